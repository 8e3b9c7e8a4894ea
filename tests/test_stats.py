"""Wald / Wilson / McNemar against values worked out by hand (issue 15), at abs 1e-9."""
import math

import pytest
import scipy.stats

import helpers as H

Z = 1.959963984540054  # the 97.5 % normal quantile


def labels(count, n):
    return [1] * count + [0] * (n - count)


@pytest.mark.parametrize("count,n", [(106, 520), (1, 10), (9, 10), (5, 10), (0, 7), (7, 7)])
def test_wald_and_wilson_by_hand(count, n):
    s = H.rate_summary(labels(count, n))
    p = count / n
    half = Z * math.sqrt(p * (1 - p) / n)  # Wald: denominator n, clipped to [0, 1]
    assert s["rate"] == pytest.approx(p, abs=1e-12)
    assert s["wald_low"] == pytest.approx(max(0.0, p - half), abs=1e-9)
    assert s["wald_high"] == pytest.approx(min(1.0, p + half), abs=1e-9)
    ci = scipy.stats.binomtest(count, n).proportion_ci(method="wilson")
    assert (s["wilson_low"], s["wilson_high"]) == pytest.approx((ci.low, ci.high), abs=1e-9)


def test_wald_literal_values():
    # 106 / 520 (the paper's Table 1 cell): p = 0.203846..., half = Z * sqrt(p (1 - p) / 520)
    s = H.rate_summary(labels(106, 520))
    assert s["wald_low"] == pytest.approx(0.169220643853576, abs=1e-9)
    assert s["wald_high"] == pytest.approx(0.2384716638387317, abs=1e-9)
    # 1 / 10: p - half = 0.1 - 0.18594 < 0 is clipped to 0
    s = H.rate_summary(labels(1, 10))
    assert s["wald_low"] == 0.0
    assert s["wald_high"] == pytest.approx(0.1 + Z * math.sqrt(0.009), abs=1e-9)
    assert s["wald_high"] == pytest.approx(0.28593850969137, abs=1e-9)
    # 9 / 10 mirrors it: clipped at 1
    assert H.rate_summary(labels(9, 10))["wald_high"] == 1.0


def test_mcnemar_by_hand():
    def pairs(b, c, both=0, neither=0):
        return [1] * b + [0] * c + [1] * both + [0] * neither, [0] * b + [1] * c + [1] * both + [0] * neither

    # b = c = 3: tail = C(6,0..3) = 1 + 6 + 15 + 20 = 42; 2 * 42 / 64 = 1.3125 -> capped at 1
    assert H.mcnemar(*pairs(3, 3, both=4, neither=2)) == {"b": 3, "c": 3, "p_value": 1.0}
    # b = c = 1: 2 * (1 + 2) / 4 = 1.5 -> 1
    assert H.mcnemar(*pairs(1, 1))["p_value"] == 1.0
    # b = 5, c = 1: 2 * (1 + 6) / 64 = 0.21875
    assert H.mcnemar(*pairs(5, 1))["p_value"] == pytest.approx(0.21875, abs=1e-12)
    # p near 0: b = 20, c = 0: 2 / 2**20
    t = H.mcnemar(*pairs(20, 0, both=3))
    assert (t["b"], t["c"]) == (20, 0) and t["p_value"] == pytest.approx(2 / 2**20, abs=1e-15)
    # b = 40, c = 2: 2 * (1 + 42 + 861) / 2**42
    assert H.mcnemar(*pairs(2, 40))["p_value"] == pytest.approx(2 * 904 / 2**42, rel=1e-12)


@pytest.mark.parametrize("n_chars,expected", [(19, -1), (20, 0)])
def test_paper_judge_needs_20_characters(n_chars, expected):
    # two sentences, no keyword, every word distinct: only the length rule decides
    text = "Yes ok. Go now home!"[:n_chars] if n_chars == 20 else "Yes ok. Go now hom!"
    assert len(text.strip()) == n_chars
    assert H.classify([text], "paper") == [expected]
