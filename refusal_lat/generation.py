"""Generation: batched, left-padded, greedy, KV-cached; exactly max_new_tokens tokens (the paper: 64,
no stop at end-of-sequence) unless stop_at_eos (docs/method.md, "Generation"). Every completion also
keeps its own turn: the text before the first end-of-turn token (end_of_turn), which the judges read.

start_decoding splits off the prompts' shared prefix, decode_step is one forward pass, greedy_tokens
loops them with a direction ablated throughout, generate_tokens / generate batch and decode prompts.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import ConfigError, Profile
from .data import require_prompts
from .hooks import ablation
from .prefix import last_position_logits, prefill_shared_prefix
from .progress import progress
from .prompts import context_length, position_ids, tokenize


@dataclass
class Decoding:
    """A greedy decode in progress: every token so far, its mask and the KV cache (None: recompute the
    whole sequence at every step). The next forward pass feeds the tokens the cache does not hold."""
    ids: torch.Tensor
    mask: torch.Tensor
    cache: object
    use_cache: bool


def start_decoding(model, input_ids, attention_mask, use_cache: bool = True,
                   direction: torch.Tensor | None = None, share_prefix: bool = True) -> Decoding:
    """With the KV cache, a prefix shared by every prompt is computed once (prefill_shared_prefix),
    with `direction` ablated, unless share_prefix=False; use_cache=False recomputes everything, as the
    paper's loop did."""
    ids, mask, cache = input_ids, attention_mask, None
    if use_cache and share_prefix:
        ids, mask, cache = prefill_shared_prefix(model, ids, mask, direction=direction)
    return Decoding(ids, mask, cache, use_cache)


@torch.no_grad()
def decode_step(model, state: Decoding) -> torch.Tensor:
    """One forward pass over the tokens after the KV cache (all of them when recomputing): [rows, vocab]
    logits of the next token (prefix.last_position_logits). Hooks active around the call apply."""
    logits, state.cache = last_position_logits(model, state.ids, state.mask, state.cache, state.use_cache)
    return logits


def append_token(state: Decoding, token: torch.Tensor):
    """Extend the decode by one token per row: the next step feeds it (or everything, recomputing)."""
    state.mask = torch.cat([state.mask, torch.ones_like(state.mask[:, :1])], dim=1)
    state.ids = torch.cat([state.ids, token[:, None]], dim=1)


@torch.no_grad()
def greedy_tokens(model, input_ids, attention_mask, max_new_tokens: int, use_cache: bool = True,
                  eos_token_id: int | None = None, direction: torch.Tensor | None = None,
                  return_logits: bool = False, on_token=None, share_prefix: bool = True):
    """[batch, max_new_tokens] greedy continuation, with `direction` ([d], or [batch, d] one per row)
    ablated throughout. use_cache=False is the paper's recompute loop (the golden reference for the
    KV-cached path). With eos_token_id, sequences that emitted it continue with pad = eos and the loop
    ends when all have. return_logits: also the [batch, vocab] logits of the first new token. on_token():
    called after each decoded token (progress). share_prefix=False: no shared-prefix prefill."""
    state = start_decoding(model, input_ids, attention_mask, use_cache, direction, share_prefix)
    new_tokens, first_logits = [], None
    done = torch.zeros(len(input_ids), dtype=torch.bool, device=input_ids.device)
    with ablation(model, direction):
        for _ in range(max_new_tokens):
            logits = decode_step(model, state)
            first_logits = logits if first_logits is None else first_logits
            token = logits.argmax(-1)
            if eos_token_id is not None:
                token = torch.where(done, torch.full_like(token, eos_token_id), token)
                done |= token == eos_token_id
            new_tokens.append(token)
            append_token(state, token)
            if on_token is not None:
                on_token()
            if eos_token_id is not None and done.all():
                break
    tokens = torch.stack(new_tokens, dim=1)
    return (tokens, first_logits) if return_logits else tokens


# Tokens that end the model's turn, where the vocabulary has them: Qwen's <|im_end|>, Llama-3's
# <|eot_id|>, the tiny model's <|end|>, and end-of-sequence tokens (plus tokenizer.eos_token_id).
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<|endoftext|>", "</s>")


def end_of_turn_ids(tokenizer) -> set[int]:
    """Ids of the tokenizer's end-of-turn / end-of-sequence tokens."""
    vocab = tokenizer.get_vocab()
    ids = {vocab[t] for t in END_OF_TURN_TOKENS if t in vocab}
    return ids | ({tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set())


def end_of_turn(token_ids: list[int], stop_ids: set[int]) -> int | None:
    """Index of the first end-of-turn token in a completion's token ids; None when the turn never ends."""
    return next((i for i, t in enumerate(token_ids) if t in stop_ids), None)


def crossed_end_of_turn(token_ids: list[int], stop_ids: set[int]) -> bool:
    """Whether the model generated anything but end-of-turn tokens after its turn ended."""
    cut = end_of_turn(token_ids, stop_ids)
    return cut is not None and any(t not in stop_ids for t in token_ids[cut + 1:])


@dataclass
class Generation:
    texts: list              # decoded completions, special tokens skipped (everything generated)
    tokens: list             # generated token ids per prompt
    first_logits: torch.Tensor | None  # [n, vocab] float32 logits of the first new token (return_logits)
    turns: list = None       # decoded text before the first end-of-turn token (the model's own turn)
    end_of_turn: list = None  # token index of that end-of-turn token, None when the turn never ended
    crossed: list = None     # whether non-end-of-turn tokens were generated after it



def refusal_token_ids(tokenizer, profile: Profile) -> list[int]:
    """First token id of each of the profile's refusal openings (e.g. 'I', 'As')."""
    ids = [tokenizer.encode(word, add_special_tokens=False)[0] for word in profile.refusal_tokens]
    return sorted(set(ids))


def refusal_score(logprobs: torch.Tensor, token_ids: list[int]) -> "np.ndarray":
    """log p_ref - log(1 - p_ref), p_ref = next-token probability mass on the refusal tokens (the first-token
    refusal log-odds of every generation unit and of selection's scores)."""
    p = logprobs[:, token_ids].exp().sum(-1).clamp(1e-12, 1 - 1e-12)
    return (p.log() - (1 - p).log()).numpy()


def generate_tokens(model, tokenizer, profile: Profile, instructions: list[str],
                    direction: torch.Tensor | None = None, stop_at_eos: bool = False, desc: str = "",
                    batch_size: int | None = None, max_new_tokens: int | None = None,
                    return_logits: bool = False, share_prefix: bool = True) -> Generation:
    """Greedy completions of `instructions` as text and token ids, with `direction` ablated everywhere
    when given: one [d] vector for all of them, or a [len(instructions), d] matrix, one per prompt.
    batch_size and max_new_tokens default to the profile's."""
    require_prompts(instructions, desc)
    batch_size = batch_size or profile.batch_size
    max_new_tokens = max_new_tokens or profile.max_new_tokens
    per_row = direction is not None and direction.ndim == 2
    if per_row and len(direction) != len(instructions):
        raise ConfigError(f"{len(direction)} directions for {len(instructions)} prompts; pass one per prompt")
    device = next(model.parameters()).device
    texts, token_ids, logits = [], [], []
    n_batches = -(-len(instructions) // batch_size)
    bar = progress(total=n_batches * max_new_tokens, desc=f"{desc or 'generate'} ({len(instructions)} prompts)",
                   unit="tok")
    for b, start in enumerate(range(0, len(instructions), batch_size)):
        rows = slice(start, start + batch_size)
        batch = tokenize(tokenizer, profile, instructions[rows], device,
                         max_length=context_length(model) - max_new_tokens)
        tokens, first = greedy_tokens(model, batch["input_ids"], batch["attention_mask"], max_new_tokens,
                                      eos_token_id=tokenizer.eos_token_id if stop_at_eos else None,
                                      direction=direction[rows] if per_row else direction, return_logits=True,
                                      on_token=lambda: bar.update(1), share_prefix=share_prefix)
        bar.update((b + 1) * max_new_tokens - bar.n)  # a batch that stopped early at end-of-sequence
        texts += tokenizer.batch_decode(tokens, skip_special_tokens=True)
        token_ids += tokens.tolist()
        if return_logits:
            logits.append(first.float().cpu())
    bar.close()
    stop = end_of_turn_ids(tokenizer)
    cuts = [end_of_turn(t, stop) for t in token_ids]
    turns = tokenizer.batch_decode([t if c is None else t[:c] for t, c in zip(token_ids, cuts)], skip_special_tokens=True)
    return Generation(texts, token_ids, torch.cat(logits) if return_logits else None, turns, cuts,
                      [crossed_end_of_turn(t, stop) for t in token_ids])


def generate(model, tokenizer, profile: Profile, instructions: list[str], direction: torch.Tensor | None = None,
             stop_at_eos: bool = False, desc: str = "", batch_size: int | None = None,
             max_new_tokens: int | None = None) -> list[str]:
    """generate_tokens' texts: the greedy completions."""
    return generate_tokens(model, tokenizer, profile, instructions, direction, stop_at_eos, desc,
                           batch_size, max_new_tokens).texts
