"""Recipes: every training decision of a profile, read from the `training:` mapping of
configs/<profile>.yaml (the reasons for each value are written there)."""
from __future__ import annotations

from dataclasses import dataclass

from ..config import ConfigError, Profile, check_fields

ARMS = ("sft", "at", "lat")


@dataclass(frozen=True)
class Recipe:
    data: str                     # "refusal_mix" (offline, built here) | "hh_chosen" (Anthropic HH, hub)
    n_harmful: int                # refusal_mix: harmful prompts paired with refusals
    n_harmless: int               # refusal_mix: harmless prompts paired with the base model's answers
    n_hh: int                     # hh_chosen: first n "chosen" conversations after shuffle(seed=42)
    response_tokens: int          # refusal_mix: greedy tokens generated per target answer
    max_seq_len: int              # longer examples are cut (prompt first, so the response is cut)
    epsilon: float                # L2 radius of delta per example, in `epsilon_unit`
    attack_steps: int
    lat_layer: int                # block whose input LAT perturbs (AT always uses block 0)
    lora_r: int
    lora_alpha: int
    lora_dropout: float
    target_modules: tuple
    lr: float
    weight_decay: float
    max_grad_norm: float
    warmup_ratio: float           # linear warm-up over this share of the steps, then constant (Casper)
    epochs: int
    batch_size: int
    seed: int
    adapters: str                 # output folder, relative to the repo; one sub-folder per arm
    refusal: str = "I'm sorry, but I can't help with that."  # target when the base model did not refuse
    # "absolute": epsilon in units of the residual stream, the same for AT and LAT (the paper).
    # "token_norm": epsilon x (median token norm at the perturbed block) x sqrt(median length), i.e.
    # each attacked arm gets the radius that is this fraction of its layer's typical per-token norm.
    epsilon_unit: str = "absolute"


def recipe(profile: Profile, overrides: dict | None = None) -> Recipe:
    """The profile's `training:` mapping, then `overrides` (e.g. {"epsilon": 0.0} in tests)."""
    if not profile.training:
        raise ConfigError(f"profile '{profile.name}' has no training recipe; add a `training:` mapping "
                          f"with the keys of refusal_lat.training.Recipe")
    out = Recipe(**check_fields(Recipe, {**profile.training, **(overrides or {})},
                                f"training recipe of '{profile.name}'"))
    if out.epsilon_unit not in ("absolute", "token_norm"):
        raise ConfigError(f"training recipe: epsilon_unit {out.epsilon_unit!r} not in ['absolute', 'token_norm']")
    if out.data not in ("refusal_mix", "hh_chosen"):
        raise ConfigError(f"training recipe: data {out.data!r} not in ['refusal_mix', 'hh_chosen']")
    if out.epsilon < 0 or out.attack_steps < 1 or out.batch_size < 1 or out.epochs < 1:
        raise ConfigError("training recipe: need epsilon >= 0, attack_steps >= 1, batch_size >= 1, epochs >= 1")
    return out


def perturb_layer(rec: Recipe, arm: str) -> int | None:
    """Block whose input the arm perturbs: None (sft), 0 (at: the embeddings), rec.lat_layer (lat)."""
    if arm not in ARMS:
        raise ConfigError(f"unknown arm {arm!r}; valid arms: {list(ARMS)}")
    return {"sft": None, "at": 0, "lat": rec.lat_layer}[arm]
