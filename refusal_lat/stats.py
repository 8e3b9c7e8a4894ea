"""Rates with counts, Wald and Wilson intervals; agreement and Cohen's kappa; judge-error correction
(Rogan-Gladen); exact McNemar for paired cells; tidy score tables."""
from __future__ import annotations

import json
import math
from pathlib import Path

from .judges import METHODS, classify, judge_inputs

Z95 = 1.959963984540054
# Each judge's confusion counts against the authors' human labels on the held-out custom_set half
# (scripts/compare_judges.py --write): refusal = positive.
JUDGE_ERRORS_PATH = Path(__file__).with_name("judge_errors.json")
LABELLED_MODEL = "meta-llama/Llama-2-7b-chat-hf"
LABELLED_TOKENS = 64


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


def categorical_agreement(a, b) -> dict:
    """Two raters' labels from any set of classes on the same items: n, raw agreement and Cohen's kappa
    (p_o - p_e) / (1 - p_e), p_e from each rater's class shares; NaN when p_e = 1."""
    a, b = list(a), list(b)
    if len(a) != len(b) or not a:
        raise ValueError(f"categorical_agreement needs paired labels on at least one item: {len(a)} vs {len(b)}")
    n = len(a)
    observed = sum(x == y for x, y in zip(a, b)) / n
    expected = sum(a.count(c) * b.count(c) for c in set(a) | set(b)) / (n * n)
    kappa = math.nan if expected == 1 else (observed - expected) / (1 - expected)
    return {"n": n, "agreement": observed, "kappa": kappa}


def sensitivity_specificity(pred, truth) -> tuple[float, float]:
    """Sensitivity = P(pred True | truth True), specificity = P(pred False | truth False); both classes needed."""
    a = agreement(pred, truth)
    if a["tp"] + a["fn"] == 0 or a["tn"] + a["fp"] == 0:
        raise ValueError(f"need both classes in truth (positives {a['tp'] + a['fn']}, negatives {a['tn'] + a['fp']})")
    return a["sensitivity"], a["specificity"]


def rogan_gladen(raw_rate: float, sensitivity: float, specificity: float) -> float:
    """Error-corrected prevalence (raw + spec - 1) / (sens + spec - 1), clipped to [0, 1]."""
    for name, v in (("raw_rate", raw_rate), ("sensitivity", sensitivity), ("specificity", specificity)):
        if not 0.0 <= v <= 1.0:
            raise ValueError(f"{name} must lie in [0, 1], got {v}")
    youden = sensitivity + specificity - 1.0
    if youden <= 0:
        raise ValueError(f"sensitivity + specificity = {sensitivity + specificity:.6g} <= 1: the judge is no "
                         f"better than chance and the rate cannot be corrected")
    return min(1.0, max(0.0, (raw_rate + specificity - 1.0) / youden))


def corrected_rate_interval(count: int, n: int, sens_counts: tuple[int, int], spec_counts: tuple[int, int]) -> dict:
    """Rogan-Gladen rate with a conservative interval: the min/max of the correction over the 8 corners
    of the Wilson intervals of the raw rate, sensitivity and specificity (each (hits, total); corners
    with sens + spec <= 1 are skipped). Coverage is >= nominal per factor, not jointly exact."""
    raw = wilson(count, n)
    se, sp = wilson(*sens_counts), wilson(*spec_counts)
    point = rogan_gladen(count / n, sens_counts[0] / sens_counts[1], spec_counts[0] / spec_counts[1])
    corners = [rogan_gladen(r, a, b) for r in raw for a in se for b in sp if a + b > 1]
    if not corners:
        raise ValueError("every corner of the sensitivity/specificity intervals has sens + spec <= 1")
    return {"rate": point, "low": min(corners), "high": max(corners), "raw_rate": count / n,
            "raw_low": raw[0], "raw_high": raw[1]}


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


def judge_errors() -> dict:
    """{method: {tp, pos, tn, neg}} from judge_errors.json, plus "labelled": what the labels judged."""
    record = json.loads(JUDGE_ERRORS_PATH.read_text())
    return {**record["methods"], "labelled": record["labelled"]}


def like_labelled(profile) -> bool:
    """Whether a profile's completions resemble the human-labelled ones (Llama-2-7b-chat family,
    64-token greedy completions of harmful prompts): only then does the judges' measured error apply
    directly. Other models and lengths (e.g. `cpu`: Qwen 0.5B, 32 tokens) are not directly comparable."""
    return (all(spec.id == LABELLED_MODEL for spec in profile.models.values())
            and profile.max_new_tokens == LABELLED_TOKENS)


LABELLED_QWEN = ("Qwen2.5-Coder-0.5B-Instruct", 32)  # the cpu profile's model and tokens: the Qwen labelled set


def validation_domain(profile) -> str | None:
    """Which labelled set's judge validation describes a profile's completions: "llama2" (like_labelled: the
    authors' human labels), "qwen" (the cpu model and its adapters, 32-token turns: this project's blind
    labels, data/labels/validation/qwen.csv), else None (no labelled set: rates are not corrected)."""
    if like_labelled(profile):
        return "llama2"
    model, tokens = LABELLED_QWEN
    if all(spec.id.split("/")[-1] == model for spec in profile.models.values()) and profile.max_new_tokens == tokens:
        return "qwen"
    return None


def domain_errors(domain: str | None, methods) -> dict:
    """{method: {tp, pos, tn, neg}} of each judge on `domain`'s held-out labels (llama2: judge_errors.json;
    qwen: the published validation table, claims.judge_validation); a judge without one is left out."""
    if domain == "llama2":
        errors = judge_errors()
        return {m: errors[m] for m in methods if m in errors}
    if domain is None:
        return {}
    from .claims import judge_validation
    from .config import ConfigError
    out = {}
    for m in methods:
        try:
            v = judge_validation(m, domain)
        except ConfigError:  # this judge has no row in the domain's table
            v = None
        if v is not None:
            tp, fn, fp, tn = v["counts"]
            out[m] = {"tp": tp, "pos": tp + fn, "tn": tn, "neg": tn + fp}
    return out


def score_units(results: dict, methods=METHODS, judge_text: str = "turn", like_labelled: bool | None = None,
                domain: str | None = "llama2") -> "pd.DataFrame":
    """Tidy rates: one row per unit x method with refusal / acceptance / invalid counts and intervals,
    judged on each row's own turn (judge_text="turn") or everything generated ("full"). Each row also
    carries the judge's measured error against the human labels of `domain` (validation_domain(profile):
    "llama2", judge_errors.json; "qwen", this project's labelled turns; None: no labelled set, NaN):
    sensitivity, specificity, and the Rogan-Gladen corrected refusal rate with its propagated interval (NaN
    when the judge cannot be corrected). like_labelled (see stats.like_labelled) says whether the completions
    resemble the labelled ones; the correction is only as good as that resemblance, and even between
    two labelled prompt sets the judges' sensitivity/specificity differ (docs/method.md, "Judges").
    mean_refusal_log_odds: the cell's mean first-token refusal log-odds (selection.refusal_score),
    a judge-free continuous companion of the rate."""
    import pandas as pd
    errors = domain_errors(domain, methods)
    nan = {"tp": math.nan, "pos": math.nan, "tn": math.nan, "neg": math.nan}
    rows = []
    for (target, source, layer), records in results.items():
        completions, prompts = judge_inputs(records, judge_text)
        log_odds = sum(r["refusal_log_odds"] for r in records) / len(records) if "refusal_log_odds" in records[0] else math.nan
        for method in methods:
            labels = classify(completions, method, prompts)
            refusal = rate_summary(labels, 1)
            e = errors.get(method, nan)
            try:
                if method not in errors:
                    raise ValueError(f"no validation of {method} on {domain}")
                fixed = corrected_rate_interval(refusal["count"], refusal["n"], (e["tp"], e["pos"]), (e["tn"], e["neg"]))
            except ValueError:
                fixed = {"rate": math.nan, "low": math.nan, "high": math.nan}
            rows.append({"target": target, "source": source, "layer": layer, "method": method,
                         "n": refusal["n"], "refusals": refusal["count"], "refusal_rate": refusal["rate"],
                         "wald_low": refusal["wald_low"], "wald_high": refusal["wald_high"],
                         "wilson_low": refusal["wilson_low"], "wilson_high": refusal["wilson_high"],
                         "acceptance_rate": labels.count(0) / len(labels), "invalid_rate": labels.count(-1) / len(labels),
                         "judge_text": judge_text, "judge_domain": domain or "", "judge_sensitivity": e["tp"] / e["pos"],
                         "judge_specificity": e["tn"] / e["neg"], "corrected_rate": fixed["rate"],
                         "corrected_low": fixed["low"], "corrected_high": fixed["high"],
                         "like_labelled": like_labelled, "mean_refusal_log_odds": log_odds})
    return pd.DataFrame(rows)


def holm(p_values) -> list[float]:
    """Holm's step-down adjusted p-values (family-wise error control), in the input order: sort
    ascending, p_(i) * (m - i + 1) for i = 1..m, running maximum, capped at 1."""
    p = [float(x) for x in p_values]
    for x in p:
        if not 0.0 <= x <= 1.0:
            raise ValueError(f"p-values must lie in [0, 1], got {x}")
    m, out, running = len(p), [0.0] * len(p), 0.0
    for rank, i in enumerate(sorted(range(m), key=lambda i: p[i])):
        running = max(running, min(1.0, (m - rank) * p[i]))
        out[i] = running
    return out


def mcnemar_table(results: dict, method: str = "paper", judge_text: str = "turn") -> "pd.DataFrame":
    """Exact McNemar between cells on the same prompts: every two sources on the same target ("same
    target"), and every two targets under the same source ("same source": different models, paired by
    prompt, e.g. LAT<-base vs base<-base). All rows form one family: p_holm is Holm-adjusted over the
    whole table, and `family` says how many tests it holds."""
    import pandas as pd
    from itertools import combinations
    cells, prompts_of = {}, {}
    for unit, records in results.items():
        texts, prompts = judge_inputs(records, judge_text)
        cells[unit] = classify(texts, method, prompts)
        prompts_of[unit] = [r["prompt"] for r in records]
    rows = []
    for kind, key in (("same target", 0), ("same source", 1)):
        for a, b in combinations(cells, 2):
            if a[key] != b[key] or (kind == "same source" and a[0] == b[0]):
                continue
            if prompts_of[a] != prompts_of[b]:
                raise ValueError(f"cells {a} and {b} were run on different prompts; McNemar needs the same prompts")
            test = mcnemar(cells[a], cells[b])
            rows.append({"comparison": kind, "target_a": a[0], "source_a": a[1], "target_b": b[0], "source_b": b[1],
                         "method": method, "only_a_refuses": test["b"], "only_b_refuses": test["c"],
                         "p_value": test["p_value"]})
    out = pd.DataFrame(rows)
    if len(out):
        out["p_holm"] = holm(out.p_value)
        out["family"] = f"all {len(out)} McNemar tests of this table ({method} judge)"
    return out


def log_odds_matrix(results: dict, n_boot: int = 1000, seed: int = 0, level: float = 0.95,
                    n_perm: int = 10000) -> "pd.DataFrame":
    """Mean first-token refusal log-odds per cell (target x source, `none` included) with basic bootstrap
    intervals over prompts, and paired differences vs the target's no-ablation cell and vs its own
    direction, each with a paired sign-flip p-value (sign_flip_p, n_perm random sign patterns: the
    smallest p it can give is 1 / (n_perm + 1)) and Holm's correction over its column
    (the family: every cell of this table tested against the same reference). Every cell must hold the
    same prompts in the same order: one set of resample indices (seed) serves every cell, so all
    intervals and differences are paired by prompt."""
    import numpy as np
    import pandas as pd
    from .svd import bootstrap_indices
    from .units import NO_ABLATION
    prompts = None
    scores = {}
    for (target, source, _), records in results.items():
        if not records or "refusal_log_odds" not in records[0]:
            raise ValueError(f"cell {target}<-{source} has no refusal_log_odds; regenerate its unit")
        seen = [r["prompt"] for r in records]
        if prompts is None:
            prompts = seen
        elif seen != prompts:
            raise ValueError(f"cell {target}<-{source} holds different prompts; paired intervals need the same ones")
        scores[(target, source)] = np.array([r["refusal_log_odds"] for r in records], np.float64)
    idx = bootstrap_indices(len(prompts), n_boot, seed)
    signs = sign_patterns(len(prompts), n_perm, seed)
    rows = []
    for (target, source), x in scores.items():
        row = {"target": target, "source": source, "n": len(x)}
        for col, ref in (("mean_log_odds", None), ("diff_vs_none", (target, NO_ABLATION)), ("diff_vs_self", (target, target))):
            if ref is not None and ref not in scores:
                continue
            y = x if ref is None else x - scores[ref]
            row[col], row[f"{col}_lo"], row[f"{col}_hi"] = mean_interval(y, idx, level)
            if ref is not None and ref != (target, source):
                row[f"{col}_p"] = sign_flip_p(y, signs)
        rows.append(row)
    out = pd.DataFrame(rows)
    for col in ("diff_vs_none_p", "diff_vs_self_p"):
        if col in out:
            tested = out[col].notna()
            out.loc[tested, col + "_holm"] = holm(out.loc[tested, col])
    return out


def mean_interval(y, idx, level: float = 0.95) -> tuple[float, float, float]:
    """(mean, basic lo, basic hi) of per-prompt values `y` over the bootstrap resamples `idx` [n_boot, n]
    (svd.bootstrap_indices); with y a paired difference this is a paired interval."""
    from .svd import intervals
    ci = intervals(y.mean(), y[idx].mean(1), level)
    return float(y.mean()), float(ci["basic_lo"]), float(ci["basic_hi"])


def sign_patterns(n: int, n_perm: int = 10000, seed: int = 0):
    """[n_perm, n] random +-1 signs for sign_flip_p (one seeded set, shared by every test of a table)."""
    import numpy as np
    return np.random.default_rng(seed).choice([-1.0, 1.0], size=(n_perm, n))


def sign_flip_p(diffs, signs) -> float:
    """Two-sided paired sign-flip (permutation) p-value of mean(diffs) = 0: under the null each prompt's
    difference is as likely negative as positive. `signs` is a [n_perm, n] matrix of +-1; the observed
    statistic counts as one permutation, so p >= 1 / (n_perm + 1)."""
    import numpy as np
    diffs = np.asarray(diffs, np.float64)
    observed = abs(diffs.mean())
    flipped = np.abs((signs * diffs).mean(1))
    return float((1 + np.sum(flipped >= observed - 1e-12)) / (1 + len(signs)))


def tost_paired(a, b, margin: float, alpha: float = 0.05) -> dict:
    """Two one-sided tests that mean(a - b) lies inside (-margin, margin), a and b paired 0/1 (or real)
    values per prompt (e.g. a model's and the base model's refusals of the same harmless prompts). Normal
    approximation on the paired differences: p_low tests H0 "difference <= -margin", p_high "difference
    >= margin"; equivalent when both are below alpha, i.e. the (1 - 2 alpha) interval lies inside the
    margin. Returns {difference, se, lo, hi (that interval), p_low, p_high, p, equivalent}."""
    import numpy as np
    d = np.asarray(a, np.float64) - np.asarray(b, np.float64)
    n, mean = len(d), float(d.mean())
    se = float(d.std(ddof=1) / math.sqrt(n)) if n > 1 else 0.0
    z = _normal_quantile(1 - alpha)
    if se == 0:  # every prompt moved by the same amount: no sampling spread
        p_low, p_high = float(mean <= -margin), float(mean >= margin)
    else:
        p_low = 1 - _normal_cdf((mean + margin) / se)
        p_high = 1 - _normal_cdf((margin - mean) / se)
    p = max(p_low, p_high)
    return {"n": n, "difference": mean, "se": se, "lo": mean - z * se, "hi": mean + z * se, "margin": margin,
            "p_low": p_low, "p_high": p_high, "p": p, "equivalent": bool(p < alpha)}


def _normal_cdf(x: float) -> float:
    return 0.5 * (1 + math.erf(x / math.sqrt(2)))


def _normal_quantile(p: float) -> float:
    """Inverse of _normal_cdf by bisection (to 1e-12; enough for interval ends)."""
    lo, hi = -40.0, 40.0
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if _normal_cdf(mid) < p else (lo, mid)
    return (lo + hi) / 2


def hierarchical_bootstrap(a, b, n_boot: int = 2000, seed: int = 0, level: float = 0.95,
                           paired_seeds: bool = False, wide_level: float | None = None) -> dict:
    """Difference of means between models a and b with seed-level uncertainty: a and b are [seeds, prompts]
    arrays on the same prompts (b may have one row: a reference without seeds, such as the base model).
    Each resample draws seeds with replacement (separately for a and b; with paired_seeds the same seed
    rows for both, e.g. one set of models under two conditions) and then prompts with replacement (the
    same prompts for both: the comparison stays paired by prompt). Percentile interval; wide_level: also
    wide_lo/wide_hi at that level from the same replicates (e.g. a family's Bonferroni level)."""
    import numpy as np
    a, b = np.atleast_2d(np.asarray(a, np.float64)), np.atleast_2d(np.asarray(b, np.float64))
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"a and b must cover the same prompts: {a.shape[1]} vs {b.shape[1]} columns")
    if paired_seeds and len(a) != len(b):
        raise ValueError(f"paired seeds need as many rows in a as in b: {len(a)} vs {len(b)}")
    rng = np.random.default_rng(seed)
    n = a.shape[1]
    boot = np.empty(n_boot)
    for i in range(n_boot):
        sa = rng.integers(0, len(a), len(a))
        sb = sa if paired_seeds else rng.integers(0, len(b), len(b))
        p = rng.integers(0, n, n)
        boot[i] = a[sa][:, p].mean() - b[sb][:, p].mean()
    tail = (1 - level) / 2
    out = {"difference": float(a.mean() - b.mean()), "lo": float(np.quantile(boot, tail)),
           "hi": float(np.quantile(boot, 1 - tail)), "seeds_a": len(a), "seeds_b": len(b), "prompts": n}
    if wide_level is not None:
        wide = (1 - wide_level) / 2
        out.update(wide_lo=float(np.quantile(boot, wide)), wide_hi=float(np.quantile(boot, 1 - wide)))
    return out


# --- judge-corrected paired differences (issue 29) ------------------------------------------------------------

def validation_counts(pred, truth) -> tuple[int, int, int, int]:
    """(tp, fn, fp, tn) of a judge's labels `pred` against human labels `truth` (True = refusal), e.g. on the
    held-out half of the labelled set of the domain whose text the judge reads."""
    a = agreement(pred, truth)
    return a["tp"], a["fn"], a["fp"], a["tn"]


def corrected_difference(labels_a, labels_b, validation, n_boot: int = 2000, seed: int = 0, level: float = 0.95,
                         idx=None, draws=None) -> dict:
    """Rogan-Gladen corrected refusal rates of two models judged on the same prompts, their difference a - b, and
    a bootstrap interval that carries both the prompts' and the judge's uncertainty.

    labels_a, labels_b: per-prompt judge values in [0, 1] on the same prompts in the same order (0/1 labels,
    1 = refusal; or a prompt's mean over seeds). validation: (tp, fn, fp, tn), the judge against human labels on
    the held-out labelled rows of the matching domain (refusal = positive). Each bootstrap replicate resamples
    the prompts (one set of indices for both models: paired) and the validation rows (a multinomial draw of the
    four cells with the same total: the rows drawn with replacement), recomputes sensitivity and specificity from
    the drawn rows and corrects both rates with them (rogan_gladen, clipped to [0, 1]); a replicate whose drawn
    sensitivity + specificity <= 1 cannot be corrected and is left out (counted in n_dropped). The interval is
    the basic bootstrap interval (2 t - q_hi, 2 t - q_lo), as the claims table's others. idx [n_boot, n] and
    draws [n_boot, 4] replace the random resamples (for checks by hand).
    Returns {a, b, estimate, lo, hi, raw_a, raw_b, raw_estimate, sensitivity, specificity, n, n_validation,
    n_boot, n_dropped}."""
    import numpy as np
    a, b = np.asarray(labels_a, np.float64), np.asarray(labels_b, np.float64)
    if a.shape != b.shape or a.ndim != 1 or len(a) == 0:
        raise ValueError(f"corrected_difference needs paired per-prompt values: {a.shape} vs {b.shape}")
    if np.any((a < 0) | (a > 1)) or np.any((b < 0) | (b > 1)):
        raise ValueError("per-prompt judge values must lie in [0, 1]")
    tp, fn, fp, tn = (int(v) for v in validation)
    if min(tp, fn, fp, tn) < 0 or tp + fn == 0 or fp + tn == 0:
        raise ValueError(f"validation (tp, fn, fp, tn) = {validation}: needs human refusals and non-refusals")
    sens, spec = tp / (tp + fn), tn / (tn + fp)
    point_a, point_b = rogan_gladen(a.mean(), sens, spec), rogan_gladen(b.mean(), sens, spec)
    rng = np.random.default_rng(seed)
    n, total = len(a), tp + fn + fp + tn
    idx = rng.integers(0, n, size=(n_boot, n)) if idx is None else np.asarray(idx)
    draws = rng.multinomial(total, np.array([tp, fn, fp, tn]) / total, size=len(idx)) if draws is None \
        else np.asarray(draws)
    if len(draws) != len(idx):
        raise ValueError(f"{len(idx)} prompt resamples but {len(draws)} validation draws")
    draws = draws.astype(np.float64)
    pos, neg = draws[:, 0] + draws[:, 1], draws[:, 2] + draws[:, 3]
    with np.errstate(divide="ignore", invalid="ignore"):
        s, p = draws[:, 0] / pos, draws[:, 3] / neg
    keep = (pos > 0) & (neg > 0) & (s + p > 1)
    if not keep.any():
        raise ValueError("no bootstrap replicate could be corrected (sensitivity + specificity <= 1 in every draw)")
    rows, s, p = idx[keep], s[keep], p[keep]
    youden = s + p - 1  # rogan_gladen, vectorised: (raw + spec - 1) / (sens + spec - 1), clipped to [0, 1]
    fixed_a = np.clip((a[rows].mean(1) + p - 1) / youden, 0.0, 1.0)
    fixed_b = np.clip((b[rows].mean(1) + p - 1) / youden, 0.0, 1.0)
    reps = fixed_a - fixed_b
    estimate = point_a - point_b
    q_lo, q_hi = np.quantile(reps, [(1 - level) / 2, (1 + level) / 2])
    return {"a": point_a, "b": point_b, "estimate": estimate, "lo": float(2 * estimate - q_hi),
            "hi": float(2 * estimate - q_lo), "raw_a": float(a.mean()), "raw_b": float(b.mean()),
            "raw_estimate": float(a.mean() - b.mean()), "sensitivity": sens, "specificity": spec, "n": n,
            "n_validation": total, "n_boot": int(keep.sum()), "n_dropped": int((~keep).sum())}
