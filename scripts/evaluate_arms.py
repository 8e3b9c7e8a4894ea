"""Evaluate every trained arm and seed against the base model (training/evaluate.py) and write the
tables that notebook 05 reads and the README cites into <adapters>/eval/ (no completion text there;
the completions stay in runs/<profile>/arms/).

    python scripts/evaluate_arms.py --profile cpu --seeds 0 1
"""
import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default="cpu")
    parser.add_argument("--seeds", nargs="+", type=int, help="default: the recipe's seeds")
    parser.add_argument("--arms", nargs="+", help="default: the recipe's arms")
    parser.add_argument("--out", help="table folder (default: <adapters>/eval)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))
    import torch
    if args.threads:
        torch.set_num_threads(args.threads)
    import helpers as H
    import training as T
    from refusal_lat.training import evaluate as E
    profile = H.load_profile(args.profile)
    rec = T.recipe(profile)
    started = time.time()
    out = Path(args.out) if args.out else T.adapter_root(rec) / "eval"
    E.evaluate_arms(profile, rec, args.arms or list(rec.arms), args.seeds or T.training_seeds(rec),
                    E.settings_of(rec), out)
    print(f"evaluated in {(time.time() - started) / 60:.1f} min -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
