"""Planted-data oracles for the analysis functions (issue 15): each expected value is computed here
independently (numpy SVD, hand formulas), never read back from the code under test."""
import math

import numpy as np
import pandas as pd
import pytest
import torch

import helpers as H
from refusal_lat import store


def planted_acts(seed=0, n=12, n_layers=3, d=6):
    """harmful = harmless + a per-layer shift along known axes + noise."""
    rng = np.random.default_rng(seed)
    harmless = rng.normal(size=(n, n_layers, d))
    shift = np.zeros((n_layers, d))
    for layer in range(n_layers):
        shift[layer, layer] = 3.0 + layer  # layer l: mean difference along axis l, length 3 + l
    harmful = harmless + shift + 0.3 * rng.normal(size=(n, n_layers, d))
    return {"harmful": torch.tensor(harmful), "harmless": torch.tensor(harmless)}


def np_ratios(d):
    s2 = np.linalg.svd(d, compute_uv=False) ** 2
    return s2 / s2.sum()


# --- directions -----------------------------------------------------------------------------------
def test_directions_are_unit_harmful_minus_harmless():
    acts = planted_acts()
    h, hl = acts["harmful"].numpy(), acts["harmless"].numpy()
    diff = h.mean(0) - hl.mean(0)
    torch.testing.assert_close(H.mean_difference(acts["harmful"], acts["harmless"]),
                               torch.tensor(diff), atol=1e-12, rtol=0)
    dirs = H.refusal_directions(acts["harmful"], acts["harmless"])
    assert dirs.shape == (3, 6)
    np.testing.assert_allclose(dirs.norm(dim=-1).numpy(), 1.0, atol=1e-6)  # unit per layer, not per column
    np.testing.assert_allclose(dirs.numpy(), diff / np.linalg.norm(diff, axis=-1, keepdims=True), atol=1e-6)
    for layer in range(3):  # points from harmless to harmful: + along the planted axis
        assert dirs[layer, layer] > 0.9


def test_zero_difference_direction_stays_zero():
    x = torch.randn(4, 2, 5, dtype=torch.float64)
    assert torch.equal(H.refusal_directions(x, x.clone()), torch.zeros(2, 5))


def test_direction_cosines_and_adjacent_layer_cosines():
    a = torch.tensor([[1.0, 0, 0], [0, 1.0, 0]])
    b = torch.tensor([[0.6, 0.8, 0], [0, 0, 1.0]])
    table = H.direction_cosines({"base": a, "LAT": b, "AT": -a}, layer=0)
    assert list(table.index) == list(table.columns) == ["base", "LAT", "AT"]
    expected = np.array([[1, 0.6, -1], [0.6, 1, -0.6], [-1, -0.6, 1]])
    np.testing.assert_allclose(table.to_numpy(), expected, atol=1e-12)
    np.testing.assert_allclose(np.diag(H.direction_cosines({"x": H.refusal_directions(*planted_acts().values())}, 1)), 1, atol=1e-6)
    # adjacent layers: unnormalised inputs; cos(e0, (1,1,0)) = 1/sqrt2, cos((1,1,0), -3 e2) = 0
    layers = torch.tensor([[2.0, 0, 0], [1.0, 1.0, 0], [0, 0, -3.0]])
    np.testing.assert_allclose(H.adjacent_layer_cosines(layers), [1 / math.sqrt(2), 0.0], atol=1e-7)


# --- SVD ------------------------------------------------------------------------------------------
def test_svd_table_every_column_against_numpy():
    acts = planted_acts()
    table = H.svd_table({"base": acts}, n_components=4)
    assert list(table.columns) == ["model", "layer", "component", "ratio", "cumulative", "ratio_centered",
                                   "cumulative_centered"]
    assert len(table) == 3 * 4
    for layer in range(3):
        d = acts["harmful"][:, layer].numpy() - acts["harmless"][:, layer].numpy()
        plain, centered = np_ratios(d), np_ratios(d - d.mean(0))
        rows = table[table.layer == layer].sort_values("component")
        assert list(rows.component) == [1, 2, 3, 4]
        np.testing.assert_allclose(rows.ratio, plain[:4], atol=1e-12)
        np.testing.assert_allclose(rows.cumulative, np.cumsum(plain)[:4], atol=1e-12)
        np.testing.assert_allclose(rows.ratio_centered, centered[:4], atol=1e-12)
        np.testing.assert_allclose(rows.cumulative_centered, np.cumsum(centered)[:4], atol=1e-12)
        assert plain[0] > 0.8  # the planted shift dominates the uncentered spectrum


def test_svd_summary_every_column_against_direct_computation():
    acts = planted_acts(seed=1, n=10)
    layer, n_boot, seed = 1, 60, 3
    row = H.svd_summary({"base": acts}, layer, n_boot=n_boot, seed=seed).iloc[0]
    a, b = acts["harmful"][:, layer].numpy(), acts["harmless"][:, layer].numpy()
    d = a - b
    plain, centered = np_ratios(d), np_ratios(d - d.mean(0))
    assert (row.model, row.layer, row.n_pairs) == ("base", layer, 10)
    assert row.comp1 == pytest.approx(plain[0], abs=1e-12) and row.comp2 == pytest.approx(plain[1], abs=1e-12)
    assert row.first_two == pytest.approx(plain[:2].sum(), abs=1e-12)
    assert row.comp1_centered == pytest.approx(centered[0], abs=1e-12)
    assert row.comp2_centered == pytest.approx(centered[1], abs=1e-12)
    assert row.mean_diff_norm == pytest.approx(np.linalg.norm(a.mean(0) - b.mean(0)), abs=1e-12)
    # bootstrap: resample pairs with the documented generator, full SVD of each resample
    draws = np.random.default_rng(seed).integers(0, len(d), size=(n_boot, len(d)))
    boot = np.array([np_ratios(d[idx])[:2] for idx in draws])
    for name, values in (("comp1", boot[:, 0]), ("comp2", boot[:, 1]), ("first_two", boot.sum(1))):
        q_lo, q_hi = np.percentile(values, [2.5, 97.5])  # basic interval: 2 * estimate - upper/lower quantile
        low, high = 2 * row[name] - q_hi, 2 * row[name] - q_lo
        assert (row[f"{name}_low"], row[f"{name}_high"]) == pytest.approx((low, high), abs=1e-9)
    # re-pairing null: harmless rows permuted, full SVD, p by direct count on component 2
    rng = np.random.default_rng(seed)
    null = np.array([np_ratios(a - b[rng.permutation(len(b))])[:2] for _ in range(n_boot)])
    assert row.null_comp1_mean == pytest.approx(null[:, 0].mean(), abs=1e-9)
    assert row.null_comp2_mean == pytest.approx(null[:, 1].mean(), abs=1e-9)
    count2 = sum(1 for v in null[:, 1] if v >= plain[1])
    assert row.null_comp2_p == pytest.approx((1 + count2) / (1 + n_boot), abs=1e-12)
    count1 = sum(1 for v in null[:, 0] if v >= plain[0])
    assert count1 != count2, "planted data must tell component 1 from component 2"


def test_pca_2d_against_numpy():
    acts = planted_acts(seed=2)
    h, hl = acts["harmful"][:, 2].numpy(), acts["harmless"][:, 2].numpy()
    coords, ratios = H.pca_2d(h, hl)
    x = np.concatenate([h, hl])
    xc = x - x.mean(0)
    u, s, vt = np.linalg.svd(xc, full_matrices=False)
    np.testing.assert_allclose(ratios, (s ** 2 / (s ** 2).sum())[:2], atol=1e-10)
    expected = xc @ vt[:2].T
    signs = np.sign((coords * expected).sum(0))  # PCA axes are defined up to sign
    np.testing.assert_allclose(coords * signs, expected, atol=1e-8)
    assert coords.shape == (len(x), 2)


# --- KL, activation addition -----------------------------------------------------------------------
def test_kl_two_token_case_by_hand():
    base = torch.log(torch.tensor([[0.5, 0.5], [0.9, 0.1]], dtype=torch.float64))
    other = torch.log(torch.tensor([[0.9, 0.1], [0.5, 0.5]], dtype=torch.float64))
    # KL(base || other), row 0: 0.5 ln(0.5/0.9) + 0.5 ln(0.5/0.1) = 0.5 ln(25/9)
    # row 1: 0.9 ln(0.9/0.5) + 0.1 ln(0.1/0.5)
    expected = [0.5 * math.log(25 / 9), 0.9 * math.log(1.8) + 0.1 * math.log(0.2)]
    np.testing.assert_allclose(H.kl_divergence(base, other), expected, atol=1e-12)
    assert expected[0] != pytest.approx(expected[1], abs=1e-3)  # the direction matters


def test_activation_addition_adds_the_vector_and_raises_a_planted_logit(tiny, tiny_model):
    model, tok = tiny_model
    batch = H.tokenize(tok, tiny, ["Hi", "Name three colours, please."])
    last = len(H.decoder_layers(model)) - 1
    target = 100
    vector = 20 * model.lm_head.weight[target].detach() / model.lm_head.weight[target].norm()

    def run():
        with torch.no_grad(), H.capture_block_inputs(model, -1) as seen:
            logits = model(**batch, position_ids=H.position_ids(batch["attention_mask"])).logits[:, -1]
        return torch.log_softmax(logits.double(), -1), seen[last][0]

    base_lp, base_in = run()
    with H.activation_addition(model, vector, last):
        added_lp, added_in = run()
    torch.testing.assert_close(added_in, base_in + vector, atol=1e-5, rtol=0)  # + vector, not - vector
    assert (added_lp[:, target] > base_lp[:, target] + 0.3).all()  # random weights: near-uniform logits
    assert (added_lp.argmax(-1) == target).all() and (base_lp.argmax(-1) != target).all()
    assert all(not layer._forward_pre_hooks for layer in H.decoder_layers(model))


# --- prompt template ---------------------------------------------------------------------------------
def llama_like_tokenizer():
    """The tiny byte tokenizer with Llama's post-processor (BOS before every text when special tokens are on)."""
    from tokenizers.processors import TemplateProcessing
    tok = H.tiny_tokenizer()
    tok.backend_tokenizer.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", tok.bos_token_id)])
    return H.prepare_tokenizer(tok)


def test_paper_template_gives_one_bos_and_newline_at_the_read_position():
    paper = H.load_profile("paper")
    tiny_paper = H.load_profile("tiny", {"template": paper.template, "read_position": paper.read_position})
    tok = llama_like_tokenizer()
    prompts = ["Hi", "Write a long poem about the sea"]
    batch = H.tokenize(tok, tiny_paper, prompts)
    for ids, mask in zip(batch["input_ids"], batch["attention_mask"]):
        real = ids[mask.bool()].tolist()
        assert real.count(tok.bos_token_id) == 1 and real[0] == tok.bos_token_id
        assert tok.decode(real[1:]) == paper.template.format(prompt=prompts[len(real) > 20])
    assert H.read_tokens(tok, tiny_paper, prompts) == ["\n", "\n"]
    # a chat template carries its own special tokens: the tokenizer adds none
    chat = H.tokenize(tok, H.load_profile("tiny"), prompts)
    assert not (chat["input_ids"] == tok.bos_token_id).any()


# --- small table helpers -------------------------------------------------------------------------------
def test_markdown_table():
    table = pd.DataFrame({"model": ["base", "LAT"], "rate": [0.25, None]})
    assert H.markdown_table(table) == "| model | rate |\n|---|---|\n| base | 0.25 |\n| LAT | – |"


def test_cache_primitive_reuses_and_recomputes(tmp_path):
    path = tmp_path / "t.csv"
    calls = []

    def table(key, value):
        def compute(info):
            calls.append(value)
            return pd.DataFrame({"x": [value]})
        return store.cached(path, key, compute, store.read_table, store.encode_table).x.tolist()
    assert table({"k": 1}, 1) == [1]
    assert table({"k": 1}, 2) == [1] and calls == [1]
    assert table({"k": 2}, 3) == [3] and calls == [1, 3]
    path.with_suffix(".json").write_text("{torn")
    assert table({"k": 2}, 4) == [4] and calls == [1, 3, 4]
