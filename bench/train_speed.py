"""Training speed per arm, read from the committed adapters' training logs (not re-timed: one cpu adapter takes
30-80 min). Each log records the seconds since the start after every step, the torch threads and the CPU time,
so a step's time is the difference of two rows; the median step is robust to a few steps slowed by other work
on the machine. The logs were written on machines shared with other jobs, so these are upper bounds for idle
cores.

    .venv/bin/python bench/train_speed.py [--profile cpu]
"""
from __future__ import annotations

import argparse

import numpy as np

from _util import table
from refusal_lat.config import REPO


def step_seconds(log: dict) -> np.ndarray:
    """Seconds of each training step (differences of the cumulative `seconds` the loop logs after each step)."""
    cumulative = np.array([0.0] + [row["seconds"] for row in log["rows"]])
    return np.diff(cumulative)


def logs_of(profile: str) -> list[tuple[str, dict]]:
    """(adapter path relative to adapters/<profile>, its log) for every committed adapter of the profile, each read
    by loop.load_log (checked against the adapter's manifest first)."""
    from refusal_lat.training.loop import load_log
    root = REPO / "adapters" / profile
    return [(str(path.parent.relative_to(root)), load_log(path.parent)) for path in sorted(root.glob("**/train_log.json"))]


def run(profile: str = "cpu"):
    rows = []
    for name, log in logs_of(profile):
        steps = step_seconds(log)
        if not len(steps):
            continue
        median = float(np.median(steps))
        rows.append([name, log["arm"], log.get("threads", "-"), len(steps), f"{median:.1f}",
                     f"{np.quantile(steps, 0.1):.1f}–{np.quantile(steps, 0.9):.1f}", f"{60 / median:.2f}",
                     f"{log['seconds'] / 60:.1f}", f"{log['cpu_seconds'] / 60:.1f}"])
    if not rows:
        return f"No committed adapters under adapters/{profile}/.", []
    md = ("Per-step time of every committed adapter, from its training log (`adapters/" + profile + "/…/train_log.json`; "
          "the machine was shared with other jobs while most of them trained, so a median step is an upper bound for "
          "idle cores). SFT's step is one forward and backward pass on the attacked batch and one on the harmless "
          "batch; AT and LAT add the attack's 6 forward and backward passes.\n\n"
          + table(["adapter", "arm", "threads", "steps", "median s / step", "10–90 % s", "steps / min",
                   "wall min", "CPU min"], rows))
    return md, []


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default="cpu")
    args = parser.parse_args()
    print(run(args.profile)[0])


if __name__ == "__main__":
    main()
