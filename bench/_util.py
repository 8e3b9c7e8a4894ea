"""Shared by bench/*.py: interleaved timing, peak-memory sampling, machine facts, BENCHMARKS.md.

Numbers on a shared 2-core machine move with whatever else runs, so nothing here is an absolute
timed test: variants are timed side by side in one process, interleaved (A B C, B C A, C A B, ...)
after an untimed warm-up, and reported as medians and ratios of medians.
"""
from __future__ import annotations

import ctypes
import datetime
import gc
import os
import platform
import statistics
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from importlib.metadata import version  # noqa: E402

from refusal_lat.data import prompt_sets  # noqa: E402

try:  # glibc: hand every allocation >= 64 KiB back to the OS when freed, so RSS tracks live tensors
    ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 16)  # M_MMAP_THRESHOLD (also turns off its dynamic growth)
except (OSError, AttributeError):
    pass


# --- timing -------------------------------------------------------------------------------------

def compare(fns: dict, reps: int = 3, warmup: dict | None = None, sync=None, log=print) -> dict[str, list[float]]:
    """Seconds per call of each fn, `reps` rounds, rotating the order every round. `warmup` (name ->
    fn, default: the fns themselves) runs once, untimed, before the first round. `sync` (e.g.
    torch.cuda.synchronize) is called around each timed call."""
    sync = sync or (lambda: None)
    names = list(fns)
    for name in names:
        (warmup or fns)[name]()
    times = {name: [] for name in names}
    for rep in range(reps):
        for name in names[rep % len(names):] + names[:rep % len(names)]:
            sync()
            start = time.perf_counter()
            fns[name]()
            sync()
            times[name].append(time.perf_counter() - start)
            log(f"  {name}: {times[name][-1]:.2f} s")
    return times


def ratio(times: dict, a: str, b: str) -> float:
    """Median over rounds of a/b, each round's pair timed back to back (robust to load that drifts)."""
    return statistics.median(x / y for x, y in zip(times[a], times[b]))


def med(xs) -> float:
    return statistics.median(xs)


def spread(xs) -> str:
    """'median s (min-max)' for a table cell."""
    return f"{med(xs):.2f} s ({min(xs):.2f}-{max(xs):.2f})"


def busy_cores(seconds: float = 2.0) -> float:
    """Cores kept busy by other processes, from /proc/stat over `seconds` (the load average lags by
    minutes: a job that just ended would still count). This process sleeps while it samples."""
    def ticks():
        with open("/proc/stat") as f:
            values = [int(x) for x in f.readline().split()[1:]]
        return sum(values), values[3] + values[4]  # total, idle + iowait
    (total0, idle0), _, (total1, idle1) = ticks(), time.sleep(seconds), ticks()
    return (os.cpu_count() or 1) * (1 - (idle1 - idle0) / max(1, total1 - total0))


def set_threads(threads: str = "auto") -> str:
    """torch's CPU threads. "auto": the default (one per core) unless other processes already keep
    cores busy; then fewer, because OpenMP threads that wait on descheduled siblings at every op
    barrier make small ops (decode steps, hooks) several times slower. Returns a note for the report."""
    default = torch.get_num_threads()
    if threads == "auto":
        busy = busy_cores()
        n = max(1, min(default, (os.cpu_count() or 1) - round(busy)))
        note = f"threads auto: {n} ({busy:.1f} cores busy with other work before the bench, default {default})"
    else:
        n, note = int(threads), f"threads {threads} (default {default})"
    torch.set_num_threads(n)
    return note


# --- memory -------------------------------------------------------------------------------------

def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """Peak resident memory above the level at entry, sampled every `interval` s by a thread
    (torch releases the GIL in its kernels, so the sampler sees the allocations as they happen)."""

    def __init__(self, interval: float = 0.002):
        self.interval, self.peak, self._stop = interval, 0, threading.Event()

    def _sample(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            time.sleep(self.interval)

    def __enter__(self):
        gc.collect()
        self.base = self.peak = rss_bytes()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())
        self.delta = self.peak - self.base


def tensor_bytes(obj) -> int:
    """Bytes held by the tensors in a nested list/tuple/dict."""
    if isinstance(obj, torch.Tensor):
        return obj.nbytes
    if isinstance(obj, dict):
        obj = list(obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(x) for x in obj)
    return 0


def mib(n: float) -> str:
    return f"{n / 2**20:,.1f} MiB"


# --- inputs -------------------------------------------------------------------------------------

def bench_prompts(profile, n: int) -> list[str]:
    """n real prompts: the profile's eval prompts, then its direction sets, cycled if too few."""
    sets = prompt_sets(profile)
    pool = sets.eval + sets.harmful + sets.harmless
    return [pool[i % len(pool)] for i in range(n)]


def batches(items: list, size: int) -> list[list]:
    return [items[i:i + size] for i in range(0, len(items), size)]


def unit_direction(width: int, seed: int = 0) -> torch.Tensor:
    """A fixed random direction: the cost of ablation does not depend on which direction it is."""
    gen = torch.Generator().manual_seed(seed)
    r = torch.randn(width, generator=gen)
    return r / r.norm()


# --- report -------------------------------------------------------------------------------------

def machine() -> str:
    """One line: where, when, with what, and how busy the machine was."""
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    if torch.cuda.is_available():
        cpu += f"; GPU {torch.cuda.get_device_name()}"
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return (f"{datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z} · {cpu}, {os.cpu_count()} cores "
            f"(torch threads {torch.get_num_threads()}), {mem:.0f} GiB · load average {load} · "
            f"Python {platform.python_version()}, torch {torch.__version__}, "
            f"transformers {version('transformers')}")


def table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def verdict(met: bool) -> str:
    return "**met**" if met else "**missed**"


PREAMBLE = """# Benchmarks

Written by `bench/*.py` (`make bench`: `bench/run_all.py`; the GPU section by `bench/gpu.py`).
Every ratio compares variants timed side by side in one process, interleaved, medians of several
repetitions after an untimed warm-up; each section says when, where and with which versions it ran.
Absolute seconds on a shared 2-core machine move with its load; the ratios are the result.
"""


def update_section(path: Path, name: str, body: str):
    """Replace (or append) the block between <!-- bench:name --> markers, keeping the others."""
    path = Path(path)
    text = path.read_text() if path.is_file() else PREAMBLE
    start, end = f"<!-- bench:{name} -->", f"<!-- /bench:{name} -->"
    block = f"{start}\n{body.strip()}\n{end}"
    if (start in text) != (end in text):
        raise ValueError(f"{path}: {start} and {end} must both be there or neither; restore the missing "
                         f"marker (hand-written text belongs outside the markers)")
    if start in text:
        head, rest = text.split(start, 1)
        text = head + block + rest.split(end, 1)[1]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


# --- command line ------------------------------------------------------------------------------
def model_main(title: str, doc: str, run, add_args=None):
    """The command line of a bench on the profile's base model: --profile, --reps, --threads (plus add_args(parser)),
    the model loaded once, run(model, tokenizer, profile, args) -> (markdown, targets) printed under `title`."""
    import argparse
    from refusal_lat.config import load_profile
    from refusal_lat.models.load import load_model
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default="cpu")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", default="auto")
    if add_args:
        add_args(parser)
    args = parser.parse_args()
    note = set_threads(args.threads)
    profile = load_profile(args.profile)
    model, tok = load_model(profile, "base")
    md, _ = run(model, tok, profile, args)
    print(f"## {title} ({profile.name})\n\n{machine()}; {note}\n\n{md}")
