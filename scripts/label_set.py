"""The blind-labelled set of this project's own completions (issue 29; refusal_lat/labelset.py).

    python scripts/label_set.py generate-attacked   # attacked + harmless rows (~15 min on 1 thread)
    python scripts/label_set.py sample              # runs/cpu/labelling/{items,key,pass2,key_pass2}.jsonl
    python scripts/label_set.py rubric              # what the labeller reads (docs/labelling_rubric.md)
    python scripts/label_set.py import-labels labels.jsonl labels_pass2.jsonl   # -> data/labels/cpu_turns.csv
    python scripts/label_set.py check               # every label still keyed to its artifact row
    python scripts/label_set.py validate            # judges vs labels, fit / held-out halves

The labeller gets items.jsonl, pass2.jsonl and the rubric, never the key files: they name each item's
model and condition.
"""
import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RUBRIC = REPO / "docs" / "labelling_rubric.md"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--profile", default="cpu")
    common.add_argument("--run-dir", help="default: runs/<profile>/")
    common.add_argument("--seed", type=int, default=0, help="draws the items, the prompts and the halves")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("sample", parents=[common], help="draw the items and their keys")
    p.add_argument("--per-cell", type=int, default=20, help="items per model and condition")
    p.add_argument("--force", action="store_true", help="replace an existing items.jsonl")
    p = sub.add_parser("generate-attacked", parents=[common], help="held-out attack and harmless completions to sample from")
    p.add_argument("--n-harmful", type=int, default=30)
    p.add_argument("--n-harmless", type=int, default=30)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    sub.add_parser("rubric", help="print the labelling rubric")
    p = sub.add_parser("import-labels", parents=[common], help="join the labeller's {id, label} files with the keys")
    p.add_argument("labels", nargs="+")
    p.add_argument("--table", help="default: data/labels/<profile>_turns.csv")
    p = sub.add_parser("check", parents=[common], help="re-read every labelled artifact row")
    p.add_argument("--table", help="default: data/labels/<profile>_turns.csv")
    p = sub.add_parser("validate", parents=[common], help="judges against the labels")
    p.add_argument("--table", help="default: data/labels/<profile>_turns.csv")
    p.add_argument("--out", help="folder for validation.csv (default: runs/<profile>/labelling/)")
    args = parser.parse_args(argv)

    if args.command == "rubric":
        print(RUBRIC.read_text())
        return 0
    sys.path.insert(0, str(REPO))
    import helpers as H
    from refusal_lat import labelset as L
    try:
        profile = H.load_profile(args.profile)
        run = H.run_dir(profile, args.run_dir)
        table_path = Path(getattr(args, "table", None) or REPO / "data" / "labels" / f"{profile.name}_turns.csv")
        if args.command == "generate-attacked":
            import torch
            torch.set_num_threads(args.threads)
            started = time.time()
            L.attacked_artifacts(profile, run, L.held_out_radii(profile), args.n_harmful, args.n_harmless, args.seed)
            print(f"done in {(time.time() - started) / 60:.1f} min on {torch.get_num_threads()} thread(s) "
                  f"-> {L.folder(run) / 'attacked'}")
        elif args.command == "sample":
            files = L.sample(run, args.per_cell, args.seed, force=args.force)
            print(L.counts(files["key"]).to_string())
            print(f"{len(files['items'])} items, {len(files['pass2'])} asked again -> {L.folder(run)}")
        elif args.command == "import-labels":
            table = L.import_labels(run, args.labels, args.seed)
            L.write_table(table, table_path)
            print(f"{len(table)} labels ({(table['pass'] == 2).sum()} of the second pass) -> {table_path}")
        elif args.command == "check":
            problems = L.check(L.read_table(table_path), run)
            for p in problems:
                print(f"{p['id']}: {p['artifact']}: {p['problem']}")
            print(f"{len(problems)} problems in {table_path} against {run}")
            return 1 if problems else 0
        elif args.command == "validate":
            table, intra = L.validate(L.read_table(table_path), run)
            out = Path(args.out) if args.out else L.folder(run)
            H.atomic_write(out / "validation.csv", table.to_csv(index=False).encode())
            H.atomic_write(out / "intra_rater.json", (json.dumps(intra, indent=1) + "\n").encode())
            shown = table[(table.scope == "overall") | (table.half == "held_out")]
            print(shown[["half", "judge", "scope", "group", "n", "agreement", "kappa", "sensitivity", "specificity",
                         "bias_points"]].round(3).to_string(index=False))
            print("intra-rater (pass 1 vs pass 2): " + ", ".join(f"{k} {v:.3g}" for k, v in intra.items()))
            print(f"-> {out / 'validation.csv'}, {out / 'intra_rater.json'}")
    except H.ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
