"""The fast test suite (`make test`) and the tiny notebook series (`PROFILE=tiny make reproduce`, into a
temporary run folder), each run once in a subprocess: wall time and CPU time (user + system of the
process and everything it waited for: pytest, papermill and the notebooks' kernels). The CPU time is the
number to compare on a shared machine for the series; the fast suite runs in 2 worker processes, so its target
is wall time on idle cores.

    .venv/bin/python bench/suite.py            # ~2-3 min on 2 cores
"""
from __future__ import annotations

import csv
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _util import REPO, busy_cores, table, verdict

TARGET_S = 60  # issue 30: `make test` <= 60 s on 2 idle cores; the tiny series <= 60 s of CPU after setup
WORKERS = 2    # `make test` runs pytest in TEST_WORKERS = 2 processes (pytest-xdist), one per core


def timed(command: list[str], log=print) -> tuple[float, float, int]:
    """(wall s, CPU s, exit status) of one subprocess run in the repository."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "REFUSAL_LAT_PROGRESS": "off"})
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    if done.returncode:
        log(f"  {' '.join(command[1:3])}... exited {done.returncode}: {(done.stdout + done.stderr)[-400:]}")
    return wall, cpu, done.returncode


def run(log=print):
    busy = busy_cores()
    wall, cpu, status = timed([sys.executable, "-m", "pytest", "-q", "-n", str(WORKERS), "-m", "not slow", "-p",
                               "no:cacheprovider", "tests"], log)
    suite = (f"Fast suite (`make test`, {WORKERS} workers): {wall:.0f} s wall, {cpu:.0f} s CPU, exit status {status} "
             f"({busy:.1f} cores busy with other work before it).")
    with tempfile.TemporaryDirectory() as tmp:
        s_wall, s_cpu, s_status = timed([sys.executable, "scripts/run_notebooks.py", "--profile", "tiny",
                                         "--run-dir", tmp], log)
        path = Path(tmp) / "series.csv"
        notebooks = list(csv.DictReader(path.open())) if path.is_file() else []
    rows = [[r["notebook"], r["seconds"], r.get("cpu_seconds", "-")] for r in notebooks]
    kernels = sum(float(r.get("cpu_seconds") or 0) for r in notebooks)
    rows.append(["runner (papermill, imports; the rest of the CPU time)", "-", f"{s_cpu - kernels:.1f}"])
    md = (suite + "\n\nTiny series (`scripts/run_notebooks.py --profile tiny` into a temporary folder, so every "
          f"artifact is computed; notebook 00 runs only when the tiny adapters are missing): {s_wall:.0f} s wall, "
          f"{s_cpu:.0f} s CPU, exit status {s_status}.\n\n" + table(["notebook", "wall s", "kernel CPU s"], rows)
          + "\n\nOn `tiny` one kernel runs the whole series (`--kernel auto`, reset before each notebook): a fresh "
          "kernel per notebook paid ~5 s of CPU each before its own work (the kernel, `import helpers`, matplotlib, "
          "transformers' model classes); `--kernel each` still does that.")
    targets = [(f"fast suite <= {TARGET_S} s wall on 2 idle cores ({WORKERS} workers; {busy:.1f} cores were busy)",
                f"{wall:.0f} s wall ({cpu:.0f} s CPU)", wall <= TARGET_S and status == 0),
               (f"tiny series <= {TARGET_S} s of CPU", f"{s_cpu:.0f} s", s_cpu <= TARGET_S and s_status == 0)]
    return md, targets


def main():
    md, targets = run()
    print(f"## Fast suite and tiny series\n\n{md}\n")
    for name, value, met in targets:
        print(f"{name}: {value} ({verdict(met)})")


if __name__ == "__main__":
    main()
