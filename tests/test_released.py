"""refusal_lat.released: registry/resolver errors, the CUDA-saved tensors on CPU, SVD bootstrap
helpers on planted data, and agreement/kappa on hand-computed labels. Fast (seconds)."""
import hashlib
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from refusal_lat import data as D  # noqa: E402
from refusal_lat import massive as M  # noqa: E402
from refusal_lat import released as R  # noqa: E402
from refusal_lat import stats as S  # noqa: E402
from refusal_lat.config import REPO, DataError  # noqa: E402

FOLDER = "apart-lab-refusal-lat-project"
MIRROR = next((p / "shared" / "data" / FOLDER for p in REPO.parents if (p / "shared" / "data" / FOLDER).is_dir()), None)
needs_mirror = pytest.mark.skipif(MIRROR is None, reason="offline mirror shared/data/apart-lab-refusal-lat-project "
                                                         "not found beside the repo or in a parent folder")
UPSTREAM = "https://raw.githubusercontent.com/nlpet/apart-lab-refusal-lat-project/6f2343a83e2e37bc8893bd613338b6253ae99ef2/"


# --- registry (data.DATA_FILES) and resolver (data.data_file) --------------------------------------
def test_registry_covers_every_released_file():
    released = {k: v for k, v in D.DATA_FILES.items() if k.startswith("released")}
    acts = [k for k in released if k.startswith("released_acts/")]
    assert len(acts) == 3 * 2 * len(D.RELEASED_LAYERS) == 48
    assert D.released_key("lat", "harmful", 12) in acts
    assert released["released_human_annots"].path == f"{FOLDER}/datasets/completions_with_human_annots.csv"
    assert released["released_completions_json"].url == UPSTREAM + "data_store/completions.json"
    for entry in released.values():
        rel = entry.path.removeprefix(FOLDER + "/")
        assert entry.url == UPSTREAM + rel and entry.path.startswith(FOLDER + "/") and len(entry.sha256) == 64


@pytest.fixture
def fake(tmp_path, monkeypatch):
    payload = b"released bytes"
    entry = D.DataFile("fake/thing.bin", (tmp_path / "nowhere" / "thing.bin").as_uri(), hashlib.sha256(payload).hexdigest())
    monkeypatch.setitem(D.DATA_FILES, "fake", entry)
    return entry


def test_explicit_dir_wins_and_is_sha_checked(tmp_path, fake):
    src = tmp_path / "src"
    (src / "fake").mkdir(parents=True)
    (src / "fake" / "thing.bin").write_bytes(b"released bytes")
    assert D.data_file("fake", src, cache_dir=tmp_path / "cache") == src / "fake/thing.bin"


def test_sha_mismatch_is_one_line_error(tmp_path, fake):
    (tmp_path / "src" / "fake").mkdir(parents=True)
    (tmp_path / "src" / "fake" / "thing.bin").write_bytes(b"altered")
    with pytest.raises(DataError) as err:
        D.data_file("fake", tmp_path / "src", cache_dir=tmp_path / "cache")
    msg = str(err.value)
    assert "\n" not in msg and "restore the original file" in msg and "delete it" in msg


def test_missing_everywhere_names_paths_and_url(tmp_path, fake, monkeypatch):
    monkeypatch.delenv("REFUSAL_LAT_DATA_DIR", raising=False)
    monkeypatch.setattr(D, "REPO", tmp_path / "repo")  # no mirror beside this repository
    with pytest.raises(DataError) as err:
        D.data_file("fake", cache_dir=tmp_path / "cache")
    msg = str(err.value)
    assert "\n" not in msg
    assert str(tmp_path / "cache" / "fake/thing.bin") in msg and str(tmp_path / "shared" / "data" / "fake/thing.bin") in msg
    assert fake.url in msg


def test_an_explicit_folder_without_the_file_is_an_error_not_a_fallback(tmp_path, fake):
    (tmp_path / "src").mkdir()
    with pytest.raises(DataError, match="has no fake/thing.bin"):
        D.data_file("fake", tmp_path / "src", cache_dir=tmp_path / "cache")


def test_download_goes_to_cache_atomically(tmp_path, monkeypatch):
    monkeypatch.delenv("REFUSAL_LAT_DATA_DIR", raising=False)
    monkeypatch.setattr(D, "REPO", tmp_path / "repo")  # no mirror beside this repository
    payload = b"upstream bytes"
    upstream = tmp_path / "upstream.bin"
    upstream.write_bytes(payload)
    monkeypatch.setitem(D.DATA_FILES, "fake", D.DataFile("fake/thing.bin", upstream.as_uri(),
                                                         hashlib.sha256(payload).hexdigest()))
    got = D.data_file("fake", cache_dir=tmp_path / "cache")
    assert got == tmp_path / "cache" / "fake/thing.bin" and got.read_bytes() == payload
    assert [p.name for p in (tmp_path / "cache" / "fake").iterdir()] == ["thing.bin"]  # no temp file left


def test_unknown_name_and_layer_and_model_errors():
    with pytest.raises(DataError, match="unknown data file"):
        D.data_file("no/such/file.pt")
    with pytest.raises(DataError, match=r"layer 14 was not released; released layers: 1, 2, 3, 4, 8, 12"):
        R.load_released_activations("LAT", 14)
    with pytest.raises(DataError, match="released models: base, AT, LAT"):
        R.load_released_activations("SFT", 12)


@needs_mirror
def test_cuda_saved_tensor_loads_on_cpu():
    harmful, harmless = R.load_released_activations("LAT", 12)
    raw = torch.load(MIRROR / "data_store/ablated_llama-2-7b/lat/harmful_layer12.pt", map_location="cpu",
                     weights_only=True)
    assert raw.dtype == torch.float16 and raw.shape == (100, 4096)
    assert harmful.dtype == torch.float32 and harmful.device.type == "cpu" and harmless.shape == (100, 4096)
    assert torch.equal(harmful, raw.float())


# --- SVD ------------------------------------------------------------------------------------------
def test_frobenius_and_ratios_match_numpy():
    rng = np.random.default_rng(3)
    a, b = rng.normal(size=(20, 50)), rng.normal(size=(20, 50))
    d = R.paired_differences(torch.tensor(a), torch.tensor(b))
    assert R.frobenius_norm(d) == pytest.approx(np.linalg.norm(a - b), abs=1e-12)
    s2 = np.linalg.svd(a - b, compute_uv=False) ** 2
    np.testing.assert_allclose(R.variance_ratios(d, 10), (s2 / s2.sum())[:10], atol=1e-12)
    np.testing.assert_allclose(R.gram_ratios(d @ d.T, 10), (s2 / s2.sum())[:10], atol=1e-12)
    dc = (a - b) - (a - b).mean(0)
    s2c = np.linalg.svd(dc, compute_uv=False) ** 2
    np.testing.assert_allclose(R.gram_ratios(d @ d.T, 5, centered=True), (s2c / s2c.sum())[:5], atol=1e-12)


def test_batched_bootstrap_matches_one_at_a_time():
    from refusal_lat.svd import gram_ratios
    d = np.random.default_rng(4).normal(size=(15, 40)) + 1.0
    idx = R.bootstrap_indices(15, 7, seed=2)
    for centered in (False, True):
        one = np.stack([gram_ratios(d[i] @ d[i].T, 5, centered) for i in idx])
        np.testing.assert_allclose(R.bootstrap_gram_ratios(d @ d.T, idx, 5, centered, chunk=3), one, atol=1e-12)
    reps = R.bootstrap_replicates({("A", 0): d}, n_boot=7, seed=2, k=5)
    np.testing.assert_allclose(reps[("A", 0)], R.bootstrap_gram_ratios(d @ d.T, idx, 5), atol=1e-12)


def test_basic_vs_percentile_intervals_planted():
    # replicates 1..99 around an estimate of 40: quantiles are exact order statistics here
    boot = np.arange(1.0, 100.0)
    ci = R.intervals(40.0, boot, level=0.9)
    assert ci["pct_lo"] == pytest.approx(5.9, abs=1e-12) and ci["pct_hi"] == pytest.approx(94.1, abs=1e-12)
    assert ci["basic_lo"] == pytest.approx(80 - 94.1) and ci["basic_hi"] == pytest.approx(80 - 5.9)
    # an upward-biased bootstrap (replicates all above the estimate): basic reflects it below
    ci = R.intervals(np.array([0.5]), np.array([[0.6], [0.7], [0.8]]), level=0.5)
    assert ci["pct_lo"][0] > 0.5 and ci["basic_hi"][0] < 0.5


def _shared(n, d, s1, s2_, seed):
    rng = np.random.default_rng(seed)
    u, _ = np.linalg.qr(rng.normal(size=(n, 2)))
    v, _ = np.linalg.qr(rng.normal(size=(d, 2)))
    return u, v


def test_paired_difference_known_answer():
    # "A" and "B" share the same rank-2 structure (same rows), B's second singular value doubled:
    # with shared indices the replicate difference tracks the true one; the known answer is exact.
    n, d = 40, 30
    rng = np.random.default_rng(0)
    u = rng.normal(size=(n, 2))
    v, _ = np.linalg.qr(rng.normal(size=(d, 2)))
    da = u @ np.diag([3.0, 1.0]) @ v.T
    db = u @ np.diag([3.0, 2.0]) @ v.T
    diffs = {("A", 0): da, ("B", 0): db}
    out = R.paired_model_differences(diffs, pairs=(("B", "A"),), n_boot=200, seed=1)
    ra, rb = R.variance_ratios(da, 2), R.variance_ratios(db, 2)
    row2 = out[out.component == 2].iloc[0]
    assert row2["difference"] == pytest.approx(rb[1] - ra[1], abs=1e-12) and row2["difference"] > 0.05
    assert row2["lo"] > 0 and row2["p_boot"] == 0.0
    # identical models: every shared-index replicate difference is exactly 0 (unshared would not be)
    same = R.paired_model_differences({("A", 0): da, ("B", 0): da.copy()}, pairs=(("B", "A"),), n_boot=50)
    assert np.abs(same[["difference", "lo", "hi", "pct_lo", "pct_hi"]].to_numpy()).max() < 1e-12


def test_long_table_wide_summary_and_figure():
    rng = np.random.default_rng(2)
    diffs = {(m, l): rng.normal(size=(12, 16)) + (i + 1) * rng.normal(size=16)
             for i, m in enumerate(("base", "AT", "LAT")) for l in (4, 8)}
    long = R.svd_long_table(diffs, n_boot=30, k=5)
    assert len(long) == 3 * 2 * 5 and set(long.columns) >= {"model", "layer", "component", "ratio", "lo", "hi",
                                                             "pct_lo", "pct_hi", "ratio_centered"}
    wide = R.svd_wide_summary(long, R.frobenius_table(diffs))
    assert list(wide.columns) == ["model", "layer", "c1", "c1_lo", "c1_hi", "c2", "c2_lo", "c2_hi", "frobenius"]
    assert wide.frobenius.iloc[0] == pytest.approx(np.linalg.norm(diffs[("base", 4)]))
    # force an interval that excludes its estimate: the figure must still draw (yerr clipped at 0)
    long.loc[0, ["lo", "hi"]] = long.loc[0, "ratio"] + np.array([0.1, 0.2])
    import matplotlib
    matplotlib.use("Agg")
    fig = R.figure2(long, 4, k=5)
    assert len(fig.axes) == 3 and "layer 4" in fig.axes[0].get_title()
    import matplotlib.pyplot as plt
    plt.close(fig)


# --- judges ---------------------------------------------------------------------------------------
def test_agreement_hand_computed():
    # pred/human: tp=3, fp=1, fn=2, tn=4 (n=10)
    pred = [1, 1, 1, 1, 0, 0, 0, 0, 0, 0]
    human = [1, 1, 1, 0, 1, 1, 0, 0, 0, 0]
    a = S.agreement(pred, human)
    assert (a["tp"], a["fp"], a["fn"], a["tn"], a["n"]) == (3, 1, 2, 4, 10)
    p_o = 0.7
    p_e = (4 * 5 + 6 * 5) / 100  # pred+ 4, human+ 5; pred- 6, human- 5 -> 0.5
    assert a["agreement"] == pytest.approx(p_o, abs=1e-12)
    assert a["kappa"] == pytest.approx((p_o - p_e) / (1 - p_e), abs=1e-12) == pytest.approx(0.4, abs=1e-12)
    assert a["sensitivity"] == pytest.approx(3 / 5, abs=1e-12) and a["specificity"] == pytest.approx(4 / 5, abs=1e-12)


def test_agreement_edge_cases():
    same = S.agreement([False] * 5, [False] * 5)  # p_e = 1: kappa undefined, no ZeroDivisionError
    assert same["agreement"] == 1.0 and math.isnan(same["kappa"]) and math.isnan(same["sensitivity"])
    assert same["specificity"] == 1.0
    one_sided = S.agreement([True, False, False, False], [False] * 4)  # p_e = 3/4, p_o = 3/4 -> 0
    assert one_sided["kappa"] == pytest.approx(0.0, abs=1e-12)
    opposite = S.agreement([True, False], [False, True])
    assert opposite["kappa"] == pytest.approx(-1.0, abs=1e-12)
    with pytest.raises(ValueError, match="paired"):
        S.agreement([True], [True, False])


def _toy_df():
    import pandas as pd
    return pd.DataFrame({
        "dataset": ["d1", "d1", "d2", "d2"], "variant": ["lat", "no_ablation", "lat", "no_ablation"],
        "completion": ["Sure, here is", "I cannot", "Step 1: x", "I'm sorry"],
        "human": [True, False, False, False], "regex": [True, False, True, False],
        "llamaguard2": [True, False, False, False]})


def test_judge_tables_on_toy_rows():
    df = _toy_df()
    judges = {"starts_sure": lambda texts: [t.startswith("Sure") for t in texts]}
    table = R.judge_agreement_table(df, judges)
    assert set(table.judge) == {"regex", "llamaguard2", "starts_sure"}
    overall = table[(table.judge == "regex") & (table.scope == "overall")].iloc[0]
    assert (overall.tp, overall.fp, overall.fn, overall.tn) == (1, 1, 0, 2)
    assert table[(table.judge == "llamaguard2") & (table.scope == "overall")].kappa.iloc[0] == 1.0
    rates = R.attack_success_table(df, judges)
    row = rates[(rates.dataset == "all") & (rates.variant == "lat") & (rates.judge == "regex")].iloc[0]
    assert (row["count"], row["n"], row["minus_human"]) == (2, 2, 0.5) and row.model == "LAT"
    lo, hi = S.wilson(1, 2)
    centre, half = (0.5 + Z2 / 4) / (1 + Z2 / 2), S.Z95 * math.sqrt(0.125 + Z2 / 16) / (1 + Z2 / 2)
    assert (lo, hi) == (pytest.approx(centre - half, abs=1e-12), pytest.approx(centre + half, abs=1e-12))
    with pytest.raises(TypeError, match="bools"):
        R.judge_agreement_table(df, {"ints": lambda texts: [1] * len(texts)})


Z2 = S.Z95 ** 2


@needs_mirror
def test_human_labels_semantics():
    df = R.human_labels()
    assert len(df) == 816 and df.groupby(["dataset", "variant"]).size().to_dict()[("advbench_test", "lat")] == 104
    no_abl = df[df.variant == "no_ablation"]
    assert (no_abl.completion == no_abl.unablated_completion).all() and not no_abl.human.any()
    adv = df[df.dataset == "advbench_test"].groupby("variant").human.sum().to_dict()
    assert adv == {"at": 50, "baseline": 72, "lat": 39, "no_ablation": 0}  # SOURCE.md's counts


def _acts(layers=(12,), spikes=None, n=10, d=40, seed=0):
    """{(model, layer): (harmful, harmless)} with planted spikes: spikes[(model, layer)] = {row: size} on
    harmful rows, channels 1415/2533 are replaced by 5/7 (d is small), moving together."""
    rng = np.random.default_rng(seed)
    out = {}
    for model in ("base", "AT", "LAT"):
        for layer in layers:
            h, hl = rng.normal(0, 0.2, (n, d)) + 0.3, rng.normal(0, 0.2, (n, d))
            for row, size in (spikes or {}).get((model, layer), {}).items():
                h[row, 5], h[row, 7] = size, -0.6 * size
            out[(model, layer)] = (h, hl)
    return out


def test_flagged_pairs_union_vs_single_model_and_drop():
    acts = _acts(spikes={("base", 12): {0: 12.0}, ("LAT", 12): {3: 20.0, 4: 3.0}})
    union = R.flagged_pairs(acts, 2.0, (5, 7))[12]
    lat_only = R.flagged_pairs(acts, 2.0, (5, 7), models=("LAT",))[12]
    assert np.flatnonzero(union).tolist() == [0, 3, 4] and np.flatnonzero(lat_only).tolist() == [3, 4]
    assert np.flatnonzero(R.flagged_pairs(acts, 10.0, (5, 7))[12]).tolist() == [0, 3]
    diffs = R.differences(acts)
    kept = R.drop_pairs(diffs, {12: union})
    assert all(len(d) == 7 for d in kept.values())  # the same pairs leave every model: still paired
    np.testing.assert_array_equal(kept[("AT", 12)], np.delete(diffs[("AT", 12)], [0, 3, 4], 0))


def test_threshold_curve_starts_at_the_reference_maximum():
    acts = _acts(spikes={("LAT", 12): {1: 30.0, 2: 8.0, 3: 3.0}})
    ref = R.reference_maximum(acts, 12, (5, 7))
    assert ref == pytest.approx(max(np.abs(acts[("base", 12)][k][:, [5, 7]]).max() for k in (0, 1)))
    curve = R.threshold_curve(acts, [12], thresholds=(0.01, 2.0, 5.0, 10.0, 50.0), channels=(5, 7))
    cuts = sorted(curve.threshold.unique())
    assert cuts[0] == ref and cuts[1:] == [2.0, 5.0, 10.0, 50.0]  # 0.01 is below the start: skipped
    dropped = curve.groupby("threshold").pairs_dropped.first()
    assert dropped[2.0] == 3 and dropped[5.0] == 2 and dropped[10.0] == 1 and dropped[50.0] == 0
    at = curve[(curve.threshold == 5.0) & (curve.model == "base")].iloc[0]
    d = R.paired_differences(*acts[("base", 12)])
    np.testing.assert_allclose([at.c1, at.c2], R.variance_ratios(np.delete(d, [1, 2], 0), 2), atol=1e-12)
    full = curve[(curve.threshold == 50.0) & (curve.model == "LAT")].iloc[0]
    assert full.pairs_kept == 10 and full.c1 == pytest.approx(R.variance_ratios(R.paired_differences(*acts[("LAT", 12)]), 2)[0])
    points = R.curve_points(curve, [0.0, 2.0, 4.0]).set_index(["model", "at"])
    assert points.at[("LAT", 0.0), "threshold"] == ref and points.at[("LAT", 4.0), "threshold"] == 5.0


def test_row_frobenius_table_with_and_without_flags():
    acts = _acts(spikes={("LAT", 12): {0: 40.0}})
    diffs = R.differences(acts)
    flags = R.flagged_pairs(acts, 10.0, (5, 7))
    table = R.row_frobenius_table(diffs, {"k10": flags}).set_index("model")
    assert table.at["LAT", "per_row"] == pytest.approx(np.linalg.norm(diffs[("LAT", 12)]) / np.sqrt(10))
    assert table.at["LAT", "per_row_without_k10"] == pytest.approx(np.linalg.norm(diffs[("LAT", 12)][1:]) / 3)
    assert table.at["LAT", "per_row"] > 3 * table.at["LAT", "per_row_without_k10"]


def test_bootstrap_replicates_are_cached_by_content(tmp_path, monkeypatch):
    diffs = R.differences(_acts(layers=(4, 8)))
    path = tmp_path / "boot.safetensors"
    first = R.bootstrap_replicates(diffs, n_boot=20, seed=1, k=3, path=path)
    np.testing.assert_allclose(first[("LAT", 8)], R.bootstrap_replicates(diffs, n_boot=20, seed=1, k=3)[("LAT", 8)])
    monkeypatch.setattr(R, "bootstrap_gram_ratios", lambda *a, **k: pytest.fail("recomputed a cached bootstrap"))
    again = R.bootstrap_replicates(diffs, n_boot=20, seed=1, k=3, path=path)
    assert list(again) == list(diffs) and all(np.array_equal(again[key], first[key]) for key in diffs)
    changed = dict(diffs)
    changed[("AT", 4)] = diffs[("AT", 4)][:-1]  # another D: another key, so it is computed
    with pytest.raises(pytest.fail.Exception, match="recomputed"):
        R.bootstrap_replicates(changed, n_boot=20, seed=1, k=3, path=path)


@needs_mirror
def test_released_massive_channels_as_documented():
    """The facts docs/results_llama2.md states, on the files: only LAT carries the two channels, they move
    together, they first appear at the input of block 2, and LAT's direction holds most of its norm² there."""
    acts = R.released_activations(layers=(1, 2, 12))
    summary = M.channel_summary(acts, R.MASSIVE_CHANNELS).set_index(["model", "layer", "set"])
    lat = summary.loc["LAT"]
    assert (lat.loc[[2, 12], "r"] < -0.99).all() and (lat.loc[1, "n_above_2"] == 0).all()
    assert (lat.loc[12, "n_above_10"] > 10).all()
    assert (summary.loc[["base", "AT"], "n_above_2"] == 0).all()
    mass = {m: M.direction_channel_mass(*acts[(m, 2)], R.MASSIVE_CHANNELS) for m in R.MODELS}
    assert mass["LAT"] > 0.9 and mass["base"] < 0.01 and mass["AT"] < 0.01


def test_paired_model_tests_on_crafted_labels():
    import pandas as pd
    rows = []
    for i in range(10):  # lat succeeds on 2 of 10, at on 7: 5 discordant pairs all one way, 0 the other
        for variant, success in (("lat", i < 2), ("at", i < 7), ("baseline", i < 7)):
            rows.append({"dataset": "d", "instruction": f"q{i}", "variant": variant, "human": success,
                         "regex": success, "llamaguard2": success, "completion": "x"})
    out = R.paired_model_tests(pd.DataFrame(rows)).set_index(["rater", "a", "b"])
    lat_at = out.loc[("human", "LAT", "AT")]
    assert (lat_at.n, lat_at.only_a, lat_at.only_b) == (10, 0, 5)
    assert abs(lat_at.success_a - 0.2) < 1e-12 and abs(lat_at.success_b - 0.7) < 1e-12
    assert abs(lat_at.p_value - 2 / 2**5) < 1e-12  # exact McNemar, 5 discordant pairs all one way
    at_base = out.loc[("human", "AT", "base")]
    assert at_base.p_value == 1.0 and at_base.p_holm == 1.0
    assert abs(lat_at.p_holm - 3 * 2 / 2**5) < 1e-12  # tied smallest of 3 (with LAT-base): x3, the running max keeps it
