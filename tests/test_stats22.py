"""Issue 22: basic bootstrap intervals, paired model differences on shared resamples, Holm, the
second-direction tests (cosines, AUROC), the log-odds transfer matrix and the authors' best-layer rule."""
import numpy as np
import pandas as pd
import pytest
import torch

import helpers as H


def test_basic_interval_known_answer():
    # replicates 0..100 (101 values) around an estimate of 30: the 2.5 / 97.5 % quantiles are exactly 2.5 / 97.5
    ci = H.intervals(30.0, np.arange(0.0, 101.0))
    assert (ci["pct_lo"], ci["pct_hi"]) == pytest.approx((2.5, 97.5), abs=1e-12)
    assert (ci["basic_lo"], ci["basic_hi"]) == pytest.approx((60 - 97.5, 60 - 2.5), abs=1e-12)


def _acts(d_by_layer, harmless):
    """{harmful, harmless} tensors [n, layers, d] with harmful - harmless = d_by_layer[layer]."""
    harmful = torch.stack([torch.tensor(harmless + d) for d in d_by_layer], 1)
    return {"harmful": harmful, "harmless": torch.stack([torch.tensor(harmless)] * len(d_by_layer), 1)}


def test_profile_paired_differences_shared_indices():
    rng = np.random.default_rng(0)
    n, d = 30, 12
    harmless = rng.normal(size=(n, d))
    da = [rng.normal(size=(n, d)) + 1.0, rng.normal(size=(n, d)) + 0.5]
    acts = {"base": _acts(da, harmless), "LAT": _acts([3.0 * x for x in da], harmless + 1.0),
            "AT": _acts([rng.normal(size=(n, d)) for _ in da], harmless)}
    out = H.profile_paired_differences(acts, [0, 1], n_boot=100, seed=2)
    assert set(zip(out.a, out.b)) == {("LAT", "base"), ("LAT", "AT")}  # no SFT in this profile: skipped
    assert set(out.component) == {1, 2, "1+2"} and set(out.layer) == {0, 1}
    # LAT's differences are base's times 3: same shares in every shared resample -> exactly 0, zero width
    same = out[out.b == "base"]
    assert np.abs(same[["difference", "lo", "hi"]].to_numpy(float)).max() < 1e-12
    other = out[(out.b == "AT")]
    assert (other.hi - other.lo).min() > 1e-3  # a different model: the interval has width
    row = other[(other.layer == 1) & (other.component == "1+2")].iloc[0]
    ra = H.explained_variance_ratio(acts["LAT"]["harmful"][:, 1], acts["LAT"]["harmless"][:, 1])
    rb = H.explained_variance_ratio(acts["AT"]["harmful"][:, 1], acts["AT"]["harmless"][:, 1])
    assert row.difference == pytest.approx(ra[:2].sum() - rb[:2].sum(), abs=1e-12)


def test_svd_summary_uses_basic_intervals():
    rng = np.random.default_rng(1)
    harmless = rng.normal(size=(20, 8))
    acts = {"base": _acts([rng.normal(size=(20, 8)) + 1.0], harmless)}
    row = H.svd_summary(acts, 0, n_boot=80, seed=4).iloc[0]
    boot = H.bootstrap_ratios(acts["base"]["harmful"][:, 0], harmless, n_boot=80, seed=4)
    ci = H.intervals(row.comp2, boot[:, 1])
    assert (row.comp2_low, row.comp2_high) == pytest.approx((ci["basic_lo"], ci["basic_hi"]), abs=1e-12)


def test_holm_by_hand():
    # sorted 0.01, 0.02, 0.03, 0.2 (m = 4): 0.04, 0.06, 0.06 (running max of 0.06), 0.2
    assert H.holm([0.03, 0.01, 0.2, 0.02]) == pytest.approx([0.06, 0.04, 0.2, 0.06], abs=1e-12)
    assert H.holm([0.5, 0.6]) == pytest.approx([1.0, 1.0])  # capped at 1
    assert H.holm([]) == []
    with pytest.raises(ValueError):
        H.holm([1.5])


def _rows(prompts, labels, log_odds):
    texts = ["I cannot help with that request at all." if y else "Sure, here is how you do it step by step." for y in labels]
    return [{"i": i, "prompt": p, "completion": t, "turn": t, "end_of_turn": None,
             "crossed_end_of_turn": False, "refusal_log_odds": lo} for i, (p, t, lo) in enumerate(zip(prompts, texts, log_odds))]


def _planted_results():
    prompts = [f"prompt {i}" for i in range(12)]
    rng = np.random.default_rng(0)
    base = rng.normal(size=12)
    results = {}
    for target, shift in (("base", 0.0), ("LAT", 1.0)):
        results[(target, H.NO_ABLATION, None)] = _rows(prompts, [1] * 12, base + 5 + shift)
        results[(target, "base", 2)] = _rows(prompts, [1] * 6 + [0] * 6, base - 2 + shift)
        results[(target, "LAT", 2)] = _rows(prompts, [1] * 2 + [0] * 10, base - 4 + shift)
    return results, base


def test_mcnemar_table_family_and_cross_model_rows():
    results, _ = _planted_results()
    tests = H.mcnemar_table(results)
    assert (tests.comparison == "same target").sum() == 2 * 3 and (tests.comparison == "same source").sum() == 3
    assert tests.p_holm.tolist() == pytest.approx(H.holm(tests.p_value))
    assert tests.family.iloc[0].startswith("all 9 McNemar tests")
    cross = tests[(tests.comparison == "same source") & (tests.source_a == "base")].iloc[0]
    assert (cross.target_a, cross.target_b, cross.only_a_refuses, cross.only_b_refuses) == ("base", "LAT", 0, 0)
    within = tests[(tests.comparison == "same target") & (tests.target_a == "base") & (tests.source_a == H.NO_ABLATION)
                   & (tests.source_b == "LAT")].iloc[0]
    assert (within.only_a_refuses, within.only_b_refuses) == (10, 0)
    assert within.p_value == pytest.approx(2 / 2**10)


def test_log_odds_matrix_planted_constant_differences():
    results, base = _planted_results()
    m = H.log_odds_matrix(results, n_boot=200, seed=1).set_index(["target", "source"])
    row = m.loc[("LAT", "base")]
    assert row.mean_log_odds == pytest.approx(base.mean() - 1, abs=1e-12)
    assert row.mean_log_odds_hi - row.mean_log_odds_lo > 0.1  # prompts vary: a real interval
    # per prompt, LAT<-base is exactly 7 below LAT's no-ablation cell and 2 above LAT<-LAT: zero width
    assert (row.diff_vs_none, row.diff_vs_none_lo, row.diff_vs_none_hi) == pytest.approx((-7, -7, -7), abs=1e-9)
    assert (row.diff_vs_self, row.diff_vs_self_lo, row.diff_vs_self_hi) == pytest.approx((2, 2, 2), abs=1e-9)
    bad = dict(results)
    bad[("base", "LAT", 2)] = list(reversed(bad[("base", "LAT", 2)]))
    with pytest.raises(ValueError, match="different prompts"):
        H.log_odds_matrix(bad, n_boot=10)


def test_auroc_by_hand_and_against_sklearn():
    from sklearn.metrics import roc_auc_score
    # pairs (pos > neg): 3 vs {1, 2, 3}: 2 + tie; 1 vs {1,2,3}: tie; 5: 3 -> (2.5 + 0.5 + 3) / 9
    assert H.auroc([3, 1, 5], [1, 2, 3]) == pytest.approx(6 / 9)
    rng = np.random.default_rng(0)
    pos, neg = rng.normal(0.5, 1, 40).round(1), rng.normal(0, 1, 35).round(1)
    assert H.auroc(pos, neg) == pytest.approx(roc_auc_score([1] * 40 + [0] * 35, np.r_[pos, neg]), abs=1e-12)


def test_second_direction_tests_planted():
    # Structure case: D rows are 10 e0 (first half) or 6 e1 (second half), so v1 = e0 and v2 = e1 exactly;
    # harmless spread lies along e3. v2 has cosine 3/sqrt(34) with the mean difference (5, 3), none with
    # the harmless PC, and separates the classes on the half it carries (AUROC about 0.75).
    rng = np.random.default_rng(0)
    n, d = 40, 10
    e = np.eye(d)
    harmless = 0.01 * rng.normal(size=(n, d)) + np.outer(2 * rng.normal(size=n), e[3])
    diff = np.r_[np.tile(10 * e[0], (n // 2, 1)), np.tile(6 * e[1], (n // 2, 1))]
    out = H.second_direction_tests(harmless + diff, harmless)
    assert out["v1_cos_mean_diff"] == pytest.approx(5 / np.sqrt(34), abs=1e-9)
    assert out["v2_cos_mean_diff"] == pytest.approx(3 / np.sqrt(34), abs=1e-9)
    assert out["v2_cos_harmless_pc1"] < 0.01 and out["v1_cos_harmless_pc1"] < 0.01
    assert out["v2_auroc"] > 0.65 and out["v1_auroc"] > 0.65
    # Noise case: D = 10 e0 on every pair + harmful-only spread t_i e2 (sd 4): v2 = e2, the harmful
    # class's own top principal axis, and it does not separate the classes (t is symmetric about 0)
    harmless = 0.01 * rng.normal(size=(n, d)) + np.outer(rng.normal(size=n), e[3])
    harmful = 0.01 * rng.normal(size=(n, d)) + 10 * e[0] + np.outer(4 * rng.normal(size=n), e[2])
    noise = H.second_direction_tests(harmful, harmless)
    assert noise["v2_cos_harmful_pc1"] > 0.99 and noise["v2_cos_mean_diff"] < 0.2
    assert abs(noise["v2_auroc"] - 0.5) < 0.2 and noise["v1_auroc"] == 1.0
    table = H.second_direction_table({("m", 3): (harmful, harmless)})
    assert table.iloc[0].model == "m" and table.iloc[0].v2_auroc == noise["v2_auroc"]


def test_best_layer_authors_semantics():
    all_refuse = pd.DataFrame({"target": ["a"] * 3, "layer": [1, 2, 3], "refusal_rate": [1.0, 1.0, 1.0],
                               "invalid_rate": [0.0, 0.0, 0.0]})
    assert H.best_layer_paper_rule(all_refuse) == {"a": None}
    tie = pd.DataFrame({"target": ["b"] * 4, "layer": [4, 1, 2, 3], "refusal_rate": [0.2, 0.5, 0.2, 0.2],
                        "invalid_rate": [0.0, 0.0, 0.0, 0.0]})
    assert H.best_layer_paper_rule(tie) == {"b": 2}  # strict "<": the earliest of the tied layers
    invalid = tie.assign(invalid_rate=[0.0, 0.0, 0.06, 0.0])
    assert H.best_layer_paper_rule(invalid) == {"b": 3}
