"""Evaluate every trained arm and seed against the base model (training/evaluate.py) and write the
tables that notebook 05 reads and the README cites into <adapters>/eval/ (no completion text there;
the completions stay in runs/<profile>/arms/).

    python scripts/evaluate_arms.py --profile cpu --threads 1 --publish     # the committed tables
    python scripts/evaluate_arms.py --profile cpu --arms lat --seeds 1 --out /tmp/lat-s1
    python scripts/evaluate_arms.py --profile cpu --from-labels --publish    # comparisons.csv from labels.csv

<adapters>/eval/ is committed: only --publish writes there, only for the recipe's arms and seeds, and
then seals the folder again (its MANIFEST.json, refusal_lat/record.py). Any other selection needs --out.
"""
import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default="cpu")
    parser.add_argument("--seeds", nargs="+", type=int, help="default: the recipe's seeds")
    parser.add_argument("--arms", nargs="+", help="default: the recipe's arms")
    parser.add_argument("--out", help="table folder (default: <adapters>/eval, committed: needs --publish)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--publish", action="store_true", help="replace the committed tables in <adapters>/eval")
    parser.add_argument("--batched", action="store_true", help="the batched conditions (evaluate.condition_outputs: "
                        "each model's harmful conditions in one generation; records cached under their own key)")
    parser.add_argument("--from-labels", action="store_true",
                        help="only rebuild comparisons.csv from the folder's labels.csv (no model runs)")
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))
    import helpers as H
    import training as T
    from refusal_lat import record
    from refusal_lat.training import evaluate as E
    try:
        profile = H.load_profile(args.profile)
        rec = T.recipe(profile)
        arms, seeds = T.check_selection(args.arms or rec.arms, T.training_seeds(rec) if args.seeds is None else args.seeds,
                                        args.threads)
        out = Path(args.out) if args.out else T.adapter_root(rec) / "eval"
        if args.from_labels:
            table = E.rebuild_comparisons(out, publish=args.publish)
            if args.publish and record.committed(out):
                record.seal(out, record.remake_command(out))
            print(f"{len(table)} comparisons rebuilt from {out / 'labels.csv'}")
            return 0
    except H.ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return record.publish_run(out, args.publish, lambda: E.evaluate_arms(
        profile, rec, arms, seeds, E.settings_of(rec), out, publish=args.publish, batched=args.batched), args.threads)


if __name__ == "__main__":
    sys.exit(main())
