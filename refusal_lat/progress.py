"""One progress bar for long loops. Interactive: tqdm.auto (a widget in Jupyter). With the environment
variable REFUSAL_LAT_PROGRESS=text (what scripts/run_notebooks.py sets for its kernel): plain-text lines on
stderr, one per stage when it is short (written when it ends: what, how many, how long) and, for a stage
that runs longer, a line with rate and ETA every `mininterval` seconds before it."""
from __future__ import annotations

import os
import sys
import time

TEXT_INTERVAL_S = 15.0


def _duration(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, s = divmod(int(round(seconds)), 60)
    return f"{minutes} min {s:02d} s" if minutes < 60 else f"{minutes // 60} h {minutes % 60:02d} min"


class TextProgress:
    """The part of tqdm's interface the engine uses (iteration, update, n, close, context manager), as
    whole lines: nothing when the stage starts, `desc: n/total unit in T` when it ends, and in between a
    line with rate and ETA at most every `mininterval` seconds."""

    def __init__(self, iterable=None, total: int | None = None, desc: str = "", unit: str = "it",
                 mininterval: float = TEXT_INTERVAL_S, stream=None):
        self.iterable = iterable
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)
        self.total, self.desc, self.unit, self.mininterval = total, desc, unit, mininterval
        self.stream = stream or sys.stderr
        self.n = 0
        self.started = self.last = time.monotonic()
        self.closed = False

    def __iter__(self):
        try:
            for item in self.iterable:
                yield item
                self.update(1)
        finally:
            self.close()

    def __len__(self):
        return self.total or 0

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _count(self) -> str:
        return f"{self.n}/{self.total} {self.unit}" if self.total else f"{self.n} {self.unit}"

    def update(self, n: int = 1):
        self.n += n
        now = time.monotonic()
        if now - self.last >= self.mininterval and not self.closed:
            self.last = now
            elapsed = now - self.started
            rate = self.n / elapsed if elapsed > 0 else 0.0
            eta = f", ETA {_duration((self.total - self.n) / rate)}" if self.total and rate > 0 else ""
            self._write(f"{self.desc}: {self._count()} after {_duration(elapsed)} ({rate:.3g} {self.unit}/s{eta})")

    def close(self):
        if self.closed:
            return
        self.closed = True
        self._write(f"{self.desc}: {self._count()} in {_duration(time.monotonic() - self.started)}")

    def _write(self, line: str):
        self.stream.write(line + "\n")
        self.stream.flush()


def text_mode() -> bool:
    return os.environ.get("REFUSAL_LAT_PROGRESS", "").lower() == "text"


def progress(iterable=None, total: int | None = None, desc: str = "", unit: str = "it",
             mininterval: float | None = None, stream=None):
    """A progress bar over `iterable` (or a manual one with `total`; call .update(n))."""
    if text_mode():
        return TextProgress(iterable, total=total, desc=desc, unit=unit,
                            mininterval=TEXT_INTERVAL_S if mininterval is None else mininterval, stream=stream)
    from tqdm.auto import tqdm
    return tqdm(iterable, total=total, desc=desc, unit=unit, leave=False,
                **({} if mininterval is None else {"mininterval": mininterval}))
