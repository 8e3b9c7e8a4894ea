"""Ablated generation (generate with a direction: KV cache + hooks) vs plain HF generate without
hooks, vs the same weights orthogonalised (no hooks), vs the paper's recompute-everything loop
(greedy_tokens(use_cache=False)) at 64 new tokens; and generation throughput per batch size.

The recompute loop is timed at a few of its 64 steps and summed over all of them; batch scaling
times the prefill once and the decode steps (greedy_tokens' own step) as medians, and predicts a
64-token generation from them. Both say so in the report.

    .venv/bin/python bench/generation.py [--profile cpu] [--reps 3] [--threads auto]
"""
from __future__ import annotations

import copy
import dataclasses
import time

import numpy as np
import torch

from _util import bench_prompts, batches, compare, med, ratio, spread, table, unit_direction, verdict
from refusal_lat.generation import append_token, decode_step, generate, greedy_tokens, start_decoding  # noqa: E402
from refusal_lat.hooks import ablation, orthogonalize_  # noqa: E402
from refusal_lat.models.load import decoder_layers  # noqa: E402
from refusal_lat.prompts import tokenize  # noqa: E402
from refusal_lat.units import transfer_units  # noqa: E402

PAPER_BATCH = 16  # the authors' generation batch for the base model (12 for AT and LAT)
SIZES = {  # overhead: batch, tokens; speedup: batches, new tokens, recompute steps timed; scaling: batches, decode steps
    "cpu": {"overhead": (4, 16), "speedup": ((4, PAPER_BATCH), 64, 4), "scaling": ((16, 64, 128, 320), 4)},
    "tiny": {"overhead": (4, 8), "speedup": ((4, PAPER_BATCH), 64, 4), "scaling": ((2, 4, 8), 4)},
}
TARGET_OVERHEAD, TARGET_SPEEDUP = 0.10, 10.0


@torch.no_grad()
def hf_generate(model, tok, profile, prompts: list[str]) -> list[str]:
    """generate's batching and decoding around transformers' own greedy generate, no hooks."""
    out = []
    for chunk in batches(prompts, profile.batch_size):
        b = tokenize(tok, profile, chunk)
        n = profile.max_new_tokens
        seq = model.generate(**b, do_sample=False, max_new_tokens=n, min_new_tokens=n, pad_token_id=tok.pad_token_id)
        out += tok.batch_decode(seq[:, b["input_ids"].shape[1]:], skip_special_tokens=True)
    return out


def overhead(model, tok, profile, r, batch, tokens, reps, log):
    prof = dataclasses.replace(profile, batch_size=batch, max_new_tokens=tokens)
    small = dataclasses.replace(profile, batch_size=2, max_new_tokens=2)
    texts = bench_prompts(profile, batch)
    ortho = orthogonalize_(copy.deepcopy(model), r)
    variants = {"ablated": lambda p, t: generate(model, tok, p, t, direction=r),
                "hf": lambda p, t: hf_generate(model, tok, p, t),
                "plain": lambda p, t: generate(model, tok, p, t),
                "ortho": lambda p, t: generate(ortho, tok, p, t)}
    log(f"generation overhead: batch {batch} x {tokens} tokens, {reps} reps")
    t = compare({k: (lambda f=f: f(prof, texts)) for k, f in variants.items()}, reps,
                {k: (lambda f=f: f(small, texts[:2])) for k, f in variants.items()}, log=log)
    del ortho
    labels = {"hf": "HF `model.generate` (greedy, KV cache), no hooks",
              "plain": "generate, no direction (our loop, no hooks)",
              "ablated": f"**generate + direction** (KV cache + {3 * len(decoder_layers(model))} hooks)",
              "ortho": "generate on orthogonalised weights (no hooks)"}
    rows = [[labels[k], spread(t[k]), f"{ratio(t, k, 'hf'):.3f}", f"{batch * tokens / med(t[k]):.1f}"] for k in labels]
    over_hf, over_hooks = ratio(t, "ablated", "hf") - 1, ratio(t, "ablated", "plain") - 1
    md = (f"### Overhead: batch {batch}, {tokens} new tokens, median (min-max) of {reps} after a warm-up\n\n"
          + table(["variant", "time", "x HF", "new tokens/s"], rows)
          + f"\n\nx HF: median of the per-round ratios. generate computes the chat template's common start once "
          f"per batch (HF generate runs it for every row), which can make it faster than HF even with hooks. "
          f"Ablated vs HF generate {over_hf:+.1%} (target <= "
          f"{TARGET_OVERHEAD:.0%}: {verdict(over_hf <= TARGET_OVERHEAD)}); the hooks alone (ablated vs our loop "
          f"without a direction) {over_hooks:+.1%}; orthogonalised weights {ratio(t, 'ortho', 'ablated'):.3f}x "
          f"the hooked time.")
    return md, [("generation overhead (ablated vs HF generate) <= 10 %", f"{over_hf:+.1%}", over_hf <= TARGET_OVERHEAD),
                ("  of which the hooks (ablated vs no direction) <= 10 %", f"{over_hooks:+.1%}",
                 over_hooks <= TARGET_OVERHEAD)]


@torch.no_grad()
def recompute_step(model, tokens, batch, step: int) -> torch.Tensor:
    """Step `step` of the paper's recompute loop (greedy_tokens(use_cache=False)): one forward pass
    over the prompt plus the `step` tokens generated so far, no cache. Returns the greedy token."""
    ids = torch.cat([batch["input_ids"], tokens[:, :step]], dim=1)
    mask = torch.cat([batch["attention_mask"], torch.ones_like(tokens[:, :step])], dim=1)
    return decode_step(model, start_decoding(model, ids, mask, use_cache=False)).argmax(-1)


def speedup(model, tok, profile, r, batch_sizes, tokens, k, reps, log):
    """KV-cached ablated generation of `tokens` tokens vs the recompute loop, whose cost is measured at
    k steps spread over the 64 (step i recomputes prompt + i tokens) and summed over all steps: the
    lower bound holds each measured step's cost until the next measured step (a step never costs
    less than a shorter one), the estimate interpolates linearly. The recomputed token at every
    measured step must equal the KV-cached one."""
    sampled = sorted({round(x) for x in np.linspace(0, tokens - 1, k)})
    rows, targets = [], []
    for batch in batch_sizes:
        b = tokenize(tok, profile, bench_prompts(profile, batch))
        small = {key: v[:1] for key, v in b.items()}
        out = {}

        def kv(x=b, n=tokens, name="kv"):
            out[name] = greedy_tokens(model, x["input_ids"], x["attention_mask"], n, direction=r)

        def recompute(i):
            with ablation(model, r):  # the hooks greedy_tokens(direction=r) sets, around one recompute step
                out[i] = recompute_step(model, out["kv"], b, i)

        log(f"KV cache vs recompute: batch {batch}, {tokens} tokens (recompute steps {sampled}), {reps} reps")
        kv()  # the tokens the recompute steps continue from
        fns = {"kv": kv} | {i: (lambda i=i: recompute(i)) for i in sampled}
        warm = {"kv": lambda: kv(small, 2, "w")} | {i: (lambda: None) for i in sampled}
        t = compare(fns, reps, warm, log=log)
        same = all(torch.equal(out[i], out["kv"][:, i]) for i in sampled)
        cost = {i: med(t[i]) for i in sampled}
        hold = [cost[max(j for j in sampled if j <= i)] for i in range(tokens)]
        lerp = np.interp(range(tokens), sampled, [cost[i] for i in sampled])
        rec_lower, rec_est = float(sum(hold)), float(sum(lerp))
        lower, est = rec_lower / med(t["kv"]), rec_est / med(t["kv"])
        length = b["input_ids"].shape[1]
        rows.append([f"{batch}{' (paper)' if batch == PAPER_BATCH else ''}", f"{length}", spread(t["kv"]),
                     " / ".join(f"{cost[i]:.2f}" for i in sampled), f">= {rec_lower:.0f} s, ~{rec_est:.0f} s",
                     f">= {lower:.1f}x, ~{est:.1f}x", "yes" if same else "**NO**"])
        targets.append((f"KV-cached ablated generation >= 10x the recompute loop at {tokens} tokens, batch {batch}"
                        f"{' (the paper uses 16)' if batch == PAPER_BATCH else ''}", f">= {lower:.1f}x (~{est:.1f}x)",
                        lower >= TARGET_SPEEDUP))
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    md = (f"### KV cache vs the paper's recompute loop: {tokens} new tokens, median (min-max) of {reps}\n\n"
          + table(["batch", "prompt tokens (padded)", f"KV cache + hooks, {tokens} tokens",
                   f"recompute + hooks, one step at {'/'.join(map(str, sampled))} (s)", f"recompute, {tokens} steps",
                   "KV speedup", "tokens equal"], rows)
          + f"\n\nThe recompute loop (`greedy_tokens(use_cache=False)`) runs the whole sequence at every step; "
          f"its steps {', '.join(map(str, sampled))} were timed (each a forward pass over the prompt plus the tokens "
          f"generated so far, continuing the KV-cached tokens) and summed over the {tokens} steps: >= holds each "
          f"timed step's cost until the next one, ~ interpolates. Tokens equal: the recomputed token at every timed "
          f"step equals the KV-cached one. The paper generated in batches of {PAPER_BATCH} (base) and 12 (AT, LAT); "
          f"at a small batch a decode step reads all {weights / 2**30:.1f} GiB of {profile.dtype} weights for a few "
          f"tokens, so the KV loop is bound by memory bandwidth and gains less. Target >= "
          f"{TARGET_SPEEDUP:.0f}x on the lower bound.")
    return md, targets


def prefill(model, batch):
    """greedy_tokens' start: the shared prefix once, then the first step over the rest of the prompts."""
    state = start_decoding(model, batch["input_ids"], batch["attention_mask"])
    append_token(state, decode_step(model, state).argmax(-1))
    return state


def decode(model, state, steps: int):
    """`steps` greedy steps from the cache: decode_step, the step greedy_tokens takes."""
    for _ in range(steps):
        append_token(state, decode_step(model, state).argmax(-1))


def scaling(model, tok, profile, r, sizes, steps, reps, log, n=64):
    states, pre, length = {}, {}, {}
    log(f"batch scaling: {sizes}, prefill once, {steps} decode steps x {reps} reps")
    with ablation(model, r):
        for s in sizes:
            batch = tokenize(tok, profile, bench_prompts(profile, s))
            started = time.perf_counter()
            states[s] = prefill(model, batch)
            pre[s], length[s] = time.perf_counter() - started, batch["input_ids"].shape[1]
            log(f"  prefill batch {s}: {pre[s]:.2f} s")
        t = compare({s: (lambda s=s: decode(model, states[s], steps)) for s in sizes}, reps,
                    {s: (lambda s=s: decode(model, states[s], 1)) for s in sizes}, log=log)
    step = {s: med(t[s]) / steps for s in sizes}
    total = {s: pre[s] + (n - 1) * step[s] for s in sizes}
    rate = {s: s * n / total[s] for s in sizes}
    best = max(rate, key=rate.get)
    # notebook 03 batches one model's transfer units (no ablation + one per source) together
    n_eval = profile.n_eval * len(transfer_units(profile)) // len(profile.roles)
    per_batch = lambda b: float(np.interp(b, sizes, [total[x] for x in sizes]))  # noqa: E731
    eval_time = {s: (n_eval // s) * total[s] + (per_batch(n_eval % s) if n_eval % s else 0) for s in sizes}
    best_eval = min(eval_time, key=eval_time.get)
    # the recompute loop's first step is this prefill; later steps recompute longer sequences
    rec_lower = {s: n * pre[s] / total[s] for s in sizes}
    rec_scaled = {s: pre[s] * sum(length[s] + i for i in range(n)) / length[s] / total[s] for s in sizes}
    rows = [[f"{s}{' (profile)' if s == profile.batch_size else ''}", f"{pre[s]:.2f} s", f"{step[s]:.2f} s",
             f"{s / step[s]:.1f}", f"{total[s]:.1f} s", f"**{rate[s]:.1f}**", f"{rate[s] / rate[best]:.2f}",
             f"{eval_time[s] / 60:.1f} min",
             f">= {rec_lower[s]:.1f}x, ~{rec_scaled[s]:.1f}x"] for s in sizes]
    md = (f"### Throughput per batch size (ablated, KV cache): {n}-token generation predicted from one prefill and "
          f"the median decode step ({steps} steps x {reps} rounds, interleaved)\n\n"
          + table(["batch", "prefill (1 run)", "decode step", "decode tok/s", f"{n} tokens", f"tok/s over {n}",
                   "x best", f"{n_eval} rows", "KV speedup vs recompute"], rows)
          + f"\n\nFastest per token: batch {best}; fastest for one model's transfer units in notebook 03 ({n_eval} "
          f"rows: {profile.n_eval} eval prompts x {n_eval // profile.n_eval} directions incl. none; whole batches plus a "
          f"remainder batch, interpolated): batch {best_eval}; profile `{profile.name}` uses "
          f"{profile.batch_size}. The last column "
          f"estimates the recompute loop from the prefill, which is its first step: >= {n} prefills, ~ scaled by "
          f"the tokens each step recomputes.")
    targets = [(f"batch-size scaling: fastest of {list(sizes)} (per token; for one model's {n_eval} rows)",
                f"batch {best}, {rate[best]:.1f} tok/s; for {n_eval} rows batch {best_eval}", None)]
    if profile.batch_size in sizes:
        s = profile.batch_size
        targets.append((f"KV >= 10x recompute at {n} tokens, profile batch {s} (from prefill + decode step)",
                        f">= {rec_lower[s]:.1f}x (~{rec_scaled[s]:.1f}x)", rec_lower[s] >= TARGET_SPEEDUP))
    return md, targets


def run(model, tok, profile, reps: int = 3, sizes: dict | None = None, log=print):
    sz = sizes or SIZES.get(profile.name, SIZES["cpu"])
    r = unit_direction(model.config.hidden_size)
    over = overhead(model, tok, profile, r, *sz["overhead"], reps, log)
    md_s, tg_s = speedup(model, tok, profile, r, *sz["speedup"], reps, log)
    scale = scaling(model, tok, profile, r, *sz["scaling"], reps, log, n=sz["speedup"][1])
    return "\n\n".join([over[0], md_s, scale[0]]), over[1] + tg_s + scale[1]


def main():
    import _util
    _util.model_main("Generation", __doc__, lambda model, tok, profile, args: run(model, tok, profile, args.reps))


if __name__ == "__main__":
    main()
