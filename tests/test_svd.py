import numpy as np
import pytest
import torch

import helpers as H


def planted(n=50, d=40, singular=(6.0, 3.0), seed=0):
    """harmless random, harmful = harmless + U diag(s) V^T with orthonormal U, V: known spectrum."""
    rng = np.random.default_rng(seed)
    u, _ = np.linalg.qr(rng.normal(size=(n, len(singular))))
    v, _ = np.linalg.qr(rng.normal(size=(d, len(singular))))
    harmless = rng.normal(size=(n, d))
    return harmless + u @ np.diag(singular) @ v.T, harmless


def test_planted_rank_two_ratios_are_exact():
    harmful, harmless = planted()
    ratios = H.explained_variance_ratio(harmful, harmless)
    np.testing.assert_allclose(ratios[:2], [36 / 45, 9 / 45], atol=1e-9)
    assert ratios[2:].sum() < 1e-9


def test_equals_numpy_svd_on_random_data():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(30, 64)), rng.normal(size=(30, 64))
    s = np.linalg.svd(a - b, compute_uv=False)
    np.testing.assert_allclose(H.explained_variance_ratio(a, b), s**2 / (s**2).sum(), atol=1e-12)
    np.testing.assert_allclose(H.explained_variance_ratio(torch.tensor(a), torch.tensor(b)),
                               s**2 / (s**2).sum(), atol=1e-12)


def test_centered_and_uncentered_differ_as_theory_says():
    rng = np.random.default_rng(2)
    n, d = 40, 32
    mean = np.zeros(d)
    mean[0] = 10.0
    harmless = rng.normal(size=(n, d))
    harmful = harmless + mean + 0.5 * rng.normal(size=(n, d))
    diff = harmful - harmless
    plain = H.explained_variance_ratio(harmful, harmless)
    centered = H.explained_variance_ratio(harmful, harmless, centered=True)
    assert plain[0] > 0.9 > centered[0]  # the shared mean is component 1 only without centering
    # energies: uncentered total = centered total + n * |mean of D|^2
    s_plain = np.linalg.svd(diff, compute_uv=False) ** 2
    s_cent = np.linalg.svd(diff - diff.mean(0), compute_uv=False) ** 2
    np.testing.assert_allclose(s_plain.sum(), s_cent.sum() + n * (diff.mean(0) ** 2).sum())
    # on zero-mean differences the two measures agree
    centred_diff = diff - diff.mean(0)
    np.testing.assert_allclose(H.explained_variance_ratio(harmless + centred_diff, harmless),
                               H.explained_variance_ratio(harmless + centred_diff, harmless, centered=True), atol=1e-9)


def test_bootstrap_is_deterministic_for_a_seed_and_matches_direct_svd():
    harmful, harmless = planted(n=20, d=16, singular=(5.0, 2.0, 1.0))
    harmful = harmful + 0.1 * np.random.default_rng(3).normal(size=harmful.shape)
    one = H.bootstrap_ratios(harmful, harmless, n_boot=50, seed=7)
    two = H.bootstrap_ratios(harmful, harmless, n_boot=50, seed=7)
    np.testing.assert_array_equal(one, two)
    assert not np.array_equal(one, H.bootstrap_ratios(harmful, harmless, n_boot=50, seed=8))
    draws = np.random.default_rng(7).integers(0, 20, size=(50, 20))  # the same draws, by direct SVD
    for b, idx in enumerate(draws[:3]):
        np.testing.assert_allclose(one[b], H.explained_variance_ratio(harmful[idx], harmless[idx])[:2], atol=1e-9)
    centered = H.bootstrap_ratios(harmful, harmless, n_boot=3, seed=7, centered=True)
    idx = np.random.default_rng(7).integers(0, 20, size=(3, 20))[0]
    np.testing.assert_allclose(centered[0], H.explained_variance_ratio(harmful[idx], harmless[idx], centered=True)[:2],
                               atol=1e-9)


def test_repairing_null_matches_direct_svd():
    harmful, harmless = planted(n=15, d=12)
    null = H.repairing_null(harmful, harmless, n_perm=4, seed=3)
    rng = np.random.default_rng(3)
    for p in range(4):
        perm = rng.permutation(15)
        np.testing.assert_allclose(null[p], H.explained_variance_ratio(harmful, harmless[perm])[:2], atol=1e-9)


def test_bad_input_is_a_one_line_error_naming_model_and_layer():
    with pytest.raises(ValueError, match=r"model 'LAT', layer 3: harmful \(5, 4\) and harmless \(6, 4\)"):
        H.explained_variance_ratio(np.ones((5, 4)), np.ones((6, 4)), label="model 'LAT', layer 3")
    acts = {"harmful": torch.randn(4, 3, 2), "harmless": torch.randn(4, 3, 2)}
    with pytest.raises(H.ConfigError, match=r"model 'base': layer 7 out of range; it has block inputs 0..2"):
        H.layer_activations(acts, "base", 7, "harmful")
    acts["harmless"][0, 1, 0] = float("nan")
    with pytest.raises(FloatingPointError, match=r"model 'base', layer 1: NaN/Inf in the 'harmless'"):
        H.svd_table({"base": acts})


def test_svd_table_covers_every_layer_and_model():
    rng = np.random.default_rng(0)
    acts = {"harmful": torch.tensor(rng.normal(size=(6, 3, 5))), "harmless": torch.tensor(rng.normal(size=(6, 3, 5)))}
    table = H.svd_table({"base": acts, "LAT": acts}, n_components=4)
    assert set(table.model) == {"base", "LAT"} and set(table.layer) == {0, 1, 2}
    assert (table.groupby(["model", "layer"]).size() == 4).all()  # each column against numpy: test_oracles.py
    full = H.svd_table({"base": acts}, n_components=99)  # every component: the shares sum to 1
    assert full.groupby("layer").ratio.sum().tolist() == pytest.approx([1.0] * 3, abs=1e-12)
