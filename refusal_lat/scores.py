"""The transfer matrix by refusal score: for every target model and every source direction (and none),
each eval prompt's first-token refusal log-odds (selection.refusal_score) with the source's direction
ablated at every block input. Forward passes only, no generation, so every profile can afford all
520 eval prompts; it sits beside the generation-based matrix of units.py and shares its row format
(stats.log_odds_matrix reads either). Cells are cached one JSONL per (target, source, layer)."""
from __future__ import annotations

from pathlib import Path

from .config import Profile
from .models import pool
from .models.load import model_fingerprint
from .selection import subspace_refusal_log_odds
from .store import VERSIONS, cached, encode_jsonl, read_jsonl, stable_hash, tensor_hash
from .units import NO_ABLATION, unit_direction


def score_path(run: Path, target: str, source: str, layer: int | None) -> Path:
    """runs/<profile>/scores/<target>__<source>_L<layer>.jsonl."""
    tag = "none" if source == NO_ABLATION else f"{source}_L{layer}"
    return run / "scores" / f"{target}__{tag}.jsonl"


def score_key(profile: Profile, target: str, source: str, layer, direction, prompts: list[str]) -> dict:
    return {"stage": VERSIONS["scores"], "target": model_fingerprint(profile, target), "source": source,
            "layer": layer, "direction": None if direction is None else tensor_hash(direction),
            "dtype": profile.gen_dtype, "quantization": profile.quantization, "template": profile.template,
            "refusal_tokens": profile.refusal_tokens, "prompts": stable_hash(prompts), "rows": len(prompts)}


def refusal_score_matrix(profile: Profile, run: Path, prompts: list[str], dirs_by_role: dict,
                         units: list[tuple[str, str, int | None]]) -> dict:
    """{(target, source, layer): rows} with rows {"i", "prompt", "refusal_log_odds"} for each unit
    (units.transfer_units gives the matrix); computed target by target in profile.gen_dtype, the
    source's direction at `layer` projected out everywhere (a rank-1 subspace ablation)."""
    out = {}
    for target in dict.fromkeys(t for t, _, _ in units):
        for unit in [u for u in units if u[0] == target]:
            _, source, layer = unit
            direction = unit_direction(profile, dirs_by_role, source, layer)

            def compute(info, direction=direction):
                model, tokenizer = pool.use_model(profile, target, profile.gen_dtype)
                basis = None if direction is None else direction[None]
                scores = subspace_refusal_log_odds(model, tokenizer, profile, prompts, basis)
                return [{"i": i, "prompt": p, "refusal_log_odds": float(s)}
                        for i, (p, s) in enumerate(zip(prompts, scores))]

            out[unit] = cached(score_path(run, target, source, layer),
                               score_key(profile, target, source, layer, direction, prompts),
                               compute, read_jsonl, encode_jsonl)
    return out
