"""Ablated generation (H.generate with a direction: KV cache + hooks) vs plain HF generate without
hooks, vs the same weights orthogonalised (no hooks), vs the paper's recompute-everything loop
(H.greedy_tokens(use_cache=False)) at 64 new tokens; and generation throughput per batch size.

The recompute loop is timed for its first few tokens only and extrapolated to 64 (said in the table).

    .venv/bin/python bench/generation.py [--profile cpu] [--reps 3]
"""
from __future__ import annotations

import argparse
import copy
import dataclasses

import torch

from _util import H, bench_prompts, batches, compare, med, spread, table, unit_direction, verdict

SIZES = {  # overhead: batch x tokens; speedup: batch, KV tokens, recompute tokens timed; scaling: sizes x tokens
    "cpu": {"overhead": (16, 16), "speedup": (8, 64, 8), "scaling": ((8, 16, 32, 48), 16)},
    "tiny": {"overhead": (4, 8), "speedup": (4, 64, 8), "scaling": ((2, 4, 8), 8)},
}
TARGET_OVERHEAD, TARGET_SPEEDUP = 0.10, 10.0


@torch.no_grad()
def hf_generate(model, tok, profile, prompts: list[str]) -> list[str]:
    """H.generate's batching and decoding around transformers' own greedy generate, no hooks."""
    out = []
    for chunk in batches(prompts, profile.batch_size):
        b = H.tokenize(tok, profile, chunk)
        n = profile.max_new_tokens
        seq = model.generate(**b, do_sample=False, max_new_tokens=n, min_new_tokens=n, pad_token_id=tok.pad_token_id)
        out += tok.batch_decode(seq[:, b["input_ids"].shape[1]:], skip_special_tokens=True)
    return out


def overhead(model, tok, profile, r, batch, tokens, reps, log):
    prof = dataclasses.replace(profile, batch_size=batch, max_new_tokens=tokens)
    tiny = dataclasses.replace(profile, batch_size=2, max_new_tokens=2)
    texts, few = bench_prompts(profile, batch), bench_prompts(profile, 2)
    ortho = H.orthogonalize_(copy.deepcopy(model), r)
    variants = {"ablated": lambda p, t: H.generate(model, tok, p, t, direction=r),
                "hf": lambda p, t: hf_generate(model, tok, p, t),
                "plain": lambda p, t: H.generate(model, tok, p, t),
                "ortho": lambda p, t: H.generate(ortho, tok, p, t)}
    log(f"generation overhead: batch {batch} x {tokens} tokens, {reps} reps")
    t = compare({k: (lambda f=f: f(prof, texts)) for k, f in variants.items()}, reps,
                {k: (lambda f=f: f(tiny, few)) for k, f in variants.items()}, log=log)
    del ortho
    base = med(t["hf"])
    labels = {"hf": "HF `model.generate` (greedy, KV cache), no hooks",
              "plain": "H.generate, no direction (our loop, no hooks)",
              "ablated": f"**H.generate + direction** (KV cache + {3 * len(H.decoder_layers(model))} hooks)",
              "ortho": "H.generate on orthogonalised weights (no hooks)"}
    rows = [[labels[k], spread(t[k]), f"{med(t[k]) / base:.3f}", f"{batch * tokens / med(t[k]):.1f}"] for k in labels]
    over_hf, over_hooks = med(t["ablated"]) / base - 1, med(t["ablated"]) / med(t["plain"]) - 1
    md = (f"### Overhead: batch {batch}, {tokens} new tokens, median (min-max) of {reps} after a warm-up\n\n"
          + table(["variant", "time", "x HF", "tokens/s"], rows)
          + f"\n\nAblated vs HF generate {over_hf:+.1%} (target <= {TARGET_OVERHEAD:.0%}: "
          f"{verdict(over_hf <= TARGET_OVERHEAD)}); the hooks alone (ablated vs our loop without a direction) "
          f"{over_hooks:+.1%}; orthogonalised weights vs hooks {med(t['ortho']) / med(t['ablated']):.3f}x.")
    return md, [("generation overhead (ablated vs HF generate) <= 10 %", f"{over_hf:+.1%}", over_hf <= TARGET_OVERHEAD),
                ("  of which the hooks (ablated vs no direction)", f"{over_hooks:+.1%}", over_hooks <= TARGET_OVERHEAD)]


def speedup(model, tok, profile, r, batch, tokens, k, reps, log):
    b = H.tokenize(tok, profile, bench_prompts(profile, batch))
    ids, mask = b["input_ids"], b["attention_mask"]
    small = {kk: v[:1] for kk, v in b.items()}
    out = {}

    def kv(n, x=b):
        with H.ablation(model, r):
            out["kv"] = H.greedy_tokens(model, x["input_ids"], x["attention_mask"], n)

    def rec(n, x=b):
        with H.ablation(model, r):
            out["rec"] = H.greedy_tokens(model, x["input_ids"], x["attention_mask"], n, use_cache=False)

    log(f"KV cache vs recompute: batch {batch}, {tokens} tokens (recompute: first {k}), {reps} reps")
    t = compare({"kv": lambda: kv(tokens), "rec": lambda: rec(k)}, reps,
                {"kv": lambda: kv(2, small), "rec": lambda: rec(2, small)}, log=log)
    same = torch.equal(out["kv"][:, :k], out["rec"])
    length = ids.shape[1]  # step t of the recompute loop runs the model on length + t tokens
    lower = med(t["rec"]) * tokens / k  # a step never costs less than the first ones
    linear = med(t["rec"]) * sum(length + i for i in range(tokens)) / sum(length + i for i in range(k))
    s_lower, s_linear = lower / med(t["kv"]), linear / med(t["kv"])
    rows = [["**KV cache + hooks** (H.greedy_tokens)", f"{tokens}", spread(t["kv"]), f"{med(t['kv']):.2f} s", "1"],
            ["recompute loop + hooks (use_cache=False)", f"{k} timed", spread(t["rec"]),
             f">= {lower:.1f} s; ~{linear:.1f} s", f">= {s_lower:.1f}x; ~{s_linear:.1f}x"]]
    md = (f"### KV cache vs the paper's recompute loop: batch {batch}, {length}-token prompts (padded), "
          f"{tokens} new tokens\n\n"
          + table(["loop", "tokens timed", "time", f"time for {tokens} tokens", "KV speedup"], rows)
          + f"\n\nThe recompute loop was timed for its first {k} tokens and extrapolated to {tokens}: the lower "
          f"bound assumes later steps cost no more than the first ones (they cost more: the sequence grows), "
          f"the ~ estimate scales with the tokens each step recomputes. First {k} tokens identical in both "
          f"loops: {'yes' if same else '**NO**'}. Speedup >= {TARGET_SPEEDUP:.0f}x at {tokens} tokens (on the "
          f"lower bound): {verdict(s_lower >= TARGET_SPEEDUP)}.")
    return md, [(f"KV-cached ablated generation >= 10x the recompute loop at {tokens} tokens",
                 f">= {s_lower:.1f}x (~{s_linear:.1f}x)", s_lower >= TARGET_SPEEDUP)]


def scaling(model, tok, profile, r, sizes, tokens, reps, log):
    texts = bench_prompts(profile, max(sizes))
    profs = {f"batch {s}": dataclasses.replace(profile, batch_size=s, max_new_tokens=tokens) for s in sizes}
    warm_prof = dataclasses.replace(profile, batch_size=2, max_new_tokens=2)
    warm = {name: (lambda: None) for name in profs}
    warm[next(iter(profs))] = lambda: H.generate(model, tok, warm_prof, texts[:2], direction=r)
    log(f"batch scaling: {sizes} x {tokens} tokens, {reps} reps")
    t = compare({name: (lambda p=p: H.generate(model, tok, p, texts[:p.batch_size], direction=r))
                 for name, p in profs.items()}, reps, warm, log=log)
    rate = {s: s * tokens / med(t[f"batch {s}"]) for s in sizes}
    best = max(rate, key=rate.get)
    rows = [[f"{s}{' (profile default)' if s == profile.batch_size else ''}", spread(t[f"batch {s}"]),
             f"{rate[s]:.1f}", f"{rate[s] / rate[best]:.2f}"] for s in sizes]
    md = (f"### Throughput per batch size: one batch of ablated H.generate, {tokens} new tokens, "
          f"median of {reps}\n\n"
          + table(["batch", "time", "new tokens/s", "x best"], rows)
          + f"\n\nFastest: batch {best} (profile `{profile.name}` uses {profile.batch_size}).")
    return md, [(f"batch-size scaling: fastest of {list(sizes)}", f"batch {best}, {rate[best]:.1f} tok/s", None)]


def run(model, tok, profile, reps: int = 3, sizes: dict | None = None, log=print):
    sz = sizes or SIZES.get(profile.name, SIZES["cpu"])
    r = unit_direction(model.config.hidden_size)
    parts = [overhead(model, tok, profile, r, *sz["overhead"], reps, log),
             speedup(model, tok, profile, r, *sz["speedup"], reps, log),
             scaling(model, tok, profile, r, *sz["scaling"], reps, log)]
    return "\n\n".join(md for md, _ in parts), [t for _, ts in parts for t in ts]


def main():
    import _util
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default="cpu")
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    profile = H.load_profile(args.profile)
    model, tok = H.load_model(profile, "base")
    md, _ = run(model, tok, profile, args.reps)
    print(f"## Generation ({profile.name})\n\n{_util.machine()}\n\n{md}")


if __name__ == "__main__":
    main()
