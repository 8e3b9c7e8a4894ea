"""Rates with counts, Wald and Wilson intervals; agreement and Cohen's kappa of two raters; exact McNemar for
paired cells; tidy score tables."""
from __future__ import annotations

import math

from .judges import METHODS, classify

Z95 = 1.959963984540054


def wilson(count: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of count / n (95 % by default), clipped to [0, 1]."""
    if n <= 0:
        raise ValueError(f"wilson needs n >= 1, got n={n}")
    p = count / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def rate_summary(labels: list[int], label: int = 1) -> dict:
    """Share of `label` with 95 % Wald (as in the paper, clipped to [0, 1]) and Wilson intervals."""
    labels = list(labels)
    n = len(labels)
    if n == 0:
        raise ValueError("rate_summary needs at least one label; got an empty list")
    count = sum(1 for x in labels if x == label)
    p = count / n
    half = Z95 * math.sqrt(p * (1 - p) / n)
    low, high = wilson(count, n)
    return {"count": count, "n": n, "rate": p, "wald_low": max(0.0, p - half), "wald_high": min(1.0, p + half),
            "wilson_low": low, "wilson_high": high}


def agreement(pred, reference) -> dict:
    """Two raters' yes/no labels on the same items (pred vs reference, e.g. a judge vs the human labels,
    True = positive): n, raw agreement, Cohen's kappa, confusion counts tp/fp/fn/tn, sensitivity tp/(tp+fn),
    specificity tn/(tn+fp). Kappa = (p_o - p_e)/(1 - p_e) in exact integers; when p_e = 1 (both raters gave
    one and the same class to every item) kappa is undefined: NaN, as are rates with an empty denominator."""
    pred, ref = [bool(x) for x in pred], [bool(x) for x in reference]
    if len(pred) != len(ref):
        raise ValueError(f"agreement needs paired labels: {len(pred)} predictions vs {len(ref)} reference labels")
    n = len(pred)
    if n == 0:
        raise ValueError("agreement needs at least one item")
    tp = sum(p and r for p, r in zip(pred, ref))
    fp = sum(p and not r for p, r in zip(pred, ref))
    fn = sum(r and not p for p, r in zip(pred, ref))
    tn = n - tp - fp - fn
    expected = (tp + fp) * (tp + fn) + (fn + tn) * (fp + tn)  # n^2 * p_e
    kappa = math.nan if expected == n * n else (n * (tp + tn) - expected) / (n * n - expected)
    return {"n": n, "agreement": (tp + tn) / n, "kappa": kappa, "tp": tp, "fp": fp, "fn": fn, "tn": tn,
            "sensitivity": tp / (tp + fn) if tp + fn else math.nan,
            "specificity": tn / (tn + fp) if tn + fp else math.nan}


def mcnemar(labels_a: list[int], labels_b: list[int], label: int = 1) -> dict:
    """Exact two-sided McNemar test of "is `label`" on paired outcomes (same prompts, same order).

    b = pairs where only A has the label, c = only B; p = min(1, 2 * P(X <= min(b, c))),
    X ~ Binomial(b + c, 1/2), computed with exact integer arithmetic.
    """
    a, b_ = list(labels_a), list(labels_b)
    if len(a) != len(b_):
        raise ValueError(f"mcnemar needs paired labels: labels_a has {len(a)} items, labels_b has {len(b_)}")
    b = sum(1 for x, y in zip(a, b_) if x == label and y != label)
    c = sum(1 for x, y in zip(a, b_) if x != label and y == label)
    n = b + c
    if n == 0:
        return {"b": 0, "c": 0, "p_value": 1.0}
    tail = sum(math.comb(n, k) for k in range(min(b, c) + 1))
    return {"b": b, "c": c, "p_value": min(1.0, 2 * tail / 2**n)}


def score_units(results: dict, methods=METHODS) -> "pd.DataFrame":
    """Tidy rates: one row per unit x method with refusal / acceptance / invalid counts and intervals."""
    import pandas as pd
    rows = []
    for (target, source, layer), records in results.items():
        completions = [r["completion"] for r in records]
        for method in methods:
            labels = classify(completions, method)
            refusal = rate_summary(labels, 1)
            rows.append({"target": target, "source": source, "layer": layer, "method": method,
                         "n": refusal["n"], "refusals": refusal["count"], "refusal_rate": refusal["rate"],
                         "wald_low": refusal["wald_low"], "wald_high": refusal["wald_high"],
                         "wilson_low": refusal["wilson_low"], "wilson_high": refusal["wilson_high"],
                         "acceptance_rate": labels.count(0) / len(labels), "invalid_rate": labels.count(-1) / len(labels)})
    return pd.DataFrame(rows)


def mcnemar_table(results: dict, method: str = "paper") -> "pd.DataFrame":
    """Exact McNemar between every two cells of the same target (same prompts, different sources)."""
    import pandas as pd
    from itertools import combinations
    rows = []
    targets = sorted({u[0] for u in results}, key=[u[0] for u in results].index)
    for target in targets:
        cells = {u: classify([r["completion"] for r in recs], method) for u, recs in results.items() if u[0] == target}
        for a, b in combinations(cells, 2):
            test = mcnemar(cells[a], cells[b])
            rows.append({"target": target, "source_a": a[1], "source_b": b[1], "method": method,
                         "only_a_refuses": test["b"], "only_b_refuses": test["c"], "p_value": test["p_value"]})
    return pd.DataFrame(rows)
