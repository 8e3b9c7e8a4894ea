"""Run notebooks/NN_*.ipynb in order through papermill on one profile.

Executed copies go to runs/<profile>/notebooks/; a failing cell stops the series with a non-zero
exit naming the notebook and the cell. Timings and peak memory go to runs/<profile>/series.csv.
"""
import argparse
import csv
import resource
import sys
import time
from pathlib import Path

import papermill as pm

REPO = Path(__file__).resolve().parents[1]


def missing_adapters(H, profile) -> list[str]:
    """Adapter folders inside this repository that the profile's models name but that are not there yet."""
    named = [spec.adapter for spec in profile.models.values() if spec.adapter and spec.adapter.startswith("adapters/")]
    return [a for a in named if not (REPO / a / "adapter_config.json").is_file()]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--profile", default="cpu")
    parser.add_argument("--only", nargs="*", help="notebook name prefixes to run, e.g. 01 02")
    parser.add_argument("--notebooks", default=str(REPO / "notebooks"), help="folder of NN_*.ipynb")
    parser.add_argument("--run-dir", default=None, help="artifacts folder (default runs/<profile>/)")
    parser.add_argument("--train", action="store_true", help="also run 00_train_adapters (otherwise only when "
                        "the profile's models name adapter folders that do not exist yet)")
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))
    import helpers as H
    try:
        profile = H.load_profile(args.profile)  # fail early on an unknown profile
        run = H.run_dir(profile, args.run_dir)
    except H.ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    out_dir = run / "notebooks"
    out_dir.mkdir(parents=True, exist_ok=True)
    notebooks = sorted(Path(args.notebooks).glob("[0-9][0-9]_*.ipynb"))
    if args.only:
        notebooks = [nb for nb in notebooks if nb.name[:2] in args.only]
    rows = []
    for nb in notebooks:
        if nb.name.startswith("00_") and not (args.train or missing_adapters(H, profile)):
            print(f"== {nb.name}: skipped (the profile's adapters exist or it uses none; --train runs it)")
            continue
        started = time.time()
        print(f"== {nb.name} on profile '{profile.name}'", flush=True)
        try:
            pm.execute_notebook(str(nb), str(out_dir / nb.name), parameters={"profile": profile.name, "run_dir": str(run)},
                                cwd=str(nb.parent), kernel_name="python3", progress_bar=False)
        except pm.PapermillExecutionError as err:
            print(f"FAILED: {nb.name}, cell {err.cell_index} (execution count {err.exec_count}): "
                  f"{err.ename}: {err.evalue}\n  executed copy: {out_dir / nb.name}", file=sys.stderr)
            return 1
        peak_gib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20
        rows.append({"notebook": nb.name, "seconds": round(time.time() - started, 1),
                     "peak_rss_gib_so_far": round(peak_gib, 2)})
        print(f"   done in {rows[-1]['seconds']} s (peak RSS so far {peak_gib:.2f} GiB)", flush=True)
    with open(run / "series.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["notebook", "seconds", "peak_rss_gib_so_far"])
        writer.writeheader()
        writer.writerows(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
