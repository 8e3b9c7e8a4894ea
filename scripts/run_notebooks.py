"""Run notebooks/NN_*.ipynb in order through papermill on one profile.

Executed copies go to runs/<profile>/notebooks/; a failing cell stops the series with a non-zero
exit naming the notebook and the cell. What the kernel prints (progress lines with ETAs, plain text:
REFUSAL_LAT_PROGRESS=text) streams to this script's own stdout/stderr as it runs. Timings (wall, and
the kernel's CPU seconds) and peak memory go to runs/<profile>/series.csv. Figures go to
<run_dir>/figures/; with --publish (the default run, no overrides) to the committed figures/<profile>/,
which is sealed again afterwards (refusal_lat/record.py). Ctrl-C stops the series with one line.
"""
import argparse
import csv
import io
import os
import resource
import sys
import time
from pathlib import Path

import papermill as pm

REPO = Path(__file__).resolve().parents[1]


def missing_adapters(H, profile) -> list[str]:
    """Adapter folders inside this repository that the profile's models name, or that its training recipe
    makes for notebook 05 (<adapters>/<arm>-s<seed>), but that are not there yet."""
    named = [spec.adapter for spec in profile.models.values() if spec.adapter and spec.adapter.startswith("adapters/")]
    missing = [a for a in named if not (REPO / a / "adapter_config.json").is_file()]
    if profile.training and profile.training.get("data") == "refusal_mix":
        missing += untrained_arms(H, profile)
    return missing


def untrained_arms(H, profile) -> list[str]:
    """The recipe's <arm>-s<seed> adapters that are not trained yet (all of them without a recipe)."""
    if not profile.training:
        return ["(no training recipe)"]
    import training as T
    rec = T.recipe(profile)
    root = T.adapter_root(rec)
    return [T.arm_folder(a, s) for s in T.training_seeds(rec) for a in rec.arms
            if not (root / T.arm_folder(a, s) / "adapter_config.json").is_file()]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--profile", default="cpu")
    parser.add_argument("--only", nargs="*", help="notebook name prefixes to run, e.g. 01 02")
    parser.add_argument("--notebooks", default=str(REPO / "notebooks"), help="folder of NN_*.ipynb")
    parser.add_argument("--run-dir", default=None, help="artifacts folder (default runs/<profile>/)")
    parser.add_argument("--train", action="store_true", help="also run 00_train_adapters (otherwise only when "
                        "the profile's models name adapter folders that do not exist yet)")
    parser.add_argument("--publish", action="store_true", help="write the committed figures/<profile>/ (default run only)")
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))
    import helpers as H
    try:
        profile = H.load_profile(args.profile)  # fail early on an unknown profile
        run = H.run_dir(profile, args.run_dir)
    except H.ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    notebooks = sorted(Path(args.notebooks).glob("[0-9][0-9]_*.ipynb"))
    if not notebooks:
        print(f"error: no NN_*.ipynb notebooks in {args.notebooks}; pass --notebooks <folder of notebooks>",
              file=sys.stderr)
        return 2
    if args.only:
        def chosen(nb, o):  # "01", "01_activations" or "01_activations.ipynb"
            return o in (nb.name[:2], nb.stem, nb.name)
        unknown = [o for o in args.only if not any(chosen(nb, o) for nb in notebooks)]
        if unknown:
            print(f"error: --only {' '.join(unknown)} matches no notebook; use two-digit prefixes or names from "
                  f"{[nb.name[:2] for nb in notebooks]} ({', '.join(nb.stem for nb in notebooks)})", file=sys.stderr)
            return 2
        notebooks = [nb for nb in notebooks if any(chosen(nb, o) for o in args.only)]
    out_dir = run / "notebooks"
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        print(f"error: {H.write_failure(out_dir, err)}", file=sys.stderr)
        return 2
    os.environ["REFUSAL_LAT_PROGRESS"] = "text"  # the kernel inherits it: refusal_lat/progress.py
    from refusal_lat import record
    from refusal_lat.config import PUBLISH_ENV, default_run_dir
    if args.publish:
        if run.resolve() != default_run_dir(profile).resolve():
            print(f"error: --publish writes figures/{profile.name}/ from the default run only; drop --run-dir",
                  file=sys.stderr)
            return 2
        os.environ[PUBLISH_ENV] = "1"  # the kernel inherits it: config.figure_dir
    try:
        rows = run_series(H, args, profile, run, notebooks, out_dir)
    except KeyboardInterrupt:
        print(f"interrupted (Ctrl-C); finished artifacts stay in {run}, rerun the same command to resume", file=sys.stderr)
        return 130
    if rows is None:
        return 1
    figures = REPO / "figures" / profile.name
    if args.publish and figures.is_dir():
        print(f"sealed {record.seal(figures, record.remake_command(figures))}")
    if rows:  # a run that executed nothing keeps the last series.csv
        table = io.StringIO()
        writer = csv.DictWriter(table, fieldnames=["notebook", "seconds", "cpu_seconds", "peak_rss_gib_so_far"])
        writer.writeheader()
        writer.writerows(rows)
        try:
            H.atomic_write(run / "series.csv", table.getvalue().encode())
        except H.StoreError as err:
            print(f"error: {err}", file=sys.stderr)
            return 1
    return 0


def kernel_cpu_seconds() -> float:
    """User + system CPU seconds of the finished kernels (this process's reaped children) so far."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_series(H, args, profile, run, notebooks, out_dir) -> list | None:
    """Execute the notebooks in order; their timing rows, or None after a failure (reported)."""
    rows = []
    for nb in notebooks:
        local_recipe = bool(profile.training) and profile.training.get("data") == "refusal_mix"
        if nb.name.startswith("00_") and not (args.train or missing_adapters(H, profile) or
                                               (local_recipe and not untrained_arms(H, profile))):
            print(f"== {nb.name}: skipped (the profile's adapters come from elsewhere or it uses none; --train runs it)")
            continue  # with every arm of a local recipe trained, 00 runs and only reads and plots their logs
        if nb.name.startswith("05_") and untrained_arms(H, profile):
            print(f"== {nb.name}: skipped (no trained arms of this profile's recipe yet: make train PROFILE={profile.name})")
            continue
        started, cpu_before = time.time(), kernel_cpu_seconds()
        print(f"== {nb.name} on profile '{profile.name}'", flush=True)
        executed = out_dir / nb.name
        try:
            pm.execute_notebook(str(nb), str(executed), parameters={"profile": profile.name, "run_dir": str(run)},
                                cwd=str(nb.parent), kernel_name="python3", progress_bar=False,
                                stdout_file=sys.stdout, stderr_file=sys.stderr,
                                extra_arguments=["--IPKernelApp.log_level=CRITICAL"])  # no TCP-transport warning, no
                                # traceback from a kernel stopped mid-cell by Ctrl-C
        except pm.PapermillExecutionError as err:
            print(f"FAILED: {nb.name}, cell {err.cell_index} (execution count {err.exec_count}): "
                  f"{err.ename}: {err.evalue}\n  executed copy: {executed}", file=sys.stderr)
            return None
        except OSError as err:  # disk full, folder gone: no half-written executed copy stays behind
            executed.unlink(missing_ok=True)
            print(f"FAILED: {nb.name}: {H.write_failure(out_dir, err)}", file=sys.stderr)
            return None
        peak_gib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20
        row = {"notebook": nb.name, "seconds": round(time.time() - started, 1),
               "cpu_seconds": round(kernel_cpu_seconds() - cpu_before, 1), "peak_rss_gib_so_far": round(peak_gib, 2)}
        rows.append(row)
        print(f"   done in {row['seconds']} s, {row['cpu_seconds']} s of CPU (peak RSS so far {peak_gib:.2f} GiB)",
              flush=True)
    return rows


if __name__ == "__main__":
    sys.exit(main())
