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

from ..config import REPO, Profile, model_role_spec
from ..models.load import free_memory, load_model
from ..hooks import perturbation
from ..store import VERSIONS, StoreError, atomic_write, stable_hash, write_failure
from .data import collate, data_order, training_examples
from .pgd import arm_epsilon, epsilon_report, pgd_attack, residual_norms, sft_loss
from .recipe import ARMS, Recipe, perturb_layer, recipe


def lora_config(rec: Recipe):
    from peft import LoraConfig
    return LoraConfig(r=rec.lora_r, lora_alpha=rec.lora_alpha, lora_dropout=rec.lora_dropout,
                      target_modules=list(rec.target_modules), task_type="CAUSAL_LM")


def train_arm(model, tokenizer, examples: list[dict], rec: Recipe, arm: str, epsilon: float | None = None,
              progress: bool = True, on_step=None):
    """Attach a fresh LoRA to `model` (in place: pass a freshly loaded base for each arm), train it
    and return (peft_model, log). `epsilon` is the absolute radius (default rec.epsilon; see
    arm_epsilon). LoRA init, data order and attack noise come from rec.seed via private generators,
    so arms differ only in the perturbation."""
    from peft import get_peft_model
    from tqdm import tqdm
    layer = perturb_layer(rec, arm)
    epsilon = rec.epsilon if epsilon is None else epsilon
    model.requires_grad_(False)
    torch.manual_seed(rec.seed)  # LoRA A matrices are drawn from the global generator
    peft_model = get_peft_model(model, lora_config(rec))
    peft_model.eval()  # keep_in_eval: no dropout anywhere, as Casper's runs
    params = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=rec.lr, weight_decay=rec.weight_decay)
    batches = data_order(len(examples), rec)
    warmup = math.ceil(rec.warmup_ratio * len(batches))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: min(1.0, (i + 1) / (warmup + 1)))
    attack_noise = torch.Generator().manual_seed(rec.seed + 1)
    pad_id = tokenizer.pad_token_id
    device = next(peft_model.parameters()).device
    rows, started, cpu_started = [], time.time(), time.process_time()
    for step, indices in enumerate(tqdm(batches, desc=f"train {arm}", disable=not progress, leave=False)):
        batch = {k: v.to(device) for k, v in collate([examples[i] for i in indices], pad_id).items()}
        attack = None
        if layer is not None:
            attack = pgd_attack(peft_model, batch, layer, epsilon, rec.attack_steps, attack_noise)
        with perturbation(peft_model, layer, None if attack is None else attack.delta):
            loss = sft_loss(peft_model, batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, rec.max_grad_norm)
        optimizer.step()
        row = {"step": step, "examples": indices, "lr": schedule.get_last_lr()[0], "loss": loss.item(),
               "grad_norm": float(grad_norm), "response_tokens": int((batch["labels"][:, 1:] != -100).sum())}
        schedule.step()
        if attack is not None:
            row.update({"attack_loss_start": attack.losses[0], "attack_loss_end": loss.item(),
                        "attack_losses": attack.losses, "delta_norm": sum(attack.norms[-1]) / len(indices)})
        row["seconds"] = round(time.time() - started, 2)
        rows.append(row)
        if on_step:
            on_step(row)
    return peft_model, {"arm": arm, "perturb_layer": layer, "epsilon_absolute": epsilon if layer is not None else 0.0,
                        "steps": len(batches), "rows": rows,
                        "seconds": round(time.time() - started, 1),
                        "cpu_seconds": round(time.process_time() - cpu_started, 1)}  # all threads together


@torch.no_grad()
def clean_losses(model, examples: list[dict], rec: Recipe, pad_id: int) -> list[float]:
    """SFT loss without perturbation on each batch of the training order (before/after training)."""
    device = next(model.parameters()).device
    return [sft_loss(model, {k: v.to(device) for k, v in collate([examples[i] for i in idx], pad_id).items()}).item()
            for idx in data_order(len(examples), rec)]


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
    return json.loads((Path(folder) / "train_log.json").read_text())


def load_arm(model, folder: Path):
    """The base `model` with the saved adapter attached (not merged), in eval mode."""
    from peft import PeftModel
    return PeftModel.from_pretrained(model, str(folder)).eval()


def existing_logs(rec: Recipe, out: Path | None = None) -> dict:
    """{arm: log} for the arms already trained into `out` with exactly this recipe."""
    out = Path(out) if out else adapter_root(rec)
    want = json.loads(json.dumps(dataclasses.asdict(rec)))
    logs = {}
    for arm in ARMS:
        if (out / arm / "train_log.json").is_file() and (out / arm / "adapter_config.json").is_file():
            log = load_log(out / arm)
            if log.get("recipe") == want:
                logs[arm] = log
    return logs


def adapter_megabytes(folder: Path) -> float:
    return round(sum(f.stat().st_size for f in Path(folder).glob("adapter_model.*")) / 2**20, 2)



def train_profile(profile: Profile, arms=ARMS, overrides: dict | None = None, out: Path | None = None,
                  run: Path | None = None, progress: bool = True) -> dict:
    """Build (or read) the training data, then train, save and log each arm from a fresh base.
    Returns {arm: log}. Existing adapters are overwritten. Runs on the profile's train_threads."""
    from importlib.metadata import version
    rec = recipe(profile, overrides)
    if profile.train_threads:
        torch.set_num_threads(profile.train_threads)
    out = Path(out) if out else adapter_root(rec)
    spec = model_role_spec(profile, "base")
    model, tokenizer = load_model(profile, "base")
    examples, rows = training_examples(profile, rec, model, tokenizer, run)
    norms = residual_norms(model, examples, sorted({0, rec.lat_layer}), tokenizer.pad_token_id)
    common = {"stage": VERSIONS["training"], "profile": profile.name, "recipe": dataclasses.asdict(rec),
              "base_model": dataclasses.asdict(spec), "n_examples": len(examples),
              "examples_by_kind": {k: sum(r["kind"] == k for r in rows) for k in sorted({r["kind"] for r in rows})},
              "target_sources": {k: sum(r.get("target_source") == k for r in rows)
                                 for k in sorted({r.get("target_source") for r in rows if r.get("target_source")})},
              "data_hash": stable_hash(examples), "order_hash": stable_hash(data_order(len(examples), rec)),
              "residual_norms": norms, "threads": torch.get_num_threads(),
              "versions": {p: version(p) for p in ("torch", "transformers", "peft")}}
    before = clean_losses(model, examples, rec, tokenizer.pad_token_id)  # the same base for every arm
    logs = {}
    for arm in arms:
        if model is None:
            model, _ = load_model(profile, "base")
        layer = perturb_layer(rec, arm)
        eps = None if layer is None else arm_epsilon(rec, layer, norms)
        peft_model, log = train_arm(model, tokenizer, examples, rec, arm, eps, progress=progress)
        log["epsilon"] = None if layer is None else {"unit": rec.epsilon_unit, "value": rec.epsilon,
                                                     "layer": layer, **epsilon_report(eps, norms[layer])}
        after = clean_losses(peft_model, examples, rec, tokenizer.pad_token_id)
        log = {**common, **log, "clean_loss_before": sum(before) / len(before),
               "clean_loss_after": sum(after) / len(after), "clean_losses_before": before, "clean_losses_after": after}
        save_arm(peft_model, log, out / arm, spec.id)
        logs[arm] = log
        print(f"{arm}: {log['steps']} steps in {log['seconds']} s; clean loss {log['clean_loss_before']:.3f} -> "
              f"{log['clean_loss_after']:.3f}; adapter {log['adapter_mb']} MB -> {out / arm}", flush=True)
        del peft_model
        model = None
        free_memory()
    return logs


def summary(logs: dict) -> "pd.DataFrame":
    """One row per arm: time, steps, losses, attack losses, eps absolute and relative."""
    import pandas as pd
    rows = []
    for arm, log in logs.items():
        eps = log["epsilon"] or {}
        tail = log["rows"][-max(1, len(log["rows"]) // 5):]  # last fifth of the steps
        rows.append({"arm": arm, "perturb_layer": log["perturb_layer"], "steps": log["steps"],
                     "minutes": log["seconds"] / 60, "cpu_minutes": log.get("cpu_seconds", float("nan")) / 60,
                     "epsilon": eps.get("absolute", 0.0),
                     "epsilon_rel_sequence": eps.get("relative_to_sequence_norm", 0.0),
                     "epsilon_rel_per_token": eps.get("per_token_relative", 0.0),
                     "train_loss_last_fifth": sum(r["loss"] for r in tail) / len(tail),
                     "attack_start_last_fifth": (sum(r["attack_loss_start"] for r in tail) / len(tail)
                                                 if eps else float("nan")),
                     "clean_loss_before": log["clean_loss_before"], "clean_loss_after": log["clean_loss_after"],
                     "adapter_mb": log.get("adapter_mb")})
    return pd.DataFrame(rows)
