"""Recipes: every training decision of a profile, read from the `training:` mapping of
configs/<profile>.yaml (the reasons for each value are written there)."""
from __future__ import annotations

from dataclasses import dataclass

from ..config import ConfigError, Profile, check_fields

ARMS = ("sft", "at", "lat", "rand")


@dataclass(frozen=True)
class Recipe:
    data: str                     # "refusal_mix" (offline, built here) | "hh_chosen" (Anthropic HH, hub)
    n_harmful: int                # refusal_mix: harmful prompts drawn (before keeping the base's refusals)
    n_harmless: int               # refusal_mix: harmless prompts drawn (before dropping the base's refusals)
    n_hh: int                     # hh_chosen: first n "chosen" conversations after shuffle(seed=42)
    response_tokens: int          # refusal_mix: greedy tokens generated per target answer
    max_seq_len: int              # longer examples are cut (prompt first, so the response is cut)
    epsilon: float                # radius of delta for LAT (and rand), in `epsilon_unit`
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
    batch_size: int               # attacked (harmful / hh) examples per optimiser step
    seed: int
    adapters: str                 # output folder, relative to the repo; one sub-folder per arm (and seed)
    refusal: str = "I'm sorry, but I can't help with that."  # v1 target when the base model did not refuse
    # "absolute": epsilon in units of the residual stream, the same for AT and LAT (the paper).
    # "token_norm": epsilon x (median token norm at the perturbed block) x sqrt(median length): one L2
    #   ball over each example's whole sequence (v1).
    # "token_ball": every token's delta has L2 norm <= epsilon x (median token norm at the block), so
    #   the attack cannot pile its budget onto one token (v2).
    epsilon_unit: str = "absolute"
    epsilon_at: float | None = None  # AT's radius when it differs from LAT's (calibrated per arm); None: epsilon
    # v2 (issue 23); the defaults reproduce v1
    harmful_pool: str = "train"        # "train": refusal_direction harmful_train | "train+test": + its harmful_test
    harmful_targets: str = "mixed"     # "mixed": base refusal, else Recipe.refusal | "own_refusals": only
                                       # prompts the base refused, its refusal as the target
    harmless_targets: str = "all"      # "all" | "non_refusals": only harmless prompts the base answered
    max_same_target: int = 0           # keep at most this many examples with one identical target (0: all)
    harmless_per_step: int = 0         # clean harmless examples per step beside the attacked batch (0: one stream)
    harmless_weight: float = 1.0       # weight of the clean harmless loss against the attacked loss
    kl_weight: float = 0.0             # KL(base || adapted) on harmless response tokens (adapter disabled = base)
    attack_positions: str = "all"      # "all" (Casper) | "prompt": delta only on prompt tokens (targeted LAT)
    steps: int = 0                     # optimiser steps (0: epochs over the attacked examples, v1)
    train_dtype: str = ""              # dtype of the frozen base while training ("" = profile dtype); LoRA fp32
    guard_every: int = 0               # every n steps: refusal log-odds on validation prompts (0: off)
    guard_prompts: int = 32            # validation prompts per class for the guard
    guard_tolerance: float = 0.10      # stop when the harmless share with refusal log-odds > 0 rises by more
    eval_prompts: int = 100            # notebook 05: held-out harmful and harmless prompts, each
    eval_tokens: int = 32              # notebook 05: greedy tokens per judged completion
    eval_attack_steps: int = 6         # notebook 05: PGD steps of the held-out evaluation attack
    arms: tuple = ARMS                 # what `make train` and notebook 00 train
    seeds: tuple = ()                  # training seeds (LoRA init, order, attack noise); () = (seed,)


def recipe(profile: Profile, overrides: dict | None = None) -> Recipe:
    """The profile's `training:` mapping, then `overrides` (e.g. {"epsilon": 0.0} in tests)."""
    if not profile.training:
        raise ConfigError(f"profile '{profile.name}' has no training recipe; add a `training:` mapping "
                          f"with the keys of refusal_lat.training.Recipe")
    out = Recipe(**check_fields(Recipe, {**profile.training, **(overrides or {})},
                                f"training recipe of '{profile.name}'"))
    choices = {"epsilon_unit": ("absolute", "token_norm", "token_ball"), "data": ("refusal_mix", "hh_chosen"),
               "harmful_pool": ("train", "train+test"),
               "harmful_targets": ("mixed", "own_refusals"), "harmless_targets": ("all", "non_refusals"),
               "attack_positions": ("all", "prompt"), "train_dtype": ("", "float32", "bfloat16", "float16")}
    for key, allowed in choices.items():
        if getattr(out, key) not in allowed:
            raise ConfigError(f"training recipe: {key} {getattr(out, key)!r} not in {list(allowed)}")
    if out.epsilon < 0 or out.attack_steps < 1 or out.batch_size < 1 or out.epochs < 1:
        raise ConfigError("training recipe: need epsilon >= 0, attack_steps >= 1, batch_size >= 1, epochs >= 1")
    unknown = [a for a in out.arms if a not in ARMS]
    if unknown:
        raise ConfigError(f"training recipe: unknown arm(s) {unknown}; valid arms: {list(ARMS)}")
    if out.epsilon_at is not None and out.epsilon_at < 0:
        raise ConfigError("training recipe: need epsilon_at >= 0 (or leave it out to use epsilon)")
    return out


def perturb_layer(rec: Recipe, arm: str) -> int | None:
    """Block whose input the arm perturbs: None (sft), 0 (at: the embeddings), rec.lat_layer (lat, and
    rand: the random-perturbation control at LAT's block with LAT's radius)."""
    if arm not in ARMS:
        raise ConfigError(f"unknown arm {arm!r}; valid arms: {list(ARMS)}")
    return {"sft": None, "at": 0, "lat": rec.lat_layer, "rand": rec.lat_layer}[arm]


def arm_epsilon_value(rec: Recipe, arm: str) -> float:
    """The arm's epsilon in rec.epsilon_unit (0 for sft)."""
    if arm == "sft":
        return 0.0
    return rec.epsilon_at if arm == "at" and rec.epsilon_at is not None else rec.epsilon


def training_seeds(rec: Recipe) -> list[int]:
    return list(rec.seeds) or [rec.seed]
