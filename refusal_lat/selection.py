"""Layer choice (notebook 04): the paper's sweep rule, and refusal_direction's automatic selection:
refusal score under ablation, KL on harmless prompts, activation addition on harmless prompts, last
20 % of layers pruned (docs/method.md, "Selection")."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .activations import activation_metadata, mean_difference
from .config import Profile
from .directions import refusal_directions
from .generation import refusal_score, refusal_token_ids  # noqa: F401  (defined beside generation: units use them)
from .hooks import ablation, activation_addition, subspace_ablation
from .judges import classify, judge_inputs
from .models.load import model_fingerprint
from .models import pool
from .prefix import last_position_logits, prefill_shared_prefix
from .progress import progress
from .prompts import tokenize
from .stats import holm, mean_interval, sign_flip_p, sign_patterns
from .store import VERSIONS, cached, encode_table, read_table, stable_hash, tensor_hash
from .svd import bootstrap_indices, paired_differences
from .units import NO_ABLATION, generation_units


MAX_INVALID = 0.05  # the paper's rule: candidate layers have < 5 % invalid completions
MAX_KL = 0.1        # refusal_direction's rule: KL on harmless prompts under ablation at most 0.1
PRUNE = 0.2         # refusal_direction's rule: the last 20 % of layers are not candidates


def best_layer_paper_rule(sweep: "pd.DataFrame", max_invalid: float = MAX_INVALID) -> dict:
    """{model: layer} by the authors' loop: layers in order, best rate starting at 100 %, a layer whose
    invalid rate is < 5 % replaces the best only if its refusal rate is strictly lower. So ties keep the
    earliest layer, and when no eligible layer lowers refusal below 100 % the answer is None (shown as
    NO_BEST_LAYER), not the first layer."""
    out = {}
    for role, part in sweep.groupby("target", sort=False):
        best, best_rate = None, 1.0
        for row in part.sort_values("layer").itertuples():
            if row.invalid_rate < max_invalid and row.refusal_rate < best_rate:
                best, best_rate = int(row.layer), row.refusal_rate
        out[role] = best
    return out


NO_BEST_LAYER = "none (no layer with < 5 % invalid answers lowers refusal below 100 %)"


@torch.no_grad()
def last_token_logprobs(model, tokenizer, profile: Profile, instructions: list[str],
                        batch_size: int | None = None) -> torch.Tensor:
    """[n, vocab] float64 log-probabilities of the next token after each prompt (hooks apply)."""
    batch_size = batch_size or profile.batch_size
    device = next(model.parameters()).device
    out = []
    for start in range(0, len(instructions), batch_size):
        batch = tokenize(tokenizer, profile, instructions[start:start + batch_size], device)
        ids, mask, cache = prefill_shared_prefix(model, batch["input_ids"], batch["attention_mask"])
        logits = last_position_logits(model, ids, mask, cache)[0]
        out.append(torch.log_softmax(logits.double(), -1).cpu())
    return torch.cat(out)


def subspace_refusal_log_odds(model, tokenizer, profile: Profile, prompts: list[str],
                              basis: torch.Tensor | None) -> np.ndarray:
    """Per-prompt first-token refusal log-odds (refusal_score) with the span of the [k, d] `basis`
    projected out of the residual stream everywhere (hooks.subspace_ablation); None: no ablation."""
    with subspace_ablation(model, basis):
        logprobs = last_token_logprobs(model, tokenizer, profile, prompts)
    return refusal_score(logprobs, refusal_token_ids(tokenizer, profile))


def component_bases(harmful, harmless) -> dict:
    """The subspaces second_component_ablation compares, from index-paired [n, d] activations at one
    layer: the mean difference, the top-1 and the top-2 right singular vectors of the uncentered
    difference matrix D = harmful - harmless (svd.py's SVD), each as a [k, d] float32 tensor."""
    from scipy.linalg import svd as scipy_svd
    d = paired_differences(harmful, harmless)
    vt = scipy_svd(d, full_matrices=False)[2]
    if len(vt) < 2:
        raise ValueError("component_bases needs at least 2 pairs and 2 dimensions")
    as_tensor = lambda a: torch.tensor(np.ascontiguousarray(a), dtype=torch.float32)  # noqa: E731
    return {"mean_diff": as_tensor(d.mean(0)[None]), "top1": as_tensor(vt[:1]), "top2": as_tensor(vt[:2])}


def second_component_ablation(model, tokenizer, profile: Profile, prompts: list[str], bases: dict) -> "pd.DataFrame":
    """Does the 2nd singular vector carry refusal? One row per prompt: refusal log-odds without ablation
    ("none") and with each of `bases` (e.g. component_bases) ablated; a forward pass per basis, no
    generation. top2 well below top1 means the second component carries refusal the first does not."""
    import pandas as pd
    table = {"prompt": list(range(len(prompts))),
             "none": subspace_refusal_log_odds(model, tokenizer, profile, prompts, None)}
    for name, basis in bases.items():
        table[name] = subspace_refusal_log_odds(model, tokenizer, profile, prompts, basis)
    return pd.DataFrame(table)


def second_component_table(profile: Profile, run: Path, role: str, acts: dict, prompts: list[str],
                           layer: int | None = None) -> "pd.DataFrame":
    """second_component_ablation for one model at `layer` (default: the profile's), its bases from the
    model's own direction-set activations (component_bases), in profile.gen_dtype; cached as
    runs/<profile>/selection/<role>_components_L<layer>.csv."""
    import pandas as pd
    layer = profile.layer if layer is None else layer
    bases = component_bases(acts["harmful"][:, layer].double().numpy(), acts["harmless"][:, layer].double().numpy())
    key = {"stage": VERSIONS["selection"], "what": "second-component", "target": model_fingerprint(profile, role),
           "layer": layer, "dtype": profile.gen_dtype, "bases": {k: tensor_hash(v) for k, v in bases.items()},
           "refusal_tokens": profile.refusal_tokens, "prompts": stable_hash(prompts), "rows": len(prompts)}

    def compute(info):
        model, tokenizer = pool.use_model(profile, role, profile.gen_dtype)
        return second_component_ablation(model, tokenizer, profile, prompts, bases)
    table = cached(run / "selection" / f"{role}_components_L{layer}.csv", key, compute, read_table, encode_table)
    return pd.DataFrame(table).assign(model=role, layer=layer)


def second_component_tests(tables: list, n_boot: int = 1000, seed: int = 0, n_perm: int = 10000) -> "pd.DataFrame":
    """Per model: mean log-odds change of each ablation vs none, and top2 - top1 (does the second
    singular vector remove refusal the first leaves?) with basic bootstrap intervals over prompts and
    a paired sign-flip p-value (n_perm sign patterns); Holm over the models' top2 - top1 tests."""
    import pandas as pd
    rows = []
    for t in tables:
        idx = bootstrap_indices(len(t), n_boot, seed)
        row = {"model": t.model.iloc[0], "layer": int(t.layer.iloc[0]), "n": len(t)}
        for name, diff in (("mean_diff", t.mean_diff - t.none), ("top1", t.top1 - t.none), ("top2", t.top2 - t.none),
                           ("top2_minus_top1", t.top2 - t.top1)):
            row[name], row[f"{name}_lo"], row[f"{name}_hi"] = mean_interval(diff.to_numpy(np.float64), idx)
        row["top2_minus_top1_p"] = sign_flip_p((t.top2 - t.top1).to_numpy(np.float64), sign_patterns(len(t), n_perm, seed))
        rows.append(row)
    out = pd.DataFrame(rows)
    out["top2_minus_top1_p_holm"] = holm(out.top2_minus_top1_p)
    return out


def kl_divergence(base_logprobs: torch.Tensor, other_logprobs: torch.Tensor) -> np.ndarray:
    """Per-prompt KL(base || other) of the next-token distributions."""
    return (base_logprobs.exp() * (base_logprobs - other_logprobs)).sum(-1).clamp_min(0).numpy()


def selection_scores(model, tokenizer, profile: Profile, dirs: torch.Tensor, mean_diffs: torch.Tensor,
                     val: dict, layers: list[int]) -> "pd.DataFrame":
    """Per candidate layer: refusal score on harmful_val with the direction ablated everywhere, KL on
    harmless_val under that ablation, and the refusal score on harmless_val when the un-normalised
    mean difference is added at its layer (the steering score)."""
    import pandas as pd
    tokens = refusal_token_ids(tokenizer, profile)
    base_harmless = last_token_logprobs(model, tokenizer, profile, val["harmless_val"])
    base_harmful = last_token_logprobs(model, tokenizer, profile, val["harmful_val"])
    rows = []
    for layer in progress(layers, desc="selection", unit="layer"):
        with ablation(model, dirs[layer]):
            harmful = last_token_logprobs(model, tokenizer, profile, val["harmful_val"])
            harmless = last_token_logprobs(model, tokenizer, profile, val["harmless_val"])
        with activation_addition(model, mean_diffs[layer].float(), layer):
            steered = last_token_logprobs(model, tokenizer, profile, val["harmless_val"])
        rows.append({"layer": layer, "refusal_score": refusal_score(harmful, tokens).mean(),
                     "baseline_refusal_score": refusal_score(base_harmful, tokens).mean(),
                     "steering_score": refusal_score(steered, tokens).mean(),
                     "baseline_steering_score": refusal_score(base_harmless, tokens).mean(),
                     "kl": kl_divergence(base_harmless, harmless).mean()})
    return pd.DataFrame(rows)


def select_layer(scores: "pd.DataFrame", n_layers: int, max_kl: float = MAX_KL, prune: float = PRUNE) -> int | None:
    """refusal_direction's rule: drop the last 20 % of layers, KL > 0.1 and steering score < 0, then
    take the lowest refusal score. None when every candidate is filtered out."""
    ok = scores[(scores.layer < int(n_layers * (1 - prune))) & (scores.kl <= max_kl) & (scores.steering_score >= 0)]
    return None if ok.empty else int(ok.sort_values("refusal_score").iloc[0].layer)


def selection_table(profile: Profile, run: Path, role: str, acts: dict, val: dict) -> "pd.DataFrame":
    """selection_scores over the sweep layers of one model (the same candidates the paper's rule sees,
    so the two rules are compared like for like), cached in runs/<profile>/selection/."""
    layers = profile.sweep_layers or list(range(1, acts["harmful"].shape[1]))  # input 0: one token's embedding
    key = {"stage": VERSIONS["selection"], "activations": activation_metadata(run, role)["hash"],
           "val": stable_hash(val["harmful_val"] + val["harmless_val"]), "tokens": profile.refusal_tokens,
           "layers": layers}

    def compute(info):
        model, tokenizer = pool.use_model(profile, role)
        scores = selection_scores(model, tokenizer, profile, refusal_directions(acts["harmful"], acts["harmless"]),
                                  mean_difference(acts["harmful"], acts["harmless"]), val, layers)
        return scores.assign(model=role)
    return cached(run / "selection" / f"{role}.csv", key, compute, read_table, encode_table)


def harmless_checks(profile: Profile, run: Path, dirs_by_role: dict, picks: dict, prompts: list[str]) -> "pd.DataFrame":
    """Capability guard for chosen directions ({model: [layers]}): next-token KL on harmless prompts,
    and how often the ablated model's harmless answers (their own turn, unless the profile's
    judge_text is "full") change class under the project judge or turn into refusals, against the
    same model without ablation."""
    import pandas as pd
    rows = []
    for role, layers in picks.items():
        layers = sorted(set(layers))
        units = [(role, NO_ABLATION, None)] + [(role, role, layer) for layer in layers]
        results = generation_units(profile, run, prompts, dirs_by_role, units, kind="harmless")
        texts, prompts_seen = judge_inputs(results[units[0]], profile.judge_text)
        before = classify(texts, "project", prompts_seen)
        key = {"stage": VERSIONS["harmless-kl"], "role": role, "layers": layers, "prompts": stable_hash(prompts),
               "directions": [tensor_hash(dirs_by_role[role][l]) for l in layers],
               "model": model_fingerprint(profile, role)}

        def compute(info):
            model, tokenizer = pool.use_model(profile, role)
            base = last_token_logprobs(model, tokenizer, profile, prompts)
            out = []
            for layer in layers:
                with ablation(model, dirs_by_role[role][layer]):
                    out.append({"layer": layer, "kl": kl_divergence(base, last_token_logprobs(
                        model, tokenizer, profile, prompts)).mean()})
            return pd.DataFrame(out)
        kl = cached(run / "selection" / f"{role}_harmless_kl.csv", key, compute, read_table, encode_table)
        kl = kl.set_index("layer").kl
        for unit in units[1:]:
            texts, prompts_seen = judge_inputs(results[unit], profile.judge_text)
            after = classify(texts, "project", prompts_seen)
            rows.append({"model": role, "layer": unit[2], "n": len(prompts), "kl": float(kl[unit[2]]),
                         "changed_class": np.mean([a != b for a, b in zip(before, after)]),
                         "refusal_before": before.count(1) / len(before), "refusal_after": after.count(1) / len(after)})
    return pd.DataFrame(rows)
