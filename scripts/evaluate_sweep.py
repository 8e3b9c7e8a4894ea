"""Evaluate every trained model of the budget sweep (training v3; refusal_lat/training/sweep_eval.py) and
write the tables notebook 07 reads into <sweep adapters>/eval/ (no completion text there; the
completions stay in runs/<profile>/sweep/).

    python scripts/evaluate_sweep.py --profile cpu --threads 1 --publish      # the committed tables
    python scripts/evaluate_sweep.py --profile cpu --budgets 0.14 --out /tmp/sweep-0.14
    python scripts/evaluate_sweep.py --profile cpu --activations-only --publish   # mechanism and SVD only
    python scripts/evaluate_sweep.py --profile cpu --no-attacks --publish  # every condition but the PGD attacks

<sweep adapters>/eval/ is committed: only --publish writes there, and then seals the folder again (its
MANIFEST.json, refusal_lat/record.py). A narrower selection (--budgets, --seeds) needs --out.
"""
import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default="cpu")
    parser.add_argument("--budgets", nargs="+", type=float, help="default: every trained budget")
    parser.add_argument("--seeds", nargs="+", type=int, help="default: every trained seed")
    parser.add_argument("--out", help="table folder (default: <sweep adapters>/eval, committed: needs --publish)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--publish", action="store_true", help="replace the committed tables")
    parser.add_argument("--activations-only", action="store_true",
                        help="only the activation tables (mechanism, SVD shares, second component): minutes per model; "
                             "the tables of completions are written empty")
    parser.add_argument("--no-attacks", action="store_true",
                        help="every condition but the two PGD attacks (their forward + backward passes are most of a "
                             "model's time); each condition is cached on its own, so a later run adds only the attacks")
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))
    import helpers as H
    from refusal_lat import record
    from refusal_lat.training import sweep as S
    from refusal_lat.training import sweep_eval as V
    try:
        profile = H.load_profile(args.profile)
        sw = S.sweep_of(profile)
        out = Path(args.out) if args.out else REPO / sw.adapters / "eval"
        if args.publish and (args.budgets or args.seeds):
            raise H.ConfigError("published sweep tables cover every trained model; write a narrower selection "
                                "elsewhere (--out <folder>)")
    except H.ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return record.publish_run(out, args.publish, lambda: V.evaluate_sweep(
        profile, out, budgets=args.budgets, seeds=args.seeds, publish=args.publish,
        generate=not args.activations_only, attacks=not args.no_attacks), args.threads)


if __name__ == "__main__":
    sys.exit(main())
