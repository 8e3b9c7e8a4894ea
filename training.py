"""Notebook 00's import: `import training as T`. Every name is defined in refusal_lat/training/."""
from refusal_lat.hooks import perturbation  # noqa: F401
from refusal_lat.training.data import (  # noqa: F401
    LLAMA2_SYSTEM,
    chat_segments,
    collate,
    data_order,
    encode,
    hh_segments,
    refusal_mix,
    training_examples,
    training_prompts,
    trim_to_sentence,
)
from refusal_lat.training.loop import (  # noqa: F401
    lora_config,
    adapter_root,
    arm_folder,
    existing_logs,
    load_arm,
    load_log,
    save_arm,
    summary,
    train_arm,
    trained_seeds,
    train_profile,
)
from refusal_lat.training.pgd import causal_lm, example_norms, pgd_attack, project_l2, project_tokens, sft_loss  # noqa: F401
from refusal_lat.training.recipe import (  # noqa: F401
    ARMS, Recipe, arm_epsilon_value, check_selection, perturb_layer, recipe, training_seeds,
)
