"""bfloat16 vs float32 generation on the CPU, side by side in one process, on the series' own path
(units.generation_units): the base model and LAT, each with no ablation and with its own direction
ablated, on the profile's eval prompts and token count. Reports tokens/s, the fraction of completions
that are token-identical, the fraction whose judge label is unchanged (every judge), and how far the
first-token refusal log-odds move. Order alternates (fp32 first for the base model, bf16 first for
LAT) so that machine drift does not favour one dtype.

The adoption rule (issue: bf16 for generation when >= 1.5x faster and <= 2 % of labels change) is
printed with the verdict; the profile records the choice as generation_dtype.

Also (--prefill): the next-token logits of a prompt batch (a forward pass, as the refusal-score
matrix runs it) through the whole model with logits_to_keep=1 vs prefix.last_position_logits (the
trunk, then the lm_head on the contiguous last hidden state), in float32 and bfloat16.

    .venv/bin/python bench/bf16.py [--profile cpu] [--roles base LAT] [--layer 12] [--prefill-only]
"""
from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time
from pathlib import Path

import numpy as np

import copy

import torch

from _util import compare, med, spread, table
from refusal_lat.activations import activations  # noqa: E402
from refusal_lat.config import load_profile  # noqa: E402
from refusal_lat.data import prompt_sets  # noqa: E402
from refusal_lat.directions import directions  # noqa: E402
from refusal_lat.judges import METHODS, classify, judge_inputs  # noqa: E402
from refusal_lat.prompts import tokenize  # noqa: E402
from refusal_lat.units import NO_ABLATION, generation_units  # noqa: E402

from refusal_lat.models import pool


def run_units(profile, run, prompts, dirs, units):
    started = time.perf_counter()
    out = generation_units(profile, run, prompts, dirs, units)
    return time.perf_counter() - started, out


@torch.no_grad()
def logits_whole_model(model, tok, profile, prompts):
    """The earlier path: the whole model with logits_to_keep=1 (the lm_head gets a strided slice)."""
    from refusal_lat.prefix import forward_after_prefix, prefill_shared_prefix
    b = tokenize(tok, profile, prompts)
    ids, mask, cache = prefill_shared_prefix(model, b["input_ids"], b["attention_mask"])
    return forward_after_prefix(model, ids, mask, cache, logits_to_keep=1).logits[:, -1]


@torch.no_grad()
def logits_trunk(model, tok, profile, prompts):
    from refusal_lat.prefix import last_position_logits, prefill_shared_prefix
    b = tokenize(tok, profile, prompts)
    ids, mask, cache = prefill_shared_prefix(model, b["input_ids"], b["attention_mask"])
    return last_position_logits(model, ids, mask, cache)[0]


def prefill(profile, prompts, reps: int = 3):
    model, tok = pool.use_model(profile, profile.roles[0])
    half = copy.deepcopy(model).to(torch.bfloat16)
    fns = {f"{name} {dtype}": (lambda f=f, m=m: f(m, tok, profile, prompts))
           for dtype, m in (("float32", model), ("bfloat16", half))
           for name, f in (("whole model", logits_whole_model), ("trunk + lm_head", logits_trunk))}
    t = compare(fns, reps)
    ref = fns["whole model float32"]().double()
    rows = []
    for k in fns:
        out = fns[k]().double()
        rows.append([k, spread(t[k]), f"{med(t['whole model float32']) / med(t[k]):.2f}x",
                     f"{(out - ref).abs().max().item():.2e}", f"{(out.argmax(-1) == ref.argmax(-1)).float().mean().item():.3f}"])
    print(f"next-token logits of {len(prompts)} prompts in one batch, median (min-max) of {reps}:")
    print(table(["variant", "time", "x whole model float32", "max |logit - float32 whole model|", "same argmax"], rows))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--profile", default="cpu")
    ap.add_argument("--roles", nargs="+", default=["base", "LAT"])
    ap.add_argument("--layer", type=int, default=None)
    ap.add_argument("--prefill-only", action="store_true")
    args = ap.parse_args()
    prefill(load_profile(args.profile), prompt_sets(load_profile(args.profile)).eval[:64])
    if args.prefill_only:
        return
    fp32 = dataclasses.replace(load_profile(args.profile), generation_dtype="float32")
    bf16 = dataclasses.replace(fp32, generation_dtype="bfloat16")
    layer = fp32.layer if args.layer is None else args.layer
    sets = prompt_sets(fp32)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        acts = {r: activations(fp32, r, sets, tmp / "acts") for r in args.roles}
        dirs = directions(tmp / "acts", acts)
        seconds, results = {"float32": 0.0, "bfloat16": 0.0}, {}
        rows = 0
        for k, role in enumerate(args.roles):
            units = [(role, NO_ABLATION, None), (role, role, layer)]
            order = [fp32, bf16] if k % 2 == 0 else [bf16, fp32]
            for prof in order:
                pool.use_model(prof, role, prof.gen_dtype)  # load and cast outside the timing
                dt, out = run_units(prof, tmp / prof.gen_dtype, sets.eval, dirs, units)
                seconds[prof.gen_dtype] += dt
                results.setdefault(prof.gen_dtype, {}).update(out)
            rows += len(units) * len(sets.eval)
    tokens = rows * fp32.max_new_tokens
    a, b = results["float32"], results["bfloat16"]
    same_tokens, same_label, moved = [], {m: [] for m in METHODS}, []
    per_unit = []
    for unit in a:
        ra, rb = a[unit], b[unit]
        same = [x["completion"] == y["completion"] for x, y in zip(ra, rb)]
        same_tokens += same
        lo = np.array([x["refusal_log_odds"] for x in ra]) - np.array([y["refusal_log_odds"] for y in rb])
        moved += list(np.abs(lo))
        unit_labels = []
        for method in METHODS:
            (ta, pa), (tb, pb) = judge_inputs(ra, fp32.judge_text), judge_inputs(rb, fp32.judge_text)
            la, lb = classify(ta, method, pa), classify(tb, method, pb)
            same_label[method] += [x == y for x, y in zip(la, lb)]
            unit_labels.append(f"{method} {np.mean(np.array(la) == 1):.2f}/{np.mean(np.array(lb) == 1):.2f}")
        per_unit.append([f"{unit[0]} <- {unit[1]}", f"{np.mean(same):.3f}", ", ".join(unit_labels)])
    speedup = seconds["float32"] / seconds["bfloat16"]
    worst_label = 1 - min(np.mean(v) for v in same_label.values())
    print(table(["", "float32", "bfloat16"], [
        ["seconds (all units)", f"{seconds['float32']:.1f}", f"{seconds['bfloat16']:.1f}"],
        ["tokens/s", f"{tokens / seconds['float32']:.1f}", f"{tokens / seconds['bfloat16']:.1f}"]]))
    print(f"\n{rows} completions x {fp32.max_new_tokens} tokens, batch {fp32.batch_size}, roles {args.roles}, layer {layer}")
    print(f"speed-up bf16/fp32: {speedup:.2f}x")
    print(f"token-identical completions: {np.mean(same_tokens):.3f} ({sum(same_tokens)}/{len(same_tokens)})")
    for method, v in same_label.items():
        print(f"label unchanged, {method} judge: {np.mean(v):.3f} ({sum(v)}/{len(v)})")
    print(f"first-token refusal log-odds |fp32 - bf16|: median {np.median(moved):.3f}, max {np.max(moved):.3f}")
    print(table(["unit", "token-identical", "refusal rate fp32/bf16 per judge"], per_unit))
    adopt = speedup >= 1.5 and worst_label <= 0.02
    print(f"\nverdict: {'adopt' if adopt else 'do not adopt'} bf16 generation "
          f"(speed-up {speedup:.2f}x vs >= 1.5; worst label change {100 * worst_label:.1f} % vs <= 2 %)")


if __name__ == "__main__":
    main()
