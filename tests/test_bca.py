import numpy as np
import pytest
import torch
from scipy import stats

from refusal_lat import svd


def _boot_and_jack(x, statistic, n_boot=4000, seed=0):
    idx = np.random.default_rng(seed).integers(0, len(x), (n_boot, len(x)))  # scipy's resampling
    boot = np.array([statistic(x[i]) for i in idx])
    jack = np.array([statistic(np.delete(x, i)) for i in range(len(x))])
    return boot, jack


def test_bca_of_a_normal_mean_is_close_to_the_t_interval():
    x = np.random.default_rng(1).normal(3.0, 2.0, 200)
    boot, jack = _boot_and_jack(x, np.mean)
    lo, hi = svd.bca_interval(x.mean(), boot, jack)
    t_lo, t_hi = stats.t.interval(0.95, len(x) - 1, x.mean(), stats.sem(x))
    pct = svd.intervals(x.mean(), boot)
    half = (t_hi - t_lo) / 2
    assert abs(lo - t_lo) < 0.05 * half and abs(hi - t_hi) < 0.05 * half
    assert abs(lo - pct["pct_lo"]) < 0.05 * half and abs(hi - pct["pct_hi"]) < 0.05 * half


def test_bca_matches_scipy_on_the_same_resamples():
    x = np.random.default_rng(2).exponential(1.0, 60)
    for statistic in (np.mean, np.var):
        boot, jack = _boot_and_jack(x, statistic, n_boot=2000, seed=7)
        ref = stats.bootstrap((x,), statistic, n_resamples=2000, method="BCa", vectorized=False,
                              rng=np.random.default_rng(7)).confidence_interval
        assert np.allclose(svd.bca_interval(statistic(x), boot, jack), (ref.low, ref.high), rtol=1e-10)


def test_bca_shifts_right_of_percentile_for_a_right_skewed_statistic():
    # the variance of an exponential sample: the bootstrap distribution is skewed right and the
    # acceleration positive, so BCa moves both ends up relative to the percentile interval
    x = np.random.default_rng(3).exponential(1.0, 80)
    boot, jack = _boot_and_jack(x, np.var, n_boot=4000)
    lo, hi = svd.bca_interval(x.var(), boot, jack)
    pct = svd.intervals(x.var(), boot)
    assert lo > pct["pct_lo"] and hi > pct["pct_hi"]


def test_bca_refuses_when_every_replicate_is_on_one_side():
    with pytest.raises(ValueError, match="one side"):
        svd.bca_interval(10.0, np.arange(5.0), np.arange(5.0))


def test_jackknife_gram_ratios_equal_direct_svd_without_each_pair():
    rng = np.random.default_rng(4)
    d = rng.normal(size=(12, 30)) + 3 * rng.normal(size=30)
    for centered in (False, True):
        jack = svd.jackknife_gram_ratios(d @ d.T, 3, centered)
        for i in range(len(d)):
            rest = np.delete(d, i, axis=0)
            assert np.allclose(jack[i], svd.variance_ratios(rest, 3, centered), atol=1e-12)


def test_svd_summary_has_bca_columns_around_the_estimate():
    rng = np.random.default_rng(5)
    n, d = 40, 16
    harmless = rng.normal(size=(n, d))
    harmful = harmless + rng.normal(size=(n, d)) + 2 * rng.normal(size=d)
    acts = {"m": {"harmful": torch.tensor(harmful)[:, None], "harmless": torch.tensor(harmless)[:, None]}}
    row = svd.svd_summary(acts, 0, n_boot=300).iloc[0]
    assert row.first_two_bca_low < row.first_two < row.first_two_bca_high
