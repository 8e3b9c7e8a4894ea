"""The loss, the PGD attack inside the eps-ball (Casper et al.'s adv_attack; docs/method.md,
"Training") and how large eps is relative to the residual stream it perturbs."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..hooks import block_input_edits, perturbation
from .data import collate
from .recipe import Recipe, arm_epsilon_value, perturb_layer


def causal_lm(model):
    """The transformers model under a PEFT wrapper (LoRA layers are injected in place)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def response_logits(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(float32 logits [n, vocab], targets [n]) at the batch's response tokens. The lm_head runs only
    where there is a label (a 150k vocabulary times every position would dominate CPU time)."""
    lm = causal_lm(model)
    hidden = lm.get_decoder()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                              use_cache=False).last_hidden_state
    targets = batch["labels"][:, 1:]
    keep = targets != -100
    return lm.get_output_embeddings()(hidden[:, :-1][keep]).float(), targets[keep]


def sft_loss(model, batch: dict) -> torch.Tensor:
    """Mean next-token cross-entropy over the response tokens of the batch."""
    return F.cross_entropy(*response_logits(model, batch))


def example_norms(x: torch.Tensor) -> torch.Tensor:
    """L2 norm of each example's whole [seq, d] slice: [batch]."""
    return x.flatten(1).norm(dim=1)


def project_l2(delta: torch.Tensor, epsilon: float) -> torch.Tensor:
    """Scale down every example whose perturbation is longer than epsilon; shorter ones are kept."""
    scale = (epsilon / example_norms(delta).clamp_min(1e-12)).clamp(max=1.0)
    return delta * scale.view(-1, *[1] * (delta.ndim - 1))


def project_tokens(delta: torch.Tensor, epsilon: float) -> torch.Tensor:
    """Scale down every token whose perturbation is longer than epsilon (the per-token ball)."""
    scale = (epsilon / delta.norm(dim=-1, keepdim=True).clamp_min(1e-12)).clamp(max=1.0)
    return delta * scale


def attack_mask(batch: dict, positions: str) -> torch.Tensor:
    """[batch, seq, 1] float mask of the positions the adversary may perturb: every real token ("all",
    Casper) or the prompt's tokens only ("prompt": the labels are -100 there; targeted LAT)."""
    mask = batch["attention_mask"].bool()
    if positions == "prompt":
        mask = mask & (batch["labels"] == -100)
    return mask[..., None].float()


def random_perturbation(mask: torch.Tensor, d_model: int, epsilon: float, per_token: bool,
                        generator: torch.Generator, radius_fraction: torch.Tensor | None = None) -> torch.Tensor:
    """Gaussian direction, padding and untouched positions zero. per_token: every token exactly on the
    sphere of radius epsilon (x radius_fraction per example when given); else the whole example's
    perturbation has norm epsilon (x radius_fraction)."""
    b, s = mask.shape[:2]
    noise = torch.randn((b, s, d_model), generator=generator).to(mask.device) * mask  # drawn on the CPU
    frac = torch.ones(b) if radius_fraction is None else radius_fraction
    frac = frac.to(mask.device).view(-1, 1, 1)
    if per_token:
        return noise / noise.norm(dim=-1, keepdim=True).clamp_min(1e-12) * epsilon * frac
    return noise / example_norms(noise).clamp_min(1e-12).view(-1, 1, 1) * epsilon * frac


@dataclass
class Attack:
    delta: torch.Tensor     # final perturbation [batch, seq, d], detached
    losses: list            # SFT loss at the start of each step (losses[0]: at the random start)
    norms: list             # per step, the per-example norms after projection


def pgd_attack(model, batch: dict, layer: int, epsilon: float, steps: int, generator: torch.Generator,
               random_init: bool = True, per_token: bool = False, positions: str = "all",
               clamp: bool = False) -> Attack:
    """Untargeted L2 PGD on the input of block `layer` that maximises the SFT loss. per_token=False
    (v1, v3, Casper): one ball over each example's whole perturbation, steps of eps / steps along the
    example-normalised gradient. per_token=True (v2): a ball per token, steps of 2 eps / steps along the
    token-normalised gradient (a sign-like L2 step that spends the budget on every token). clamp (v3):
    the perturbed input stays inside each example's clean [min, max] (hooks.perturbation)."""
    lm = causal_lm(model)
    mask = attack_mask(batch, positions)
    d_model = lm.config.hidden_size
    delta = torch.zeros(*mask.shape[:2], d_model, device=mask.device)
    if random_init and epsilon > 0:  # Gaussian direction, radius U(0, 1) * eps, padding left at zero
        radius = torch.rand(mask.shape[0], generator=generator)
        delta = random_perturbation(mask, d_model, epsilon, per_token, generator, radius)
    losses, norms = [], []
    for _ in range(steps):
        delta.requires_grad_(True)
        with perturbation(model, layer, delta, clamp=clamp):
            loss = sft_loss(model, batch)
        (grad,) = torch.autograd.grad(loss, delta)
        losses.append(loss.item())
        grad = grad * mask
        if per_token:
            step = grad / grad.norm(dim=-1, keepdim=True).clamp_min(1e-12)
            delta = project_tokens(delta.detach() + (2 * epsilon / steps) * step, epsilon) * mask
        else:
            step = grad / example_norms(grad).clamp_min(1e-12).view(-1, 1, 1)
            delta = project_l2(delta.detach() + (epsilon / steps) * step, epsilon)
        norms.append(example_norms(delta).tolist())
    return Attack(delta.detach(), losses, norms)


@torch.no_grad()
def residual_norms(model, examples: list[dict], layers: list[int], pad_id: int, n: int = 64) -> dict:
    """Per layer: median over examples of the L2 norm of the whole clean block input (real tokens,
    the norm the eps-ball uses), median per-token norm and median length; on the first n examples."""
    lm = causal_lm(model)
    seen = {layer: [] for layer in layers}
    tokens = {layer: [] for layer in layers}

    lengths = []
    device = next(lm.parameters()).device
    for start in range(0, min(n, len(examples)), 8):
        batch = {k: v.to(device) for k, v in collate(examples[start:start + 8], pad_id).items()}
        lengths += batch["attention_mask"].sum(1).tolist()
        mask = batch["attention_mask"]

        def measure(layer, hidden):
            hidden = hidden.float() * mask[..., None]
            seen[layer] += example_norms(hidden).tolist()
            tokens[layer] += hidden.norm(dim=-1)[mask.bool()].tolist()

        with block_input_edits(lm, measure, layers):
            lm.get_decoder()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    med = lambda xs: float(torch.tensor(xs).median())  # noqa: E731
    return {layer: {"sequence_norm": med(seen[layer]), "token_norm": med(tokens[layer]),
                    "tokens": med(lengths)} for layer in layers}


def arm_epsilon(rec: Recipe, arm: str, norms: dict) -> float:
    """Absolute radius for `arm` (norms from residual_norms): per example (absolute, token_norm) or per
    token (token_ball)."""
    value, layer = arm_epsilon_value(rec, arm), perturb_layer(rec, arm)
    if rec.epsilon_unit == "absolute" or layer is None:
        return value
    if rec.epsilon_unit == "token_ball":
        return value * norms[layer]["token_norm"]
    return value * norms[layer]["token_norm"] * math.sqrt(norms[layer]["tokens"])


def epsilon_report(epsilon: float, norms: dict, per_token: bool = False) -> dict:
    """An absolute eps, and relative: to the median whole-sequence norm of the clean block input (the
    quantity the ball bounds; the first token's large activation dominates it in later blocks), per
    token (eps spread evenly over the median length, over the median token norm) and, for a
    whole-sequence ball, concentrated (the whole budget on one token, over the median token norm)."""
    out = {"absolute": epsilon, **norms, "relative_to_sequence_norm": epsilon / norms["sequence_norm"],
           "per_token_relative": epsilon / norms["token_norm"] if per_token else
           epsilon / math.sqrt(norms["tokens"]) / norms["token_norm"]}
    if not per_token:
        out["concentrated_token_relative"] = epsilon / norms["token_norm"]
    return out


@torch.no_grad()
def loss_increase(model, batches: list[dict], layer: int, deltas: list[torch.Tensor], clamp: bool = False) -> float:
    """Mean over batches of SFT loss with the batch's delta at block `layer` minus the clean loss."""
    rises = []
    for batch, delta in zip(batches, deltas):
        clean = sft_loss(model, batch).item()
        with perturbation(model, layer, delta, clamp=clamp):
            rises.append(sft_loss(model, batch).item() - clean)
    return sum(rises) / len(rises)


def matched_random_epsilon(model, batches: list[dict], layer: int, target: float, start: float, positions: str,
                           clamp: bool, seed: int = 0, iterations: int = 14, most: float = 1e4) -> dict:
    """The radius whose random perturbation (random_perturbation, whole-sequence ball) raises the mean
    SFT loss over `batches` by `target` (LAT's PGD rise at its radius `start`): bisection in log radius
    between start and start x `most`, the same noise draws at every radius. Returns {epsilon, rise,
    target, reached} (reached False: even the largest radius falls short; epsilon is then the largest)."""
    d_model = causal_lm(model).config.hidden_size
    noise = []
    for i, batch in enumerate(batches):  # unit-radius draws, scaled below: the rise is monotone in the radius
        g = torch.Generator().manual_seed(seed * 1000 + i)
        noise.append(random_perturbation(attack_mask(batch, positions), d_model, 1.0, False, g))
    rise = lambda eps: loss_increase(model, batches, layer, [n * eps for n in noise], clamp)  # noqa: E731
    lo, hi = math.log(start), math.log(start * most)
    top = rise(math.exp(hi))
    if top < target:
        return {"epsilon": math.exp(hi), "rise": top, "target": target, "reached": False}
    for _ in range(iterations):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if rise(math.exp(mid)) < target else (lo, mid)
    return {"epsilon": math.exp(hi), "rise": rise(math.exp(hi)), "target": target, "reached": True}
