"""refusal_lat.massive on planted arrays, and scripts/check_massive_activations.py end to end on the tiny model
with a massive channel planted through a LoRA adapter (the way an adapter could make one). Fast (seconds)."""
import importlib.util
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import helpers as H
from refusal_lat import massive as M

REPO = Path(__file__).resolve().parents[1]


def _script():
    spec = importlib.util.spec_from_file_location("check_massive_activations", REPO / "scripts" / "check_massive_activations.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _planted(n=12, d=16, seed=0, spikes=(), channels=(3, 9), size=40.0):
    """(harmful, harmless) rows ~N(0, 0.3) with rows `spikes` of harmful carrying +size on channels[0] and
    -0.6 size on channels[1] (the two channels moving together, as Llama-2's 1415 and 2533 do)."""
    rng = np.random.default_rng(seed)
    h, hl = rng.normal(0, 0.3, (n, d)) + 0.5, rng.normal(0, 0.3, (n, d))
    for i in spikes:
        h[i, channels[0]] += size
        h[i, channels[1]] -= 0.6 * size
    return h, hl


def test_planted_channels_are_found_and_move_together():
    h, hl = _planted(spikes=(1, 4, 7), size=30.0)
    assert M.top_channels([h, hl], 2) == (3, 9)
    np.testing.assert_array_less(M.row_peaks(h, (3, 9))[[0, 2, 3]], 2.0)
    assert (M.row_peaks(h, (3, 9))[[1, 4, 7]] > 29).all()
    summary = M.channel_summary({("LAT", 5): (h, hl)}, (3, 9), cuts=(2.0, 10.0, 40.0)).set_index("set")
    assert summary.at["harmful", "r"] < -0.99 and summary.at["harmful", "n_above_10"] == 3
    assert summary.at["harmless", "n_above_2"] == 0 and summary.at["harmful", "median_peak_above_10"] > 29


def test_union_mask_differs_from_a_single_models_mask():
    base = _planted(seed=1, spikes=(2,))
    lat = _planted(seed=2, spikes=(5, 6))
    pairs = {"base": base, "LAT": lat}
    union = M.flag_pairs(pairs, 10.0, (3, 9))
    only_lat = M.flag_pairs(pairs, 10.0, (3, 9), models=("LAT",))
    assert np.flatnonzero(union).tolist() == [2, 5, 6] and np.flatnonzero(only_lat).tolist() == [5, 6]
    assert not M.flag_pairs(pairs, 100.0, (3, 9)).any()
    with pytest.raises(ValueError, match="index-paired"):
        M.flag_pairs({"base": base, "LAT": (lat[0][:5], lat[1][:5])}, 10.0, (3, 9))


def test_direction_mass_and_row_frobenius_known_answers():
    h, hl = np.zeros((4, 5)), np.zeros((4, 5))
    h[:, 0], h[:, 2] = 3.0, 4.0  # mean difference (3, 0, 4, 0, 0): norm² 25, 9 of it on channel 0
    assert M.direction_channel_mass(h, hl, (0,)) == pytest.approx(9 / 25)
    assert M.direction_channel_mass(h, hl, (0, 2)) == pytest.approx(1.0)
    assert np.isnan(M.direction_channel_mass(h, h, (0,)))  # no direction (e.g. the same read token at block 0)
    d = np.array([[3.0, 4.0], [0.0, 0.0], [6.0, 8.0]])
    assert M.row_frobenius(d) == pytest.approx(np.sqrt(125 / 3))
    assert M.row_frobenius(d, [True, False, True]) == pytest.approx(np.sqrt(125 / 2))


def test_mechanism_table_on_planted_models():
    acts = {("base", 4): _planted(seed=3), ("LAT", 4): _planted(seed=4, spikes=(0, 1, 2), size=25.0)}
    table = M.mechanism_table(acts, channels=None, ks=(2.0, 10.0)).set_index("model")
    assert table.at["LAT", "channels"] == "3 9"  # discovered: the planted channels
    base_peak = table.at["base", "peak"]
    assert table.at["base", "peak_vs_reference"] == 1.0 and table.at["LAT", "peak_vs_reference"] > 10
    assert table.at["LAT", "above_10x"] == (25.0 > 10 * base_peak) * 3 and table.at["base", "above_2x"] == 0
    assert table.at["LAT", "norm_without"] < table.at["LAT", "norm"] and table.at["LAT", "direction_mass"] > 0.5
    with pytest.raises(ValueError, match="no 'base' model"):
        M.mechanism_table({("LAT", 4): acts[("LAT", 4)]})


def test_profile_layer_pairs_reads_a_cache_layout():
    acts = {"base": {"harmful": torch.arange(24.0).reshape(2, 3, 4), "harmless": torch.zeros(2, 3, 4)}}
    pairs = M.profile_layer_pairs(acts, [1])
    np.testing.assert_array_equal(pairs[("base", 1)][0], [[4, 5, 6, 7], [16, 17, 18, 19]])


# --- the GPU check, end to end on tiny ------------------------------------------------------------------------------
TINY = H.load_profile("tiny").models["base"]
CHANNEL = 7


def _adapter(folder, scale, seed):
    """A LoRA on block 1's MLP down-projection; scale != 0 plants `scale` on channel CHANNEL's row of B, so the
    adapted block 1 writes a large value into that channel: it first shows at the input of block 2."""
    from peft import LoraConfig, get_peft_model
    torch.manual_seed(seed)
    model = get_peft_model(H.tiny_model(TINY.config, len(H.tiny_tokenizer())), LoraConfig(
        r=4, lora_alpha=4, target_modules=["down_proj"], layers_to_transform=[1], init_lora_weights=False))
    if scale:
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.data.zero_()
                param.data[CHANNEL] = scale
    model.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def check(tmp_path_factory):
    pytest.importorskip("bitsandbytes")
    folder = tmp_path_factory.mktemp("massive")
    spec = {"source": "tiny", "id": TINY.id, "config": dict(TINY.config)}
    models = {"base": spec, "AT": {**spec, "adapter": _adapter(folder / "at", 0.0, 2)},
              "LAT": {**spec, "adapter": _adapter(folder / "lat", 1000.0, 1)}}
    return _script().run("tiny", {"models": models}, folder / "out", channels=(CHANNEL, 3), n_prompts=4, n_direction=6)


def test_check_finds_the_planted_channel_in_both_loadings(check):
    spikes = check["spikes"]
    lat = spikes[spikes.model == "LAT"].set_index(["variant", "batch", "layer"])
    for variant in ("bf16_unmerged", "nf4_merged"):
        for batch in (1, 2):
            assert lat.loc[(variant, batch, 1), "peak_vs_reference"] < 2  # block 1's input: before the planted block
            assert lat.loc[(variant, batch, 2), "peak_vs_reference"] > 10
            assert lat.loc[(variant, batch, 2), "above_10x"] == 8  # 4 harmful + 4 harmless prompts
    others = spikes[spikes.model != "LAT"]
    assert (others.above_2x == 0).all() and (others.peak_vs_reference < 2).all()
    assert any("property of the model" in line for line in check["verdicts"])
    assert any("batch 1 and batch 2 give the same counts" in line for line in check["verdicts"])
    pos = check["positions"].set_index(["variant", "batch", "role", "block"])
    assert pos.loc[("bf16_unmerged", 2, "LAT", 2), "last_token_median"] > 10 * pos.loc[("bf16_unmerged", 2, "base", 2), "last_token_max"]
    saved = np.load(check["out"] / "positions_bf16_unmerged_LAT_b2.npz")
    assert saved["harmful_values"].shape[:2] == (4, 3) and saved["harmful_values"].shape[-1] == 2
    assert saved["blocks"].tolist() == [1, 2, 3] and (check["out"] / "report.md").is_file()
    assert check["reproduction"].empty  # the tiny model is not Llama-2: nothing to compare with


def test_verdicts_tell_a_quantisation_artifact_from_a_model_property():
    check = _script()

    def table(bf16, nf4):
        return pd.DataFrame([{"model": "LAT", "layer": 14, "variant": v, "batch": b, "n_prompts": 200, "above_10x": n}
                             for v, n in (("bf16_unmerged", bf16), ("nf4_merged", nf4)) for b in (1, 2)])
    assert "quantisation artifact" in check.verdicts(table(0, 35), 14)[1]
    assert "property of the model" in check.verdicts(table(30, 35), 14)[1]
    assert "not reproduced" in check.verdicts(table(0, 0), 14)[1]


def test_reproduction_and_svd_tables_on_planted_rows():
    check = _script()
    h, hl = _planted(n=6, d=10, seed=5, spikes=(1,), size=30.0)
    sets = {"harmful": {"last": h[:, None]}, "harmless": {"last": hl[:, None]}}
    rep = check.reproduction_table({("nf4_merged", 2, "LAT"): sets}, [12], {("LAT", 12): (h, hl)}, (3, 9))
    assert np.allclose(rep.cos_median, 1.0) and (rep.flag_agree == 6).all() and rep.flagged_ours.tolist() == [1, 0]
    rows = {("v", "base"): _planted(n=20, d=10, seed=6), ("v", "LAT"): _planted(n=20, d=10, seed=7, spikes=(3, 8))}
    svd = check.svd_table(rows, 14, (3, 9)).set_index("role")
    assert (svd.dropped == 2).all() and svd.at["LAT", "c1"] > svd.at["LAT", "c1_without"]
    assert svd.at["base", "c1_without"] == pytest.approx(H.explained_variance_ratio(
        np.delete(rows[("v", "base")][0], [3, 8], 0), np.delete(rows[("v", "base")][1], [3, 8], 0))[0])
