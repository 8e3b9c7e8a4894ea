"""Refusal directions: the normalised difference of means at every layer (docs/method.md, "Direction")."""
from __future__ import annotations

from pathlib import Path

import torch

from .activations import activation_metadata, mean_difference
from .store import encode_tensors, store


def refusal_directions(harmful: torch.Tensor, harmless: torch.Tensor) -> torch.Tensor:
    """[n_layers, d] unit vectors mean(harmful) - mean(harmless) from [n, n_layers, d] activations
    (float32; zero rows stay zero)."""
    diff = mean_difference(harmful, harmless)
    return (diff / diff.norm(dim=-1, keepdim=True).clamp_min(1e-12)).float()


def directions(run: Path, acts_by_role: dict) -> dict[str, torch.Tensor]:
    """refusal_directions of every model, also saved to runs/<profile>/directions/<role>.safetensors
    (keyed by the hash of the activations they come from); returns {role: [n_layers, d]}."""
    out = {}
    for role, acts in acts_by_role.items():
        out[role] = refusal_directions(acts["harmful"], acts["harmless"])
        norms = mean_difference(acts["harmful"], acts["harmless"]).norm(dim=-1).tolist()
        store(run / "directions" / f"{role}.safetensors", {"activations": activation_metadata(run, role)["hash"]},
              encode_tensors({"directions": out[role]}), role=role, norm_of_mean_difference=norms)
    return out


def direction_cosines(dirs_by_role: dict, layer: int) -> "pd.DataFrame":
    """cos between models' directions at one layer (same-base models share one residual basis)."""
    import pandas as pd
    roles = list(dirs_by_role)
    unit = torch.stack([dirs_by_role[r][layer].double() for r in roles])
    return pd.DataFrame((unit @ unit.T).numpy(), index=roles, columns=roles)
