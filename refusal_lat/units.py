"""Generation units: one JSONL per (target model, direction source, layer), written atomically as it
finishes, so a killed run resumes at the unit it was in. Rows: unit_row."""
from __future__ import annotations

import time
from pathlib import Path

import torch

from . import generation
from .config import ConfigError, Profile, model_role_spec
from .models import pool
from .models.load import model_fingerprint
from .store import VERSIONS, StoreError, encode_jsonl, fresh, read_jsonl, stable_hash, store, tensor_hash


NO_ABLATION = "none"


def unit_path(run: Path, target: str, source: str, layer: int | None, kind: str = "eval") -> Path:
    """runs/<profile>/generations/<kind>/<target>__<source>_L<layer>.jsonl; kind names the prompt set."""
    tag = "none" if source == NO_ABLATION else f"{source}_L{layer}"
    return run / "generations" / kind / f"{target}__{tag}.jsonl"


def unit_key(profile: Profile, target: str, source: str, layer, direction, prompts: list[str],
             stop_at_eos: bool) -> dict:
    direction_hash = None if direction is None else tensor_hash(direction)
    return {"stage": VERSIONS["generation"], "target": model_fingerprint(profile, target),
            "source": source, "layer": layer, "direction": direction_hash, "dtype": profile.gen_dtype,
            "quantization": profile.quantization, "template": profile.template,
            "max_new_tokens": profile.max_new_tokens, "stop_at_eos": stop_at_eos, "prompts": stable_hash(prompts),
            "exact_paper_path": profile.exact_paper_path,
            "rows": len(prompts)}


def unit_row(i: int, prompt: str, out: generation.Generation, k: int, log_odds: float) -> dict:
    """One JSONL row: the full completion (everything generated, for display), the model's own turn
    (text before the first end-of-turn token; the judges read it), that token's index (None: the turn
    never ended), whether anything was generated after it, and the first token's refusal log-odds
    (generation.refusal_score under the same intervention: a continuous companion of the judges)."""
    return {"i": i, "prompt": prompt, "completion": out.texts[k], "turn": out.turns[k],
            "end_of_turn": out.end_of_turn[k], "crossed_end_of_turn": out.crossed[k], "refusal_log_odds": log_odds}


def unit_direction(profile: Profile, dirs_by_role: dict, source: str, layer: int | None):
    """The [d] direction a unit ablates: `source`'s at `layer`, None for NO_ABLATION; an unknown model
    or a layer outside its block inputs is a one-line ConfigError."""
    if source == NO_ABLATION:
        return None
    model_role_spec(profile, source)
    n_layers = dirs_by_role[source].shape[0]
    if not 0 <= layer < n_layers:
        raise ConfigError(f"model '{source}': layer {layer} out of range; it has block inputs 0..{n_layers - 1}")
    return dirs_by_role[source][layer]


def unit_groups(pending: list, n_prompts: int, batch_size: int) -> list[list]:
    """Split one model's pending units into as few generation batches as batch_size allows, of even
    size: on a CPU a 320-row batch decodes about 1.4x faster per row than a 64-row one (BENCHMARKS.md).
    With batch_size < 2 x n_prompts every unit runs on its own."""
    per_batch = max(1, batch_size // max(1, n_prompts))
    n_groups = -(-len(pending) // per_batch)
    size = -(-len(pending) // max(1, n_groups))
    return [pending[i:i + size] for i in range(0, len(pending), size)]


def generation_units(profile: Profile, run: Path, prompts: list[str], dirs_by_role: dict,
                     units: list[tuple[str, str, int | None]], stop_at_eos: bool = False, kind: str = "eval") -> dict:
    """Completions for each (target, source, layer) unit; source NO_ABLATION means no intervention.
    Finished units are read back; the rest are generated target by target (one model in memory), several
    units of a target in one batch when batch_size holds them (one direction per row), each written as
    soon as its batch is done."""
    results, todo = {}, {}
    for target, source, layer in units:
        model_role_spec(profile, target)
        direction = unit_direction(profile, dirs_by_role, source, layer)
        key = unit_key(profile, target, source, layer, direction, prompts, stop_at_eos)
        path = unit_path(run, target, source, layer, kind)
        rows = fresh(path, key, read_jsonl)
        if rows is not None:
            results[(target, source, layer)] = rows
        else:
            todo.setdefault(target, []).append((source, layer, direction, key, path))
    for target, pending in todo.items():
        model, tokenizer = pool.use_model(profile, target, profile.gen_dtype)
        batch_size = exact_batch_size(profile, target) if profile.exact_paper_path else profile.batch_size
        groups = [[unit] for unit in pending] if profile.exact_paper_path else unit_groups(pending, len(prompts), batch_size)
        for group in groups:
            started = time.time()
            if len(group) == 1:
                directions = group[0][2]
            else:  # one direction per row; a zero row means no ablation
                directions = torch.stack([torch.zeros(model.config.hidden_size) if d is None else d.float()
                                          for _, _, d, _, _ in group for _ in prompts])
            names = ", ".join(source + ("" if layer is None else f" L{layer}") for source, layer, *_ in group)
            out = generation.generate_tokens(model, tokenizer, profile, prompts * len(group), directions, stop_at_eos,
                                             desc=f"{target} <- {names}", return_logits=True, batch_size=batch_size,
                                             share_prefix=not profile.exact_paper_path)
            if len(out.texts) != len(prompts) * len(group):
                raise StoreError(f"generation returned {len(out.texts)} completions for {len(prompts) * len(group)} "
                                 f"prompts ({target} <- {names}); refusing to save units with no or too few rows")
            log_odds = generation.refusal_score(torch.log_softmax(out.first_logits.double(), -1),
                                                generation.refusal_token_ids(tokenizer, profile)).tolist()
            seconds = round((time.time() - started) / len(group), 1)
            for i, (source, layer, direction, key, path) in enumerate(group):
                rows = [unit_row(j, p, out, i * len(prompts) + j, log_odds[i * len(prompts) + j])
                        for j, p in enumerate(prompts)]
                store(path, key, encode_jsonl(rows), rows=len(rows), seconds=seconds, units_in_batch=len(group))
                results[(target, source, layer)] = rows
        del model  # the next use_model may load another model
    return {u: results[u] for u in units}


PAPER_BATCH_SIZES = (16, 12)  # the authors' generation batches: the base model, then AT and LAT


def exact_batch_size(profile: Profile, target: str) -> int:
    """exact_paper_path: 16 rows per generation batch for the base model (the profile's first role),
    12 for the others, as the authors ran them."""
    return PAPER_BATCH_SIZES[0] if target == profile.roles[0] else PAPER_BATCH_SIZES[1]


def transfer_units(profile: Profile, layer: int | None = None) -> list[tuple]:
    """(target, source, layer) for the no-ablation row and the full N x N matrix."""
    layer = profile.layer if layer is None else layer
    return [(t, NO_ABLATION, None) for t in profile.roles] + [(t, s, layer) for t in profile.roles for s in profile.roles]
