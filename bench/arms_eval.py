"""One arm's evaluation (notebook 05: five conditions on the recipe's held-out prompts, then its row of
the transfer matrix), one condition at a time (evaluate.condition_outputs, as evaluate_model runs by
default) vs batched (condition_outputs(batched=True)), timed side by side in one process, interleaved
after a warm-up on 2 prompts; the labels compared row by row. Where the time goes: CPU seconds inside
the attack (PGD forward + backward), the separate log-odds forward, and generation (prefill + decode).
The activations and the direction (float32) are computed once, outside the comparison, and timed once,
as is one transfer cell (a forward pass over the harmful prompts with a direction ablated).

    .venv/bin/python bench/arms_eval.py [--profile cpu] [--role lat-s0] [--reps 1] [--n 100] [--dtype float32]
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import time

import numpy as np

from _util import compare, med, ratio, spread, table
from refusal_lat.activations import block_inputs  # noqa: E402
from refusal_lat.config import load_profile  # noqa: E402
from refusal_lat.data import prompt_sets  # noqa: E402

import training as T
from refusal_lat.models import pool
from refusal_lat.training import evaluate as E
from refusal_lat.training import robustness as R

PATHS = {"one condition at a time": False, "batched": True}


def phase_timer(spent: collections.Counter):
    """Wrap robustness' attack, log-odds forward and generation so that their CPU seconds add up in `spent`
    (a call inside another, e.g. the attack's own forward passes, counts for the outer one)."""
    inside = []

    def wrap(name, label):
        real = getattr(R, name)

        def timed(*args, **kwargs):
            if inside:
                return real(*args, **kwargs)
            inside.append(label)
            started = time.process_time()
            try:
                return real(*args, **kwargs)
            finally:
                spent[label] += time.process_time() - started
                inside.pop()
        setattr(R, name, timed)
        return real
    return {name: wrap(name, label) for name, label in (("prompt_attack", "attack (PGD forward + backward)"),
                                                         ("last_logits", "log-odds forward"),
                                                         ("greedy_tokens", "generation (prefill + decode)"))}


def run(profile_name: str = "cpu", role: str | None = None, reps: int = 1, n: int | None = None, log=print,
        dtype: str | None = None):
    profile = load_profile(profile_name)
    rec = T.recipe(profile, {"eval_dtype": dtype} if dtype else None)
    settings = E.settings_of(rec)
    settings = dataclasses.replace(settings, n_harmful=n, n_harmless=n) if n else settings
    arms_p = E.arms_profile(profile, rec, rec.arms, T.training_seeds(rec))
    adapters = [spec.adapter for spec in arms_p.models.values() if spec.adapter]
    role = role or list(arms_p.models)[-1]
    if adapters:
        radii, note = E.attack_radii(profile, rec, E.logged_norms(adapters)), "from the adapters' train logs"
    else:  # a checkout without trained arms (the tiny profile in CI): the cost does not depend on the radius
        radii, note = {"pgd_at": (0, 1.0), "pgd_lat": (rec.lat_layer, 1.0)}, "1.0 (no trained adapters here)"
    prompts = E.eval_prompts(settings)
    started = time.perf_counter()
    model, tok = pool.use_model(arms_p, role)
    sets = prompt_sets(arms_p)
    harmful, harmless = (block_inputs(model, tok, arms_p, p)[:, arms_p.layer] for p in (sets.harmful, sets.harmless))
    direction = harmful.mean(0) - harmless.mean(0)
    acts_s = time.perf_counter() - started
    model, tok = pool.use_model(arms_p, role, arms_p.gen_dtype)
    outputs, spent = {}, {name: collections.Counter() for name in PATHS}

    def evaluate(name, texts=prompts, phases=None):
        real = phase_timer(phases if phases is not None else collections.Counter())
        try:
            outputs[name] = E.condition_outputs(model, tok, arms_p, texts, direction, radii, settings, PATHS[name])
        finally:
            for attr, fn in real.items():
                setattr(R, attr, fn)
    small = {k: v[:2] for k, v in prompts.items()}
    times = compare({name: (lambda name=name: evaluate(name, phases=spent[name])) for name in PATHS}, reps, log=log,
                    warmup={name: (lambda name=name: evaluate(name, small)) for name in PATHS})
    from refusal_lat.selection import subspace_refusal_log_odds
    started = time.perf_counter()
    subspace_refusal_log_odds(model, tok, arms_p, prompts["harmful"], direction[None])
    cell_s = time.perf_counter() - started
    cells = len(arms_p.models) + 1  # no ablation and every model's direction, cached per cell

    slow, fast = outputs["one condition at a time"], outputs["batched"]
    rows, same_all, n_all = [], 0, 0
    for condition in E.CONDITIONS:
        texts = prompts["harmless" if condition == "harmless" else "harmful"]
        la, lb = (R.refusal_labels(out[condition]["turns"], texts) for out in (slow, fast))
        same = {j: sum(x == y for x, y in zip(la[j], lb[j])) for j in la}
        same_all += same["project"]
        n_all += len(texts)
        moved = np.abs(np.array(slow[condition]["log_odds"]) - np.array(fast[condition]["log_odds"])).max()
        rates = " / ".join(f"{np.mean(np.array(labels['project']) == 1):.3f}" for labels in (la, lb))
        turns = sum(a == b for a, b in zip(slow[condition]["turns"], fast[condition]["turns"]))
        rows.append([condition, len(texts), rates, f"{same['project']}/{len(texts)}", f"{same['substring']}/{len(texts)}",
                     f"{turns}/{len(texts)}", f"{moved:.2e}"])
    speedup = ratio(times, "one condition at a time", "batched")
    phases = sorted({p for c in spent.values() for p in c})
    full = {name: acts_s + med(times[name]) + cells * cell_s for name in PATHS}
    md = (f"Model `{role}` of profile `{profile.name}` ({arms_p.models[role].id}), weights in {arms_p.gen_dtype} "
          f"for the conditions; {settings.n_harmful} harmful + {settings.n_harmless} harmless prompts, "
          f"{settings.tokens} tokens, {settings.attack_steps} attack steps; radii {note}. Median (min-max) of {reps} "
          "after a warm-up on 2 prompts; x: median of the per-round ratios.\n\n"
          + table(["conditions", "time", "x batched"],
                  [[name, spread(times[name]), f"{ratio(times, name, 'batched'):.2f}"] for name in PATHS])
          + "\n\nCPU seconds per phase (mean of the timed runs):\n\n"
          + table(["phase", *PATHS], [[p, *(f"{spent[name][p] / reps:.1f}" for name in PATHS)] for p in phases])
          + "\n\nLabels, one condition at a time vs batched (refusal rate by the project judge, slow / batched; "
          "rows with the same label, with the same turn; the largest log-odds difference):\n\n"
          + table(["condition", "n", "project rate", "same project", "same substring", "same turn",
                   "largest log-odds difference"], rows)
          + f"\n\nThe whole evaluation of one model, estimated: activations {acts_s:.0f} s (once, float32) + the "
          f"conditions + {cells} transfer cells x {cell_s:.1f} s (read back from the cache on a rerun): "
          + ", ".join(f"{name} {full[name] / 60:.1f} min" for name in PATHS) + ".")
    targets = [("one arm's conditions batched >= 4x one at a time", f"{speedup:.2f}x", speedup >= 4),
               ("batched labels identical on >= 99 % of rows (project judge)", f"{100 * same_all / n_all:.1f} %",
                same_all >= 0.99 * n_all),
               ("one arm's whole evaluation <= 3 min (estimate, batched)", f"{full['batched'] / 60:.1f} min",
                full["batched"] <= 180)]
    return md, targets


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", default="cpu")
    ap.add_argument("--role", help="default: the last trained adapter (base without any)")
    ap.add_argument("--reps", type=int, default=1)
    ap.add_argument("--n", type=int, help="harmful and harmless prompts (default: the recipe's eval_prompts)")
    ap.add_argument("--dtype", help="generation dtype (default: the recipe's eval_dtype; float32 on a CPU "
                                    "without native bfloat16)")
    args = ap.parse_args()
    md, targets = run(args.profile, args.role, args.reps, args.n, dtype=args.dtype)
    print(f"## Arm evaluation ({args.profile})\n\n{md}\n")
    for name, value, met in targets:
        print(f"{name}: {value} ({'met' if met else 'missed'})")


if __name__ == "__main__":
    main()
