"""One resident model shared between calls; roles on the same base switch adapters in place."""
from __future__ import annotations

import dataclasses

import torch

from ..config import Profile, model_role_spec
from ..store import stable_hash
from .load import adapter_location, free_memory, load_model, merge_adapter, model_fingerprint, use_cuda


_SHARED = {}  # use_model's resident model: key, model, tokenizer, pristine weights, merged adapter


def use_model(profile: Profile, role: str):
    """(model, tokenizer) for `role`, keeping one model resident between calls. Roles that share a
    base switch adapters on it instead of reloading (issue 5: load the base once): the adapter is
    merged in place exactly as load_model merges it, after the weights an earlier merge touched are
    restored byte for byte from a pristine copy, so each role's weights equal a fresh load_model's.
    The model is valid until the next use_model call; drop your reference before it, so that a GPU
    never holds two. Quantised models are reloaded per role (merging into 4-bit weights is lossy)."""
    spec = model_role_spec(profile, role)
    shareable = profile.quantization == "none"
    key = stable_hash({"base": dataclasses.asdict(dataclasses.replace(spec, adapter=None, adapter_revision="main")),
                       "role": None if shareable else model_fingerprint(profile, role), "dtype": profile.dtype,
                       "quantization": profile.quantization, "cuda": use_cuda(profile)})
    if _SHARED.get("key") != key:
        invalidate()
        base = dataclasses.replace(spec, adapter=None) if shareable else spec
        model, tokenizer = load_model(dataclasses.replace(profile, models={role: base}), role)
        _SHARED.update(key=key, model=model, tokenizer=tokenizer, pristine={}, adapter=(spec.adapter, spec.adapter_revision)
                       if not shareable else (None, "main"))
    model = _SHARED["model"]
    if _SHARED["adapter"] != (spec.adapter, spec.adapter_revision):
        with torch.no_grad():
            for name, weight in _SHARED["pristine"].items():
                model.get_submodule(name).weight.copy_(weight)
        if spec.adapter:
            try:
                merge_adapter(model, adapter_location(spec), spec.adapter_revision, pristine=_SHARED["pristine"])
            except Exception:
                invalidate()  # a failed merge may leave adapter layers behind: never reuse that model
                raise
        _SHARED["adapter"] = (spec.adapter, spec.adapter_revision)
        model.eval().requires_grad_(False)
    return model, _SHARED["tokenizer"]


def invalidate():
    """Drop the resident model, so the next use_model loads afresh. Call it after editing the weights
    of a model use_model handed out (hooks.orthogonalize_), and to free its memory."""
    _SHARED.clear()
    free_memory()
