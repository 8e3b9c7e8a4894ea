"""The paper profile's NF4 load path (issue 15) without a GPU: transformers' loaders are replaced by a
recorder that returns the tiny model, and torch is told CUDA exists, so the kwargs load_model passes to
from_pretrained are checked. No real 4-bit load."""
import pytest
import torch
import transformers

import helpers as H

TINY = H.load_profile("tiny").models["base"]


@pytest.fixture()
def fake_hub(monkeypatch):
    calls = []
    try:  # import before torch is told CUDA exists: bitsandbytes picks its backend at import
        import bitsandbytes  # noqa: F401
    except ImportError:
        pass

    def from_pretrained(name, **kwargs):
        calls.append((name, kwargs))
        return H.tiny_model(TINY.config, len(H.tiny_tokenizer()))
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
