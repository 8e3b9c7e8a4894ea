"""Run notebooks/NN_*.ipynb in order through papermill on one profile.

Executed copies go to runs/<profile>/notebooks/ (with --overrides: runs/<profile>-<hash>/, a folder of
their own); a failing cell stops the series with a non-zero exit naming the notebook and the cell. What
the kernel prints (one progress line per stage, plain text: REFUSAL_LAT_PROGRESS=text) streams to this
script's own stdout/stderr as it runs; before each notebook a line gives the series' ETA from the last
run's series.csv. Timings (wall, and the kernel's CPU seconds) and peak memory go to <run>/series.csv.
Figures go to <run_dir>/figures/; with --publish (the default run, no overrides) to the committed
figures/<profile>/, which is sealed again afterwards (refusal_lat/record.py). Ctrl-C stops the series
with one line. Each notebook gets a fresh kernel, except on profiles whose models are all built in-process
(`tiny`): there one kernel, reset before each notebook, runs the series (--kernel one|each overrides).
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
    """The recipe's <arm>-s<seed> adapters that are not trained yet (all of them without a recipe). Read from
    the recipe alone (training.adapter_root / arm_folder, without importing torch: tests/test_repo.py checks
    that both name the same folders)."""
    if not profile.training:
        return ["(no training recipe)"]
    from refusal_lat.training.recipe import recipe, training_seeds
    rec = recipe(profile)
    return [f"{a}-s{s}" for s in training_seeds(rec) for a in rec.arms
            if not (REPO / rec.adapters / f"{a}-s{s}" / "adapter_config.json").is_file()]


def engine():
    """What the runner needs of the engine, without helpers' imports (torch and the rest load in the kernels)."""
    from types import SimpleNamespace
    from refusal_lat import config, store
    return SimpleNamespace(load_profile=config.load_profile, run_dir=config.run_dir, ConfigError=config.ConfigError,
                           write_failure=store.write_failure, atomic_write=store.atomic_write, StoreError=store.StoreError)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--profile", default="cpu")
    parser.add_argument("--only", nargs="*", help="notebook name prefixes to run, e.g. 01 02")
    parser.add_argument("--notebooks", default=str(REPO / "notebooks"), help="folder of NN_*.ipynb")
    parser.add_argument("--run-dir", default=None, help="artifacts folder (default runs/<profile>/)")
    parser.add_argument("--train", action="store_true", help="also run 00_train_adapters (otherwise only when "
                        "the profile's models name adapter folders that do not exist yet)")
    parser.add_argument("--publish", action="store_true", help="write the committed figures/<profile>/ (default run only)")
    parser.add_argument("--kernel", choices=["auto", "one", "each"], default="auto",
                        help="one kernel for the series, or a fresh one for each notebook; auto: one when every model "
                             "is a tiny in-process one, else each")
    parser.add_argument("--overrides", nargs="+", metavar="KEY=VALUE", help="profile keys to change for every "
                        "notebook: JSON/YAML ('{\"n_eval\": 16}') or key=value pairs (n_eval=16 layer=3); the run "
                        "goes to runs/<profile>-<hash>/ unless --run-dir names another folder")
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))
    H = engine()
    from refusal_lat.config import default_run_dir
    try:
        overrides = parse_overrides(args.overrides)
        profile = H.load_profile(args.profile, overrides)  # fail early on an unknown profile or key
        run = H.run_dir(profile, args.run_dir or default_run_dir(profile, overrides))
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
    from refusal_lat.config import PUBLISH_ENV
    if args.publish:
        if overrides or run.resolve() != default_run_dir(profile).resolve():
            print(f"error: --publish writes figures/{profile.name}/ from the default run only; drop --run-dir and "
                  f"--overrides", file=sys.stderr)
            return 2
        os.environ[PUBLISH_ENV] = "1"  # the kernel inherits it: config.figure_dir
    try:
        rows = run_series(H, args, profile, run, notebooks, out_dir, overrides)
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


def parse_overrides(tokens) -> dict:
    """--overrides as one JSON/YAML mapping or as key=value tokens (each value read as YAML: 16, [1, 2], true)."""
    from refusal_lat.config import ConfigError, parse_overrides as parse_mapping, parse_yaml
    if not tokens:
        return {}
    if len(tokens) == 1 and tokens[0].lstrip().startswith("{"):
        return parse_mapping(tokens[0])
    out = {}
    for token in tokens:
        key, sep, value = token.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--overrides {token!r} is not key=value; write e.g. --overrides n_eval=16 layer=3 "
                              f"or --overrides '{{\"n_eval\": 16}}'")
        out[key.strip()] = parse_yaml(value, f"--overrides {key.strip()}")
    return out


def last_timings(run: Path) -> dict:
    """{notebook: seconds} of the last series run in this folder (series.csv), {} when there is none."""
    try:
        with open(run / "series.csv", newline="") as f:
            return {row["notebook"]: float(row["seconds"]) for row in csv.DictReader(f)}
    except (OSError, KeyError, ValueError):
        return {}


def eta_line(last: dict, remaining: list[str]) -> str:
    """'   series ETA: about 4 min 10 s left by the last run's timings' ('' without a last run)."""
    known = [last[name] for name in remaining if name in last]
    if not known:
        return ""
    left = sum(known)
    note = "" if len(known) == len(remaining) else f", {len(remaining) - len(known)} notebook(s) not timed before"
    return f"   series ETA: about {_duration(left)} left by the last run's timings{note}"


def _duration(seconds: float) -> str:
    from refusal_lat.progress import _duration as fmt
    return fmt(seconds)


def kernel_cpu_seconds() -> float:
    """User + system CPU seconds of the finished kernels (this process's reaped children) so far."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


KERNEL_ARGS = ["--IPKernelApp.log_level=CRITICAL"]  # no TCP-transport warning, no traceback from a kernel stopped
                                                  # mid-cell by Ctrl-C


def shared_kernel_wanted(choice: str, profile) -> bool:
    """--kernel auto: one kernel for the whole series when every model is built in-process (`tiny`: there the
    kernel's start and its imports were most of the series' time), a fresh kernel per notebook otherwise."""
    if choice != "auto":
        return choice == "one"
    return all(spec.source == "tiny" for spec in profile.models.values())


class SharedKernel:
    """One kernel for every notebook of the series: papermill starts it with the first notebook and keeps it (the
    runner owns its manager). Before each later notebook its namespace, history and figures are reset (IPython's
    reset(new_session=True)): a notebook sees none of the previous one's variables, only the modules already
    imported. CPU seconds and peak RSS come from the kernel's /proc entry."""

    def __init__(self):
        from jupyter_client.manager import KernelManager
        self.km = KernelManager(kernel_name="python3")

    @property
    def pid(self):
        return self.km.provisioner.pid if self.km.has_kernel and self.km.provisioner else None

    def reset(self):
        if not self.km.has_kernel:
            return
        kc = self.km.client()
        kc.start_channels()
        try:
            kc.wait_for_ready(timeout=120)
            kc.execute_interactive("get_ipython().reset(new_session=True)\nimport gc, matplotlib.pyplot\n"
                                   "matplotlib.pyplot.close('all'); gc.collect()", store_history=False, timeout=120,
                                   output_hook=lambda msg: None)
        finally:
            kc.stop_channels()

    def cpu_seconds(self) -> float:
        try:
            fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except (OSError, ValueError, IndexError, TypeError):
            return 0.0

    def peak_rss_gib(self) -> float:
        try:
            line = next(l for l in Path(f"/proc/{self.pid}/status").read_text().splitlines() if l.startswith("VmHWM:"))
            return int(line.split()[1]) / 2**20
        except (OSError, StopIteration, ValueError):
            return 0.0

    def shutdown(self):
        if self.km.has_kernel:
            self.km.shutdown_kernel(now=True)


def run_series(H, args, profile, run, notebooks, out_dir, overrides=None) -> list | None:
    """Execute the notebooks in order; their timing rows, or None after a failure (reported)."""
    from refusal_lat.config import paper_recipe_note
    rows, last = [], last_timings(run)
    note = paper_recipe_note(profile)
    parameters = {"profile": profile.name}
    if overrides:
        parameters["overrides"] = overrides
    shared = None
    if shared_kernel_wanted(getattr(args, "kernel", "each"), profile):
        shared = SharedKernel()
        print("one kernel for the series, reset before each notebook (--kernel each: a fresh one per notebook)",
              flush=True)
    try:
        for k, nb in enumerate(notebooks):
            row = run_one(H, args, profile, run, notebooks, k, out_dir, parameters, note, last, shared)
            if row is False:
                return None
            if row:
                rows.append(row)
    finally:
        if shared is not None:
            shared.shutdown()
    return rows


def run_one(H, args, profile, run, notebooks, k, out_dir, parameters, note, last, shared):
    """One notebook: its timing row, None when skipped, False after a failure (reported)."""
    nb = notebooks[k]
    local_recipe = bool(profile.training) and profile.training.get("data") == "refusal_mix"
    if nb.name.startswith("00_") and not (args.train or missing_adapters(H, profile) or
                                           (local_recipe and not untrained_arms(H, profile))):
        print(f"== {nb.name}: skipped (" + (note if note else "the profile's adapters come from elsewhere or it "
              "uses none; --train runs it") + ")")
        return None  # with every arm of a local recipe trained, 00 runs and only reads and plots their logs
    if nb.name.startswith("05_") and untrained_arms(H, profile):
        print(f"== {nb.name}: skipped (" + (note if note else "no trained arms of this profile's recipe yet: "
              f"make train PROFILE={profile.name}") + ")")
        return None
    if shared is not None:
        shared.reset()
    cpu = shared.cpu_seconds if shared is not None else kernel_cpu_seconds
    started, cpu_before = time.time(), cpu()
    eta = eta_line(last, [n.name for n in notebooks[k:]])
    print(f"== {nb.name} on profile '{profile.name}'" + (f" (last run: {_duration(last[nb.name])})"
                                                        if nb.name in last else ""), flush=True)
    if eta:
        print(eta, flush=True)
    executed = out_dir / nb.name
    try:
        pm.execute_notebook(str(nb), str(executed), parameters={**parameters, "run_dir": shown_path(run, nb.parent)},
                            request_save_on_cell_execute=False,  # one write at the end: a write per cell
                            # (validated, images and all) cost the runner seconds per notebook
                            cwd=str(nb.parent), kernel_name="python3", progress_bar=False,
                            stdout_file=sys.stdout, stderr_file=sys.stderr, extra_arguments=KERNEL_ARGS,
                            **({"km": shared.km} if shared is not None else {}))
    except pm.PapermillExecutionError as err:
        print(f"FAILED: {nb.name}, cell {err.cell_index} (execution count {err.exec_count}): "
              f"{err.ename}: {err.evalue}\n  executed copy: {executed}", file=sys.stderr)
        return False
    except OSError as err:  # disk full, folder gone: no half-written executed copy stays behind
        executed.unlink(missing_ok=True)
        print(f"FAILED: {nb.name}: {H.write_failure(out_dir, err)}", file=sys.stderr)
        return False
    peak_gib = (shared.peak_rss_gib() if shared is not None
                else resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20)
    row = {"notebook": nb.name, "seconds": round(time.time() - started, 1),
           "cpu_seconds": round(cpu() - cpu_before, 1), "peak_rss_gib_so_far": round(peak_gib, 2)}
    print(f"   done in {row['seconds']} s, {row['cpu_seconds']} s of CPU (peak RSS so far {peak_gib:.2f} GiB)",
          flush=True)
    return row


def shown_path(path: Path, cwd: Path) -> str:
    """The run folder as the notebook's injected parameter cell shows it: relative to the kernel's working
    directory when inside this repository (no machine paths in executed copies), else absolute."""
    path = Path(path).resolve()
    if REPO.resolve() in path.parents or path == REPO.resolve():
        return os.path.relpath(path, cwd)
    return str(path)


if __name__ == "__main__":
    sys.exit(main())
