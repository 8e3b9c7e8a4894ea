import pytest
import torch

import helpers as H


def test_tiny_tokenizer_pads_left_and_has_a_chat_template(tiny_model):
    _, tok = tiny_model
    assert tok.padding_side == "left" and tok.pad_token is not None and tok.chat_template


def test_pad_token_is_set_when_missing():
    tok = H.tiny_tokenizer()
    tok.pad_token = None
    tok.padding_side = "right"
    tok = H.prepare_tokenizer(tok)
    assert tok.pad_token == tok.eos_token and tok.padding_side == "left"


@pytest.fixture()
def local_hub(tmp_path):
    """A tiny 'hub' base model and a LoRA adapter for it, saved as local folders."""
    from peft import LoraConfig, get_peft_model
    base = H.tiny_model({"hidden_size": 32, "num_hidden_layers": 4, "num_attention_heads": 4,  # the tiny profile's
                         "num_key_value_heads": 2, "intermediate_size": 64}, len(H.tiny_tokenizer()))  # 4 blocks
    base.save_pretrained(tmp_path / "base")
    H.tiny_tokenizer().save_pretrained(tmp_path / "base")
    lora = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                           init_lora_weights=False))
    lora.save_pretrained(tmp_path / "adapter")
    return tmp_path


def _profile(root, adapter):
    spec = {"source": "hub", "id": str(root / "base")}
    return H.load_profile("tiny", {"models": {"base": spec, "LAT": {**spec, "adapter": str(adapter)}}})


def test_hub_path_merges_the_lora_adapter(local_hub):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    profile = _profile(local_hub, local_hub / "adapter")
    merged, tok = H.load_model(profile, "LAT")
    base, _ = H.load_model(profile, "base")
    batch = H.tokenize(tok, profile, ["hello there", "hi"])
    reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(local_hub / "base"),
                                          local_hub / "adapter").eval()
    with torch.no_grad():
        got = merged(**batch).logits
        want = reference(**batch).logits
        plain = base(**batch).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert (got - plain).abs().max() > 1e-3, "the adapter must change the model"
    assert not hasattr(merged, "peft_config") or not merged.peft_config  # folded in, no PEFT wrapper


def test_adapter_for_another_base_is_a_clear_error(local_hub, tmp_path):
    from peft import LoraConfig, get_peft_model
    other = H.tiny_model({"hidden_size": 16, "num_hidden_layers": 2, "num_attention_heads": 4,
                          "num_key_value_heads": 2, "intermediate_size": 32}, len(H.tiny_tokenizer()))
    get_peft_model(other, LoraConfig(r=4, target_modules=["q_proj"])).save_pretrained(tmp_path / "wrong")
    with pytest.raises(H.ConfigError, match="does not fit this base model"):
        H.load_model(_profile(local_hub, tmp_path / "wrong"), "LAT")


@pytest.mark.slow
def test_cpu_model_loads_offline_and_reads_the_newline():
    profile = H.load_profile("cpu")
    model, tok = H.load_model(profile, "base")
    assert (model.config.num_hidden_layers, model.config.hidden_size) == (24, 896)
    assert H.read_tokens(tok, profile, ["How do I bake bread?"]) == ["\n"]


def _switching_profile(root):
    """base + two adapters on it that touch different modules (q/v and q/o)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    torch.manual_seed(1)
    get_peft_model(AutoModelForCausalLM.from_pretrained(root / "base"), LoraConfig(
        r=2, target_modules=["q_proj", "o_proj"], init_lora_weights=False)).save_pretrained(root / "adapter2")
    spec = {"source": "hub", "id": str(root / "base")}
    return H.load_profile("tiny", {"models": {"base": spec, "A": {**spec, "adapter": str(root / "adapter")},
                                              "B": {**spec, "adapter": str(root / "adapter2")}}})


def test_use_model_switches_adapters_on_one_base_with_the_weights_of_a_fresh_load(local_hub):
    profile = _switching_profile(local_hub)
    fresh = {role: H.load_model(profile, role)[0].state_dict() for role in profile.roles}
    assert any(not torch.equal(fresh["A"][k], fresh["B"][k]) for k in fresh["A"])
    H.invalidate()
    seen = set()
    for role in ["A", "base", "B", "A", "B", "base", "A"]:
        model, _ = H.use_model(profile, role)
        seen.add(id(model))
        state = model.state_dict()
        assert state.keys() == fresh[role].keys()
        assert all(torch.equal(state[k], fresh[role][k]) for k in state), f"{role}: weights differ from a fresh load"
        del model
    assert len(seen) == 1, "the base must be loaded once"
    H.invalidate()


def test_use_model_reloads_after_invalidate(local_hub):
    profile = _switching_profile(local_hub)
    model, _ = H.use_model(profile, "A")
    H.orthogonalize_(model, torch.ones(32))
    H.invalidate()  # the weights were edited in place
    edited = id(model)
    del model
    again, _ = H.use_model(profile, "A")
    assert id(again) != edited
    fresh = H.load_model(profile, "A")[0].state_dict()
    assert all(torch.equal(v, fresh[k]) for k, v in again.state_dict().items())
    H.invalidate()


def test_cache_keys_change_when_a_local_adapter_is_retrained(local_hub):
    profile = _profile(local_hub, local_hub / "adapter")
    before = H.model_fingerprint(profile, "LAT")
    weights = local_hub / "adapter" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes() + b" ")
    assert H.model_fingerprint(profile, "LAT")["adapter_sha256"] != before["adapter_sha256"]
    assert "adapter_sha256" not in H.model_fingerprint(profile, "base")
