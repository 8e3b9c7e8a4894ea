"""SVD of the paired harmful-harmless differences (notebook 02; docs/method.md, "SVD").
D = harmful_i - harmless_i (index-paired), *uncentered* SVD, ratio s^2 / sum s^2."""
from __future__ import annotations

import functools
from typing import Mapping

import numpy as np
import torch

from .config import ConfigError

N_COMPONENTS = 10


def layer_activations(acts: dict, role: str, layer: int, name: str) -> np.ndarray:
    """One layer of one cached set as float64 numpy, with errors that name the model and layer."""
    tensor = acts[name]
    n_layers = tensor.shape[1]
    if not -n_layers <= layer < n_layers:
        raise ConfigError(f"model '{role}': layer {layer} out of range; it has block inputs 0..{n_layers - 1}")
    x = tensor[:, layer].double().numpy()
    if not np.isfinite(x).all():
        raise FloatingPointError(f"model '{role}', layer {layer}: NaN/Inf in the '{name}' activations; "
                                 f"delete runs/<profile>/activations/{role}.* to recompute")
    return x


def _as_matrix(x, label: str) -> np.ndarray:
    x = x.detach().double().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"{label}expected a 2-D [n, d] array, got shape {x.shape}")
    if not np.isfinite(x).all():
        raise FloatingPointError(f"{label}NaN/Inf in the activations")
    return x


def paired_differences(harmful, harmless, label: str = "") -> np.ndarray:
    """D[i] = harmful[i] - harmless[i] in float64; the pairing is by index, as in the paper."""
    prefix = f"{label}: " if label else ""
    a, b = _as_matrix(harmful, prefix), _as_matrix(harmless, prefix)
    if a.shape != b.shape:
        raise ValueError(f"{prefix}harmful {a.shape} and harmless {b.shape} must have the same [n, d] "
                         f"(the SVD pairs row i with row i)")
    return a - b


def explained_variance_ratio(harmful, harmless, centered: bool = False, label: str = "") -> np.ndarray:
    """s^2 / sum(s^2) of the [n, d] difference matrix, largest first. centered=False is the paper's
    measure (an energy share; component 1 is mostly the mean difference); True is PCA of the differences."""
    from scipy.linalg import svd
    d = paired_differences(harmful, harmless, label)
    if centered:
        d = d - d.mean(0)
    energy = svd(d, compute_uv=False) ** 2
    if energy.sum() == 0:
        raise ValueError(f"{label + ': ' if label else ''}harmful and harmless activations are identical; "
                         f"no spectrum to share out")
    return energy / energy.sum()


@functools.lru_cache(maxsize=1)
def _blas_pools():
    """The BLAS thread pools of numpy and scipy, found once (threadpool_limits would scan the process's
    libraries on every call: ~5 ms, more than the small products it guards)."""
    import scipy.linalg  # noqa: F401  (scipy may bring its own BLAS: load it before looking)
    from threadpoolctl import ThreadpoolController
    return ThreadpoolController()


def one_blas_thread(fn):
    """Run `fn` on one BLAS thread. Its matrices are small (a few hundred rows by d): on a busy 2-core machine
    the default threads only wait for each other (the released Llama-2 section: 62 s -> 4 s for the
    second-direction tests, 1.8 s -> 0.25 s for 24 spectra, measured)."""
    @functools.wraps(fn)
    def run(*args, **kwargs):
        with _blas_pools().limit(limits=1):
            return fn(*args, **kwargs)
    return run


@one_blas_thread
def small_eigvalsh(matrices: np.ndarray) -> np.ndarray:
    """np.linalg.eigvalsh on one BLAS thread: for ~100 x 100 matrices threads only add overhead
    (1,000 of them: 0.3 s on one thread vs 17 s with the default threads on a busy 2-core machine)."""
    return np.linalg.eigvalsh(matrices)


def gram_ratios(gram: np.ndarray, k: int, centered: bool = False) -> np.ndarray:
    """Top-k s^2/sum s^2 of D from its n x n Gram matrix D D^T (same nonzero spectrum, much cheaper);
    centered: of D minus its column means. Zero-padded to k."""
    if centered:
        gram = gram - gram.mean(0, keepdims=True) - gram.mean(1, keepdims=True) + gram.mean()
    eig = np.clip(small_eigvalsh(gram)[::-1], 0, None)
    if eig.sum() <= 0:
        raise ValueError("the difference matrix is zero; no spectrum to share out")
    out = np.zeros(k)
    out[:min(k, len(eig))] = eig[:k] / eig.sum()
    return out


def bootstrap_ratios(harmful, harmless, n_boot: int = 1000, seed: int = 0, k: int = 2,
                     centered: bool = False) -> np.ndarray:
    """[n_boot, k] ratios after resampling pairs with replacement (bootstrap_indices(n, n_boot, seed): the
    same seed gives the same resamples for every model with the same number of pairs)."""
    d = paired_differences(harmful, harmless)
    return bootstrap_gram_ratios(d @ d.T, bootstrap_indices(len(d), n_boot, seed), k, centered)


def repairing_null(harmful, harmless, n_perm: int = 1000, seed: int = 0, k: int = 2) -> np.ndarray:
    """[n_perm, k] uncentered ratios when harmless rows are randomly re-paired with harmful rows:
    how much of each component the arbitrary pairing alone produces. Not a test of structure: the
    paper's index pairing is itself an arbitrary pairing, so its p-value against this null is uniform
    for any model; second_direction_tests asks the question directly."""
    a, b = _as_matrix(harmful, ""), _as_matrix(harmless, "")
    aa, ab, bb = a @ a.T, a @ b.T, b @ b.T
    rng = np.random.default_rng(seed)
    out = np.empty((n_perm, k))
    for p in range(n_perm):
        perm = rng.permutation(len(b))  # D = a - b[perm]; its Gram from the three blocks
        cross = ab[:, perm]
        out[p] = gram_ratios(aa - cross - cross.T + bb[np.ix_(perm, perm)], k)
    return out


def svd_table(acts_by_role: dict, n_components: int = 10) -> "pd.DataFrame":
    """Long table: model, layer, component (1-based), uncentered and centered ratio, cumulative."""
    import pandas as pd
    rows = []
    for role, acts in acts_by_role.items():
        for layer in range(acts["harmful"].shape[1]):
            h = layer_activations(acts, role, layer, "harmful")
            hl = layer_activations(acts, role, layer, "harmless")
            label = f"model '{role}', layer {layer}"
            if np.array_equal(h, hl):  # e.g. the embeddings of the same read token: nothing to decompose
                print(f"{label}: harmful and harmless activations are identical; layer skipped")
                continue
            plain = explained_variance_ratio(h, hl, label=label)
            centered = explained_variance_ratio(h, hl, centered=True, label=label)
            for c in range(min(n_components, len(plain))):
                rows.append({"model": role, "layer": layer, "component": c + 1, "ratio": plain[c],
                             "cumulative": plain[:c + 1].sum(), "ratio_centered": centered[c],
                             "cumulative_centered": centered[:c + 1].sum()})
    return pd.DataFrame(rows)


def repairing_nulls(acts_by_role: dict, layer: int, n_perm: int = 1000, seed: int = 0) -> dict:
    """{model: repairing_null at `layer`} (notebook 02 plots them; svd_summary summarises them)."""
    return {role: repairing_null(layer_activations(acts, role, layer, "harmful"),
                                 layer_activations(acts, role, layer, "harmless"), n_perm=n_perm, seed=seed)
            for role, acts in acts_by_role.items()}


def mean_difference_norms(acts_by_role: dict) -> "pd.DataFrame":
    """model, layer, norm: |mean(harmful) - mean(harmless)| at every block input, in float64."""
    import pandas as pd
    return pd.DataFrame([{"model": role, "layer": layer, "norm": float(np.linalg.norm(
        layer_activations(acts, role, layer, "harmful").mean(0) - layer_activations(acts, role, layer, "harmless").mean(0)))}
        for role, acts in acts_by_role.items() for layer in range(acts["harmful"].shape[1])])


def svd_summary(acts_by_role: dict, layer: int, n_boot: int = 1000, seed: int = 0,
                nulls: dict | None = None) -> "pd.DataFrame":
    """One row per model at `layer`: the paper's two ratios with basic bootstrap 95 % intervals (see
    `intervals`; first_two also BCa in first_two_bca_low/high, see bca_interval), the centered ratios,
    the random re-pairing null (pass repairing_nulls' result to reuse
    it; not evidence about structure: the paper's pairing is itself arbitrary, see repairing_null), and
    the norm of the mean difference."""
    import pandas as pd
    rows = []
    for role, acts in acts_by_role.items():
        h = layer_activations(acts, role, layer, "harmful")
        hl = layer_activations(acts, role, layer, "harmless")
        plain = explained_variance_ratio(h, hl, label=f"model '{role}', layer {layer}")
        centered = explained_variance_ratio(h, hl, centered=True)
        boot = bootstrap_ratios(h, hl, n_boot=n_boot, seed=seed)
        null = nulls[role] if nulls is not None else repairing_null(h, hl, n_perm=n_boot, seed=seed)
        row = {"model": role, "layer": layer, "n_pairs": len(h), "comp1": plain[0], "comp2": plain[1],
               "first_two": plain[:2].sum()}
        for name, values in (("comp1", boot[:, 0]), ("comp2", boot[:, 1]), ("first_two", boot.sum(1))):
            ci = intervals(row[name], values)
            row[f"{name}_low"], row[f"{name}_high"] = float(ci["basic_lo"]), float(ci["basic_hi"])
        d = paired_differences(h, hl)
        try:  # undefined when every replicate lies on one side of the estimate (or < 3 pairs): NaN
            row["first_two_bca_low"], row["first_two_bca_high"] = bca_interval(
                row["first_two"], boot.sum(1), jackknife_gram_ratios(d @ d.T, 2).sum(1))
        except ValueError:
            row["first_two_bca_low"] = row["first_two_bca_high"] = float("nan")
        row.update({"comp1_centered": centered[0], "comp2_centered": centered[1],
                    "null_comp1_mean": null[:, 0].mean(), "null_comp2_mean": null[:, 1].mean(),
                    "null_comp2_p": (1 + (null[:, 1] >= plain[1]).sum()) / (1 + len(null)),
                    "mean_diff_norm": float(np.linalg.norm(h.mean(0) - hl.mean(0)))})
        rows.append(row)
    return pd.DataFrame(rows)


@one_blas_thread
def variance_ratios(d: np.ndarray, k: int = N_COMPONENTS, centered: bool = False) -> np.ndarray:
    """s^2 / sum s^2 of D (centered: of D minus its column means), the first k, largest first."""
    d = np.asarray(d, np.float64)
    return gram_ratios(d @ d.T, k, centered)


def bootstrap_indices(n: int, n_boot: int = 1000, seed: int = 0) -> np.ndarray:
    """[n_boot, n] resample indices of the pairs (with replacement); share them across models so that
    model differences are paired."""
    return np.random.default_rng(seed).integers(0, n, size=(n_boot, n))


def bootstrap_gram_ratios(gram: np.ndarray, indices: np.ndarray, k: int = N_COMPONENTS,
                          centered: bool = False, chunk: int = 100) -> np.ndarray:
    """[n_boot, k] ratios of D[idx] for each row idx of `indices`, from the n x n Gram matrix: what
    svd.gram_ratios gives for each resampled Gram matrix, computed on stacks of `chunk` at once."""
    out = np.zeros((len(indices), k))
    for start in range(0, len(indices), chunk):
        idx = indices[start:start + chunk]
        g = gram[idx[:, :, None], idx[:, None, :]]
        if centered:
            g = g - g.mean(1, keepdims=True) - g.mean(2, keepdims=True) + g.mean((1, 2), keepdims=True)
        eig = np.clip(small_eigvalsh(g)[:, ::-1], 0, None)
        out[start:start + chunk, :min(k, eig.shape[1])] = (eig / eig.sum(1, keepdims=True))[:, :k]
    return out


def intervals(point, boot, level: float = 0.95) -> dict:
    """Percentile [q_lo, q_hi] and basic [2 t - q_hi, 2 t - q_lo] bootstrap intervals of the estimate
    `point` from replicates `boot` (axis 0). Basic intervals correct the first-order bias of the
    bootstrap distribution (the share of a leading eigenvalue is biased upward under resampling, and
    percentile intervals inherit that bias); a basic interval may therefore lie off-centre or even
    exclude the estimate. The tables use basic intervals (lo/hi); percentile ones are pct_lo/pct_hi."""
    point = np.asarray(point, np.float64)
    q_lo, q_hi = np.quantile(np.asarray(boot, np.float64), [(1 - level) / 2, (1 + level) / 2], axis=0)
    return {"pct_lo": q_lo, "pct_hi": q_hi, "basic_lo": 2 * point - q_hi, "basic_hi": 2 * point - q_lo}


def bca_interval(point, boot, jack, level: float = 0.95) -> tuple[float, float]:
    """Bias-corrected and accelerated (BCa) bootstrap interval of a scalar estimate `point` from its
    bootstrap replicates `boot` [n_boot] and its jackknife (leave-one-out) estimates `jack` [n]
    (Efron & Tibshirani 1993, 14.3): z0 = Phi^-1(share of replicates below the estimate, ties half),
    acceleration a = sum (m - jack)^3 / (6 (sum (m - jack)^2)^1.5), m = mean(jack); the interval is
    the bootstrap quantiles at Phi(z0 + (z0 + z) / (1 - a (z0 + z))) for z = Phi^-1 of each tail."""
    from scipy.special import ndtr, ndtri
    boot, jack = np.asarray(boot, np.float64).ravel(), np.asarray(jack, np.float64).ravel()
    if len(boot) < 2 or len(jack) < 2:
        raise ValueError(f"bca_interval needs >= 2 bootstrap and jackknife values; got {len(boot)} and {len(jack)}")
    z0 = ndtri(((boot < point).sum() + (boot <= point).sum()) / (2 * len(boot)))
    if not np.isfinite(z0):  # every replicate on one side of the estimate
        raise ValueError("bca_interval: all bootstrap replicates lie on one side of the estimate; "
                         "use the percentile or basic interval (svd.intervals)")
    dev = jack.mean() - jack
    spread = (dev ** 2).sum()
    accel = (dev ** 3).sum() / (6 * spread ** 1.5) if spread > 0 else 0.0
    z = ndtri(np.array([(1 - level) / 2, (1 + level) / 2]))
    alpha = ndtr(z0 + (z0 + z) / (1 - accel * (z0 + z)))
    lo, hi = np.quantile(boot, alpha)
    return float(lo), float(hi)


def jackknife_gram_ratios(gram: np.ndarray, k: int = 2, centered: bool = False) -> np.ndarray:
    """[n, k] leave-one-pair-out ratios: gram_ratios of the Gram matrix without row and column i
    (the jackknife of the variance shares over pairs, for bca_interval's acceleration)."""
    gram = np.asarray(gram, np.float64)
    n = len(gram)
    if n < 3:
        raise ValueError(f"the jackknife over pairs needs at least 3 pairs; got {n}")
    keep = ~np.eye(n, dtype=bool)
    idx = np.stack([np.arange(n)[keep[i]] for i in range(n)])  # [n, n - 1]: every pair but i
    return bootstrap_gram_ratios(gram, idx, k, centered)


DEFAULT_PAIRS = (("LAT", "base"), ("LAT", "AT"), ("AT", "base"))


@one_blas_thread
def paired_model_differences(diffs: Mapping, pairs=DEFAULT_PAIRS, components=(1, 2), n_boot: int = 1000,
                             seed: int = 0, level: float = 0.95, centered: bool = False, boot: Mapping | None = None,
                             first_two: bool = False):
    """Ratio(a) - ratio(b) per layer and component with bootstrap intervals, both models resampled with
    the SAME pair indices in each replicate (this assumes row i is the same prompt in every model's
    file, which the released files support: see the notes). Basic interval in lo/hi, percentile in
    pct_lo/pct_hi; p_boot = two-sided share of replicate differences on the other side of 0. `boot`:
    bootstrap_replicates(diffs, n_boot, seed, k >= max(components), centered) if already computed.
    first_two: also a row with component "1+2", the difference of the first two components' summed share."""
    import pandas as pd
    k = max(*components, 2 if first_two else 1)
    layers = sorted({l for _, l in diffs}, key=[l for _, l in diffs].index)
    rows = []
    for layer in layers:
        models = [m for m, l in diffs if l == layer]
        n = len(diffs[(models[0], layer)])
        idx = bootstrap_indices(n, n_boot, seed)
        point, reps = {}, {}
        for m in {x for p in pairs for x in p} & set(models):
            d = diffs[(m, layer)]
            if len(d) != n:
                raise ValueError(f"layer {layer}: models have different numbers of pairs; cannot pair them")
            point[m] = variance_ratios(d, k, centered)
            reps[m] = boot[(m, layer)][:, :k] if boot is not None else bootstrap_gram_ratios(d @ d.T, idx, k, centered)
        for a, b in pairs:
            if a not in point or b not in point:
                continue
            est, rep = point[a] - point[b], reps[a] - reps[b]
            quantities = [(c, c - 1) for c in components]
            if first_two:
                est, rep = np.append(est, est[:2].sum()), np.column_stack([rep, rep[:, :2].sum(1)])
                quantities.append(("1+2", len(est) - 1))
            ci = intervals(est, rep, level)
            for c, j in quantities:
                r = rep[:, j]
                p = min(1.0, 2 * min((r <= 0).mean(), (r >= 0).mean()))
                rows.append({"layer": layer, "a": a, "b": b, "component": c, "difference": est[j],
                             "lo": ci["basic_lo"][j], "hi": ci["basic_hi"][j],
                             "pct_lo": ci["pct_lo"][j], "pct_hi": ci["pct_hi"][j], "p_boot": p})
    return pd.DataFrame(rows)


def profile_paired_differences(acts_by_role: dict, layers, pairs=(("LAT", "base"), ("LAT", "SFT"), ("LAT", "AT")),
                               n_boot: int = 1000, seed: int = 0, level: float = 0.95) -> "pd.DataFrame":
    """paired_model_differences on the profile's own activations at `layers`: component 1, 2 and the
    first-two share ("1+2"), model a minus model b, every model resampled with the same pair indices
    (all models read the same prompt pairs). Pairs whose models the profile lacks are skipped."""
    diffs = {(role, layer): paired_differences(layer_activations(acts, role, layer, "harmful"),
                                               layer_activations(acts, role, layer, "harmless"))
             for role, acts in acts_by_role.items() for layer in layers}
    pairs = [(a, b) for a, b in pairs if a in acts_by_role and b in acts_by_role]
    return paired_model_differences(diffs, pairs, (1, 2), n_boot, seed, level, first_two=True)


def auroc(positive, negative) -> float:
    """Area under the ROC curve of scores `positive` (class 1) vs `negative` (class 0): P(pos > neg) +
    0.5 P(pos = neg) over all pairs (the Mann-Whitney statistic / (n_pos n_neg))."""
    pos, neg = np.asarray(positive, np.float64).ravel(), np.asarray(negative, np.float64).ravel()
    if len(pos) == 0 or len(neg) == 0:
        raise ValueError(f"auroc needs scores of both classes; got {len(pos)} positive, {len(neg)} negative")
    diff = pos[:, None] - neg[None, :]
    return float(((diff > 0).sum() + 0.5 * (diff == 0).sum()) / diff.size)


def top_component(x: np.ndarray) -> np.ndarray:
    """Unit first principal axis of the rows of x (centered)."""
    from scipy.linalg import svd
    return svd(x - x.mean(0), full_matrices=False)[2][0]


@one_blas_thread
def second_direction_tests(harmful, harmless) -> dict:
    """Does the 2nd right singular vector v2 of D = harmful - harmless (uncentered, the paper's SVD) carry
    a second refusal dimension? Cosines (absolute: singular vectors have no sign) of v1 and v2 with the
    mean difference and with the top principal axis of the harmful-only and of the harmless-only
    activations (within-class spread: a v2 close to those is prompt variation, not refusal), and the
    AUROC of harmful vs harmless projections on v1 and v2, each oriented so that the mean difference
    projects positively (0.5: the direction does not separate the classes; in-sample, so optimistic)."""
    h, hl = _as_matrix(harmful, "harmful: "), _as_matrix(harmless, "harmless: ")
    d = paired_differences(h, hl)
    from scipy.linalg import svd
    vt = svd(d, full_matrices=False)[2]
    if len(vt) < 2:
        raise ValueError("second_direction_tests needs at least 2 pairs and 2 dimensions")
    mean = d.mean(0)
    unit = mean / np.linalg.norm(mean)
    pc_h, pc_hl = top_component(h), top_component(hl)
    out = {"n_pairs": len(d)}
    for name, v in (("v1", vt[0]), ("v2", vt[1])):
        sign = 1.0 if v @ mean >= 0 else -1.0
        out.update({f"{name}_cos_mean_diff": abs(float(v @ unit)), f"{name}_cos_harmful_pc1": abs(float(v @ pc_h)),
                    f"{name}_cos_harmless_pc1": abs(float(v @ pc_hl)),
                    f"{name}_auroc": auroc(sign * h @ v, sign * hl @ v)})
    return out


def second_direction_table(activations: Mapping) -> "pd.DataFrame":
    """One row of second_direction_tests per {(model, layer): (harmful, harmless)}."""
    import pandas as pd
    return pd.DataFrame([{"model": m, "layer": l, **second_direction_tests(h, hl)}
                         for (m, l), (h, hl) in activations.items()])


def pca_2d(harmful, harmless) -> tuple[np.ndarray, np.ndarray]:
    """The paper's Figure 3: centered PCA fit on [harmful; harmless]; returns coords and ratios."""
    x = np.concatenate([_as_matrix(harmful, ""), _as_matrix(harmless, "")])
    xc = x - x.mean(0)
    _, s, vt = np.linalg.svd(xc, full_matrices=False)
    vt = vt * np.sign(vt[np.arange(len(vt)), np.abs(vt).argmax(1)])[:, None]  # sklearn PCA's signs (svd_flip on V)
    return xc @ vt[:2].T, (s ** 2 / (s ** 2).sum())[:2]  # numpy, not sklearn: its import cost a second per kernel
