import pandas as pd
import pytest
import torch

import helpers as H

PROMPTS = ["Hi", "Write a long poem about the sea and the sky", "Name three colours, please."]


@pytest.fixture()
def logprobs(tiny, tiny_model):
    model, tok = tiny_model
    return lambda: H.last_token_logprobs(model, tok, tiny, PROMPTS)


def test_kl_of_a_zero_direction_is_zero(tiny_model, logprobs):
    model, _ = tiny_model
    base = logprobs()
    with H.ablation(model, torch.zeros(model.config.hidden_size)):
        ablated = logprobs()
    assert H.kl_divergence(base, ablated).max() == 0
    with H.ablation(model, torch.randn(model.config.hidden_size, generator=torch.Generator().manual_seed(1))):
        changed = logprobs()
    assert H.kl_divergence(base, changed).min() > 0
    p, q = base.exp(), changed.exp()  # KL(base || ablated), not the reverse
    torch.testing.assert_close(torch.tensor(H.kl_divergence(base, changed)), (p * (base - changed)).sum(-1))
    assert not torch.allclose(torch.tensor(H.kl_divergence(base, changed)), (q * (changed - base)).sum(-1))


def test_adding_then_ablating_equals_ablating_alone(tiny_model, logprobs):
    model, _ = tiny_model
    r = torch.randn(model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    with H.ablation(model, r):
        ablated = logprobs()
    with H.activation_addition(model, 5 * r / r.norm(), layer=2), H.ablation(model, r):
        added_then_ablated = logprobs()
    with H.activation_addition(model, 5 * r / r.norm(), layer=2):
        added = logprobs()
    torch.testing.assert_close(added_then_ablated, ablated, atol=1e-5, rtol=0)  # float32 rounding
    assert (added - ablated).abs().max() > 1e-3
    assert all(not layer._forward_pre_hooks for layer in H.decoder_layers(model))


def test_refusal_score_is_the_log_odds_of_the_refusal_tokens():
    logprobs = torch.log(torch.tensor([[0.5, 0.25, 0.25], [0.1, 0.1, 0.8]], dtype=torch.float64))
    score = H.refusal_score(logprobs, [0, 1])
    assert score[0] == pytest.approx(torch.log(torch.tensor(0.75 / 0.25)).item())
    assert score[1] == pytest.approx(torch.log(torch.tensor(0.2 / 0.8)).item())


def test_refusal_token_ids(tiny_model):
    _, tok = tiny_model
    profile = H.load_profile("tiny", {"refusal_tokens": ["I", "As"]})
    assert H.refusal_token_ids(tok, profile) == sorted({tok.encode("I", add_special_tokens=False)[0],
                                                         tok.encode("As", add_special_tokens=False)[0]})


def test_selection_rules():
    scores = pd.DataFrame({"layer": [1, 2, 3, 4, 5], "refusal_score": [-5, -4, -9, 1, -20],
                           "steering_score": [1, 1, 1, 1, 1], "kl": [0.01, 0.01, 0.5, 0.01, 0.01]})
    assert H.select_layer(scores, n_layers=6) == 1  # layer 5 pruned (last 20 %), layer 3 has KL > 0.1
    sweep = pd.DataFrame({"target": ["a"] * 3, "layer": [1, 2, 3], "refusal_rate": [0.3, 0.1, 0.2],
                          "invalid_rate": [0.0, 0.06, 0.0]})
    assert H.best_layer_paper_rule(sweep) == {"a": 3}  # layer 2 is invalid; 0.2 < 0.3


def test_selection_scores_on_tiny(tiny, tiny_model, tmp_path):
    model, tok = tiny_model
    sets = H.prompt_sets(tiny)
    acts = H.activations(tiny, "base", sets, tmp_path, model, tok)
    val = H.validation_sets(tiny)
    assert len(val["harmful_val"]) == tiny.n_val and not set(val["harmful_val"]) & set(sets.eval)
    scores = H.selection_scores(model, tok, tiny, H.refusal_directions(acts["harmful"], acts["harmless"]),
                                H.mean_difference(acts["harmful"], acts["harmless"]), val, [1, 2, 3])
    assert list(scores.layer) == [1, 2, 3]
    tokens = H.refusal_token_ids(tok, tiny)
    lp = lambda prompts: H.last_token_logprobs(model, tok, tiny, prompts)
    base_harmless = lp(val["harmless_val"])
    row = scores.iloc[1]  # layer 2, recomputed here from its definition
    direction = H.refusal_directions(acts["harmful"], acts["harmless"])[2]
    with H.ablation(model, direction):
        assert row.refusal_score == pytest.approx(H.refusal_score(lp(val["harmful_val"]), tokens).mean(), abs=1e-9)
        ablated = lp(val["harmless_val"])
    p, q = base_harmless.exp(), ablated.exp()
    assert row.kl == pytest.approx(float((p * (p.log() - q.log())).sum(-1).mean()), abs=1e-9) and row.kl > 0
    with H.activation_addition(model, H.mean_difference(acts["harmful"], acts["harmless"])[2].float(), 2):
        assert row.steering_score == pytest.approx(H.refusal_score(lp(val["harmless_val"]), tokens).mean(), abs=1e-9)
    assert row.baseline_steering_score == pytest.approx(H.refusal_score(base_harmless, tokens).mean(), abs=1e-9)


def test_shared_prefix_logprobs_equal_a_plain_forward(tiny_model):
    model, tok = tiny_model
    system = H.load_profile("tiny", {"template": "System: answer briefly.\nUser: {prompt}\nAssistant:"})
    batch = H.tokenize(tok, system, PROMPTS)
    assert H.prefill_shared_prefix(model, batch["input_ids"], batch["attention_mask"])[2] is not None
    with torch.no_grad():
        plain = model(**batch, position_ids=H.position_ids(batch["attention_mask"])).logits[:, -1]
    shared = H.last_token_logprobs(model, tok, system, PROMPTS)
    torch.testing.assert_close(shared, torch.log_softmax(plain.double(), -1), atol=1e-5, rtol=0)
