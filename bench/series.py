"""The end-to-end notebook series per notebook, read from runs/<profile>/series.csv (written by
scripts/run_notebooks.py) and from the papermill metadata of the executed copies in
runs/<profile>/notebooks/. It runs nothing: `make reproduce` does.

    .venv/bin/python bench/series.py [--profile cpu]
"""
from __future__ import annotations

import argparse
import csv
import datetime
import json
from pathlib import Path

from _util import table, verdict
from refusal_lat.config import REPO, load_profile, run_dir  # noqa: E402

BUDGET = {"cpu": (45, ("01", "02", "03", "04"))}  # issue 6: on cpu, 01->04 in <= 45 min on 2 cores


def papermill_runs(folder: Path) -> dict[str, tuple]:
    """notebook -> (seconds or None if unfinished, end time) from the executed copies."""
    out = {}
    for nb in sorted(folder.glob("[0-9][0-9]_*.ipynb")):
        try:
            meta = json.loads(nb.read_text())["metadata"].get("papermill", {})
        except (OSError, ValueError, KeyError):
            continue
        out[nb.name] = (meta.get("duration"), meta.get("end_time") or meta.get("start_time"))
    return out


def run(profile_name: str = "cpu", log=print):
    profile = load_profile(profile_name)
    run = run_dir(profile)
    csv_path = run / "series.csv"
    notebooks = sorted(p.name for p in (REPO / "notebooks").glob("[0-9][0-9]_*.ipynb"))
    series = {}
    if csv_path.is_file():
        with open(csv_path) as f:
            series = {row["notebook"]: row for row in csv.DictReader(f)}
        written = datetime.datetime.fromtimestamp(csv_path.stat().st_mtime).astimezone()
        source = f"`{csv_path.relative_to(REPO)}` (written {written:%Y-%m-%d %H:%M %Z})"
    else:
        source = f"`{csv_path.relative_to(REPO)}` is missing (run `make reproduce PROFILE={profile_name}`)"
        log(f"series: {csv_path} is missing")
    executed = papermill_runs(run / "notebooks")
    budget, judged = BUDGET.get(profile_name, (None, tuple(nb[:2] for nb in notebooks)))
    rows, total, complete = [], 0.0, True
    for nb in notebooks:
        row, (pm_s, pm_end) = series.get(nb), executed.get(nb, (None, None))
        secs = float(row["seconds"]) if row else pm_s
        if nb[:2] in judged:
            complete &= secs is not None
            total += secs or 0.0
        rows.append([nb, f"{float(row['seconds']):.0f}" if row else "-", (row or {}).get("cpu_seconds") or "-",
                     row["peak_rss_gib_so_far"] if row else "-",
                     f"{pm_s:.0f}" if pm_s is not None else ("unfinished" if nb in executed else "-"),
                     (pm_end or "-")[:16].replace("T", " ")])
    md = (f"Source: {source}; executed copies in `{(run / 'notebooks').relative_to(REPO)}/`. Seconds per "
          f"notebook from series.csv where it has the notebook, else papermill's own duration.\n\n"
          + table(["notebook", "series.csv s", "kernel CPU s", "peak RSS GiB (so far)", "papermill s", "last run (UTC)"],
                  rows))
    targets, span = [], f"{judged[0]}->{judged[-1]}"
    if not complete:
        over = budget is not None and total > budget * 60  # already over budget without the missing ones
        md += (f"\n\nThe series {span} is incomplete here (a notebook has no finished run): at least "
               f"{total / 60:.1f} min for the notebooks that did run; "
               + (f"already over the {budget}-min budget: {verdict(False)}." if over else "the budget cannot be judged."))
        targets.append((f"`{profile_name}` series {span} within {budget} min",
                        f">= {total / 60:.1f} min (incomplete)", False if over else None))
    else:
        md += f"\n\nEnd to end {span}: {total / 60:.1f} min"
        if budget:
            md += f" (budget {budget} min: {verdict(total <= budget * 60)})"
            targets.append((f"`{profile_name}` series {span} within {budget} min", f"{total / 60:.1f} min",
                            total <= budget * 60))
        md += ". Notebooks run at different times add up here; one `make reproduce` gives the clean number."
    return md, targets


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default="cpu")
    args = parser.parse_args()
    md, _ = run(args.profile)
    print(f"## Notebook series ({args.profile})\n\n{md}")


if __name__ == "__main__":
    main()
