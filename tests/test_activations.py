import pytest
import torch

import helpers as H
from refusal_lat.models import pool

PROMPTS = ["Hi", "Write a long poem about the sea and the sky", "Name three colours, please.", "x"]


def test_hooks_equal_output_hidden_states_with_left_padding(tiny, tiny_model):
    model, tok = tiny_model
    batch = H.tokenize(tok, tiny, PROMPTS)
    assert (batch["attention_mask"] == 0).any(), "the batch must contain left padding"
    with H.capture_block_inputs(model, -1) as captured:
        out = model(**batch, position_ids=H.position_ids(batch["attention_mask"]), output_hidden_states=True)
    n_layers = model.config.num_hidden_layers
    assert len(captured) == n_layers
    for layer in range(n_layers):  # hidden_states[l] is the input of block l (index 0 = embeddings)
        torch.testing.assert_close(captured[layer][0], out.hidden_states[layer][:, -1], atol=1e-5, rtol=0)


def test_left_padding_does_not_change_activations(tiny, tiny_model):
    model, tok = tiny_model
    batched = H.block_inputs(model, tok, tiny, PROMPTS)
    alone = torch.cat([H.block_inputs(model, tok, tiny, [p]) for p in PROMPTS])
    assert batched.shape == (len(PROMPTS), model.config.num_hidden_layers, model.config.hidden_size)
    torch.testing.assert_close(batched, alone, atol=1e-5, rtol=0)


def test_hooks_are_removed_even_on_error(tiny_model):
    model, _ = tiny_model
    with pytest.raises(ZeroDivisionError):
        with H.capture_block_inputs(model, -1):
            1 / 0
    assert all(not layer._forward_pre_hooks for layer in H.decoder_layers(model))


def _counting_loader(monkeypatch):
    """Counts computations: activations() asks use_model for a model only when it must compute."""
    calls = []
    real = H.use_model

    def loader(profile, role):
        calls.append((profile.template, role))
        return real(profile, role)
    monkeypatch.setattr(pool, "use_model", loader)
    return calls


def test_cache_is_reused_then_recomputed_after_a_profile_change(tiny, tmp_path, monkeypatch):
    calls = _counting_loader(monkeypatch)
    sets = H.prompt_sets(tiny)
    first = H.activations(tiny, "base", sets, tmp_path)
    second = H.activations(tiny, "base", sets, tmp_path)
    assert len(calls) == 1
    torch.testing.assert_close(first, second)
    assert first["harmful"].dtype == torch.float32 and first["harmful"].shape == (8, 4, 32)

    other = H.load_profile("tiny", {"template": "\n[INST]{prompt}[/INST]\n"})
    changed = H.activations(other, "base", sets, tmp_path)
    assert len(calls) == 2
    assert not torch.allclose(changed["harmful"], first["harmful"])
    meta = H.activation_metadata(tmp_path, "base")
    assert meta["key"]["template"] == other.template and meta["shapes"]["eval"] == [8, 4, 32]


def test_corrupted_cache_is_recomputed(tiny, tmp_path, monkeypatch):
    sets = H.prompt_sets(tiny)
    good = H.activations(tiny, "base", sets, tmp_path)
    path = tmp_path / "activations" / "base.safetensors"
    path.write_bytes(path.read_bytes()[:100])
    calls = _counting_loader(monkeypatch)
    again = H.activations(tiny, "base", sets, tmp_path)
    assert len(calls) == 1
    torch.testing.assert_close(good, again)


def test_nan_activations_name_model_and_layer():
    acts = torch.zeros(2, 3, 4)
    acts[1, 2, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="model 'LAT', set 'eval': NaN/Inf activations at layer 2"):
        H.check_finite(acts, "LAT", "eval")


def test_shared_prefix_capture_equals_output_hidden_states(tiny_model):
    """A template with a common start: block_inputs runs it once (prefill_shared_prefix) and must
    still read every prompt's own last token."""
    model, tok = tiny_model
    system = H.load_profile("tiny", {"template": "System: answer briefly.\nUser: {prompt}\nAssistant:"})
    batch = H.tokenize(tok, system, PROMPTS)
    assert H.prefill_shared_prefix(model, batch["input_ids"], batch["attention_mask"])[2] is not None
    shared = H.block_inputs(model, tok, system, PROMPTS)
    with torch.no_grad():
        out = model(**batch, position_ids=H.position_ids(batch["attention_mask"]), output_hidden_states=True)
    for layer in range(model.config.num_hidden_layers):
        torch.testing.assert_close(shared[:, layer], out.hidden_states[layer][:, -1], atol=1e-5, rtol=0)
