"""Loading a role's model and tokenizer. paper: hub + PEFT adapter merged, NF4 (CUDA or CPU); cpu: PyPI
GGUF parts converted once to safetensors (models/gguf.py); tiny: a random Llama and a byte-level
tokenizer built in-process."""
from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path

import torch

from .. import record
from ..config import DTYPES, REPO, ConfigError, ModelSpec, Profile, check_layers, model_role_spec
from ..quiet import no_loading_bars
from ..store import sha256_file
from .gguf import converted_gguf_folder


def use_cuda(profile: Profile) -> bool:
    if profile.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"profile '{profile.name}' asks for device cuda but torch sees no CUDA GPU; "
                          f"pass overrides={{'device': 'auto'}} or install a CUDA build of torch")
    return profile.device != "cpu" and torch.cuda.is_available()


def prepare_tokenizer(tokenizer):
    """Left padding (the read position and generation assume it) and a pad token when missing."""
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ConfigError("tokenizer has neither a pad nor an eos token; set tokenizer.pad_token yourself")
        tokenizer.pad_token = tokenizer.eos_token  # masked out everywhere, so its identity does not matter
    return tokenizer


TINY_CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
                      "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def tiny_tokenizer():
    """Byte-level tokenizer (256 byte tokens + specials), built in-process: no download."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    byte_vocab = pre_tokenizers.ByteLevel.alphabet()
    specials = ["<unk>", "<s>", "</s>", "<|user|>", "<|assistant|>", "<|end|>"]
    vocab = {tok: i for i, tok in enumerate(specials + sorted(byte_vocab))}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    core.add_special_tokens(specials)
    tok = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    tok.chat_template = TINY_CHAT_TEMPLATE
    return tok


def tiny_model(config: dict, vocab_size: int):
    from transformers import LlamaConfig, LlamaForCausalLM
    config = dict(config)
    seed = config.pop("seed", 0)
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size, max_position_embeddings=512, bos_token_id=1, eos_token_id=2,
                      pad_token_id=None, tie_word_embeddings=False, **config)
    return LlamaForCausalLM(cfg)


def load_tokenizer(profile: Profile, role: str):
    from transformers import AutoTokenizer
    spec = model_role_spec(profile, role)
    if spec.source == "tiny":
        return prepare_tokenizer(tiny_tokenizer())
    if spec.source == "pypi_gguf":
        return prepare_tokenizer(AutoTokenizer.from_pretrained(converted_gguf_folder(spec)))
    return prepare_tokenizer(AutoTokenizer.from_pretrained(spec.id, revision=spec.revision))


def load_model(profile: Profile, role: str, merge: bool = True):
    """(model, tokenizer) for one role, in eval mode with gradients off. Adapters are merged; merge=False
    keeps the LoRA layers beside the base weights (attach_adapter; scripts/check_massive_activations.py)."""
    from transformers import AutoModelForCausalLM
    spec = model_role_spec(profile, role)
    if profile.threads:
        torch.set_num_threads(profile.threads)
    dtype = DTYPES[profile.dtype]
    tokenizer = load_tokenizer(profile, role)
    kwargs = {"dtype": dtype}
    cuda = use_cuda(profile)
    quantized = profile.quantization == "nf4"
    if quantized:
        kwargs["quantization_config"] = nf4_config(profile)
    if cuda:
        kwargs["device_map"] = "auto"  # spreads a model larger than one GPU over several
    elif quantized:
        kwargs["device_map"] = {"": "cpu"}  # bitsandbytes quantises while loading, onto this device
    with no_loading_bars():
        if spec.source == "tiny":
            model = tiny_model(spec.config, len(tokenizer)).to(dtype)
            if quantized:  # quantised as any checkpoint is: saved, then loaded with the config
                with tempfile.TemporaryDirectory() as folder:
                    model.save_pretrained(folder)
                    model = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
        elif spec.source == "pypi_gguf":  # weights from safetensors only: nothing in a cache folder is unpickled
            model = AutoModelForCausalLM.from_pretrained(converted_gguf_folder(spec), use_safetensors=True, **kwargs)
        else:
            model = AutoModelForCausalLM.from_pretrained(spec.id, revision=spec.revision, **kwargs)
    if spec.adapter and merge:
        model = merge_adapter(model, adapter_location(spec), spec.adapter_revision, lora_dtype=lora_dtype(profile))
    elif spec.adapter:
        model = attach_adapter(model, adapter_location(spec), spec.adapter_revision).get_base_model()
    if not cuda:
        if quantized:
            fit_cpu_4bit_kernels(model)
        else:
            model = model.to("cpu")
    model.eval().requires_grad_(False)
    check_layers(profile, len(decoder_layers(model)))
    return model, tokenizer


def lora_dtype(profile: Profile) -> torch.dtype | None:
    """float16 on the exact paper path (the authors merged float16 LoRA weights), else None (as loaded)."""
    return torch.float16 if profile.exact_paper_path else None


def nf4_config(profile: Profile):
    """The paper's 4-bit setup: NF4, double quantisation, compute in the profile's dtype (float16 for the
    paper). bitsandbytes (requirements.txt) runs it on CUDA and on the CPU,
    float16 compute included (slower there than on a GPU, same quantised weights)."""
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise ConfigError(f"profile '{profile.name}' asks for NF4 4-bit, which needs bitsandbytes; pip install "
                          f"-r requirements.txt, or pass overrides={{'quantization': 'none'}}") from None
    from transformers import BitsAndBytesConfig
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=DTYPES[profile.dtype])


def fit_cpu_4bit_kernels(model):
    """bitsandbytes' fast CPU kernel (CPUs with AVX512-BF16) repacks each 4-bit weight on its first call
    and needs in_features divisible by the quantisation block (64) and out_features by 32; layers that
    do not fit (the tiny model's width 32) keep the plain dequantise-and-matmul path, same numbers."""
    from bitsandbytes.nn import Linear4bit
    for module in model.modules():
        if isinstance(module, Linear4bit):
            block = module.weight.quant_state.blocksize if module.weight.quant_state is not None else 64
            if module.in_features % block or module.out_features % 32:
                module.support_avx512bf16_for_cpu = False


def adapter_location(spec: ModelSpec) -> str:
    """A folder in this repo (adapters/<profile>/<arm>, trained by notebook 00) or a hub id. A committed
    folder is checked against its manifest first (record.verify)."""
    local = REPO / spec.adapter
    if local.is_dir():
        record.verify(local)
        return str(local)
    return spec.adapter


def model_fingerprint(profile: Profile, role: str) -> dict:
    """What identifies a role's weights in cache keys: its spec, the device type it runs on (CPU and
    CUDA kernels give other numbers), plus the adapter file's sha256 for local adapters (retraining one
    must not reuse stale activations or generations)."""
    spec = model_role_spec(profile, role)
    out = {**dataclasses.asdict(spec), "device": "cuda" if use_cuda(profile) else "cpu"}
    if spec.adapter and Path(adapter_location(spec)).is_dir():
        out["adapter_sha256"] = sha256_file(Path(adapter_location(spec)) / "adapter_model.safetensors")
    if spec.adapter and lora_dtype(profile) is not None:
        out["lora_dtype"] = str(lora_dtype(profile))
    return out


def attach_adapter(model, adapter: str, revision: str = "main"):
    """A PEFT LoRA adapter on top of `model`, not merged: the PeftModel (its get_base_model() is `model` with
    the LoRA layers injected in place, so hooks on its blocks see the adapted model)."""
    from peft import PeftModel
    try:
        return PeftModel.from_pretrained(model, adapter, revision=revision)
    except (OSError, RuntimeError, ValueError) as err:
        if isinstance(err, OSError) or "adapter_config.json" in str(err):  # also the hub's not-found errors
            raise ConfigError(f"adapter {adapter!r} not found as a folder or hub id ({type(err).__name__}); "
                              f"check the profile's adapter path") from None
        raise ConfigError(f"adapter {adapter!r} does not fit this base model ({str(err).splitlines()[0][:160]}); "
                          f"check the profile's adapter/base pair") from None  # shape mismatch: another base


def merge_adapter(model, adapter: str, revision: str = "main", pristine: dict | None = None,
                  lora_dtype: torch.dtype | None = None):
    """Load a PEFT LoRA adapter on top of `model` and fold it into the weights (docs/method.md, "Models").
    lora_dtype: cast the LoRA matrices to it before merging (the authors' float16; exact_paper_path)."""
    peft_model = attach_adapter(model, adapter, revision)
    if pristine is not None:  # keep the weights the merge will change, once, for use_model
        from peft.tuners.tuners_utils import BaseTunerLayer
        config = peft_model.peft_config[peft_model.active_adapter]
        if getattr(config, "modules_to_save", None) or getattr(config, "bias", "none") != "none":
            raise ConfigError(f"adapter {adapter!r} also trains whole modules or biases, which use_model cannot switch "
                              f"back; call load_model for it")
        prefix = "base_model.model."
        for name, module in peft_model.named_modules():
            if isinstance(module, BaseTunerLayer) and name.startswith(prefix) and name[len(prefix):] not in pristine:
                pristine[name[len(prefix):]] = module.get_base_layer().weight.detach().clone()
    if lora_dtype is not None:
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.data = param.data.to(lora_dtype)
    return peft_model.merge_and_unload()


def decoder_layers(model) -> list:
    """The decoder blocks, whose inputs are the residual stream (TransformerLens resid_pre)."""
    for path in ("model.layers", "transformer.h", "gpt_neox.layers"):
        obj = model
        try:
            for part in path.split("."):
                obj = getattr(obj, part)
            return list(obj)
        except AttributeError:
            continue
    raise ConfigError(f"cannot find the decoder blocks of {type(model).__name__}; add its path to decoder_layers()")


COLLECT_ABOVE_BYTES = 64 * 2**20  # free_memory's threshold: a tiny test model is not worth a full collection


def model_bytes(model) -> int:
    """Bytes of a model's parameters and buffers."""
    return sum(t.nbytes for t in (*model.parameters(), *model.buffers()))


def free_memory(dropped_bytes: int | None = None):
    """A full garbage collection (weights kept alive by reference cycles are freed now) and, on a GPU, an
    empty CUDA cache. It takes ~0.4 s in a process that has imported torch and transformers, so a caller
    that knows how much it dropped (model_bytes) skips it below COLLECT_ABOVE_BYTES."""
    if dropped_bytes is not None and dropped_bytes < COLLECT_ABOVE_BYTES:
        return
    import gc
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
