"""Training v3 (issue 31; docs/training.md, "Training v3"): the authors' LAT at small scale, as a sweep
over the adversary's budget.

The `sweep:` mapping of configs/<profile>.yaml names the points. Each point is the profile's `training:`
recipe with the sweep's `recipe` overrides (a whole-sequence L2 ball, every position, clamped to the
clean range, 6 PGD steps) and one relative budget b: the absolute radius is
b x (median token norm at the perturbed block) x sqrt(median example length) (epsilon_unit token_norm),
the same b for AT (embeddings) and LAT (lat_layer). Read per token, b is the share of a typical token's
norm the adversary has on every token if it spreads the budget evenly; b x sqrt(length) is the share of
one token's norm if it concentrates the budget on one token.

The authors' budget in these units: eps = 8 at the input of Llama-2's block 4, where a median token's
norm is about 3.8, over HH conversations of 100-300 tokens: b = 8 / (3.8 x sqrt(100..300)) = 0.12-0.21
spread, or 8 / 3.8 = 2.1 token norms concentrated (AUTHORS_BUDGET).

Each point trains into <adapters>/<tag>/<arm>-s<seed>/ (tag: eps<b>); SFT, which no budget changes,
trains once per seed into <adapters>/eps0/. At the `chosen` budget the `chosen_arms` train with every
seed of `chosen_seeds`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from ..config import ConfigError, Profile, check_fields
from .recipe import ARMS

AUTHORS_EPSILON = 8.0          # lat.py --epsilon=8 (whole-sequence L2 norm)
AUTHORS_TOKEN_NORM = 3.8       # median token norm at the input of Llama-2-7b-chat's block 4
AUTHORS_LENGTHS = (100, 300)   # HH conversations, tokens


def authors_budget() -> dict:
    """The authors' eps = 8 as a relative budget: spread over 100 and 300 tokens, and concentrated."""
    spread = [AUTHORS_EPSILON / (AUTHORS_TOKEN_NORM * math.sqrt(n)) for n in AUTHORS_LENGTHS]
    return {"spread_low": min(spread), "spread_high": max(spread),
            "concentrated": AUTHORS_EPSILON / AUTHORS_TOKEN_NORM}


@dataclass(frozen=True)
class Sweep:
    adapters: str                 # folder (relative to the repo) holding one sub-folder per budget
    budgets: tuple                # relative budgets b (see the module)
    arms: tuple                   # arms trained at every budget (one seed each: `seeds`)
    seeds: tuple
    recipe: dict = field(default_factory=dict)   # overrides of the profile's training recipe
    chosen: float = 0.0           # the budget that gets several seeds (0: none yet)
    chosen_arms: tuple = ()
    chosen_seeds: tuple = ()


def sweep_of(profile: Profile) -> Sweep:
    if not profile.sweep:
        raise ConfigError(f"profile '{profile.name}' has no budget sweep; add a `sweep:` mapping with the keys "
                          f"of refusal_lat.training.sweep.Sweep (configs/cpu.yaml has one)")
    out = Sweep(**check_fields(Sweep, profile.sweep, f"sweep of '{profile.name}'"))
    bad = [b for b in out.budgets if not isinstance(b, (int, float)) or b <= 0]
    if bad or not out.budgets:
        raise ConfigError(f"sweep: budgets must be numbers > 0, got {list(out.budgets)}")
    unknown = [a for a in (*out.arms, *out.chosen_arms) if a not in ARMS]
    if unknown:
        raise ConfigError(f"sweep: unknown arm(s) {unknown}; valid arms: {list(ARMS)}")
    if out.chosen and out.chosen not in out.budgets:
        raise ConfigError(f"sweep: chosen budget {out.chosen} is not one of the budgets {list(out.budgets)}")
    return out


def tag(budget: float) -> str:
    """A budget's folder name: eps0.14 (eps0: SFT, unperturbed)."""
    return f"eps{budget:g}"


def point_overrides(sw: Sweep, budget: float) -> dict:
    """The training-recipe overrides of one sweep point (budget 0: the SFT point)."""
    return {**sw.recipe, "epsilon": float(budget), "epsilon_at": float(budget),
            "adapters": f"{sw.adapters}/{tag(budget)}"}


def points(sw: Sweep) -> list[tuple[float, str, int]]:
    """Every (budget, arm, seed) the sweep trains: SFT at budget 0 for every seed used anywhere, each arm
    at each budget with `seeds`, then the chosen budget's arms with `chosen_seeds`."""
    jobs = [(0.0, "sft", s) for s in dict.fromkeys((*sw.seeds, *(sw.chosen_seeds if sw.chosen else ())))]
    jobs += [(b, a, s) for b in sw.budgets for a in sw.arms if a != "sft" for s in sw.seeds]
    if sw.chosen:
        jobs += [(sw.chosen, a, s) for a in sw.chosen_arms if a != "sft" for s in sw.chosen_seeds]
    return list(dict.fromkeys(jobs))


def point_folder(sw: Sweep, budget: float, arm: str, seed: int) -> str:
    """<adapters>/<tag>/<arm>-s<seed>, relative to the repo."""
    return f"{sw.adapters}/{tag(0.0 if arm == 'sft' else budget)}/{arm}-s{seed}"
