"""Copy the executed notebooks of a finished run to notebooks/reference/<profile>/, for readers on GitHub,
and the run's figures (and claims/summary tables) to figures/<profile>/.

Usage: python scripts/publish_reference.py [--profile cpu] [--run-dir runs/cpu] --publish

notebooks/reference/<profile>/ and figures/<profile>/ are committed: --publish is the explicit consent to
replace them; each folder is sealed again afterwards (MANIFEST.json, refusal_lat/record.py). The copies
are cleaned for readers: no stderr output (library warnings, progress lines), no widget state, and no
absolute paths of the machine that ran them.

Refuses (exit 1, nothing copied) when an output shows more of a harmful prompt or of a generated
completion than its first few words: every evaluation prompt and every completion of the run's
generation units is searched for in the outputs, by its first 60 characters.
"""
import argparse
import json
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHOWN = 60  # characters: longer than "the first few words" that truncate() leaves


def output_text(notebook: Path) -> str:
    cells = json.loads(notebook.read_text())["cells"]
    parts = []
    for cell in cells:
        for out in cell.get("outputs", []):
            parts.append("".join(out.get("text", "")))
            for mime, value in out.get("data", {}).items():
                if mime.startswith("text/"):
                    parts.append("".join(value))
    return "\n".join(parts)


def leaks(text: str, run: Path) -> list[str]:
    """Completions and prompts of the run's generation units whose first SHOWN characters appear in text."""
    found = []
    for unit in sorted(run.glob("generations/**/*.jsonl")):
        try:
            rows = [json.loads(line) for line in unit.read_text().splitlines()]
        except ValueError:  # cut or edited (UnicodeDecodeError is one): nothing to compare, so nothing is published
            found.append(f"{unit.name} (unreadable: delete it or run the notebooks again)")
            continue
        for row in rows:
            for field in ("prompt", "completion", "turn"):
                value = (row.get(field) or "").strip()
                if len(value) >= SHOWN and value[:SHOWN] in text:
                    found.append(f"{unit.name} row {row['i']} {field}")
    from refusal_lat.training.evaluate import read_record  # safetensors + JSON: reading runs no code
    for path in sorted(run.glob("arms/*.safetensors")):  # notebook 05's completions (training/evaluate.py)
        try:
            conditions = read_record(path)["conditions"]
        except Exception:  # cut, edited or not a record at all: nothing to compare, so nothing is published
            found.append(f"{path.name} (unreadable: delete it or run notebook 05 again)")
            continue
        for condition, out in conditions.items():
            for i, turn in enumerate(out["turns"]):
                if len(turn.strip()) >= SHOWN and turn.strip()[:SHOWN] in text:
                    found.append(f"{path.name} {condition} completion {i}")
    return found


def cleaned(notebook: Path, roots: list[str]) -> str:
    """The executed notebook as JSON text without stderr outputs and widget state, with every absolute
    checkout path in `roots` written relative."""
    nb = json.loads(notebook.read_text())
    nb.get("metadata", {}).pop("widgets", None)
    for cell in nb["cells"]:
        if "outputs" not in cell:
            continue
        outs = [o for o in cell["outputs"] if not (o.get("output_type") == "stream" and o.get("name") == "stderr")]
        for o in outs:
            o.get("data", {}).pop("application/vnd.jupyter.widget-view+json", None)
        cell["outputs"] = [o for o in outs if o.get("output_type") != "display_data" or o.get("data")]
    text = json.dumps(nb, indent=1, ensure_ascii=False) + "\n"
    for root in sorted(roots, key=len, reverse=True):
        text = text.replace(root.rstrip("/") + "/", "")
    return text


FIGURE_FILES = ("*.png", "claims.md", "claims.csv", "summary.md")


def stale_figures(figures: Path, notebooks: list[Path]) -> list[str]:
    """Figures NN_*.png in the run's figures/ written before the run of notebook NN being published started
    (papermill's start_time): left there by an earlier run, they would replace newer committed ones."""
    import datetime
    started = {}
    for nb in notebooks:
        stamp = json.loads(nb.read_text()).get("metadata", {}).get("papermill", {}).get("start_time")
        if stamp:
            started[nb.name[:2]] = datetime.datetime.fromisoformat(stamp).timestamp()
    return [f.name for f in sorted(figures.glob("[0-9][0-9]_*.png"))
            if f.name[:2] in started and f.stat().st_mtime < started[f.name[:2]]]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--profile", default="cpu")
    parser.add_argument("--run-dir", default=None)
    parser.add_argument("--only", nargs="*", help="notebook name prefixes to copy, e.g. 05 (default: all)")
    parser.add_argument("--publish", action="store_true", help="replace the committed notebooks/reference/<profile>/")
    parser.add_argument("--root", nargs="*", help="other absolute checkout paths to write relative (default: this one)")
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))
    from refusal_lat import record
    run = Path(args.run_dir) if args.run_dir else REPO / "runs" / args.profile
    notebooks = sorted((run / "notebooks").glob("[0-9][0-9]_*.ipynb"))
    if args.only:
        notebooks = [nb for nb in notebooks if nb.name[:2] in args.only]
    if not notebooks:
        print(f"error: no executed notebooks in {run / 'notebooks'}; run `make reproduce` first", file=sys.stderr)
        return 2
    problems = {nb.name: leaks(output_text(nb), run) for nb in notebooks}
    if any(problems.values()):
        for name, found in problems.items():
            for item in found:
                print(f"error: {name} shows more than the first words of {item}", file=sys.stderr)
        return 1
    target = REPO / "notebooks" / "reference" / args.profile
    stale = stale_figures(run / "figures", notebooks) if (run / "figures").is_dir() and not args.only else []
    if stale:
        print(f"error: {len(stale)} figure(s) in {run / 'figures'} predate the notebook run being published "
              f"({', '.join(stale[:3])}{', ...' if len(stale) > 3 else ''}): remove that folder and rerun the "
              "notebooks (run_notebooks.py --publish writes figures/<profile>/ itself), then publish", file=sys.stderr)
        return 2
    try:
        record.check_writable(target, args.publish, "scripts/publish_reference.py")
        target.mkdir(parents=True, exist_ok=True)
        roots = [str(REPO), str(run.resolve().parents[1]), *(args.root or [])]
        for nb in notebooks:
            (target / nb.name).write_text(cleaned(nb, roots))
        record.seal(target, record.remake_command(target))
        figures = run / "figures"
        if figures.is_dir() and not args.only:
            out = REPO / "figures" / args.profile
            record.check_writable(out, args.publish, "scripts/publish_reference.py")
            out.mkdir(parents=True, exist_ok=True)
            for pattern in FIGURE_FILES:  # the run's figures replace the folder's: none of an older run stays
                for f in sorted(out.glob(pattern)):
                    f.unlink()
                for f in sorted(figures.glob(pattern)):
                    shutil.copyfile(f, out / f.name)
            record.seal(out, record.remake_command(out))
            print(f"copied the figures of {figures} to {out} and sealed it")
    except record.CommittedError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"copied {len(notebooks)} notebooks to {target} and sealed it")
    return 0


if __name__ == "__main__":
    sys.exit(main())
