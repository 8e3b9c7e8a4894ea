"""Training data. An example is a list of (text, trained) segments; the loss covers the tokens of
the trained segments only (the responses).

refusal_mix (cpu, tiny), built offline and cached under runs/<profile>/training/:
- harmful prompts: refusal_direction's harmful_train minus every prompt this project analyses,
  evaluates or selects with (all 520 AdvBench goals, the 100 GPT-4o questions and all of
  refusal_direction's harmful_val, which data.validation_sets uses; compared after lower-casing and
  collapsing whitespace; near copies with word-set Jaccard >= 0.8, such as the same request with
  one extra adjective, go too), de-duplicated, then a seeded sample;
- harmless prompts: refusal_direction's harmless_train minus the direction set's harmless side
  (the paper's Alpaca harmless_train[:100]), the paper's Alpaca harmless_test (notebook 04's
  harmless checks) and refusal_direction's harmless_val, then a seeded sample;
- targets: the base model's own greedy answer (generation.generate, stop at end of turn, at most
  response_tokens tokens). For a harmful prompt the answer is kept only when
  the fitted judge, reading the answer without its request (judges.project_labels_without_requests,
  as recipes v1 and v2 were made), calls it a refusal; otherwise the target is the fixed sentence
  Recipe.refusal. An answer cut by the token limit is trimmed back to its last full sentence so
  that the end-of-turn token that follows it in the chat template is not taught mid-sentence.
hh_chosen (paper): Anthropic/hh-rlhf "chosen", shuffle(seed=42), first n_hh, in Casper's Llama-2
format, "\n" removed from the turns (docs/method.md, "Training"); the assistant turns are trained.
"""
from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path

import torch

from .. import generation
from ..config import ConfigError, Profile, model_role_spec, run_dir
from ..data import paper_splits, refusal_direction_splits
from ..judges import project_labels_without_requests
from ..prompts import format_prompt
from ..store import VERSIONS, atomic_write, encode_jsonl, fresh, read_jsonl, store
from .recipe import Recipe


def _norm_text(text: str) -> str:
    return " ".join(text.lower().split())


def excluded_prompts() -> dict[str, set]:
    """Normalised prompts that training must not see: every prompt data.prompt_sets and
    data.validation_sets can draw, at any profile size (n_direction <= 100, n_eval <= 520)."""
    s, rd = paper_splits(), refusal_direction_splits()
    return {"harmful": {_norm_text(p) for p in s["harmful_train"] + s["harmful_test"] + s["gpt4o"] + rd["harmful_val"]},
            "harmless": {_norm_text(p) for p in s["harmless_train"][:100] + s["harmless_test"] + rd["harmless_val"]}}


def _near_copy(text: str, others: dict[int, list[set]], threshold: float = 0.8) -> bool:
    """Whether `text`'s word set has Jaccard >= threshold with one of `others` (word sets by size).
    Jaccard >= t needs min(|a|, |b|) >= t * max(|a|, |b|), so only sets of nearby sizes are compared."""
    words = set(re.findall(r"\w+", text))
    sizes = range(math.ceil(threshold * len(words) - 1e-9), math.floor(len(words) / threshold + 1e-9) + 1)
    return any(len(words & o) / max(1, len(words | o)) >= threshold for size in sizes for o in others.get(size, ()))


def _held_out(pool: list[str], excluded: set, n: int | None = None) -> list[str]:
    """`pool` in order without the excluded prompts, their near copies (word-set Jaccard >= 0.8) and
    repeats; the first n."""
    seen = set(excluded)
    word_sets = {}
    for text in seen:
        words = set(re.findall(r"\w+", text))
        word_sets.setdefault(len(words), []).append(words)
    kept = []
    for prompt in pool:
        norm = _norm_text(prompt)
        if norm not in seen and not _near_copy(norm, word_sets):
            seen.add(norm)
            words = set(re.findall(r"\w+", norm))
            word_sets.setdefault(len(words), []).append(words)
            kept.append(prompt)
            if n is not None and len(kept) == n:
                break
    return kept


CALIBRATION_PROMPTS = 64


def calibration_prompts(n: int = CALIBRATION_PROMPTS) -> list[str]:
    """Held-out harmful prompts for calibrating the attack radius (training/robustness.py): the first n
    of refusal_direction's harmful_test that are not evaluated, selected with or in harmful_train."""
    rd = refusal_direction_splits()
    return _held_out(rd["harmful_test"], excluded_prompts()["harmful"] | {_norm_text(p) for p in rd["harmful_train"]}, n)


def training_prompts(rec: Recipe) -> dict[str, list[str]]:
    """{"harmful": [...], "harmless": [...]}: the refusal_mix prompts, disjoint from data.prompt_sets,
    data.validation_sets and calibration_prompts. harmful_pool "train": refusal_direction's harmful_train;
    "train+test": also its harmful_test (minus everything evaluated and the calibration prompts)."""
    rd = refusal_direction_splits()
    excluded = excluded_prompts()
    excluded["harmful"] |= {_norm_text(p) for p in calibration_prompts()}
    pools = {"harmful": rd["harmful_train"] + (rd["harmful_test"] if rec.harmful_pool == "train+test" else []),
             "harmless": rd["harmless_train"]}
    generator = torch.Generator().manual_seed(rec.seed)
    out = {}
    for kind, n in (("harmful", rec.n_harmful), ("harmless", rec.n_harmless)):
        if kind == "harmful":
            kept = _held_out(pools[kind], excluded[kind])
        else:  # 18,793 prompts: exact matches only (the near-copy rule is for the small harmful sets)
            seen, kept = set(excluded[kind]), []
            for prompt in pools[kind]:
                if _norm_text(prompt) not in seen:
                    seen.add(_norm_text(prompt))
                    kept.append(prompt)
        if n > len(kept):
            raise ConfigError(f"training recipe asks for {n} {kind} prompts but only {len(kept)} remain after "
                              f"removing the direction/evaluation/calibration prompts; lower n_{kind}")
        pick = torch.randperm(len(kept), generator=generator)[:n].tolist()
        out[kind] = [kept[i] for i in pick]
    return out


def trim_to_sentence(text: str) -> str:
    """Cut an answer that hit the token limit back to its last complete sentence (a period after a
    digit, as in a list's "1.", does not count); unchanged when that would drop two thirds of it."""
    ends = [m.end() for m in re.finditer(r"(?<!\d)[.!?](?=\s|$)", text)]
    return text[:ends[-1]].rstrip() if ends and ends[-1] > len(text) // 3 else text.rstrip()


def base_answers(profile: Profile, rec: Recipe, model, tokenizer, prompts: list[str],
                 run: Path | None = None) -> dict[str, dict]:
    """{prompt: {"answer", "cut"}}: the base model's greedy answers (minutes on cpu), cached per prompt
    in runs/<profile>/training/base_answers.jsonl under the hash of what determines them, so a recipe
    with more or fewer prompts only generates the missing ones."""
    key = {"stage": VERSIONS["training"], "model": dataclasses.asdict(model_role_spec(profile, "base")),
           "dtype": profile.dtype, "quantization": profile.quantization, "template": profile.template,
           "response_tokens": rec.response_tokens, "stop_at_eos": True}
    path = Path(run or run_dir(profile)) / "training" / "base_answers.jsonl"
    cached = {r["prompt"]: r for r in fresh(path, key, read_jsonl) or []}
    missing = [p for p in dict.fromkeys(prompts) if p not in cached]
    if missing:  # shortest first, in batches of 64: one long prompt no longer pads hundreds of short ones
        missing.sort(key=lambda p: (len(tokenizer(format_prompt(tokenizer, profile, p))["input_ids"]), p))
        answers = generation.generate(model, tokenizer, profile, missing, stop_at_eos=True, desc="base answers",
                                      max_new_tokens=rec.response_tokens, batch_size=min(64, profile.batch_size))
        for prompt, answer in zip(missing, answers):
            cut = len(tokenizer(answer, add_special_tokens=False)["input_ids"]) >= rec.response_tokens
            cached[prompt] = {"prompt": prompt, "answer": answer, "cut": cut}
        store(path, key, encode_jsonl(list(cached.values())), rows=len(cached))
    return {p: cached[p] for p in prompts}


def refusal_mix(profile: Profile, rec: Recipe, model, tokenizer, run: Path | None = None) -> list[dict]:
    """Rows {kind, prompt, response, target_source, base_label, base_answer, cut}, also written to
    runs/<profile>/training/examples.jsonl for reading (with the dropped prompts and why).

    v1 (harmful_targets "mixed", harmless_targets "all"): every drawn prompt; a harmful prompt the base
    answered gets the fixed sentence Recipe.refusal. v2 ("own_refusals", "non_refusals"): only harmful
    prompts the base refused (its own refusal is the target) and harmless prompts it answered (its
    answer is the target); with max_same_target, an identical target (a stock sentence such as
    "I'm sorry, but I can't assist with that.") is kept at most that many times."""
    prompts = training_prompts(rec)
    answers = base_answers(profile, rec, model, tokenizer, prompts["harmful"] + prompts["harmless"], run)
    rows, dropped = [], []
    for kind in ("harmful", "harmless"):
        raw = [answers[p] for p in prompts[kind]]
        labels = project_labels_without_requests([a["answer"] for a in raw])  # as the committed adapters were made
        seen_targets: dict[str, int] = {}
        for prompt, a, label in zip(prompts[kind], raw, labels):
            answer = trim_to_sentence(a["answer"]) if a["cut"] else a["answer"].strip()
            row = {"kind": kind, "prompt": prompt, "base_label": label, "base_answer": a["answer"], "cut": a["cut"]}
            if kind == "harmful" and label != 1 and rec.harmful_targets == "own_refusals":
                dropped.append({**row, "dropped": "base model did not refuse"})
                continue
            if kind == "harmless" and label == 1 and rec.harmless_targets == "non_refusals":
                dropped.append({**row, "dropped": "base model refused"})
                continue
            use_model = kind == "harmless" or label == 1
            response = answer if use_model else rec.refusal
            key = _norm_text(response)
            if rec.max_same_target and seen_targets.get(key, 0) >= rec.max_same_target:
                dropped.append({**row, "dropped": f"target already used {rec.max_same_target} times"})
                continue
            seen_targets[key] = seen_targets.get(key, 0) + 1
            rows.append({**row, "response": response,
                         "target_source": "base_model" if use_model else "fixed_refusal"})
    if not any(r["kind"] == "harmful" for r in rows):
        raise ConfigError("training data has no harmful example (the base model refused none of the drawn prompts); "
                          "raise n_harmful or set harmful_targets: mixed")
    folder = Path(run or run_dir(profile)) / "training"
    atomic_write(folder / "examples.jsonl", encode_jsonl(rows))
    atomic_write(folder / "dropped.jsonl", encode_jsonl(dropped))
    return rows


def chat_segments(tokenizer, profile: Profile, prompt: str, response: str) -> list[tuple[str, bool]]:
    """[(prompt as the evaluation formats it, False), (response + end of turn, True)]."""
    head = format_prompt(tokenizer, profile, prompt)
    if profile.template != "chat":
        return [(head, False), (response + (tokenizer.eos_token or ""), True)]
    full = tokenizer.apply_chat_template([{"role": "user", "content": prompt},
                                          {"role": "assistant", "content": response}], tokenize=False)
    if not full.startswith(head):
        raise ConfigError("the chat template renders the prompt differently with and without an answer; "
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
        raise ConfigError("the paper recipe reads Anthropic/hh-rlhf with `datasets`: pip install datasets "
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


def training_examples(profile: Profile, rec: Recipe, model, tokenizer,
                      run: Path | None = None) -> tuple[list[dict], list[dict]]:
    """(encoded examples, data rows) for the profile's recipe; model is the untouched base model."""
    if rec.data == "hh_chosen":
        segments = hh_chosen_segments(rec.n_hh)
        rows = [{"kind": "hh_chosen", "turns": len(s) // 2} for s in segments]
    else:
        rows = refusal_mix(profile, rec, model, tokenizer, run)
        segments = [chat_segments(tokenizer, profile, r["prompt"], r["response"]) for r in rows]
    examples = [{**encode(tokenizer, s, rec.max_seq_len), "kind": r["kind"]} for s, r in zip(segments, rows)]
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
