"""NF4 4-bit (the paper's quantisation). For real on the CPU with a tiny NF4 model: the load, an adapter
merged into 4-bit weights, ablation hooks, KV-cached generation and per-role reloads. Then the paper
profile's CUDA load path: transformers' loaders are replaced by a recorder that returns the tiny model,
and torch is told CUDA exists, so the kwargs load_model passes to from_pretrained are checked."""
import pytest
import torch
import transformers

import helpers as H

TINY = H.load_profile("tiny").models["base"]
PROMPTS = ["hello there", "how are you today?", "hi"]
bnb = pytest.importorskip("bitsandbytes")


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    """A LoRA adapter (random, non-zero) for the tiny base, saved as a folder."""
    from peft import LoraConfig, get_peft_model
    folder = tmp_path_factory.mktemp("nf4") / "adapter"
    torch.manual_seed(2)
    get_peft_model(H.tiny_model(TINY.config, len(H.tiny_tokenizer())), LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)).save_pretrained(folder)
    return folder


def _profile(quantization, adapter):
    spec = {"source": "tiny", "id": TINY.id, "config": dict(TINY.config)}
    return H.load_profile("tiny", {"quantization": quantization, "models": {
        "base": spec, "LAT": {**spec, "config": {**TINY.config, "seed": 1}}, "A": {**spec, "adapter": str(adapter)}}})


@pytest.fixture(scope="module")
def nf4(adapter):
    H.invalidate()
    profile = _profile("nf4", adapter)
    model, tok = H.load_model(profile, "base")
    return profile, model, tok


def _logits(model, tok, profile):
    with torch.no_grad():
        return model(**H.tokenize(tok, profile, PROMPTS)).logits.float()


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def test_nf4_loads_on_cpu_as_4bit_linear_layers(nf4, tiny_model):
    profile, model, tok = nf4
    linears = [m for block in H.decoder_layers(model) for m in block.modules() if isinstance(m, torch.nn.Linear)]
    assert len(linears) == 7 * len(H.decoder_layers(model))  # q k v o gate up down
    assert all(isinstance(m, bnb.nn.Linear4bit) and m.weight.quant_state.quant_type == "nf4" for m in linears)
    assert all(m.weight.quant_state.nested for m in linears)  # double quantisation
    assert next(model.parameters()).device.type == "cpu" and not model.training
    got, fp32 = _logits(model, tok, profile), _logits(tiny_model[0], tok, profile)
    assert torch.isfinite(got).all() and 0 < _rel(got, fp32) < 0.5  # 4-bit rounding, not another model


def test_adapter_merges_into_nf4_weights(nf4, adapter):
    profile, base, tok = nf4
    merged, _ = H.load_model(profile, "A")
    full, _ = H.load_model(_profile("none", adapter), "A")
    assert isinstance(merged.model.layers[0].self_attn.q_proj, bnb.nn.Linear4bit)  # requantised, still 4-bit
    assert not hasattr(merged, "peft_config") or not merged.peft_config
    got, plain, want = _logits(merged, tok, profile), _logits(base, tok, profile), _logits(full, tok, profile)
    assert _rel(got, want) < 0.5 * _rel(plain, want), "the merged NF4 model must be near the fp32 merged one"


def test_ablation_hooks_zero_the_direction_in_every_block_input(nf4):
    profile, model, tok = nf4
    batch = H.tokenize(tok, profile, PROMPTS)
    direction = torch.randn(model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    unit = direction / direction.norm()

    def components(ablate):
        # capture hooks first: they see each block's input before the ablation's own input hook
        with torch.no_grad(), H.capture_block_inputs(model, -1) as captured, H.ablation(model, direction if ablate else None):
            model(**batch)
        return [(torch.cat(c) @ unit).abs().max().item() / torch.cat(c).norm(dim=-1).max().item() for c in captured]

    plain, ablated = components(False), components(True)
    assert min(plain[1:]) > 1e-3, "the direction must be present without ablation"
    assert max(ablated[1:]) < 1e-5, ablated  # block 0's input is the embedding, edited only by its own hook


def test_kv_cached_generation_matches_the_recompute_loop_on_nf4(nf4):
    profile, model, tok = nf4
    batch = H.tokenize(tok, profile, PROMPTS)
    direction = torch.randn(model.config.hidden_size, generator=torch.Generator().manual_seed(1))
    cached = H.greedy_tokens(model, batch["input_ids"], batch["attention_mask"], 5, use_cache=True, direction=direction)
    recomputed = H.greedy_tokens(model, batch["input_ids"], batch["attention_mask"], 5, use_cache=False,
                                 direction=direction)
    assert torch.equal(cached, recomputed)


def test_use_model_reloads_a_quantised_model_per_role(nf4):
    profile, base, tok = nf4
    fresh = {"base": _logits(base, tok, profile), "A": _logits(H.load_model(profile, "A")[0], tok, profile)}
    H.invalidate()
    seen = []  # kept alive (tiny, on the CPU), so that ids cannot be reused
    for role in ["base", "A", "base"]:
        model, _ = H.use_model(profile, role)
        seen.append(model)
        assert isinstance(model.model.layers[0].mlp.down_proj, bnb.nn.Linear4bit)
        torch.testing.assert_close(_logits(model, tok, profile), fresh[role], atol=0, rtol=0)
    assert len({id(m) for m in seen}) == 3, "each role of a quantised model is a fresh load"
    H.invalidate()


@pytest.fixture()
def fake_hub(monkeypatch):
    calls = []
    try:  # import before torch is told CUDA exists: bitsandbytes picks its backend at import
        import bitsandbytes  # noqa: F401
    except ImportError:
        pass

    def from_pretrained(name, **kwargs):  # a tiny stand-in with Llama-2-7b's 32 blocks (the paper's layers exist)
        calls.append((name, kwargs))
        return H.tiny_model({**TINY.config, "num_hidden_layers": 32}, len(H.tiny_tokenizer()))
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", staticmethod(from_pretrained))
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", staticmethod(lambda *a, **k: H.tiny_tokenizer()))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    H.invalidate()
    yield calls
    H.invalidate()


def test_nf4_from_pretrained_kwargs(fake_hub):
    pytest.importorskip("bitsandbytes")  # BitsAndBytesConfig checks the installed version
    paper = H.load_profile("paper")
    model, tok = H.load_model(paper, "base")
    ((name, kwargs),) = fake_hub
    assert name == "meta-llama/Llama-2-7b-chat-hf" and kwargs["revision"] == "main"
    assert kwargs["dtype"] == torch.float16 and kwargs["device_map"] == "auto"
    q = kwargs["quantization_config"]
    assert isinstance(q, transformers.BitsAndBytesConfig)
    assert (q.load_in_4bit, q.load_in_8bit, q.bnb_4bit_quant_type, q.bnb_4bit_use_double_quant,
            q.bnb_4bit_compute_dtype) == (True, False, "nf4", True, torch.float16)
    assert not model.training and tok.padding_side == "left"


def test_bf16_cuda_has_no_quantization_config(fake_hub):
    paper = H.load_profile("paper", {"quantization": "none", "dtype": "bfloat16"})
    H.load_model(paper, "base")
    ((_, kwargs),) = fake_hub
    assert "quantization_config" not in kwargs and kwargs["dtype"] == torch.bfloat16 and kwargs["device_map"] == "auto"
