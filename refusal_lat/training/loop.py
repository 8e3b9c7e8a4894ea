"""The training loop (one function for all three arms), saving and logs, and running the arms of a
profile (the CLI and notebook 00 call train_profile)."""
from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from pathlib import Path

import torch

from .. import record
from ..config import DTYPES, REPO, ConfigError, Profile, check_layers, model_role_spec
from ..models.load import decoder_layers, free_memory, load_model, model_bytes
from ..hooks import perturbation
from ..store import VERSIONS, StoreError, atomic_write, stable_hash, write_failure
from .data import collate, data_order, training_examples
from .pgd import (arm_epsilon, attack_mask, causal_lm, epsilon_report, loss_increase, matched_random_epsilon,
                  pgd_attack, random_perturbation, residual_norms, response_logits, sft_loss)
from .recipe import ARMS, Recipe, training_fields, arm_epsilon_value, check_selection, perturb_layer, recipe, training_seeds


def lora_config(rec: Recipe):
    from peft import LoraConfig
    return LoraConfig(r=rec.lora_r, lora_alpha=rec.lora_alpha, lora_dropout=rec.lora_dropout,
                      target_modules=list(rec.target_modules), task_type="CAUSAL_LM")


def step_order(kinds: list[str], rec: Recipe) -> list[tuple[list[int], list[int]]]:
    """(attacked indices, clean indices) per optimiser step, a function of (kinds, recipe) only, so
    every arm sees exactly the same order. v1 (harmless_per_step 0): every example is in the attacked
    stream, epochs of seeded permutations in batches of batch_size. v2: harmful examples attacked,
    batch_size per step; harmless examples clean, harmless_per_step per step; each stream cycles
    through fresh seeded permutations for rec.steps steps."""
    if not rec.harmless_per_step:
        return [(batch, []) for batch in data_order(len(kinds), rec)]
    streams = []
    for s, (kind, size) in enumerate((("harmful", rec.batch_size), ("harmless", rec.harmless_per_step))):
        pool = [i for i, k in enumerate(kinds) if k == kind]
        if not pool:
            raise ConfigError(f"training recipe: harmless_per_step needs {kind} examples and there are none")
        generator, queue, batches = torch.Generator().manual_seed(rec.seed * 1000 + s), [], []
        while len(batches) < rec.steps:
            while len(queue) < size:
                queue += [pool[i] for i in torch.randperm(len(pool), generator=generator).tolist()]
            batches.append(queue[:size])
            queue = queue[size:]
        streams.append(batches)
    return list(zip(*streams))


def kl_to_base(peft_model, batch: dict) -> torch.Tensor:
    """Mean KL(base || adapted) of the next-token distributions on the response tokens; the base is the
    same model with the adapter disabled."""
    import torch.nn.functional as F
    adapted = response_logits(peft_model, batch)[0]
    with torch.no_grad(), peft_model.disable_adapter():
        base = response_logits(peft_model, batch)[0]
    return F.kl_div(adapted.log_softmax(-1), base.log_softmax(-1), log_target=True, reduction="batchmean")


def train_arm(model, tokenizer, examples: list[dict], rec: Recipe, arm: str, epsilon: float | None = None,
              progress: bool = True, on_step=None, guard=None):
    """Attach a fresh LoRA to `model` (in place: pass a freshly loaded base for each arm), train it
    and return (peft_model, log). `epsilon` is the absolute radius (arm_epsilon). LoRA init, data
    order and attack noise come from rec.seed via private generators, so arms differ only in the
    perturbation. guard(peft_model) -> (stop, record) runs every rec.guard_every steps."""
    from peft import get_peft_model
    from tqdm import tqdm
    layer = perturb_layer(rec, arm)
    epsilon = arm_epsilon_value(rec, arm) if epsilon is None else epsilon
    per_token = rec.epsilon_unit == "token_ball"
    model.requires_grad_(False)
    torch.manual_seed(rec.seed)  # LoRA A matrices are drawn from the global generator
    peft_model = get_peft_model(model, lora_config(rec))  # LoRA weights float32 whatever the base dtype
    peft_model.eval()  # keep_in_eval: no dropout anywhere, as Casper's runs
    params = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=rec.lr, weight_decay=rec.weight_decay)
    order = step_order([e.get("kind", "harmful") for e in examples], rec)
    warmup = math.ceil(rec.warmup_ratio * len(order))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: min(1.0, (i + 1) / (warmup + 1)))
    attack_noise = torch.Generator().manual_seed(rec.seed + 1)
    pad_id = tokenizer.pad_token_id
    device = next(peft_model.parameters()).device
    d_model = causal_lm(peft_model).config.hidden_size
    rows, checks, stopped, started, cpu_started = [], [], None, time.time(), time.process_time()
    for step, (attacked, clean) in enumerate(tqdm(order, desc=f"train {arm}", disable=not progress, leave=False)):
        if guard is not None and rec.guard_every and step % rec.guard_every == 0 and step:
            halt, record = guard(peft_model)
            checks.append({"step": step, **record})
            if halt:
                stopped = {"step": step, **record}
                break
        batch = {k: v.to(device) for k, v in collate([examples[i] for i in attacked], pad_id).items()}
        attack, delta = None, None
        if arm in ("at", "lat"):
            attack = pgd_attack(peft_model, batch, layer, epsilon, rec.attack_steps, attack_noise,
                                per_token=per_token, positions=rec.attack_positions, clamp=rec.clamp)
            delta = attack.delta
        elif arm == "rand":  # the control: a random perturbation of the same radius, no search
            delta = random_perturbation(attack_mask(batch, rec.attack_positions), d_model, epsilon, per_token,
                                        attack_noise)
        with perturbation(peft_model, layer, delta, clamp=rec.clamp):
            loss_attacked = sft_loss(peft_model, batch)
        loss, row = loss_attacked, {"loss_attacked": loss_attacked.item()}
        if clean:
            clean_batch = {k: v.to(device) for k, v in collate([examples[i] for i in clean], pad_id).items()}
            loss_clean = sft_loss(peft_model, clean_batch)
            loss = loss + rec.harmless_weight * loss_clean
            row["loss_harmless"] = loss_clean.item()
            if rec.kl_weight:
                kl = kl_to_base(peft_model, clean_batch)
                loss = loss + rec.kl_weight * kl
                row["kl_harmless"] = kl.item()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, rec.max_grad_norm)
        optimizer.step()
        row = {"step": step, "examples": attacked + clean, "lr": schedule.get_last_lr()[0], "loss": loss.item(),
               **row, "grad_norm": float(grad_norm), "response_tokens": int((batch["labels"][:, 1:] != -100).sum())}
        schedule.step()
        if attack is not None:
            row.update({"attack_loss_start": attack.losses[0], "attack_loss_end": loss_attacked.item(),
                        "attack_losses": attack.losses, "delta_norm": sum(attack.norms[-1]) / len(attacked)})
        row["seconds"] = round(time.time() - started, 2)
        rows.append(row)
        if on_step:
            on_step(row)
    if guard is not None and rec.guard_every and stopped is None:
        halt, record = guard(peft_model)
        checks.append({"step": len(rows), **record})
    return peft_model, {"arm": arm, "seed": rec.seed, "perturb_layer": layer,
                        "epsilon_absolute": epsilon if layer is not None else 0.0,
                        "steps": len(rows), "planned_steps": len(order), "rows": rows, "guard": checks,
                        "stopped_by_guard": stopped, "seconds": round(time.time() - started, 1),
                        "cpu_seconds": round(time.process_time() - cpu_started, 1)}  # all threads together


@torch.no_grad()
def clean_losses(model, examples: list[dict], rec: Recipe, pad_id: int, per_kind: int = 32) -> dict[str, float]:
    """Mean SFT loss without perturbation, per kind of example, on the first `per_kind` examples of each
    kind (before/after training, in the training dtype)."""
    device = next(model.parameters()).device
    out = {}
    for kind in dict.fromkeys(e.get("kind", "harmful") for e in examples):
        chosen = [e for e in examples if e.get("kind", "harmful") == kind][:per_kind]
        losses = [sft_loss(model, {k: v.to(device) for k, v in collate(chosen[i:i + 8], pad_id).items()}).item()
                  for i in range(0, len(chosen), 8)]
        out[kind] = sum(losses) / len(losses)
    return out


CALIBRATION_BATCHES = 4  # attacked batches (the first of the step order) that calibrate the random control


def match_random(model, examples: list[dict], rec: Recipe, eps_lat: float, pad_id: int) -> dict:
    """rand_match "loss": LAT's PGD (its radius, steps, positions, clamp) on the untrained base raises the
    SFT loss of the first CALIBRATION_BATCHES attacked batches by some amount; the random control gets
    the radius whose random perturbation raises it as much (pgd.matched_random_epsilon)."""
    if rec.epsilon_unit == "token_ball":
        raise ConfigError("training recipe: rand_match 'loss' needs a whole-sequence ball (epsilon_unit "
                          "token_norm or absolute)")
    device = next(model.parameters()).device
    order = step_order([e.get("kind", "harmful") for e in examples], rec)[:CALIBRATION_BATCHES]
    batches = [{k: v.to(device) for k, v in collate([examples[i] for i in attacked], pad_id).items()}
               for attacked, _ in order]
    model.requires_grad_(False)
    g = torch.Generator().manual_seed(rec.seed + 2)
    deltas = [pgd_attack(model, b, rec.lat_layer, eps_lat, rec.attack_steps, g, positions=rec.attack_positions,
                         clamp=rec.clamp).delta for b in batches]
    target = loss_increase(model, batches, rec.lat_layer, deltas, rec.clamp)
    out = matched_random_epsilon(model, batches, rec.lat_layer, target, eps_lat, rec.attack_positions, rec.clamp,
                                 seed=rec.seed)
    return {**out, "lat_epsilon": eps_lat, "batches": CALIBRATION_BATCHES}


def adapter_root(rec: Recipe) -> Path:
    return REPO / rec.adapters


def save_arm(peft_model, log: dict, out: Path, base_id: str):
    """PEFT save_pretrained (adapter_config.json + adapter_model.safetensors), the log as JSON (with
    adapter_mb) and the per-step rows as CSV. The base is recorded by its id, not by this machine's
    cache path. Everything is written into <out>.tmp and renamed to `out` when complete, so a killed
    save never leaves a torn adapter folder that a later run would load."""
    import shutil
    import pandas as pd
    out = Path(out)
    tmp = out.with_name(out.name + ".tmp")
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        for config in peft_model.peft_config.values():
            config.base_model_name_or_path = base_id
        peft_model.save_pretrained(tmp, save_embedding_layers=False)  # LoRA on q/v only; no hub lookup
        (tmp / "README.md").unlink(missing_ok=True)  # PEFT's empty model-card template
        log["adapter_mb"] = adapter_megabytes(tmp)
        atomic_write(tmp / "train_log.json", json.dumps(log, indent=1).encode())
        table = pd.DataFrame([{k: v for k, v in r.items() if k not in ("examples", "attack_losses")} for r in log["rows"]])
        if "attack_losses" in log["rows"][0]:
            for i in range(len(log["rows"][0]["attack_losses"])):
                table[f"attack_loss_{i}"] = [r["attack_losses"][i] for r in log["rows"]]
        atomic_write(tmp / "train_log.csv", table.to_csv(index=False).encode())
        shutil.rmtree(out, ignore_errors=True)
        os.replace(tmp, out)
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise StoreError(write_failure(out.parent, err)) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def load_log(folder: Path) -> dict:
    """An adapter's train_log.json (a committed adapter's folder is checked against its manifest first)."""
    record.verify(folder)
    try:
        return json.loads((Path(folder) / "train_log.json").read_text())
    except ValueError:
        raise ConfigError(f"{Path(folder) / 'train_log.json'} is cut or not JSON; train that adapter again "
                          f"(or delete its folder)") from None


def load_arm(model, folder: Path):
    """The base `model` with the saved adapter attached (not merged), in eval mode."""
    from peft import PeftModel
    record.verify(folder)
    return PeftModel.from_pretrained(model, str(folder)).eval()


def arm_folder(arm: str, seed: int) -> str:
    """An arm's adapter folder name: <arm>-s<seed> (e.g. lat-s0)."""
    return f"{arm}-s{seed}"


def trained_seeds(out: Path) -> list[int]:
    """The seeds of every adapter folder (<arm>-s<seed>) in `out`, sorted."""
    out = Path(out)
    names = [f.name.rpartition("-s") for f in out.iterdir() if f.is_dir()] if out.is_dir() else []
    return sorted({int(seed) for arm, _, seed in names if arm in ARMS and seed.isdigit()})


def existing_logs(rec: Recipe, out: Path | None = None, seeds=None) -> dict:  # noqa: D401
    """{(arm, seed): log} for the arms already trained into `out` with exactly this recipe (seed aside)."""
    out = Path(out) if out else adapter_root(rec)
    logs = {}
    for seed in seeds or training_seeds(rec):
        want = json.loads(json.dumps(dataclasses.asdict(dataclasses.replace(rec, seed=seed))))
        for arm in ARMS:
            folder = out / arm_folder(arm, seed)
            if (folder / "train_log.json").is_file() and (folder / "adapter_config.json").is_file():
                log = load_log(folder)  # a committed adapter that changed is an error, not a retraining
                if training_fields(log.get("recipe") or {}) == training_fields(want):  # evaluation keys aside
                    logs[(arm, seed)] = log
    return logs


def adapter_megabytes(folder: Path) -> float:
    return round(sum(f.stat().st_size for f in Path(folder).glob("adapter_model.*")) / 2**20, 2)



def guard_prompts(rec: Recipe) -> dict[str, list[str]]:
    """Validation prompts of the drift guard: the first guard_prompts of refusal_direction's harmful_val
    and harmless_val (never trained on; notebook 04 selects with the first n_val of them)."""
    from ..data import refusal_direction_splits
    rd = refusal_direction_splits()
    return {"harmful": rd["harmful_val"][:rec.guard_prompts], "harmless": rd["harmless_val"][:rec.guard_prompts]}


def refusal_guard(profile: Profile, rec: Recipe, tokenizer, baseline: dict | None = None):
    """guard(model) -> (stop, record): first-token refusal log-odds (selection.refusal_score) on the guard
    prompts; stop when the harmless share with log-odds > 0 exceeds the baseline's by more than
    rec.guard_tolerance. With baseline None, the first call sets it (call it on the base model)."""
    import numpy as np
    from ..selection import last_token_logprobs, refusal_score, refusal_token_ids
    prompts, ids = guard_prompts(rec), refusal_token_ids(tokenizer, profile)
    state = {"baseline": baseline}

    def guard(model):
        lm = causal_lm(model)
        was_training = lm.training
        lm.eval()
        record = {}
        for kind, texts in prompts.items():
            scores = refusal_score(last_token_logprobs(lm, tokenizer, profile, texts, batch_size=16), ids)
            record[f"{kind}_log_odds"] = float(np.mean(scores))
            record[f"{kind}_refusing"] = float(np.mean(scores > 0))
        lm.train(was_training)
        if state["baseline"] is None:
            state["baseline"] = record
        rise = record["harmless_refusing"] - state["baseline"]["harmless_refusing"]
        return rise > rec.guard_tolerance, {**record, "harmless_rise": rise}
    return guard


def load_training_base(profile: Profile, rec: Recipe):
    """The base model (and tokenizer) in the recipe's train_dtype (LoRA weights stay float32)."""
    model, tokenizer = load_model(profile, "base")
    if rec.train_dtype and rec.train_dtype != profile.dtype:
        model = model.to(DTYPES[rec.train_dtype])
    return model, tokenizer


def train_profile(profile: Profile, arms=None, overrides: dict | None = None, out: Path | None = None,
                  run: Path | None = None, progress: bool = True, seeds=None, publish: bool = False) -> dict:
    """Build (or read) the training data, then train, save and log each arm and seed from a fresh base
    into <out>/<arm>-s<seed>/. Returns {(arm, seed): log}. Existing adapters are overwritten, committed
    ones (record.committed: anything under adapters/) only with publish=True (scripts/train_adapters.py
    --publish). The data are the recipe's (its seed draws them); `seeds` (default: the recipe's seeds)
    vary LoRA init, order and attack noise; `arms` default to the recipe's. Runs on the profile's
    train_threads."""
    from importlib.metadata import version
    rec0 = recipe(profile, overrides)
    arms, seeds = check_selection(rec0.arms if arms is None else arms,
                                  training_seeds(rec0) if seeds is None else seeds)
    out = Path(out) if out else adapter_root(rec0)
    for seed in seeds:  # before anything is computed: refuse now rather than after the training
        for arm in arms:
            record.check_writable(out / arm_folder(arm, seed), publish, "scripts/train_adapters.py")
    if profile.train_threads:
        torch.set_num_threads(profile.train_threads)
    spec = model_role_spec(profile, "base")
    model, tokenizer = load_model(profile, "base")
    check_layers(profile, len(decoder_layers(model)), rec0.lat_layer)
    examples, rows = training_examples(profile, rec0, model, tokenizer, run)
    norms = residual_norms(model, examples, sorted({0, rec0.lat_layer}), tokenizer.pad_token_id)
    common = {"stage": VERSIONS["training"], "profile": profile.name, "base_model": dataclasses.asdict(spec),
              "n_examples": len(examples),
              "examples_by_kind": {k: sum(r["kind"] == k for r in rows) for k in sorted({r["kind"] for r in rows})},
              "target_sources": {k: sum(r.get("target_source") == k for r in rows)
                                 for k in sorted({r.get("target_source") for r in rows if r.get("target_source")})},
              "data_hash": stable_hash(examples), "residual_norms": norms, "threads": torch.get_num_threads(),
              "versions": {p: version(p) for p in ("torch", "transformers", "peft")}}
    baseline = refusal_guard(profile, rec0, tokenizer)(model)[1] if rec0.guard_every else None
    logs = {}
    for seed in seeds:
        rec = dataclasses.replace(rec0, seed=seed)
        for arm in arms:
            if model is None or rec.train_dtype:  # a fresh base per arm, in the training dtype
                model, _ = load_training_base(profile, rec)
            layer = perturb_layer(rec, arm)
            eps = None if layer is None else arm_epsilon(rec, arm, norms)
            matched = None
            if arm == "rand" and rec.rand_match == "loss":
                matched = match_random(model, examples, rec, eps, tokenizer.pad_token_id)
                eps = matched["epsilon"]
            guard = refusal_guard(profile, rec, tokenizer, baseline) if rec.guard_every else None
            before = clean_losses(model, examples, rec, tokenizer.pad_token_id)
            peft_model, log = train_arm(model, tokenizer, examples, rec, arm, eps, progress=progress, guard=guard)
            log["epsilon"] = None if layer is None else {
                "unit": rec.epsilon_unit, "value": arm_epsilon_value(rec, arm), "layer": layer,
                **epsilon_report(eps, norms[layer], per_token=rec.epsilon_unit == "token_ball"),
                **({"loss_matched": matched} if matched else {})}
            after = clean_losses(peft_model, examples, rec, tokenizer.pad_token_id)
            log = {**common, "recipe": dataclasses.asdict(rec), "order_hash": stable_hash(step_order(
                       [e["kind"] for e in examples], rec)), **log, "guard_baseline": baseline,
                   "clean_loss_before": sum(before.values()) / len(before),
                   "clean_loss_after": sum(after.values()) / len(after),
                   "clean_losses_before": before, "clean_losses_after": after}
            folder = out / arm_folder(arm, seed)
            save_arm(peft_model, log, folder, spec.id)
            logs[(arm, seed)] = log
            stop = f"; STOPPED by the guard at step {log['stopped_by_guard']['step']}" if log["stopped_by_guard"] else ""
            print(f"{arm_folder(arm, seed)}: {log['steps']} steps in {log['seconds']} s; clean loss "
                  f"{log['clean_loss_before']:.3f} -> {log['clean_loss_after']:.3f}{stop}; adapter "
                  f"{log['adapter_mb']} MB -> {folder}", flush=True)
            dropped = model_bytes(peft_model)
            del peft_model
            model = None
            free_memory(dropped)
    return logs


def summary(logs: dict) -> "pd.DataFrame":
    """One row per arm: time, steps, losses, attack losses, eps absolute and relative."""
    import pandas as pd
    rows = []
    for key, log in logs.items():
        eps = log["epsilon"] or {}
        arm = arm_folder(*key) if isinstance(key, tuple) else key
        tail = log["rows"][-max(1, len(log["rows"]) // 5):]  # last fifth of the steps
        guard = (log.get("guard") or [{}])[-1]
        rows.append({"arm": arm, "seed": log.get("seed"), "perturb_layer": log["perturb_layer"], "steps": log["steps"],
                     "minutes": log["seconds"] / 60, "cpu_minutes": log.get("cpu_seconds", float("nan")) / 60,
                     "epsilon": eps.get("absolute", 0.0),
                     "epsilon_rel_sequence": eps.get("relative_to_sequence_norm", 0.0),
                     "epsilon_rel_per_token": eps.get("per_token_relative", 0.0),
                     "train_loss_last_fifth": sum(r["loss"] for r in tail) / len(tail),
                     "attack_start_last_fifth": (sum(r["attack_loss_start"] for r in tail) / len(tail)
                                                 if "attack_loss_start" in tail[0] else float("nan")),
                     "clean_loss_before": log["clean_loss_before"], "clean_loss_after": log["clean_loss_after"],
                     **{f"clean_{kind}_{when}": log[f"clean_losses_{when}"].get(kind, float("nan"))
                        for when in ("before", "after") for kind in ("harmful", "harmless")
                        if isinstance(log[f"clean_losses_{when}"], dict)},
                     "adapter_mb": log.get("adapter_mb"), "stopped_by_guard": bool(log.get("stopped_by_guard")),
                     "guard_harmless_refusing": guard.get("harmless_refusing", float("nan")),
                     "guard_harmful_refusing": guard.get("harmful_refusing", float("nan"))})
    return pd.DataFrame(rows)
