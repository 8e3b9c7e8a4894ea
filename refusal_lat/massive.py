"""Massive activations: a few residual-stream channels whose values are many times the usual size (Sun et
al. 2024, "Massive activations in large language models"; Llama-2-7b's are channels 1415 and 2533). Row
peaks on chosen channels, pair flags (the union over models keeps the models index-paired), the refusal
direction's share of norm² on the channels, and one mechanism table for any set of models: the authors'
released Llama-2 rows (notebook 02), a profile's cached activations, scripts/check_massive_activations.py.
Plain arrays in, numbers out; which channels and thresholds are always the caller's arguments."""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np


def as_rows(x) -> np.ndarray:
    """A [n, d] float64 array from a tensor or array."""
    x = x.detach().double().cpu().numpy() if hasattr(x, "detach") else np.asarray(x, np.float64)
    if x.ndim != 2:
        raise ValueError(f"expected [n, d] activations, got shape {x.shape}")
    return x


def top_channels(rows: Sequence, n: int = 2) -> tuple[int, ...]:
    """The n channels with the largest |x| anywhere in `rows` (a list of [n_i, d] arrays), largest first."""
    peak = np.max([np.abs(as_rows(x)).max(0) for x in rows], axis=0)
    return tuple(int(c) for c in np.argsort(-peak, kind="stable")[:n])


def row_peaks(x, channels: Sequence[int]) -> np.ndarray:
    """[n] largest |x[:, c]| over `channels` per row."""
    return np.abs(as_rows(x)[:, list(channels)]).max(1)


def flag_pairs(pairs: Mapping, threshold: float, channels: Sequence[int], models: Sequence[str] | None = None) -> np.ndarray:
    """Bool [n]: pair i has a harmful or harmless row whose peak on `channels` exceeds `threshold` in ANY of
    `models` (default: every model in `pairs`, {model: (harmful, harmless)} at one layer). Dropping these pairs
    from every model keeps the models index-paired; models=(one,) gives that model's own flags."""
    models = list(pairs) if models is None else list(models)
    masks = [(row_peaks(h, channels) > threshold) | (row_peaks(hl, channels) > threshold)
             for h, hl in (pairs[m] for m in models)]
    if len({len(m) for m in masks}) > 1:
        raise ValueError(f"models {models} have different numbers of pairs; they must be index-paired")
    return np.logical_or.reduce(masks)


def mean_difference(harmful, harmless) -> np.ndarray:
    return as_rows(harmful).mean(0) - as_rows(harmless).mean(0)


def direction_channel_mass(harmful, harmless, channels: Sequence[int]) -> float:
    """Share of the mean-difference (refusal) direction's norm² on `channels`: ablating the direction
    removes that share of it along those channels too. NaN when the direction is zero (harmful = harmless)."""
    r = mean_difference(harmful, harmless)
    total = r @ r
    return float((r[list(channels)] ** 2).sum() / total) if total > 0 else float("nan")


def row_frobenius(d, keep=None) -> float:
    """‖D‖_F / sqrt(rows) over the kept rows: a per-pair size, comparable across different numbers of pairs."""
    d = as_rows(d) if keep is None else as_rows(d)[np.asarray(keep, bool)]
    return float(np.linalg.norm(d) / np.sqrt(len(d)))


def pooled(pair) -> np.ndarray:
    """Harmful and harmless rows of one (harmful, harmless) pair of arrays, stacked."""
    return np.vstack([as_rows(pair[0]), as_rows(pair[1])])


def channel_summary(acts: Mapping, channels: Sequence[int], cuts: Sequence[float] = (2.0, 10.0, 40.0)):
    """One row per model x layer x set (harmful / harmless) of {(model, layer): (harmful, harmless)}: the
    largest |x| of each channel, the correlation of the first two channels across rows, the rows whose peak
    on `channels` exceeds each cut (n_above_<cut>) and the median peak of the rows above the middle cut."""
    import pandas as pd
    rows = []
    for (model, layer), pair in acts.items():
        for kind, x in zip(("harmful", "harmless"), pair):
            x = as_rows(x)
            peak = row_peaks(x, channels)
            row = {"model": model, "layer": layer, "set": kind, "n": len(x)}
            row.update({f"max_abs_{c}": float(np.abs(x[:, c]).max()) for c in channels})
            if len(channels) >= 2:
                a, b = x[:, channels[0]], x[:, channels[1]]
                row["r"] = float(np.corrcoef(a, b)[0, 1]) if a.std() > 0 and b.std() > 0 else float("nan")
            row.update({f"n_above_{c:g}": int((peak > c).sum()) for c in cuts})
            middle = cuts[len(cuts) // 2]
            row[f"median_peak_above_{middle:g}"] = float(np.median(peak[peak > middle])) if (peak > middle).any() else float("nan")
            rows.append(row)
    return pd.DataFrame(rows)


def mechanism_table(acts: Mapping, channels: Sequence[int] | None = None, reference: str = "base",
                    ks: Sequence[float] = (2.0, 5.0, 10.0), n_channels: int = 2):
    """The mechanism measurement, one row per model x layer of {(model, layer): (harmful, harmless)} (rows =
    the last-token block inputs of the same prompts in every model): the median row norm with and without
    the channels (zeroed), the largest |x| on them and its ratio to the `reference` model's largest at that
    layer, how many prompts (harmful + harmless rows) peak above k x the reference's largest for each k, and
    the mean-difference direction's share of norm² on the channels. channels=None: at each layer the
    n_channels channels with the largest |x| in any model there."""
    import pandas as pd
    rows = []
    for layer in dict.fromkeys(l for _, l in acts):
        here = {m: acts[(m, l)] for m, l in acts if l == layer}
        if reference not in here:
            raise ValueError(f"layer {layer}: no {reference!r} model to compare with; models: {sorted(here)}")
        chans = list(channels) if channels is not None else list(top_channels([pooled(p) for p in here.values()], n_channels))
        ref = row_peaks(pooled(here[reference]), chans).max()
        for model, pair in here.items():
            x = pooled(pair)
            peak = row_peaks(x, chans)
            rest = x.copy()
            rest[:, chans] = 0.0
            row = {"model": model, "layer": layer, "channels": " ".join(map(str, chans)), "n_prompts": len(x),
                   "norm": float(np.median(np.linalg.norm(x, axis=1))),
                   "norm_without": float(np.median(np.linalg.norm(rest, axis=1))),
                   "peak": float(peak.max()), "peak_vs_reference": float(peak.max() / ref) if ref > 0 else float("inf")}
            row.update({f"above_{k:g}x": int((peak > k * ref).sum()) for k in ks})
            row["direction_mass"] = direction_channel_mass(*pair, chans)
            rows.append(row)
    return pd.DataFrame(rows)


def profile_layer_pairs(acts_by_role: Mapping, layers: Sequence[int]) -> dict:
    """{(role, layer): (harmful, harmless)} float64 rows from a profile's cached activations ({role: {"harmful":
    [n, L, d], "harmless": ...}}, activations.activations), for mechanism_table."""
    return {(role, layer): (as_rows(a["harmful"][:, layer]), as_rows(a["harmless"][:, layer]))
            for role, a in acts_by_role.items() for layer in layers}
