"""Arm evaluation, batched (robustness.condition_completions, evaluate_model(batched=True)), against
one condition at a time (attacked_completions), and the transfer cells' cache (evaluate.transfer_log_odds)."""
import copy

import numpy as np
import pytest
import torch

import helpers as H
from refusal_lat.hooks import ablation
from refusal_lat.training import evaluate as E
from refusal_lat.training import robustness as R


def _direction(tiny, model, tok):
    sets = H.prompt_sets(tiny)
    harmful, harmless = (H.block_inputs(model, tok, tiny, p)[:, tiny.layer] for p in (sets.harmful, sets.harmless))
    return harmful.mean(0) - harmless.mean(0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_batched_conditions_equal_one_condition_at_a_time(tiny, tiny_model, dtype, one_thread):
    model, tok = tiny_model
    direction = _direction(tiny, model, tok)
    model = model if dtype == torch.float32 else copy.deepcopy(model).to(dtype)
    prompts = H.eval_pool(12)[0]
    conditions = {"harmful": (None, None, 0.0), "ablated": (direction, None, 0.0), "pgd_at": (None, 0, 0.5),
                  "pgd_lat": (None, tiny.layer, 2.0)}
    slow = {}
    for name, (d, layer, eps) in conditions.items():
        with ablation(model, d):
            slow[name] = R.attacked_completions(model, tok, tiny, prompts, layer, eps, 2, 5, batch_size=6)
    fast = R.condition_completions(model, tok, tiny, prompts, conditions, 2, 5, batch_size=6)
    for name in conditions:
        labels = [R.refusal_labels(out[name]["turns"], prompts) for out in (slow, fast)]
        if dtype == torch.float32 or name != "ablated":
            assert fast[name]["turns"] == slow[name]["turns"] and labels[0] == labels[1], name
            assert np.allclose(fast[name]["log_odds"], slow[name]["log_odds"], rtol=0, atol=1e-5), name
        else:  # the per-row projection, (x * r).sum(-1), rounds each bf16 product; x @ r does not
            assert np.allclose(fast[name]["log_odds"], slow[name]["log_odds"], rtol=0, atol=0.01)
            assert np.mean([a == b for a, b in zip(fast[name]["turns"], slow[name]["turns"])]) >= 0.9
    assert np.mean(fast["pgd_lat"]["log_odds"]) < np.mean(fast["harmful"]["log_odds"])  # the attack reached them
    assert fast["ablated"]["log_odds"] != fast["harmful"]["log_odds"]  # and the ablation


def test_batched_model_record_has_the_slow_paths_labels_under_its_own_key(tiny, tmp_path, monkeypatch, one_thread):
    prompts = {"harmful": H.eval_pool(6)[0], "harmless": H.paper_splits()["harmless_test"][:6]}
    radii = {"pgd_at": (0, 0.5), "pgd_lat": (tiny.layer, 2.0)}
    settings = E.EvalSettings(6, 6, tokens=4, attack_steps=2)
    slow = E.evaluate_model(tiny, "base", prompts, radii, settings, tmp_path)
    fast = E.evaluate_model(tiny, "base", prompts, radii, settings, tmp_path, batched=True)
    assert list(fast["conditions"]) == list(slow["conditions"]) == list(E.CONDITIONS)
    for condition, out in slow["conditions"].items():
        assert fast["conditions"][condition]["labels"] == out["labels"], condition
        assert np.allclose(fast["conditions"][condition]["log_odds"], out["log_odds"], rtol=0, atol=1e-5)
    calls = []
    real = E.attacked_completions
    monkeypatch.setattr(E, "attacked_completions", lambda *a, **k: calls.append(1) or real(*a, **k))
    E.evaluate_model(tiny, "base", prompts, radii, settings, tmp_path)
    assert len(calls) == len(E.CONDITIONS)  # the batched record is not read as the slow path's


def test_transfer_cells_are_read_back_whatever_the_thread_count(tiny, tmp_path, monkeypatch):
    from refusal_lat import selection
    records = {role: {"direction": torch.randn(32, generator=torch.Generator().manual_seed(i))}
               for i, role in enumerate(tiny.roles)}
    prompts = H.eval_pool(6)[0]
    calls = []
    real = selection.subspace_refusal_log_odds
    monkeypatch.setattr(selection, "subspace_refusal_log_odds", lambda *a: calls.append(a[-1]) or real(*a))
    first = E.transfer_log_odds(tiny, records, prompts, tmp_path)
    assert len(calls) == len(tiny.roles) * (1 + len(tiny.roles))
    model, tok = H.use_model(tiny, "base", tiny.gen_dtype)
    direct = real(model, tok, tiny, prompts, records["LAT"]["direction"][None])
    cell = first[(first.model == "base") & (first.direction_of == "LAT")]
    assert cell.log_odds.tolist() == [float(x) for x in direct]  # the cache keeps every bit
    before = torch.get_num_threads()
    torch.set_num_threads(2 if before == 1 else 1)
    try:
        calls.clear()
        again = E.transfer_log_odds(tiny, records, prompts, tmp_path)
    finally:
        torch.set_num_threads(before)
    assert calls == [] and again.equals(first)
    records["LAT"]["direction"] = -2 * records["LAT"]["direction"]  # another direction: its cells again
    E.transfer_log_odds(tiny, records, prompts, tmp_path)
    assert len(calls) == len(tiny.roles)
