"""The shared prompt prefix computed once, the forward pass over what follows it (no hooks), and the
next-token logits of the last position."""
from __future__ import annotations

import torch

from .hooks import ablation
from .prompts import position_ids


@torch.no_grad()
def prefill_shared_prefix(model, input_ids, attention_mask, keep: int = 1, direction: torch.Tensor | None = None):
    """Chat templates start every prompt with the same tokens (Qwen's default system prompt: about
    half of each `cpu` prompt). Run them once, for one row, and copy their KV cache across the batch.
    The batch is rearranged as [shared prefix | left padding | rest]; the attention mask and the
    mask-derived positions make that layout equivalent to plain left padding (tests compare tokens).
    Every row keeps at least `keep` tokens of its own (the read position must stay in the rest).
    `direction` is ablated while the prefix runs; with one direction per row ([rows, d]) the prefix
    runs once per distinct direction and each row gets the cache of its own.
    Returns (ids, mask, cache), or the inputs and None when fewer than two tokens are shared."""
    lengths = attention_mask.sum(1).tolist()
    if len(input_ids) < 2 or not bool(attention_mask[:, -1].all()):  # needs a left-padded batch
        return input_ids, attention_mask, None
    rows = [ids[len(ids) - n:] for ids, n in zip(input_ids, lengths)]
    shortest = min(lengths)
    agree = torch.stack([r[:shortest] for r in rows]).eq(rows[0][:shortest]).all(0).tolist() + [False]
    shared = min(agree.index(False), shortest - keep)
    if shared < 2:
        return input_ids, attention_mask, None
    per_row = direction is not None and direction.ndim == 2
    distinct, row_of = torch.unique(direction, dim=0, return_inverse=True) if per_row else (direction, None)
    prefix = rows[0][None, :shared]
    prefix_rows = prefix.expand(len(distinct) if per_row else 1, -1)  # one row per distinct direction
    positions = torch.arange(shared, device=prefix.device)[None].expand(len(prefix_rows), -1)
    with ablation(model, distinct):
        cache = trunk(model)(input_ids=prefix_rows, attention_mask=torch.ones_like(prefix_rows),
                             position_ids=positions, use_cache=True).cache
    if per_row:
        cache.batch_select_indices(row_of.to(prefix.device))
    else:
        cache.batch_repeat_interleave(len(rows))
    rests = [r[shared:] for r in rows]
    width = max(len(r) for r in rests)
    rest_ids = torch.zeros(len(rows), width, dtype=input_ids.dtype, device=input_ids.device)
    rest_mask = torch.zeros(len(rows), width, dtype=attention_mask.dtype, device=attention_mask.device)
    for i, r in enumerate(rests):
        rest_ids[i, width - len(r):], rest_mask[i, width - len(r):] = r, 1
    ids = torch.cat([prefix.expand(len(rows), -1), rest_ids], dim=1)
    mask = torch.cat([torch.ones_like(ids[:, :shared], dtype=attention_mask.dtype), rest_mask], dim=1)
    return ids, mask, cache


def trunk(model):
    """The decoder stack without the lm_head (hooks on its blocks apply as on the whole model)."""
    return model.get_decoder() if hasattr(model, "get_decoder") else model


def last_position_logits(model, ids, mask, cache, use_cache: bool = True):
    """(logits [rows, vocab] of the token after the last position, cache): the trunk over the tokens
    after `cache`, then the lm_head on the last position's hidden state, made contiguous. Calling the
    whole model with logits_to_keep=1 instead hands the lm_head a strided slice, which in bfloat16 on
    the CPU expands the 151,936 x 896 weight into one copy per row (7.5 of 8.3 s of a 16-prompt pass,
    measured); in float32 it only costs ~20 %."""
    out = forward_after_prefix(trunk(model), ids, mask, cache, use_cache=use_cache)
    hidden = out.last_hidden_state[:, -1].contiguous()
    return model.get_output_embeddings()(hidden), (out.cache if use_cache else None)


def forward_after_prefix(module, ids, mask, cache, **kwargs):
    """One forward pass of `module` (model or trunk) over the tokens after the cached prefix, or over
    all of them when `cache` is None (nothing was shared)."""
    rest = ids.shape[1] - (cache.get_seq_length() if cache is not None else 0)
    kwargs.setdefault("use_cache", cache is not None)
    return module(input_ids=ids[:, -rest:], attention_mask=mask, position_ids=position_ids(mask)[:, -rest:],
                  cache=cache, **kwargs)
