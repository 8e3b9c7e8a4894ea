"""The refusal-score transfer matrix (scores.py), its paired sign-flip tests, and the bfloat16
generation path (profile.generation_dtype)."""
import dataclasses
import itertools

import numpy as np
import pytest
import torch

import helpers as H
from refusal_lat import generation
from refusal_lat.config import ConfigError


def test_sign_flip_p_exact_cases():
    all_positive = np.arange(1, 11, dtype=float)  # every flip but the identity lowers |mean|
    every = np.array(list(itertools.product([-1.0, 1.0], repeat=10)))  # the exact permutation set
    # exact: the identity and its mirror reach |mean|; the observed counts once more -> (1 + 2) / (1 + 1024)
    assert H.sign_flip_p(all_positive, every) == pytest.approx(3 / 1025)
    assert H.sign_flip_p(np.array([1.0, -1.0, 2.0, -2.0]), every[:, :4]) == 1.0  # mean 0: every flip reaches it


def test_log_odds_matrix_p_values_and_holm():
    rng = np.random.default_rng(0)
    prompts = [f"p{i}" for i in range(40)]
    base = rng.normal(2.0, 1.0, 40)
    cells = {("m", "none"): base, ("m", "m"): base - 3.0 + rng.normal(0, 0.1, 40),  # a clear drop
             ("m", "o"): base + rng.normal(0, 1.0, 40)}  # noise around none
    results = {(t, s, None): [{"prompt": p, "refusal_log_odds": float(v)} for p, v in zip(prompts, x)]
               for (t, s), x in cells.items()}
    table = H.log_odds_matrix(results, n_boot=2000).set_index("source")
    assert table.loc["m", "diff_vs_none_p"] < 0.001 and table.loc["o", "diff_vs_none_p"] > 0.05
    assert np.isnan(table.loc["none", "diff_vs_none_p"])  # a cell is not tested against itself
    assert table.loc["m", "diff_vs_none_p_holm"] == pytest.approx(min(1, 2 * table.loc["m", "diff_vs_none_p"]))


def test_refusal_score_matrix_equals_the_first_token_of_generation(tiny, tmp_path):
    """Golden: a cell's forward-only refusal log-odds equal the refusal_log_odds that generation
    records from its first new token under the same ablation."""
    sets = H.prompt_sets(tiny)
    acts = {r: H.activations(tiny, r, sets, tmp_path) for r in tiny.roles}
    dirs = H.directions(tmp_path, acts)
    units = H.transfer_units(tiny)
    scores = H.refusal_score_matrix(tiny, tmp_path, sets.eval, dirs, units)
    generated = H.generation_units(tiny, tmp_path, sets.eval, dirs, units)
    for unit in units:
        a = [r["refusal_log_odds"] for r in scores[unit]]
        b = [r["refusal_log_odds"] for r in generated[unit]]
        assert np.allclose(a, b, atol=1e-4), unit
    assert H.score_path(tmp_path, "base", "LAT", tiny.layer).exists()
    ablated = np.mean([r["refusal_log_odds"] for r in scores[("base", "base", tiny.layer)]])
    plain = np.mean([r["refusal_log_odds"] for r in scores[("base", "none", None)]])
    assert ablated != plain  # the ablation reached the forward pass


def test_refusal_score_matrix_is_cached_and_keyed_on_dtype(tiny, tmp_path, monkeypatch):
    sets = H.prompt_sets(tiny)
    acts = {r: H.activations(tiny, r, sets, tmp_path) for r in tiny.roles}
    dirs = H.directions(tmp_path, acts)
    units = [("base", "none", None), ("base", "LAT", tiny.layer)]
    H.refusal_score_matrix(tiny, tmp_path, sets.eval, dirs, units)
    from refusal_lat import scores
    calls = []
    real = scores.subspace_refusal_log_odds
    monkeypatch.setattr(scores, "subspace_refusal_log_odds", lambda *a: calls.append(1) or real(*a))
    H.refusal_score_matrix(tiny, tmp_path, sets.eval, dirs, units)
    assert calls == []  # read back
    H.refusal_score_matrix(dataclasses.replace(tiny, generation_dtype="bfloat16"), tmp_path, sets.eval, dirs, units)
    assert len(calls) == 2  # another dtype is another key


def test_bf16_generation_runs_in_bf16_and_agrees_with_fp32(tiny, tmp_path, monkeypatch):
    """The bf16 path generates with bfloat16 weights (asserted on what runs), records that in the unit
    key, and on the tiny model agrees with float32 on the first token of >= 90 % of rows with
    first-token refusal log-odds within 0.01 (a random model's logits are nearly flat, so later tokens
    diverge sooner than a trained model's; bench/bf16.py measures the real model)."""
    bf16 = dataclasses.replace(tiny, generation_dtype="bfloat16")
    sets = H.prompt_sets(tiny)
    acts = {r: H.activations(tiny, r, sets, tmp_path) for r in tiny.roles}
    dirs = H.directions(tmp_path, acts)
    seen = []
    real = generation.generate_tokens
    monkeypatch.setattr(generation, "generate_tokens",
                        lambda model, *a, **k: seen.append(next(model.parameters()).dtype) or real(model, *a, **k))
    units = [("base", "none", None), ("base", "base", tiny.layer)]
    a = H.generation_units(tiny, tmp_path / "fp32", sets.eval, dirs, units)
    b = H.generation_units(bf16, tmp_path / "bf16", sets.eval, dirs, units)
    half = len(seen) // 2
    assert seen[:half] == [torch.float32] * half and seen[half:] == [torch.bfloat16] * half
    rows_a = [r for u in units for r in a[u]]
    rows_b = [r for u in units for r in b[u]]
    first = lambda rows: [r["completion"][:1] for r in rows]  # noqa: E731
    assert np.mean([x == y for x, y in zip(first(rows_a), first(rows_b))]) >= 0.9
    assert np.allclose([r["refusal_log_odds"] for r in rows_a], [r["refusal_log_odds"] for r in rows_b], atol=0.01)
    import json
    meta = json.loads(H.unit_path(tmp_path / "bf16", "base", "none", None).with_suffix(".json").read_text())
    assert meta["key"]["dtype"] == "bfloat16"
    # activations stay float32 under a bf16 generation profile
    assert H.activations(bf16, "base", sets, tmp_path / "bf16")["harmful"].dtype == torch.float32


def test_generation_dtype_is_checked():
    with pytest.raises(ConfigError, match="generation_dtype"):
        H.load_profile("tiny", {"generation_dtype": "float8"})
    with pytest.raises(ConfigError, match="quantization none"):
        H.load_profile("tiny", {"generation_dtype": "bfloat16", "quantization": "nf4"})


def test_exact_paper_path_uses_the_authors_batches_and_no_shared_prefix(tmp_path, monkeypatch):
    """exact_paper_path: generation batches of 16 rows for the base model and 12 for the others, one
    direction per batch, and no shared-prefix prefill (asserted on what runs)."""
    exact = H.load_profile("tiny", {"exact_paper_path": True, "n_eval": 20})
    fast = H.load_profile("tiny", {"n_eval": 20, "batch_size": 80})
    sets = H.prompt_sets(exact)
    acts = {r: H.activations(exact, r, sets, tmp_path) for r in exact.roles}
    dirs = H.directions(tmp_path, acts)
    seen, prefills = [], []
    real_greedy, real_prefill = generation.greedy_tokens, generation.prefill_shared_prefix
    monkeypatch.setattr(generation, "greedy_tokens",
                        lambda model, ids, *a, **k: seen.append((len(ids), k["direction"] is None or k["direction"].ndim))
                        or real_greedy(model, ids, *a, **k))
    monkeypatch.setattr(generation, "prefill_shared_prefix", lambda *a, **k: prefills.append(1) or real_prefill(*a, **k))
    units = H.transfer_units(exact)
    exact_rows = H.generation_units(exact, tmp_path / "exact", sets.eval, dirs, units)
    per_unit = 2  # 20 prompts: base 16 + 4, others 12 + 8
    assert [n for n, _ in seen] == [16, 4] * 3 + [12, 8] * 3 and prefills == []
    assert all(kind in (True, 1) for _, kind in seen)  # one direction (or none) per batch, never per row
    seen.clear()
    fast_rows = H.generation_units(fast, tmp_path / "fast", sets.eval, dirs, units)
    assert [n for n, _ in seen] == [60, 60] and len(prefills) == per_unit  # per-row units, prefix shared
    seen.clear()
    few = H.load_profile("tiny", {"exact_paper_path": True})  # 8 prompts: two units would fit one batch of 16
    H.generation_units(few, tmp_path / "few", H.prompt_sets(few).eval, dirs, units)
    assert [n for n, _ in seen] == [8] * len(units) and all(kind in (True, 1) for _, kind in seen)
    same = [a["completion"] == b["completion"] for u in units for a, b in zip(exact_rows[u], fast_rows[u])]
    assert np.mean(same) == 1.0  # float32 on the CPU: the two paths give the same tokens


def test_exact_paper_path_merges_float16_lora_weights(tmp_path):
    from peft import LoraConfig, get_peft_model
    tiny = H.load_profile("tiny")
    model, _ = H.load_model(tiny, "base")
    torch.manual_seed(0)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], init_lora_weights=False))
    peft_model.save_pretrained(tmp_path / "adapter")
    base = H.load_profile("tiny", {"models": {"base": {"source": "tiny", "id": "tiny-random-llama",
                                                       "config": tiny.models["base"].config,
                                                       "adapter": str(tmp_path / "adapter")}}})
    exact = H.load_profile("tiny", {"exact_paper_path": True, "models": {"base": {
        "source": "tiny", "id": "tiny-random-llama", "config": tiny.models["base"].config, "adapter": str(tmp_path / "adapter")}}})
    plain, _ = H.load_model(tiny, "base")
    w = lambda m: m.model.layers[0].self_attn.q_proj.weight.detach()  # noqa: E731
    merged32, merged16 = w(H.load_model(base, "base")[0]), w(H.load_model(exact, "base")[0])
    delta32, delta16 = merged32 - w(plain), merged16 - w(plain)
    assert not torch.equal(delta32, delta16)  # the cast changed the merge ...
    assert torch.allclose(delta32, delta16, rtol=0, atol=1e-2 * delta32.abs().max())  # ... by fp16 rounding only
    assert H.model_fingerprint(exact, "base")["lora_dtype"] == "torch.float16"
    assert "lora_dtype" not in H.model_fingerprint(base, "base")


def test_second_component_tests_find_a_planted_second_component():
    import pandas as pd
    rng = np.random.default_rng(1)
    none = rng.normal(3.0, 1.0, 60)
    top1 = none - 1.0 + rng.normal(0, 0.05, 60)
    carries = pd.DataFrame({"none": none, "mean_diff": top1, "top1": top1, "top2": top1 - 1.0 + rng.normal(0, 0.05, 60),
                            "model": "carries", "layer": 3})
    empty = carries.assign(top2=top1 + rng.normal(0, 0.05, 60), model="empty")
    out = H.second_component_tests([carries, empty], n_boot=2000).set_index("model")
    assert out.loc["carries", "top2_minus_top1"] == pytest.approx(-1.0, abs=0.05)
    assert out.loc["carries", "top2_minus_top1_p_holm"] < 0.01 and out.loc["empty", "top2_minus_top1_p_holm"] > 0.05
    row = out.loc["carries"]
    assert row.top2_minus_top1_lo < row.top2_minus_top1 < row.top2_minus_top1_hi < -0.9  # tight, far from 0


def test_second_component_table_is_cached(tiny, tmp_path, monkeypatch):
    sets = H.prompt_sets(tiny)
    acts = H.activations(tiny, "base", sets, tmp_path)
    first = H.second_component_table(tiny, tmp_path, "base", acts, sets.eval)
    from refusal_lat import selection
    monkeypatch.setattr(selection, "second_component_ablation", lambda *a: (_ for _ in ()).throw(AssertionError("recomputed")))
    again = H.second_component_table(tiny, tmp_path, "base", acts, sets.eval)
    assert np.allclose(first[["none", "top1", "top2"]].to_numpy(), again[["none", "top1", "top2"]].to_numpy())
