"""One progress bar for long loops. Interactive: tqdm.auto (a widget in Jupyter). With the environment
variable REFUSAL_LAT_PROGRESS=text (what scripts/run_notebooks.py sets for its kernel): plain-text lines
with rate and ETA on stderr, at most one every `mininterval` seconds, so a headless run shows progress
without carriage-return noise."""
from __future__ import annotations

import os
import sys

TEXT_INTERVAL_S = 15.0


class _Lines:
    """A file for tqdm that turns its carriage-return redraws into whole lines."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text: str):
        text = text.replace("\r", "").strip()
        if text:
            self.stream.write(text + "\n")

    def flush(self):
        self.stream.flush()


def text_mode() -> bool:
    return os.environ.get("REFUSAL_LAT_PROGRESS", "").lower() == "text"


def progress(iterable=None, total: int | None = None, desc: str = "", unit: str = "it",
             mininterval: float | None = None, stream=None):
    """A tqdm bar over `iterable` (or a manual one with `total`; call .update(n))."""
    if text_mode():
        from tqdm import tqdm
        return tqdm(iterable, total=total, desc=desc, unit=unit, file=_Lines(stream or sys.stderr), ascii=True,
                    ncols=100, mininterval=TEXT_INTERVAL_S if mininterval is None else mininterval, leave=True)
    from tqdm.auto import tqdm
    return tqdm(iterable, total=total, desc=desc, unit=unit, leave=False,
                **({} if mininterval is None else {"mininterval": mininterval}))
