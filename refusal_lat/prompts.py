"""Prompts: the paper's literal template or the tokenizer's chat template; left padded."""
from __future__ import annotations

import torch

from .config import ConfigError, Profile


def format_prompt(tokenizer, profile: Profile, instruction: str) -> str:
    if profile.template == "chat":
        if not getattr(tokenizer, "chat_template", None):
            raise ConfigError(f"profile '{profile.name}' uses template: chat but the tokenizer has no chat template; "
                              f"set template to a format string such as '\\n[INST]{{prompt}}[/INST]\\n'")
        return tokenizer.apply_chat_template([{"role": "user", "content": instruction}],
                                             tokenize=False, add_generation_prompt=True)
    return profile.template.format(prompt=instruction)


def tokenize(tokenizer, profile: Profile, instructions: list[str], device="cpu", max_length: int | None = None,
             prefill: str = ""):
    """Left-padded batch. A literal template gets the tokenizer's BOS (as TransformerLens adds it);
    a chat template already contains whatever special tokens the model expects. prefill: text the
    model's turn starts with (the prefilling attack), placed after the template's turn opening."""
    if not instructions:
        raise ConfigError("empty prompt list: nothing to run; check the dataset sizes in the profile")
    check_prompts(instructions)
    texts = [format_prompt(tokenizer, profile, p) + prefill for p in instructions]
    batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=profile.template != "chat")
    if max_length is not None and batch["attention_mask"].sum(1).max() > max_length:
        longest = int(batch["attention_mask"].sum(1).argmax())
        raise ConfigError(f"prompt {instructions[longest][:30]!r}… has {int(batch['attention_mask'][longest].sum())} "
                          f"tokens, more than the {max_length} the model's context allows here; shorten or drop it")
    return {k: v.to(device) for k, v in batch.items()}


def visible(text: str) -> bool:
    """Whether `text` shows anything: a printable character other than whitespace (control and
    zero-width characters such as U+0000 and U+200B are not)."""
    return any(ch.isprintable() and not ch.isspace() for ch in text)


def check_prompts(instructions: list):
    """Every prompt is text that shows something and encodes as UTF-8 (None or "" is not silently an
    empty prompt)."""
    for i, text in enumerate(instructions):
        if not isinstance(text, str):
            raise ConfigError(f"prompt {i} is {type(text).__name__} {repr(text)[:30]}, not text; "
                              f"fix or drop it in the prompt list")
        if not visible(text):
            raise ConfigError(f"prompt {i} ({text[:30]!r}) is empty or shows nothing; fix or drop it in the prompt list")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as err:
            raise ConfigError(f"prompt {i} ({text[:30]!r}…) is not valid text ({err.reason} at character "
                              f"{err.start}); fix or drop it in the prompt list") from None


def context_length(model) -> int:
    return getattr(model.config, "max_position_embeddings", None) or 10**9


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that start at 0 on the first real token, so left padding changes nothing."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def read_tokens(tokenizer, profile: Profile, instructions: list[str]) -> list[str]:
    """The token that sits at the read position of each prompt (shown in notebook 01)."""
    batch = tokenize(tokenizer, profile, instructions)
    ids = batch["input_ids"][:, profile.read_position]
    return [tokenizer.decode([i]) for i in ids.tolist()]
