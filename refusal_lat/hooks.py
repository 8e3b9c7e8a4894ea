"""Every forward hook of the project, each inside a context manager that always removes it."""
from __future__ import annotations

from contextlib import contextmanager

import torch

from .config import ConfigError
from .models.load import decoder_layers


@contextmanager
def block_input_edits(model, edit, layers=None):
    """The one block-input hook. While inside, each decoder block in `layers` (default: all) calls
    edit(index, hidden) on its input (the residual stream, TransformerLens resid_pre) and runs on what
    it returns instead; returning None leaves the input as it is. Removed on exit, errors included."""
    blocks = decoder_layers(model)

    def make_hook(index):
        def hook(module, args, kwargs):
            new = edit(index, args[0] if args else kwargs["hidden_states"])
            if new is None:
                return None
            if args:
                return (new, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": new}
        return hook

    handles = []
    try:
        for index in range(len(blocks)) if layers is None else layers:
            handles.append(blocks[index].register_forward_pre_hook(make_hook(index), with_kwargs=True))
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def capture_block_inputs(model, position: int):
    """Collect each decoder block's input at `position`: yields [[tensor per call] per block]."""
    captured: list[list[torch.Tensor]] = [[] for _ in decoder_layers(model)]

    def keep(index, hidden):
        # clone: in fp32 on CPU the slice is a view that would keep the whole [batch, seq, d] alive
        captured[index].append(hidden[:, position].detach().float().cpu().clone())

    with block_input_edits(model, keep):
        yield captured


@contextmanager
def capture_channels(model, channels, layers=None):
    """Collect, at every position of each block input in `layers` (default: all), the values of `channels`
    and the norm, plus the last position's whole vector: yields {block: [(values [rows, seq, len(channels)],
    norms [rows, seq], last [rows, d]) per call]}, float32 on the CPU (massive activations; left padding is
    the caller's to mask)."""
    captured: dict[int, list] = {}
    index_of = list(channels)

    def keep(index, hidden):
        h = hidden.detach().float()
        captured.setdefault(index, []).append((h[..., index_of].cpu().clone(), h.norm(dim=-1).cpu(),
                                               h[:, -1].cpu().clone()))

    with block_input_edits(model, keep, layers):
        yield captured


def _unit_direction(model, direction: torch.Tensor) -> torch.Tensor:
    """r / |r| in float64: a [d] vector, or a [rows, d] matrix with one direction per batch row
    (generation_units batches several units that way). A zero direction ablates nothing."""
    width = model.config.hidden_size
    if direction.ndim not in (1, 2) or direction.shape[-1] != width:
        raise ConfigError(f"direction has shape {tuple(direction.shape)} but the model's residual width is {width}; "
                          f"use a direction from a model with the same d_model")
    direction = direction.double()
    norm = direction.norm(dim=-1, keepdim=True)
    if not torch.isfinite(norm).all():
        raise ConfigError("direction is not finite (NaN/Inf); recompute the activations it came from")
    return direction / torch.where(norm > 0, norm, torch.ones_like(norm))


def _project_out(x: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    r = r.to(device=x.device, dtype=x.dtype)  # a no-op when the caller already cast it
    if r.ndim == 2:  # one direction per batch row: x is [rows, seq, d]
        if x.shape[0] != r.shape[0]:
            raise ConfigError(f"{r.shape[0]} per-row directions for a batch of {x.shape[0]}; pass one per prompt")
        r = r[:, None, :]
        return x - (x * r).sum(-1, keepdim=True) * r
    return x - (x @ r).unsqueeze(-1) * r


def _orthonormal_rows(model, basis: torch.Tensor) -> torch.Tensor:
    """Gram-Schmidt (twice, float64) on the rows of a [k, d] basis; row 1 is exactly _unit_direction of
    basis[0], so a one-row basis ablates exactly what ablation(model, basis[0]) does."""
    if basis.ndim != 2 or len(basis) == 0:
        raise ConfigError(f"basis has shape {tuple(basis.shape)}; pass a [k, d] matrix of k >= 1 directions")
    rows = _unit_direction(model, basis)
    if not (rows.norm(dim=-1) > 0).all():
        raise ConfigError("basis has a zero row; pass k nonzero directions")
    out = [rows[0]]
    for v in rows[1:]:
        for _ in range(2):
            v = v - sum((v @ q) * q for q in out)
        if v.norm() < 1e-8:
            raise ConfigError("basis rows are linearly dependent; pass k independent directions")
        out.append(v / v.norm())
    return torch.stack(out)


@contextmanager
def _projection_hooks(model, unit: torch.Tensor, project_out):
    """project_out(x, unit cast to x) on every block input and every attention and MLP output."""
    casts = {}  # one copy of the unit vectors per (device, dtype): no host-to-device copy inside the hooks

    def project(x):
        key = (x.device, x.dtype)
        if key not in casts:
            casts[key] = unit.to(device=x.device, dtype=x.dtype)
        return project_out(x, casts[key])

    def out_hook(module, args, output):
        if isinstance(output, tuple):
            return (project(output[0]), *output[1:])
        return project(output)

    handles = []
    try:
        for layer in decoder_layers(model):
            handles.append(layer.self_attn.register_forward_hook(out_hook))
            handles.append(layer.mlp.register_forward_hook(out_hook))
        with block_input_edits(model, lambda index, hidden: project(hidden)):
            yield
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def ablation(model, direction: torch.Tensor | None):
    """Project `direction` out of the residual stream everywhere while the block runs.
    None means no intervention (so callers can treat the no-ablation baseline uniformly); a
    [rows, d] matrix ablates one direction per batch row (zero rows: no intervention)."""
    if direction is None:
        yield
        return
    with _projection_hooks(model, _unit_direction(model, direction), _project_out):
        yield


def _project_out_rows(x: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    for q in basis:  # orthonormal rows: successive projections remove the whole span
        x = _project_out(x, q)
    return x


@contextmanager
def subspace_ablation(model, basis: torch.Tensor | None):
    """Project the span of the rows of a [k, d] `basis` (the same subspace for every prompt) out of the
    residual stream everywhere, as ablation does for one direction; None: no intervention."""
    if basis is None:
        yield
        return
    with _projection_hooks(model, _orthonormal_rows(model, basis), _project_out_rows):
        yield


@torch.no_grad()
def orthogonalize_(model, direction: torch.Tensor):
    """The same map folded into the weights, in place: every matrix that writes to the residual
    stream (embedding, attention out-projection, MLP down-projection) loses its r component. Editing a
    model from models.pool.use_model? Call models.pool.invalidate() afterwards."""
    if direction.ndim != 1:
        raise ConfigError("orthogonalize_ folds one direction into the weights; pass a [d] vector, not one per row")
    r = _unit_direction(model, direction)
    embed = model.get_input_embeddings()
    if model.get_output_embeddings() is not None and model.get_output_embeddings().weight is embed.weight:
        model.get_output_embeddings().weight = torch.nn.Parameter(embed.weight.clone())  # untie first
    embed.weight.copy_(_project_out(embed.weight, r))
    for layer in decoder_layers(model):
        for linear in (layer.self_attn.o_proj, layer.mlp.down_proj):
            rr = r.to(linear.weight.dtype).to(linear.weight.device)
            linear.weight.copy_(linear.weight - torch.outer(rr, rr @ linear.weight))
            if linear.bias is not None:
                linear.bias.copy_(_project_out(linear.bias, r))
    return model


@contextmanager
def activation_addition(model, vector: torch.Tensor, layer: int):
    """Add `vector` to the input of block `layer` at every position (refusal_direction's actadd)."""
    with block_input_edits(model, lambda index, hidden: hidden + vector.to(hidden), [layer]):
        yield


@contextmanager
def perturbation(model, layer: int | None, delta: torch.Tensor | None, clamp: bool = False):
    """Add delta [batch, seq, d] to the input of decoder block `layer` (training's AT/LAT attack, the
    evaluation's attacks); a no-op for None. clamp: the perturbed input is clamped to each example's
    clean [min, max] (over its positions and channels; the authors' LAT, training v3). During KV-cached
    generation delta applies to the prefill (the prompt, same length as delta); one-token decode steps
    pass unchanged, so the continuation attends to the perturbed prompt. `model` may be a PEFT wrapper
    (LoRA layers are injected in place)."""
    if layer is None or delta is None:
        yield
        return
    model = model.get_base_model() if hasattr(model, "get_base_model") else model

    def add(index, hidden):
        if hidden.shape[1] == delta.shape[1]:
            out = hidden + delta.to(device=hidden.device, dtype=hidden.dtype)
            if clamp:
                lo = hidden.detach().amin(dim=(1, 2), keepdim=True)
                hi = hidden.detach().amax(dim=(1, 2), keepdim=True)
                out = torch.clamp(out, lo, hi)
            return out
        if hidden.shape[1] == 1:
            return None  # a decode step after the perturbed prefill
        raise ConfigError(f"perturbation of {delta.shape[1]} positions met a block input of {hidden.shape[1]}; "
                          f"generate with share_prefix=False so the prompt is one prefill")
    with block_input_edits(model, add, [layer]):
        yield
