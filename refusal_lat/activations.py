"""Activations: the residual stream entering every block at the read position, one forward pass per
batch, cached per model as safetensors [n, n_layers, d] float32 + JSON metadata."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from .config import ConfigError, Profile, check_layers
from .data import PromptSets, require_prompts
from .hooks import capture_block_inputs
from .models.load import model_fingerprint
from .models import pool
from .prefix import forward_after_prefix, prefill_shared_prefix, trunk
from .progress import progress
from .prompts import context_length, read_tokens, tokenize
from .store import VERSIONS, cached, encode_tensors, read_tensors, stable_hash


@torch.no_grad()
def trunk_forward(model, input_ids, attention_mask, position: int, capture: bool = False):
    """One forward pass of the decoder trunk (no lm_head) over a left-padded batch, the prompts' common
    start computed once (prefill_shared_prefix keeps `position` in the rest). Hook-free unless capture:
    then it returns the [rows, n_layers, d] float32 input of every block at `position`."""
    stack = trunk(model)  # the lm_head is not needed
    ids, mask, cache = input_ids, attention_mask, None
    if position < 0:  # the common start of the prompts once, outside the capture
        ids, mask, cache = prefill_shared_prefix(model, ids, mask, keep=-position)
    if not capture:
        forward_after_prefix(stack, ids, mask, cache)
        return None
    with capture_block_inputs(model, position) as captured:
        forward_after_prefix(stack, ids, mask, cache)
    return torch.stack([layer[0] for layer in captured], dim=1)


def block_inputs(model, tokenizer, profile: Profile, instructions: list[str], desc: str = "",
                 batch_size: int | None = None) -> torch.Tensor:
    """[n, n_layers, d] float32 residual stream at the read position for every block input."""
    require_prompts(instructions, desc)
    batch_size = batch_size or profile.batch_size
    device = next(model.parameters()).device
    chunks = []
    for start in progress(range(0, len(instructions), batch_size), desc=desc or "activations", unit="batch"):
        batch = tokenize(tokenizer, profile, instructions[start:start + batch_size], device,
                         max_length=context_length(model))
        check_read_position(batch["attention_mask"], profile.read_position, instructions[start:start + batch_size])
        chunks.append(trunk_forward(model, batch["input_ids"], batch["attention_mask"], profile.read_position,
                                    capture=True))
    return torch.cat(chunks)


def check_read_position(attention_mask: torch.Tensor, position: int, instructions: list[str]):
    """A read position counted from the end must fall inside every prompt, not in its left padding."""
    lengths = attention_mask.sum(1)
    if position >= 0 or int(lengths.min()) < -position:
        short = int(lengths.argmin())
        raise ConfigError(f"read_position {position} lies outside prompt {instructions[short][:30]!r}… "
                          f"({int(lengths[short])} tokens); use a position between -{int(lengths.min())} and -1")


def activation_key(profile: Profile, role: str, sets: dict[str, list[str]]) -> dict:
    """Everything that determines the activations; its hash names the cache entry."""
    return {"stage": VERSIONS["activations"], "model": model_fingerprint(profile, role),
            "dtype": profile.dtype, "quantization": profile.quantization, "template": profile.template,
            "read_position": profile.read_position,
            "prompts": {name: stable_hash(prompts) for name, prompts in sets.items()},
            "rows": {name: len(prompts) for name, prompts in sets.items()}}


def check_finite(acts: torch.Tensor, role: str, name: str):
    bad = ~torch.isfinite(acts)
    if bad.any():
        layer = int(bad.nonzero()[0][1])
        raise FloatingPointError(f"model '{role}', set '{name}': NaN/Inf activations at layer {layer}; "
                                 f"try dtype float32 or check the weights")


def activations(profile: Profile, role: str, sets: PromptSets, run: Path, model=None, tokenizer=None) -> dict:
    """Per-set activations for one model, from runs/<profile>/activations/<role>.safetensors when
    the hash of everything that determines them matches, else computed (loading the model)."""
    named = sets.as_dict()

    def compute(info):
        nonlocal model, tokenizer
        if model is None:
            model, tokenizer = pool.use_model(profile, role)
        tensors = {name: block_inputs(model, tokenizer, profile, prompts, desc=f"{role}/{name}")
                   for name, prompts in named.items()}
        for name, acts in tensors.items():
            check_finite(acts, role, name)
        info.update(shapes={k: list(v.shape) for k, v in tensors.items()},
                    read_tokens=sorted(set(read_tokens(tokenizer, profile, named["harmful"][:8]))),
                    versions={"torch": torch.__version__, "transformers": _version("transformers")})
        return tensors
    acts = cached(run / "activations" / f"{role}.safetensors", activation_key(profile, role, named), compute,
                  read_tensors, encode_tensors)
    check_layers(profile, acts["harmful"].shape[1])  # cached activations name the model's block count
    return acts


def activation_metadata(run: Path, role: str) -> dict:
    return json.loads((run / "activations" / f"{role}.json").read_text())


def _version(package: str) -> str:
    from importlib.metadata import version
    return version(package)


def mean_difference(harmful: torch.Tensor, harmless: torch.Tensor) -> torch.Tensor:
    """Difference of means per layer: [n, L, d] x2 -> [L, d] (float64)."""
    return harmful.double().mean(0) - harmless.double().mean(0)


def adjacent_layer_cosines(directions: torch.Tensor) -> np.ndarray:
    """cos(direction_l, direction_{l+1}) for l = 0..L-2; how smoothly the refusal direction evolves."""
    unit = directions / directions.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return (unit[:-1] * unit[1:]).sum(-1).numpy()
