"""Recipes: every training decision of a profile, read from the `training:` mapping of
configs/<profile>.yaml (the reasons for each value are written there)."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

from ..config import ConfigError, Profile, check_fields, check_ranges

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
    eval_dtype: str = ""               # notebook 05: generation dtype of the evaluation ("" = the profile's)
    # v3 (issue 31): the authors' LAT at small scale
    clamp: bool = False                # perturbed block input clamped to each example's clean [min, max]
    rand_match: str = "epsilon"        # rand's radius: "epsilon" (LAT's) | "loss": the radius whose random
                                       # perturbation raises the base model's loss as much as LAT's PGD does
    arms: tuple = ARMS                 # what `make train` and notebook 00 train
    seeds: tuple = ()                  # training seeds (LoRA init, order, attack noise); () = (seed,)


# (lowest, highest) allowed; None = no bound
RANGES = {"n_harmful": (0, None), "n_harmless": (0, None), "n_hh": (0, None), "response_tokens": (0, None),
          "max_seq_len": (2, None), "epsilon": (0, None), "attack_steps": (1, None), "lat_layer": (0, None),
          "lora_r": (1, None), "lora_alpha": (1, None), "lora_dropout": (0, 1), "lr": (0, None),
          "weight_decay": (0, None), "max_grad_norm": (0, None), "warmup_ratio": (0, 1), "epochs": (1, None),
          "batch_size": (1, None), "seed": (0, None), "max_same_target": (0, None), "harmless_per_step": (0, None),
          "harmless_weight": (0, None), "kl_weight": (0, None), "steps": (0, None), "guard_every": (0, None),
          "guard_prompts": (1, None), "eval_prompts": (1, 520), "eval_tokens": (1, None), "eval_attack_steps": (1, None)}


EVAL_ONLY = ("eval_prompts", "eval_tokens", "eval_attack_steps", "eval_dtype")  # notebook 05's settings: not training


def training_fields(recipe_dict: dict) -> dict:
    """A recipe (as a dict, e.g. from a train log) without the evaluation-only keys: what decides an adapter.
    Keys the log predates (added to Recipe later, e.g. v3's clamp) count with their default, which is
    what the adapter was trained with."""
    defaults = {f.name: f.default for f in dataclasses.fields(Recipe) if f.default is not dataclasses.MISSING}
    full = {**json.loads(json.dumps(defaults)), **recipe_dict}
    return {k: v for k, v in full.items() if k not in EVAL_ONLY}


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
               "attack_positions": ("all", "prompt"), "rand_match": ("epsilon", "loss"), "train_dtype": ("", "float32", "bfloat16", "float16"),
               "eval_dtype": ("", "float32", "bfloat16", "float16")}
    for key, allowed in choices.items():
        if getattr(out, key) not in allowed:
            raise ConfigError(f"training recipe: {key} {getattr(out, key)!r} not in {list(allowed)}")
    check_ranges(RANGES, dataclasses.asdict(out), "training recipe")
    unknown = [a for a in out.arms if a not in ARMS]
    if unknown:
        raise ConfigError(f"training recipe: unknown arm(s) {unknown}; valid arms: {list(ARMS)}")
    if out.epsilon_at is not None and out.epsilon_at < 0:
        raise ConfigError("training recipe: need epsilon_at >= 0 (or leave it out to use epsilon)")
    bad_seeds = [s for s in out.seeds if not isinstance(s, int) or isinstance(s, bool) or s < 0]
    if bad_seeds:
        raise ConfigError(f"training recipe: seeds must be integers >= 0, got {bad_seeds}")
    return out


def check_selection(arms, seeds, threads: int | None = None) -> tuple[list[str], list[int]]:
    """The arms and seeds a command line names (and its --threads): known arms, seeds >= 0, at least one
    of each, threads >= 1; else a one-line ConfigError."""
    arms, seeds = list(arms), list(seeds)
    unknown = [a for a in arms if a not in ARMS]
    if unknown or not arms:
        raise ConfigError(f"unknown arm(s) {unknown}; valid arms: {list(ARMS)}" if unknown else
                          f"no arm named; valid arms: {list(ARMS)}")
    if not seeds or any(not isinstance(s, int) or s < 0 for s in seeds):
        raise ConfigError(f"seeds must be integers >= 0, got {seeds}")
    if threads is not None and threads < 1:
        raise ConfigError(f"threads = {threads} is out of range; need threads >= 1")
    return list(dict.fromkeys(arms)), list(dict.fromkeys(seeds))


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
