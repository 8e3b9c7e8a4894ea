"""The blind-labelled set of this project's own completions (issue 29; refusal_lat/labelset.py).

    python scripts/label_set.py generate-attacked   # attacked + harmless rows (~15 min on 1 thread)
    python scripts/label_set.py sample              # runs/cpu/labelling/{items,key,pass2,key_pass2}.jsonl
    python scripts/label_set.py rubric              # what the labeller reads (docs/labelling_rubric.md)
    python scripts/label_set.py import-labels labels.jsonl labels_pass2.jsonl   # -> data/labels/cpu_turns.csv
    python scripts/label_set.py check               # every label still keyed to its artifact row
    python scripts/label_set.py validate            # judges vs labels, both domains -> runs/<profile>/labelling/
    python scripts/label_set.py validate --publish  # the committed tables -> data/labels/validation/ (sealed)

The labeller gets items.jsonl, pass2.jsonl and the rubric, never the key files: they name each item's
model and condition.

validate scores every judge (judges.ALL_METHODS) against the labels of both domains, fit and held-out halves:
llama2.csv (the authors' Llama-2 completions: all rows, clean, ablated rows, each model's ablated rows) and
qwen.csv (this project's turns: overall, per condition, per model), intra_rater.json, and claims_verdicts.csv
(the claims' judged comparisons on the labelled rows, judges vs labels). data/labels/validation/ is committed:
only --publish writes there, and seals it (refusal_lat/record.py); stats/claims read the held-out counts from it.
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
    common.add_argument("--round", default="q", choices=["q", "s"],
                        help="labelling round: q, notebooks 03-05's models; s, training v3's sweep models (its own "
                             "items, ids and table data/labels/<profile>_turns_sweep.csv)")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("sample", parents=[common], help="draw the items and their keys")
    p.add_argument("--per-cell", type=int, default=20, help="items per model and condition")
    p.add_argument("--force", action="store_true", help="replace an existing items.jsonl")
    p.add_argument("--conditions", nargs="+", help="only these conditions (labelset.CONDITIONS), e.g. prefill")
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
    p.add_argument("--out", help="folder for the tables (default: runs/<profile>/labelling/; with --publish "
                                 "data/labels/validation/)")
    p.add_argument("--publish", action="store_true", help="replace the committed tables in data/labels/validation/")
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
        tables = {r: REPO / "data" / "labels" / spec["table"].format(profile=profile.name) for r, spec in L.ROUNDS.items()}
        table_path = Path(getattr(args, "table", None) or tables[args.round])
        if args.command == "generate-attacked":
            import torch
            torch.set_num_threads(args.threads)
            started = time.time()
            L.attacked_artifacts(profile, run, L.held_out_radii(profile), args.n_harmful, args.n_harmless, args.seed)
            print(f"done in {(time.time() - started) / 60:.1f} min on {torch.get_num_threads()} thread(s) "
                  f"-> {L.folder(run) / 'attacked'}")
        elif args.command == "sample":
            files = L.sample(run, args.per_cell, args.seed, force=args.force, round_name=args.round,
                             conditions=args.conditions)
            print(L.counts(files["key"]).to_string())
            print(f"{len(files['items'])} items, {len(files['pass2'])} asked again -> {L.folder(run)}")
        elif args.command == "import-labels":
            earlier = [L.labelled_halves(L.read_table(tables[r]), run) for r in L.ROUNDS
                       if r != args.round and tables[r].is_file()]
            table = L.import_labels(run, args.labels, args.seed, args.round,
                                    {k: v for halves in earlier for k, v in halves.items()})
            L.write_table(table, table_path)
            print(f"{len(table)} labels ({(table['pass'] == 2).sum()} of the second pass) -> {table_path}")
        elif args.command == "check":
            problems = L.check(L.read_table(table_path), run)
            for p in problems:
                print(f"{p['id']}: {p['artifact']}: {p['problem']}")
            print(f"{len(problems)} problems in {table_path} against {run}")
            return 1 if problems else 0
        elif args.command == "validate":
            paths = [Path(args.table)] if args.table else [t for t in tables.values() if t.is_file()]
            return validate(args, profile, run, paths, H, L)
    except H.ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


def validate(args, profile, run, table_paths, H, L) -> int:
    import pandas as pd
    from refusal_lat import claims as C
    from refusal_lat import record
    from refusal_lat.config import DataError
    from refusal_lat.judges import ALL_METHODS
    out = Path(args.out) if args.out else (L.VALIDATION_DIR if args.publish else L.folder(run))
    command = ".venv/bin/python scripts/label_set.py validate --publish"
    record.check_writable(out, args.publish, "scripts/label_set.py validate")
    labels = pd.concat([L.read_table(path) for path in table_paths], ignore_index=True)  # every round's labels
    parts = [L.qwen_rows(labels, run)]
    try:
        parts.insert(0, L.authors_rows())
    except DataError as err:
        if args.publish:
            raise
        print(f"note: the authors' human labels are not reachable ({err}); validating the {profile.name} labels only")
    rows = L.judge_columns(pd.concat(parts, ignore_index=True), ALL_METHODS)
    table = L.domain_validation(rows, ALL_METHODS)
    intra = L.intra_rater(labels)
    verdicts = C.claims_on_labels(rows, profile.layer, ("project", "project_v1"), seed=args.seed)
    files = {f"{d}.csv": table[table.domain == d].to_csv(index=False).encode() for d in dict.fromkeys(table.domain)}
    files["intra_rater.json"] = (json.dumps(intra, indent=1) + "\n").encode()
    files["claims_verdicts.csv"] = verdicts.to_csv(index=False).encode()
    if not args.publish and not args.out:  # the earlier scratch table, the labels domain only
        old = L.validation_table(rows[rows.domain == "qwen"], [m for m in ALL_METHODS])
        files["validation.csv"] = old.to_csv(index=False).encode()
    for name, body in files.items():
        H.atomic_write(out / name, body)
    if args.publish:
        record.seal(out, command)
    shown = table[(table.half == "held_out") & table.judge.isin(["project", "project_v1", "substring"])
                  & ~table.scope.isin(["model"])]
    print(shown[["domain", "split", "judge", "scope", "group", "n", "agreement", "kappa", "sensitivity", "specificity",
                 "bias_points"]].round(3).to_string(index=False))
    print("intra-rater (pass 1 vs pass 2): " + ", ".join(f"{k} {v:.3g}" for k, v in intra.items()))
    if len(verdicts):
        for judge, part in verdicts[verdicts.rater != "labels"].groupby("rater", sort=False):
            print(f"claims' judged comparisons on the labelled rows, {judge}: {int(part.same_verdict_as_labels.sum())} "
                  f"of {len(part)} verdicts equal the labels' (claims_verdicts.csv)")
    print(f"-> {out}: {', '.join(files)}" + (" (sealed)" if args.publish else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
