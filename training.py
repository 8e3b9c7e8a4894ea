"""Train the project's own LoRA adapters: plain SFT, embedding-space AT and latent AT (issue 5).

One loop, three arms. Every arm starts from the same base model, sees the same examples in the
same order with the same seed, and takes the same number of optimiser steps; the arms differ only
in the perturbation delta that is added to the input of one decoder block while the loss is computed:

    sft  no perturbation (the control the paper lacked)
    at   delta on the token embeddings       = the input of block 0  (Casper et al. perturb_layer=0)
    lat  delta on the residual stream entering block k                (the paper: block 4 of 32)

"Input of block l" is exactly helpers' resid_pre index l (TransformerLens blocks.l.hook_resid_pre), so
AT and LAT are one mechanism: a forward pre-hook on H.decoder_layers(model)[l], inside a context
manager that always removes it.

The inner attack follows Casper et al.'s `lat_trainer.adv_attack` (PAPER.md §2): untargeted L2 PGD
that *maximises* the SFT loss; random start inside the eps-ball; `attack_steps` steps of size
eps / attack_steps along the per-example L2-normalised gradient; projection onto the eps-ball after
every step, the norm taken over the whole (sequence x d_model) perturbation of one example. Then one
LoRA optimiser step on the SFT loss under the final perturbation, with the model in eval mode
(Casper's keep_in_eval, so LoRA dropout is inactive). Two deliberate differences from Casper's code:
delta is zero on padding positions (so padding does not use up the budget), and the perturbed
latents are not clamped to the [min, max] of the clean ones (so "block k's input differs by exactly
delta", which the tests check).

Sections: 1 recipes, 2 training data, 3 perturbation hook and loss, 4 PGD, 5 the training loop,
6 residual norms (eps relative), 7 saving, loading and logs, 8 running the arms of a profile.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

import helpers as H

ARMS = ("sft", "at", "lat")
TRAINING_VERSION = "training-v1"  # bump when the data construction changes what it returns


# ----------------------------------------------------------------------------------------------
# 1. Recipes: every training decision of a profile, read from the `training:` mapping of
#    configs/<profile>.yaml (the reasons for each value are written there).

@dataclass(frozen=True)
class Recipe:
    data: str                     # "refusal_mix" (offline, built here) | "hh_chosen" (Anthropic HH, hub)
    n_harmful: int                # refusal_mix: harmful prompts paired with refusals
    n_harmless: int               # refusal_mix: harmless prompts paired with the base model's answers
    n_hh: int                     # hh_chosen: first n "chosen" conversations after shuffle(seed=42)
    response_tokens: int          # refusal_mix: greedy tokens generated per target answer
    max_seq_len: int              # longer examples are cut (prompt first, so the response is cut)
    epsilon: float                # L2 radius of delta per example, in `epsilon_unit`
    attack_steps: int
    lat_layer: int                # block whose input LAT perturbs (AT always uses block 0)
    lora_r: int
    lora_alpha: int
    lora_dropout: float
    target_modules: tuple
    lr: float
    weight_decay: float
    max_grad_norm: float
    warmup_ratio: float           # linear warm-up over this share of the steps, then constant (Casper)
    epochs: int
    batch_size: int
    seed: int
    adapters: str                 # output folder, relative to the repo; one sub-folder per arm
    refusal: str = "I'm sorry, but I can't help with that."  # target when the base model did not refuse
    # "absolute": epsilon in units of the residual stream, the same for AT and LAT (the paper).
    # "token_norm": epsilon x (median token norm at the perturbed block) x sqrt(median length), i.e.
    # each attacked arm gets the radius that is this fraction of its layer's typical per-token norm.
    epsilon_unit: str = "absolute"


def recipe(profile: H.Profile, overrides: dict | None = None) -> Recipe:
    """The profile's `training:` mapping, then `overrides` (e.g. {"epsilon": 0.0} in tests)."""
    fields = {f.name: f for f in dataclasses.fields(Recipe)}
    required = sorted(k for k, f in fields.items() if f.default is dataclasses.MISSING)
    if not profile.training:
        raise H.ConfigError(f"profile '{profile.name}' has no training recipe; add a `training:` mapping "
                            f"with the keys {required}")
    values = {**profile.training, **(overrides or {})}
    unknown, missing = sorted(set(values) - set(fields)), sorted(set(required) - set(values))
    if unknown or missing:
        raise H.ConfigError(f"training recipe of '{profile.name}': unknown key(s) {unknown}, missing key(s) {missing}; "
                            f"valid keys: {sorted(fields)}")
    for key, value in values.items():
        want = fields[key].type
        if want == "float" and isinstance(value, int) and not isinstance(value, bool):
            values[key] = float(value)
        elif want in ("float", "int", "str") and not isinstance(values[key], {"float": float, "int": int, "str": str}[want]):
            raise H.ConfigError(f"training recipe of '{profile.name}': key '{key}' must be {want}, got "
                                f"{type(value).__name__} {value!r} (write floats as 6.0e-4: YAML reads 6e-4 as text)")
    values["target_modules"] = tuple(values["target_modules"])
    out = Recipe(**values)
    if out.epsilon_unit not in ("absolute", "token_norm"):
        raise H.ConfigError(f"training recipe: epsilon_unit {out.epsilon_unit!r} not in ['absolute', 'token_norm']")
    if out.data not in ("refusal_mix", "hh_chosen"):
        raise H.ConfigError(f"training recipe: data {out.data!r} not in ['refusal_mix', 'hh_chosen']")
    if out.epsilon < 0 or out.attack_steps < 1 or out.batch_size < 1 or out.epochs < 1:
        raise H.ConfigError("training recipe: need epsilon >= 0, attack_steps >= 1, batch_size >= 1, epochs >= 1")
    return out


def perturb_layer(rec: Recipe, arm: str) -> int | None:
    """Block whose input the arm perturbs: None (sft), 0 (at: the embeddings), rec.lat_layer (lat)."""
    if arm not in ARMS:
        raise H.ConfigError(f"unknown arm {arm!r}; valid arms: {list(ARMS)}")
    return {"sft": None, "at": 0, "lat": rec.lat_layer}[arm]


# ----------------------------------------------------------------------------------------------
# 2. Training data. An example is a list of (text, trained) segments; the loss covers the tokens of
#    the trained segments only (the responses).
#
#    refusal_mix (cpu, tiny), built offline and cached under runs/<profile>/training/:
#    - harmful prompts: refusal_direction's harmful_train minus every prompt this project analyses,
#      evaluates or selects with (all 520 AdvBench goals, the 100 GPT-4o questions and all of
#      refusal_direction's harmful_val, which H.validation_sets uses; compared after lower-casing and
#      collapsing whitespace; near copies with word-set Jaccard >= 0.8, such as the same request with
#      one extra adjective, go too), de-duplicated, then a seeded sample;
#    - harmless prompts: refusal_direction's harmless_train minus the direction set's harmless side
#      (the paper's Alpaca harmless_train[:100]), the paper's Alpaca harmless_test (notebook 04's
#      harmless checks) and refusal_direction's harmless_val, then a seeded sample;
#    - targets: the base model's own greedy answer (H.generate, stop at end of turn, at most
#      response_tokens tokens). For a harmful prompt the answer is kept only when
#      H.classify(..., "project") calls it a refusal; otherwise the target is the fixed sentence
#      Recipe.refusal. An answer cut by the token limit is trimmed back to its last full sentence so
#      that the end-of-turn token that follows it in the chat template is not taught mid-sentence.
#    hh_chosen (paper): Anthropic/hh-rlhf "chosen", shuffle(seed=42), first n_hh, in Casper's Llama-2
#    format, "\n" removed from the turns (PAPER.md §2); the assistant turns are trained.

def _norm_text(text: str) -> str:
    return " ".join(text.lower().split())


def excluded_prompts() -> dict[str, set]:
    """Normalised prompts that training must not see: every prompt H.prompt_sets and
    H.validation_sets can draw, at any profile size (n_direction <= 100, n_eval <= 520)."""
    s, rd = H.paper_splits(), H.refusal_direction_splits()
    return {"harmful": {_norm_text(p) for p in s["harmful_train"] + s["harmful_test"] + s["gpt4o"] + rd["harmful_val"]},
            "harmless": {_norm_text(p) for p in s["harmless_train"][:100] + s["harmless_test"] + rd["harmless_val"]}}


def _near_copy(text: str, others: list[set], threshold: float = 0.8) -> bool:
    words = set(re.findall(r"\w+", text))
    return any(len(words & o) / max(1, len(words | o)) >= threshold for o in others)


def training_prompts(rec: Recipe) -> dict[str, list[str]]:
    """{"harmful": [...], "harmless": [...]}: the refusal_mix prompts, disjoint from H.prompt_sets."""
    rd = H.refusal_direction_splits()
    excluded = excluded_prompts()
    generator = torch.Generator().manual_seed(rec.seed)
    out = {}
    for kind, pool, n in (("harmful", rd["harmful_train"], rec.n_harmful),
                          ("harmless", rd["harmless_train"], rec.n_harmless)):
        seen, kept = set(excluded[kind]), []
        word_sets = [set(re.findall(r"\w+", p)) for p in excluded[kind]] if kind == "harmful" else []
        for prompt in pool:
            if _norm_text(prompt) not in seen and not _near_copy(_norm_text(prompt), word_sets):
                seen.add(_norm_text(prompt))
                kept.append(prompt)
        if n > len(kept):
            raise H.ConfigError(f"training recipe asks for {n} {kind} prompts but only {len(kept)} remain after "
                                f"removing the direction/evaluation prompts; lower n_{kind}")
        pick = torch.randperm(len(kept), generator=generator)[:n].tolist()
        out[kind] = [kept[i] for i in pick]
    return out


def trim_to_sentence(text: str) -> str:
    """Cut an answer that hit the token limit back to its last complete sentence (a period after a
    digit, as in a list's "1.", does not count); unchanged when that would drop two thirds of it."""
    ends = [m.end() for m in re.finditer(r"(?<!\d)[.!?](?=\s|$)", text)]
    return text[:ends[-1]].rstrip() if ends and ends[-1] > len(text) // 3 else text.rstrip()


def base_answers(profile: H.Profile, rec: Recipe, model, tokenizer, prompts: list[str],
                 run: Path | None = None) -> dict[str, dict]:
    """{prompt: {"answer", "cut"}}: the base model's greedy answers (minutes on cpu), cached per prompt
    in runs/<profile>/training/base_answers.jsonl under the hash of what determines them, so a recipe
    with more or fewer prompts only generates the missing ones."""
    key = {"stage": TRAINING_VERSION, "model": dataclasses.asdict(H.model_role_spec(profile, "base")),
           "dtype": profile.dtype, "quantization": profile.quantization, "template": profile.template,
           "response_tokens": rec.response_tokens, "stop_at_eos": True}
    path = Path(run or H.run_dir(profile)) / "training" / "base_answers.jsonl"
    cached = {}
    if path.is_file() and path.with_suffix(".json").is_file() and \
            json.loads(path.with_suffix(".json").read_text()).get("hash") == H.stable_hash(key):
        cached = {r["prompt"]: r for r in map(json.loads, path.read_text().splitlines())}
    missing = [p for p in dict.fromkeys(prompts) if p not in cached]
    if missing:
        gen_profile = dataclasses.replace(profile, max_new_tokens=rec.response_tokens)
        answers = H.generate(model, tokenizer, gen_profile, missing, stop_at_eos=True, desc="base answers")
        for prompt, answer in zip(missing, answers):
            cut = len(tokenizer(answer, add_special_tokens=False)["input_ids"]) >= rec.response_tokens
            cached[prompt] = {"prompt": prompt, "answer": answer, "cut": cut}
        _write_atomic(path, "".join(json.dumps(r) + "\n" for r in cached.values()))
        _write_atomic(path.with_suffix(".json"), json.dumps({"hash": H.stable_hash(key), "key": key}, indent=1))
    return {p: cached[p] for p in prompts}


def refusal_mix(profile: H.Profile, rec: Recipe, model, tokenizer, run: Path | None = None) -> list[dict]:
    """Rows {kind, prompt, response, target_source, base_label, base_answer, cut}, also written to
    runs/<profile>/training/examples.jsonl for reading."""
    prompts = training_prompts(rec)
    answers = base_answers(profile, rec, model, tokenizer, prompts["harmful"] + prompts["harmless"], run)
    rows = []
    for kind in ("harmful", "harmless"):
        raw = [answers[p] for p in prompts[kind]]
        labels = H.classify([a["answer"] for a in raw], "project")
        for prompt, a, label in zip(prompts[kind], raw, labels):
            answer = trim_to_sentence(a["answer"]) if a["cut"] else a["answer"].strip()
            use_model = kind == "harmless" or label == 1
            rows.append({"kind": kind, "prompt": prompt, "response": answer if use_model else rec.refusal,
                         "target_source": "base_model" if use_model else "fixed_refusal", "base_label": label,
                         "base_answer": a["answer"], "cut": a["cut"]})
    _write_atomic(Path(run or H.run_dir(profile)) / "training" / "examples.jsonl",
                  "".join(json.dumps(r) + "\n" for r in rows))
    return rows


def chat_segments(tokenizer, profile: H.Profile, prompt: str, response: str) -> list[tuple[str, bool]]:
    """[(prompt as the evaluation formats it, False), (response + end of turn, True)]."""
    head = H.format_prompt(tokenizer, profile, prompt)
    if profile.template != "chat":
        return [(head, False), (response + (tokenizer.eos_token or ""), True)]
    full = tokenizer.apply_chat_template([{"role": "user", "content": prompt},
                                          {"role": "assistant", "content": response}], tokenize=False)
    if not full.startswith(head):
        raise H.ConfigError("the chat template renders the prompt differently with and without an answer; "
                            "cannot separate the response tokens")
    return [(head, False), (full[len(head):], True)]


LLAMA2_SYSTEM = "<s>[INST] <<SYS>>\nYou are a helpful, respectful and honest assistant.\n<</SYS>>\n\n"


def hh_segments(text: str) -> list[tuple[str, bool]]:
    """One HH transcript in Casper et al.'s parse_examples format (newlines inside a turn become spaces);
    the assistant turns are the trained segments."""
    turns = re.split(r"\n\nHuman: |\n\nAssistant: ", "\n\n" + text.strip())[1:]  # human, assistant, ...
    turns = [t.replace("\n", " ").strip() for t in turns]
    segments = []
    for i in range(0, len(turns) - 1, 2):
        head = (LLAMA2_SYSTEM if i == 0 else "<s>[INST] ") + turns[i] + " [/INST] "
        segments += [(head, False), (turns[i + 1] + " </s>", True)]
    return segments


def hh_chosen_segments(n: int) -> list[list[tuple[str, bool]]]:
    """The paper recipe's data: Anthropic/hh-rlhf "chosen", shuffle(seed=42), first n (needs the hub)."""
    try:
        from datasets import load_dataset
    except ImportError as err:
        raise H.ConfigError("the paper recipe reads Anthropic/hh-rlhf with `datasets`: pip install datasets "
                            "(and run where the Hugging Face hub is reachable)") from err
    rows = load_dataset("Anthropic/hh-rlhf", split="train").shuffle(seed=42).select(range(n))
    return [seg for seg in map(hh_segments, rows["chosen"]) if seg]


def encode(tokenizer, segments: list[tuple[str, bool]], max_len: int) -> dict:
    """input_ids and labels (-100 where untrained) of one example; segments tokenised separately so
    the prompt's tokens are exactly those the evaluation sees."""
    ids, labels = [], []
    for text, trained in segments:
        part = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids += part
        labels += part if trained else [-100] * len(part)
    return {"input_ids": ids[:max_len], "labels": labels[:max_len]}


def training_examples(profile: H.Profile, rec: Recipe, model, tokenizer,
                      run: Path | None = None) -> tuple[list[dict], list[dict]]:
    """(encoded examples, data rows) for the profile's recipe; model is the untouched base model."""
    if rec.data == "hh_chosen":
        segments = hh_chosen_segments(rec.n_hh)
        rows = [{"kind": "hh_chosen", "turns": len(s) // 2} for s in segments]
    else:
        rows = refusal_mix(profile, rec, model, tokenizer, run)
        segments = [chat_segments(tokenizer, profile, r["prompt"], r["response"]) for r in rows]
    examples = [encode(tokenizer, s, rec.max_seq_len) for s in segments]
    kept = [i for i, e in enumerate(examples) if any(x != -100 for x in e["labels"][1:])]
    if len(kept) < len(examples):  # the prompt alone fills max_seq_len: nothing to learn from it
        print(f"dropped {len(examples) - len(kept)} of {len(examples)} examples longer than "
              f"max_seq_len={rec.max_seq_len}")
    return [examples[i] for i in kept], [rows[i] for i in kept]


def collate(examples: list[dict], pad_id: int) -> dict:
    """Right-padded batch (as Casper's trainer); position ids then start at 0 without help."""
    width = max(len(e["input_ids"]) for e in examples)
    batch = {"input_ids": [], "attention_mask": [], "labels": []}
    for e in examples:
        pad = width - len(e["input_ids"])
        batch["input_ids"].append(e["input_ids"] + [pad_id] * pad)
        batch["attention_mask"].append([1] * len(e["input_ids"]) + [0] * pad)
        batch["labels"].append(e["labels"] + [-100] * pad)
    return {k: torch.tensor(v) for k, v in batch.items()}


def data_order(n_examples: int, rec: Recipe) -> list[list[int]]:
    """Batches of example indices for every epoch; a function of (n, seed, batch size) only, so
    every arm sees exactly the same order."""
    batches = []
    for epoch in range(rec.epochs):
        perm = torch.randperm(n_examples, generator=torch.Generator().manual_seed(rec.seed + epoch)).tolist()
        batches += [perm[i:i + rec.batch_size] for i in range(0, n_examples, rec.batch_size)]
    return batches


# ----------------------------------------------------------------------------------------------
# 3. The perturbation hook and the loss.

def causal_lm(model):
    """The transformers model under a PEFT wrapper (LoRA layers are injected in place)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


@contextmanager
def perturbation(model, layer: int | None, delta: torch.Tensor | None):
    """Add delta [batch, seq, d] to the input of decoder block `layer` while inside; no-op for None."""
    if layer is None or delta is None:
        yield
        return

    def add(hidden):
        return hidden + delta.to(device=hidden.device, dtype=hidden.dtype)

    def hook(module, args, kwargs):
        if args:
            return (add(args[0]), *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": add(kwargs["hidden_states"])}

    handle = H.decoder_layers(causal_lm(model))[layer].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


def sft_loss(model, batch: dict) -> torch.Tensor:
    """Mean next-token cross-entropy over the response tokens of the batch. The lm_head runs only
    where there is a label (a 150k vocabulary times every position would dominate CPU time)."""
    lm = causal_lm(model)
    hidden = lm.get_decoder()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                              use_cache=False).last_hidden_state
    targets = batch["labels"][:, 1:]
    keep = targets != -100
    logits = lm.get_output_embeddings()(hidden[:, :-1][keep]).float()
    return F.cross_entropy(logits, targets[keep])


# ----------------------------------------------------------------------------------------------
# 4. PGD inside the eps-ball (Casper et al.'s adv_attack, PAPER.md §2).

def example_norms(x: torch.Tensor) -> torch.Tensor:
    """L2 norm of each example's whole [seq, d] slice: [batch]."""
    return x.flatten(1).norm(dim=1)


def project_l2(delta: torch.Tensor, epsilon: float) -> torch.Tensor:
    """Scale down every example whose perturbation is longer than epsilon; shorter ones are kept."""
    scale = (epsilon / example_norms(delta).clamp_min(1e-12)).clamp(max=1.0)
    return delta * scale.view(-1, *[1] * (delta.ndim - 1))


@dataclass
class Attack:
    delta: torch.Tensor     # final perturbation [batch, seq, d], detached
    losses: list            # SFT loss at the start of each step (losses[0]: at the random start)
    norms: list             # per step, the per-example norms after projection


def pgd_attack(model, batch: dict, layer: int, epsilon: float, steps: int, generator: torch.Generator,
               random_init: bool = True) -> Attack:
    """Untargeted L2 PGD on the input of block `layer` that maximises the SFT loss."""
    lm = causal_lm(model)
    b, s = batch["input_ids"].shape
    mask = batch["attention_mask"][..., None].float()
    delta = torch.zeros(b, s, lm.config.hidden_size, device=mask.device)
    if random_init and epsilon > 0:  # Gaussian direction, radius U(0, 1) * eps, padding left at zero
        noise = torch.randn(delta.shape, generator=generator)  # drawn on the CPU: same on every device
        radius = torch.rand(b, generator=generator) * epsilon
        delta = noise.to(mask.device) * mask
        delta = delta * (radius.to(mask.device) / example_norms(delta).clamp_min(1e-12)).view(-1, 1, 1)
    losses, norms = [], []
    for _ in range(steps):
        delta.requires_grad_(True)
        with perturbation(model, layer, delta):
            loss = sft_loss(model, batch)
        (grad,) = torch.autograd.grad(loss, delta)
        losses.append(loss.item())
        grad = grad * mask
        step = grad / example_norms(grad).clamp_min(1e-12).view(-1, 1, 1)
        delta = project_l2(delta.detach() + (epsilon / steps) * step, epsilon)
        norms.append(example_norms(delta).tolist())
    return Attack(delta.detach(), losses, norms)


# ----------------------------------------------------------------------------------------------
# 5. The training loop: one function for all three arms.

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


# ----------------------------------------------------------------------------------------------
# 6. How large eps is relative to the residual stream it perturbs.

@torch.no_grad()
def residual_norms(model, examples: list[dict], layers: list[int], pad_id: int, n: int = 64) -> dict:
    """Per layer: median over examples of the L2 norm of the whole clean block input (real tokens,
    the norm the eps-ball uses), median per-token norm and median length; on the first n examples."""
    lm = causal_lm(model)
    seen = {layer: [] for layer in layers}
    tokens = {layer: [] for layer in layers}

    def make_hook(layer, mask):
        def hook(module, args, kwargs):
            hidden = (args[0] if args else kwargs["hidden_states"]).float() * mask[..., None]
            seen[layer] += example_norms(hidden).tolist()
            tokens[layer] += hidden.norm(dim=-1)[mask.bool()].tolist()
        return hook

    lengths = []
    device = next(lm.parameters()).device
    for start in range(0, min(n, len(examples)), 8):
        batch = {k: v.to(device) for k, v in collate(examples[start:start + 8], pad_id).items()}
        lengths += batch["attention_mask"].sum(1).tolist()
        blocks = H.decoder_layers(lm)
        handles = [blocks[layer].register_forward_pre_hook(make_hook(layer, batch["attention_mask"]), with_kwargs=True)
                   for layer in layers]
        try:
            lm.get_decoder()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
        finally:
            for handle in handles:
                handle.remove()
    med = lambda xs: float(torch.tensor(xs).median())  # noqa: E731
    return {layer: {"sequence_norm": med(seen[layer]), "token_norm": med(tokens[layer]),
                    "tokens": med(lengths)} for layer in layers}


def arm_epsilon(rec: Recipe, layer: int, norms: dict) -> float:
    """Absolute radius for the arm that perturbs `layer` (norms from residual_norms)."""
    if rec.epsilon_unit == "absolute":
        return rec.epsilon
    return rec.epsilon * norms[layer]["token_norm"] * math.sqrt(norms[layer]["tokens"])


def epsilon_report(epsilon: float, norms: dict) -> dict:
    """An absolute eps, and relative: to the median whole-sequence norm of the clean block input (the
    quantity the ball bounds; the first token's large activation dominates it in later blocks) and per
    token (eps spread evenly over the median length, over the median token norm)."""
    return {"absolute": epsilon, **norms, "relative_to_sequence_norm": epsilon / norms["sequence_norm"],
            "per_token_relative": epsilon / math.sqrt(norms["tokens"]) / norms["token_norm"]}


# ----------------------------------------------------------------------------------------------
# 7. Saving, loading and logs.

def _write_atomic(path: Path, text: str):
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=path.name, suffix=".tmp", delete=False) as f:
        f.write(text)
    os.chmod(f.name, 0o644)  # NamedTemporaryFile creates 0600
    os.replace(f.name, path)


def adapter_root(rec: Recipe) -> Path:
    return H.REPO / rec.adapters


def save_arm(peft_model, log: dict, out: Path, base_id: str):
    """PEFT save_pretrained (adapter_config.json + adapter_model.safetensors), the log as JSON and
    the per-step rows as CSV. The base is recorded by its id, not by this machine's cache path."""
    import pandas as pd
    out.mkdir(parents=True, exist_ok=True)
    for config in peft_model.peft_config.values():
        config.base_model_name_or_path = base_id
    peft_model.save_pretrained(out, save_embedding_layers=False)  # LoRA on q/v only; no hub lookup
    (out / "README.md").unlink(missing_ok=True)  # PEFT's empty model-card template
    _write_atomic(out / "train_log.json", json.dumps(log, indent=1))
    table = pd.DataFrame([{k: v for k, v in r.items() if k not in ("examples", "attack_losses")} for r in log["rows"]])
    if "attack_losses" in log["rows"][0]:
        for i in range(len(log["rows"][0]["attack_losses"])):
            table[f"attack_loss_{i}"] = [r["attack_losses"][i] for r in log["rows"]]
    _write_atomic(out / "train_log.csv", table.to_csv(index=False))


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


# ----------------------------------------------------------------------------------------------
# 8. Running the arms of a profile (the CLI and notebook 00 call this).

def train_profile(profile: H.Profile, arms=ARMS, overrides: dict | None = None, out: Path | None = None,
                  run: Path | None = None, progress: bool = True) -> dict:
    """Build (or read) the training data, then train, save and log each arm from a fresh base.
    Returns {arm: log}. Existing adapters are overwritten."""
    from importlib.metadata import version
    rec = recipe(profile, overrides)
    out = Path(out) if out else adapter_root(rec)
    spec = H.model_role_spec(profile, "base")
    model, tokenizer = H.load_model(profile, "base")
    examples, rows = training_examples(profile, rec, model, tokenizer, run)
    norms = residual_norms(model, examples, sorted({0, rec.lat_layer}), tokenizer.pad_token_id)
    common = {"stage": TRAINING_VERSION, "profile": profile.name, "recipe": dataclasses.asdict(rec),
              "base_model": dataclasses.asdict(spec), "n_examples": len(examples),
              "examples_by_kind": {k: sum(r["kind"] == k for r in rows) for k in sorted({r["kind"] for r in rows})},
              "target_sources": {k: sum(r.get("target_source") == k for r in rows)
                                 for k in sorted({r.get("target_source") for r in rows if r.get("target_source")})},
              "data_hash": H.stable_hash(examples), "order_hash": H.stable_hash(data_order(len(examples), rec)),
              "residual_norms": norms, "threads": torch.get_num_threads(),
              "versions": {p: version(p) for p in ("torch", "transformers", "peft")}}
    before = clean_losses(model, examples, rec, tokenizer.pad_token_id)  # the same base for every arm
    logs = {}
    for arm in arms:
        if model is None:
            model, _ = H.load_model(profile, "base")
        layer = perturb_layer(rec, arm)
        eps = None if layer is None else arm_epsilon(rec, layer, norms)
        peft_model, log = train_arm(model, tokenizer, examples, rec, arm, eps, progress=progress)
        log["epsilon"] = None if layer is None else {"unit": rec.epsilon_unit, "value": rec.epsilon,
                                                     "layer": layer, **epsilon_report(eps, norms[layer])}
        after = clean_losses(peft_model, examples, rec, tokenizer.pad_token_id)
        log = {**common, **log, "clean_loss_before": sum(before) / len(before),
               "clean_loss_after": sum(after) / len(after), "clean_losses_before": before, "clean_losses_after": after}
        save_arm(peft_model, log, out / arm, spec.id)
        log["adapter_mb"] = adapter_megabytes(out / arm)
        _write_atomic(out / arm / "train_log.json", json.dumps(log, indent=1))
        logs[arm] = log
        print(f"{arm}: {log['steps']} steps in {log['seconds']} s; clean loss {log['clean_loss_before']:.3f} -> "
              f"{log['clean_loss_after']:.3f}; adapter {log['adapter_mb']} MB -> {out / arm}", flush=True)
        del peft_model
        model = None
        H.free_memory()
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
