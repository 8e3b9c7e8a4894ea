"""The notebooks' one import: `import helpers as H`. Every name here is defined in a stage module of
refusal_lat/ (docs/design.md); read and patch it there. The order follows the data flow:
profile -> data -> models -> prompts -> activations -> SVD -> directions -> generation -> judges ->
statistics -> layer selection -> report -> figures (H.plots draws each figure in H.style's one look).
"""
from refusal_lat.config import (  # noqa: F401
    REPO,
    ConfigError,
    DataError,
    ModelSpec,
    Profile,
    available_profiles,
    figure_dir,
    load_profile,
    model_role_spec,
    paper_recipe_note,
    run_dir,
    start,
)
from refusal_lat.data import (  # noqa: F401
    DATA_FILES,
    PromptSets,
    data_file,
    data_search_dirs,
    eval_pool,
    evenly_spaced,
    paper_splits,
    prompt_sets,
    refusal_direction_splits,
    truncate,
    validation_sets,
)
from refusal_lat.models.load import (  # noqa: F401
    decoder_layers,
    free_memory,
    load_model,
    load_tokenizer,
    model_fingerprint,
    prepare_tokenizer,
    tiny_model,
    tiny_tokenizer,
)
from refusal_lat.models.pool import invalidate, use_model  # noqa: F401
from refusal_lat.prompts import format_prompt, position_ids, read_tokens, tokenize  # noqa: F401
from refusal_lat.hooks import (  # noqa: F401
    ablation,
    activation_addition,
    block_input_edits,
    capture_block_inputs,
    orthogonalize_,
)
from refusal_lat.prefix import forward_after_prefix, prefill_shared_prefix  # noqa: F401
from refusal_lat.store import StoreError, atomic_write, stable_hash, write_failure  # noqa: F401
from refusal_lat.activations import (  # noqa: F401
    activation_key,
    activation_metadata,
    activations,
    adjacent_layer_cosines,
    block_inputs,
    check_finite,
    mean_difference,
    trunk_forward,
)
from refusal_lat.svd import (  # noqa: F401
    auroc,
    bootstrap_indices,
    bootstrap_ratios,
    intervals,
    paired_differences,
    paired_model_differences,
    profile_paired_differences,
    second_direction_table,
    second_direction_tests,
    explained_variance_ratio,
    layer_activations,
    mean_difference_norms,
    pca_2d,
    repairing_null,
    repairing_nulls,
    svd_summary,
    svd_table,
)
from refusal_lat.directions import direction_cosines, directions, refusal_directions  # noqa: F401
from refusal_lat.generation import (  # noqa: F401
    Generation,
    append_token,
    crossed_end_of_turn,
    decode_step,
    end_of_turn,
    end_of_turn_ids,
    generate,
    generate_tokens,
    greedy_tokens,
    start_decoding,
)
from refusal_lat.units import NO_ABLATION, generation_units, transfer_units, unit_groups, unit_path, unit_row  # noqa: F401
from refusal_lat.judges import METHODS, classify, judge_inputs, success_judges  # noqa: F401
from refusal_lat.stats import (  # noqa: F401
    agreement,
    corrected_rate_interval,
    holm,
    judge_errors,
    like_labelled,
    log_odds_matrix,
    mcnemar,
    mcnemar_table,
    rate_summary,
    rogan_gladen,
    score_units,
    sign_flip_p,
    validation_domain,
    wilson,
)
from refusal_lat.selection import (  # noqa: F401
    MAX_KL,
    NO_BEST_LAYER,
    best_layer_paper_rule,
    harmless_checks,
    kl_divergence,
    last_token_logprobs,
    refusal_score,
    refusal_token_ids,
    second_component_table,
    second_component_tests,
    select_layer,
    selection_scores,
    selection_table,
)
from refusal_lat.scores import refusal_score_matrix, score_path  # noqa: F401
from refusal_lat import massive  # noqa: F401  (massive-activation channels: H.massive.*)
from refusal_lat import released  # noqa: F401  (the authors' released Llama-2 files: H.released.*)
from refusal_lat import claims  # noqa: F401  (the paper's claims as directional tests: H.claims.*)
from refusal_lat.reference import AUTHORS_FROBENIUS, AUTHORS_FROBENIUS_PAIRS, PAPER_SVD, PAPER_SWEEP_BEST, PAPER_SWEEP_REFUSAL, PAPER_TABLE1  # noqa: F401
from refusal_lat.report import (  # noqa: F401
    PAPER_COLUMN,
    activation_findings,
    compares_to_paper,
    error_bars,
    markdown_table,
    mcnemar_findings,
    overlap_words,
    separation_words,
    saturation_findings,
    score_matrix_findings,
    selection_findings,
    summary_table,
    svd_beside_paper,
    svd_findings,
    transfer_beside_paper,
)


def __getattr__(name):
    """H.plots (every figure of the series) and H.style (its one look) import matplotlib on first use only."""
    if name in ("plots", "style"):
        import importlib
        return importlib.import_module(f"refusal_lat.{name}")
    raise AttributeError(f"module 'helpers' has no attribute {name!r}")


def sweep_tables(profile, run):
    """Notebook 07: (sweep, tables) of training v3's budget sweep (refusal_lat.training.sweep_eval.tables_for)."""
    from refusal_lat.training.sweep_eval import tables_for
    return tables_for(profile, run)
