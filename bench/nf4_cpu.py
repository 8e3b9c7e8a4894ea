"""The paper's precision regime on the `cpu` profile: NF4 weights (bitsandbytes, double quantisation,
float32 compute) vs the profile's own weights, side by side on the quantities the series reports:
the SVD share of the first two components and of the second at the profile's layer, the refusal rate
without ablation and with the model's own direction ablated (paper and project judges), and the
own-direction change in first-token refusal log-odds. Same prompts, same code; only
`quantization: nf4` differs (a profile switch: overrides={"quantization": "nf4"}).

    .venv/bin/python bench/nf4_cpu.py [--profile cpu] [--roles base LAT] [--n-eval 64] [--tokens 32]
"""
from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time
from pathlib import Path

import numpy as np

from _util import table
from refusal_lat.activations import activations  # noqa: E402
from refusal_lat.config import load_profile  # noqa: E402
from refusal_lat.data import prompt_sets  # noqa: E402
from refusal_lat.directions import directions  # noqa: E402
from refusal_lat.stats import score_units  # noqa: E402
from refusal_lat.svd import svd_table  # noqa: E402
from refusal_lat.units import NO_ABLATION, generation_units  # noqa: E402


def measure(profile, roles, run: Path) -> dict:
    sets = prompt_sets(profile)
    started = time.perf_counter()
    acts = {r: activations(profile, r, sets, run) for r in roles}
    dirs = directions(run, acts)
    svd = svd_table(acts).set_index(["model", "layer", "component"])
    units = [u for r in roles for u in ((r, NO_ABLATION, None), (r, r, profile.layer))]
    rows = generation_units(profile, run, sets.eval, dirs, units)
    scores = score_units(rows, methods=["paper", "project"], judge_text=profile.judge_text).set_index(["target", "source", "method"])
    out = {}
    for r in roles:
        own = np.mean([x["refusal_log_odds"] for x in rows[(r, r, profile.layer)]])
        none = np.mean([x["refusal_log_odds"] for x in rows[(r, NO_ABLATION, None)]])
        out[r] = {"first two %": 100 * svd.loc[(r, profile.layer, 2)].cumulative,
                  "second %": 100 * svd.loc[(r, profile.layer, 2)].ratio,
                  **{f"refusal none ({m})": 100 * scores.loc[(r, NO_ABLATION, m)].refusal_rate for m in ("paper", "project")},
                  **{f"refusal own ({m})": 100 * scores.loc[(r, r, m)].refusal_rate for m in ("paper", "project")},
                  "log-odds own - none": own - none}
    out["seconds"] = time.perf_counter() - started
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--profile", default="cpu")
    ap.add_argument("--roles", nargs="+", default=["base", "LAT"])
    ap.add_argument("--n-eval", type=int, default=None, help="eval prompts (default: the profile's)")
    ap.add_argument("--tokens", type=int, default=None, help="new tokens (default: the profile's)")
    args = ap.parse_args()
    sizes = {k: v for k, v in (("n_eval", args.n_eval), ("max_new_tokens", args.tokens)) if v}
    plain = load_profile(args.profile, sizes)
    nf4 = load_profile(args.profile, {**sizes, "quantization": "nf4", "generation_dtype": ""})
    with tempfile.TemporaryDirectory() as tmp:
        a = measure(plain, args.roles, Path(tmp) / "plain")
        b = measure(nf4, args.roles, Path(tmp) / "nf4")
    rows = []
    for r in args.roles:
        for k in a[r]:
            rows.append([r, k, f"{a[r][k]:.2f}", f"{b[r][k]:.2f}", f"{b[r][k] - a[r][k]:+.2f}"])
    print(table(["model", "quantity", f"{plain.dtype} weights (generation {plain.gen_dtype})",
                 "NF4 weights (float32 compute)", "NF4 - plain"], rows))
    print(f"\n{len(prompt_sets(plain).eval)} eval prompts x {plain.max_new_tokens} tokens, layer {plain.layer}; "
          f"seconds: plain {a['seconds']:.0f}, NF4 {b['seconds']:.0f} (activations + 4 units, one process)")


if __name__ == "__main__":
    main()
