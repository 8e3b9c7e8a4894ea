"""SVD of the paired harmful-harmless differences (notebook 02; docs/method.md, "SVD").
D = harmful_i - harmless_i (index-paired), *uncentered* SVD, ratio s^2 / sum s^2."""
from __future__ import annotations

import numpy as np
import torch

from .config import ConfigError


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


def small_eigvalsh(matrices: np.ndarray) -> np.ndarray:
    """np.linalg.eigvalsh on one BLAS thread: for ~100 x 100 matrices threads only add overhead
    (1,000 of them: 0.3 s on one thread vs 17 s with the default threads on a busy 2-core machine)."""
    from threadpoolctl import threadpool_limits
    with threadpool_limits(1):
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
    """[n_boot, k] ratios after resampling pairs with replacement (rows of the Gram matrix)."""
    d = paired_differences(harmful, harmless)
    gram = d @ d.T
    rng = np.random.default_rng(seed)
    out = np.empty((n_boot, k))
    for b in range(n_boot):
        idx = rng.integers(0, len(d), len(d))
        g = gram[np.ix_(idx, idx)]
        out[b] = gram_ratios(g, k, centered)
    return out


def repairing_null(harmful, harmless, n_perm: int = 1000, seed: int = 0, k: int = 2) -> np.ndarray:
    """[n_perm, k] uncentered ratios when harmless rows are randomly re-paired with harmful rows:
    how much of each component the arbitrary pairing alone produces."""
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
    """One row per model at `layer`: the paper's two ratios with bootstrap 95 % intervals, the centered
    ratios, the random re-pairing null for comparison (pass repairing_nulls' result to reuse it), and
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
            row[f"{name}_low"], row[f"{name}_high"] = np.percentile(values, [2.5, 97.5])
        row.update({"comp1_centered": centered[0], "comp2_centered": centered[1],
                    "null_comp1_mean": null[:, 0].mean(), "null_comp2_mean": null[:, 1].mean(),
                    "null_comp2_p": (1 + (null[:, 1] >= plain[1]).sum()) / (1 + len(null)),
                    "mean_diff_norm": float(np.linalg.norm(h.mean(0) - hl.mean(0)))})
        rows.append(row)
    return pd.DataFrame(rows)


def pca_2d(harmful, harmless) -> tuple[np.ndarray, np.ndarray]:
    """The paper's Figure 3: centered PCA fit on [harmful; harmless]; returns coords and ratios."""
    from sklearn.decomposition import PCA
    x = np.concatenate([_as_matrix(harmful, ""), _as_matrix(harmless, "")])
    pca = PCA(n_components=2, svd_solver="full").fit(x)
    return pca.transform(x), pca.explained_variance_ratio_
