"""One resident model shared between calls; roles on the same base switch adapters in place."""
from __future__ import annotations

import copy
import dataclasses

import torch

from ..config import DTYPES, Profile, model_role_spec
from ..store import stable_hash
from .load import (adapter_location, free_memory, load_model, lora_dtype, merge_adapter, model_bytes,
                   model_fingerprint, use_cuda)


_SHARED = {}  # use_model's resident model: key, model, tokenizer, pristine weights, merged adapter


def use_model(profile: Profile, role: str, dtype: str | None = None):
    """(model, tokenizer) for `role`, keeping one model resident between calls. Roles that share a
    base switch adapters on it instead of reloading (issue 5: load the base once): the adapter is
    merged in place exactly as load_model merges it, after the weights an earlier merge touched are
    restored byte for byte from a pristine copy, so each role's weights equal a fresh load_model's.
    The model is valid until the next use_model call; drop your reference before it, so that a GPU
    never holds two. Quantised models are reloaded per role (merging into 4-bit weights is lossy).
    dtype (e.g. profile.gen_dtype) other than profile.dtype: a copy of the role's merged weights cast
    to it, kept beside the resident model until the role changes (the adapter is merged in
    profile.dtype first, so both copies hold the same adapter)."""
    spec = model_role_spec(profile, role)
    shareable = profile.quantization == "none"
    key = stable_hash({"base": dataclasses.asdict(dataclasses.replace(spec, adapter=None, adapter_revision="main")),
                       "role": None if shareable else model_fingerprint(profile, role), "dtype": profile.dtype,
                       "quantization": profile.quantization, "cuda": use_cuda(profile)})
    merged = (spec.adapter, spec.adapter_revision, str(lora_dtype(profile)))  # what the weights must hold
    if _SHARED.get("key") != key:
        invalidate()
        base = dataclasses.replace(spec, adapter=None) if shareable else spec
        model, tokenizer = load_model(dataclasses.replace(profile, models={role: base}), role)
        _SHARED.update(key=key, model=model, tokenizer=tokenizer, pristine={},
                       adapter=merged if not shareable else (None, "main", merged[2]))
    model = _SHARED["model"]
    if _SHARED["adapter"] != merged:
        with torch.no_grad():
            for name, weight in _SHARED["pristine"].items():
                model.get_submodule(name).weight.copy_(weight)
        if spec.adapter:
            try:
                merge_adapter(model, adapter_location(spec), spec.adapter_revision, pristine=_SHARED["pristine"],
                              lora_dtype=lora_dtype(profile))
            except Exception:
                invalidate()  # a failed merge may leave adapter layers behind: never reuse that model
                raise
        _SHARED["adapter"] = merged
        _SHARED.pop("cast", None)
        model.eval().requires_grad_(False)
    if dtype not in (None, profile.dtype):
        if _SHARED.get("cast", (None,))[0] != dtype:
            _SHARED["cast"] = (dtype, copy.deepcopy(model).to(DTYPES[dtype]))
        model = _SHARED["cast"][1]
    return model, _SHARED["tokenizer"]


def invalidate():
    """Drop the resident model, so the next use_model loads afresh. Call it after editing the weights
    of a model use_model handed out (hooks.orthogonalize_), and to free its memory."""
    models = [_SHARED.get("model"), _SHARED.get("cast", (None, None))[1]]
    dropped = sum(model_bytes(m) for m in models if m is not None)
    _SHARED.clear()
    free_memory(dropped)
