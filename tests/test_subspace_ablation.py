import pytest
import torch

import helpers as H
from refusal_lat import hooks, selection
from refusal_lat.config import ConfigError

PROMPTS = ["Hi", "Write a long poem about the sea and the sky", "Name three colours, please."]


def _forward(model, tok, profile, prompts=PROMPTS):
    batch = H.tokenize(tok, profile, prompts)
    return model(**batch, position_ids=H.position_ids(batch["attention_mask"])).logits


@torch.no_grad()
def test_two_dim_subspace_is_removed_from_every_block_input_and_write(tiny, tiny_model):
    model, tok = tiny_model
    torch.manual_seed(0)
    basis = torch.randn(2, model.config.hidden_size)
    q = torch.linalg.qr(basis.double().T).Q.T.float()  # an independent orthonormal basis of the span
    seen = []
    with hooks.subspace_ablation(model, basis):
        observers = []
        for layer in H.decoder_layers(model):
            observers.append(layer.register_forward_pre_hook(
                lambda m, a, k: seen.append((a[0] if a else k["hidden_states"]) @ q.T), with_kwargs=True))
            observers.append(layer.self_attn.register_forward_hook(lambda m, a, o: seen.append(o[0] @ q.T)))
            observers.append(layer.mlp.register_forward_hook(lambda m, a, o: seen.append(o @ q.T)))
        try:
            _forward(model, tok, tiny)
        finally:
            for handle in observers:
                handle.remove()
    assert len(seen) == 3 * model.config.num_hidden_layers
    assert max(s.abs().max().item() for s in seen) <= 1e-5
    assert all(not layer._forward_pre_hooks for layer in H.decoder_layers(model))
    # not vacuous: without the hooks both components are present
    with H.capture_block_inputs(model, -1) as captured:
        _forward(model, tok, tiny)
    assert (captured[1][0] @ q.T).abs().min() > 1e-3


@torch.no_grad()
def test_one_row_basis_equals_single_direction_ablation_exactly(tiny, tiny_model):
    model, tok = tiny_model
    torch.manual_seed(1)
    r = torch.randn(model.config.hidden_size)
    with hooks.ablation(model, r):
        single = _forward(model, tok, tiny)
    with hooks.subspace_ablation(model, r[None]):
        basis = _forward(model, tok, tiny)
    assert torch.equal(single, basis)
    # the span, not the particular rows: a mixed basis of the same plane ablates the same thing
    b = torch.randn(2, model.config.hidden_size)
    with hooks.subspace_ablation(model, b):
        plane = _forward(model, tok, tiny)
    with hooks.subspace_ablation(model, torch.stack([b[0] + 2 * b[1], b[0] - b[1]])):
        mixed = _forward(model, tok, tiny)
    assert torch.allclose(plane, mixed, atol=1e-4)


def test_bad_bases_are_one_line_errors(tiny_model):
    model, _ = tiny_model
    d = model.config.hidden_size
    v = torch.randn(d)
    for bad, words in ((torch.stack([v, 2 * v]), "linearly dependent"), (torch.zeros(2, d), "zero row"),
                       (v, "[k, d]"), (torch.randn(2, d + 1), "residual width")):
        with pytest.raises(ConfigError, match=words.replace("[", r"\[").replace("]", r"\]")) as info:
            with hooks.subspace_ablation(model, bad):
                pass
        assert "\n" not in str(info.value)


@torch.no_grad()
def test_second_component_ablation_on_tiny(tiny, tiny_model):
    model, tok = tiny_model
    with H.capture_block_inputs(model, -1) as captured:
        _forward(model, tok, tiny, PROMPTS * 2)
    acts = captured[1][0]
    torch.manual_seed(2)
    harmful = acts + torch.randn_like(acts)
    bases = selection.component_bases(harmful, acts)
    assert [tuple(b.shape) for b in bases.values()] == [(1, acts.shape[1]), (1, acts.shape[1]), (2, acts.shape[1])]
    table = selection.second_component_ablation(model, tok, tiny, PROMPTS, bases)
    assert list(table.columns) == ["prompt", "none", "mean_diff", "top1", "top2"]
    assert len(table) == len(PROMPTS) and table.drop(columns="prompt").notna().all().all()
    tokens = selection.refusal_token_ids(tok, tiny)
    with hooks.ablation(model, bases["top1"][0]):
        direct = selection.refusal_score(selection.last_token_logprobs(model, tok, tiny, PROMPTS), tokens)
    assert (table["top1"].to_numpy() == direct).all()
    assert (table["top2"] != table["top1"]).any() and (table["none"] != table["top1"]).any()
    print(table.round(4).to_string())
