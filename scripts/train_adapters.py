"""Train the SFT / AT / LAT LoRA adapters of a profile (training.py) and record how they were made.

    python scripts/train_adapters.py --profile cpu --arms sft at lat
    python scripts/train_adapters.py --profile tiny --set epsilon=0.2 --out /tmp/adapters

Each arm goes to <out>/<arm>/ (default: the recipe's `adapters` folder): the PEFT adapter, its
training log (JSON + CSV) and COMMAND.txt with the exact command line, the git commit and the time.
<out>/summary.csv has one row per arm.
"""
import argparse
import shlex
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def parse_set(items: list[str]) -> dict:
    """--set key=value (value parsed as YAML: 4 -> int, 2.5e-4 -> float, [q_proj] -> list)."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"error: --set expects key=value, got {item!r}")
        out[key.strip()] = yaml.safe_load(value)
    return out


def git_state() -> str:
    def git(*args):
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True).stdout.strip()
    commit = git("rev-parse", "HEAD") or "unknown"
    dirty = " (with uncommitted changes)" if git("status", "--porcelain", "--untracked-files=no") else ""
    return commit + dirty


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default="cpu")
    parser.add_argument("--arms", nargs="+", default=["sft", "at", "lat"])
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="override recipe keys")
    parser.add_argument("--out", help="output folder (default: the recipe's `adapters`, relative to the repo)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))
    import torch
    import helpers as H
    import training as T
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        profile = H.load_profile(args.profile)
        rec = T.recipe(profile, parse_set(args.set))
        for arm in args.arms:
            T.perturb_layer(rec, arm)
    except H.ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    out = Path(args.out) if args.out else T.adapter_root(rec)
    command = "cd " + shlex.quote(str(REPO)) + " && .venv/bin/python " + " ".join(
        shlex.quote(a) for a in [str(Path(sys.argv[0]).resolve().relative_to(REPO))
                                 if Path(sys.argv[0]).resolve().is_relative_to(REPO) else sys.argv[0], *sys.argv[1:]])
    started = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    logs = T.train_profile(profile, args.arms, parse_set(args.set), out)
    for arm, log in logs.items():
        (out / arm / "COMMAND.txt").write_text(
            f"{command}\n\n# git commit: {git_state()}\n# started: {started}\n"
            f"# arm {arm}: {log['steps']} steps, {log['seconds'] / 60:.1f} min of training on "
            f"{log['threads']} torch threads\n")
    table = T.summary(logs)
    table.to_csv(out / "summary.csv", index=False)
    print(table.to_string(index=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
