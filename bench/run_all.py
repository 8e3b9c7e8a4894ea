"""`make bench`: capture, generation, series and arm-evaluation benchmarks on one profile, the training speed
per arm (from the committed logs), and (on cpu, or with --suite) the fast test suite and the tiny notebook
series, into BENCHMARKS.md.

    .venv/bin/python bench/run_all.py                  # cpu -> BENCHMARKS.md (~40 min on 2 idle cores)
    .venv/bin/python bench/run_all.py --profile tiny   # seconds, meaningless numbers -> runs/tiny/BENCHMARKS.md

The model is loaded once (load_model(profile, "base")); each part is a module with run().
bench/gpu.py is separate (it needs CUDA) and writes its own section of BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import _util
import arms_eval
import capture
import generation
import series
import suite
import train_speed
from _util import table
from refusal_lat.config import REPO, load_profile, run_dir  # noqa: E402
from refusal_lat.models.load import load_model  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default="cpu")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", default="auto", help="torch CPU threads, or auto (see _util.set_threads)")
    parser.add_argument("--out", help="markdown file (default: BENCHMARKS.md for cpu, runs/<profile>/BENCHMARKS.md else)")
    parser.add_argument("--suite", action=argparse.BooleanOptionalAction, default=None,
                        help="also time the fast test suite and the tiny series (default: on the cpu profile only)")
    args = parser.parse_args()
    profile = load_profile(args.profile)
    out = Path(args.out) if args.out else (REPO / "BENCHMARKS.md" if profile.name == "cpu"
                                           else run_dir(profile) / "BENCHMARKS.md")
    note = _util.set_threads(args.threads)
    started, machine = time.time(), _util.machine()
    model, tok = load_model(profile, "base")
    n_capture = capture.SIZES.get(profile.name, capture.SIZES["cpu"])["prompts"]
    parts = [("Activation capture", capture.run(model, tok, profile, n_capture, args.reps)),
             ("Generation", generation.run(model, tok, profile, args.reps)),
             ("Notebook series", series.run(profile.name)),
             ("Arm evaluation", arms_eval.run(profile.name, reps=1)),
             ("Training speed per arm", train_speed.run(profile.name))]
    if args.suite or (args.suite is None and profile.name == "cpu"):
        parts.append(("Fast suite and tiny series", suite.run()))
    targets = [t for _, (_, ts) in parts for t in ts]
    summary = table(["target", "measured", "met"],
                    [[name, value, "-" if met is None else ("yes" if met else "**no**")] for name, value, met in targets])
    body = (f"## Profile `{profile.name}` ({profile.models['base'].id}, {profile.dtype})\n\n"
            f"Started {machine}; {note}. Bench wall time {(time.time() - started) / 60:.1f} min; load average at the end "
            f"{', '.join(f'{x:.1f}' for x in os.getloadavg())}.\n\n{summary}\n\n"
            + "\n\n".join(f"### {title}\n\n{md.replace('### ', '#### ')}" for title, (md, _) in parts))
    _util.update_section(out, profile.name, body)
    text = out.read_text()
    if profile.name == "cpu" and ("<!-- bench:gpu -->" not in text or "Not measured yet" in text):
        _util.update_section(out, "gpu", "## GPU: Llama-2-7B shape\n\nNot measured yet: no GPU was lent to the session "
                             "that wrote this file. On a CUDA machine run `python bench/gpu.py` (about 5 minutes "
                             "after the model is built); it replaces this section.")
    print(body)
    print(f"\nwritten to {out}")


if __name__ == "__main__":
    main()
