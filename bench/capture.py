"""All-layer activation capture (block_inputs: one pre-hook per block, read position only) vs the
same batches through the bare trunk, and its memory vs keeping every layer's whole sequence (what
TransformerLens run_with_cache keeps; emulated with output_hidden_states=True, which holds only the
residual stream, so the real run_with_cache cache is larger still).

    .venv/bin/python bench/capture.py [--profile cpu] [--prompts 16] [--threads auto] [--reps 3]
"""
from __future__ import annotations


import torch

from _util import PeakRSS, bench_prompts, batches, compare, med, mib, ratio, spread, table, tensor_bytes, verdict
from refusal_lat.activations import block_inputs, trunk_forward  # noqa: E402
from refusal_lat.prompts import position_ids, tokenize  # noqa: E402

SIZES = {"cpu": {"prompts": 16}, "tiny": {"prompts": 16}}
TARGET = 0.10  # capture costs at most 10 % over the bare forward pass


def bare_forward(model, tok, profile, prompts):
    """trunk_forward without capture (the pass block_inputs hooks): tokenize, run the trunk with
    the shared prefix once, keep nothing. The hook overhead is block_inputs over this."""
    for chunk in batches(prompts, profile.batch_size):
        b = tokenize(tok, profile, chunk)
        trunk_forward(model, b["input_ids"], b["attention_mask"], profile.read_position)


@torch.no_grad()
def plain_forward(model, tok, profile, prompts):
    """The trunk over every token of every prompt (no shared prefix): what capture cost before it."""
    trunk = model.get_decoder()
    for chunk in batches(prompts, profile.batch_size):
        b = tokenize(tok, profile, chunk)
        trunk(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
              position_ids=position_ids(b["attention_mask"]), use_cache=False)


@torch.no_grad()
def whole_sequences(model, tok, profile, prompts):
    """Every layer's residual stream at every position, kept for all prompts."""
    trunk, kept = model.get_decoder(), []
    for chunk in batches(prompts, profile.batch_size):
        b = tokenize(tok, profile, chunk)
        out = trunk(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                    position_ids=position_ids(b["attention_mask"]), use_cache=False, output_hidden_states=True)
        kept.append(out.hidden_states)
    return kept


def run(model, tok, profile, prompts: int = 16, reps: int = 3, log=print):
    texts = bench_prompts(profile, prompts)
    variants = {"bare": lambda t: bare_forward(model, tok, profile, t),
                "capture": lambda t: block_inputs(model, tok, profile, t),
                "plain": lambda t: plain_forward(model, tok, profile, t),
                "whole": lambda t: whole_sequences(model, tok, profile, t)}
    mem, kept_bytes = {}, {}

    def measured(name):  # peak memory of every timed call (same sampler cost for all variants)
        def call():
            with PeakRSS() as peak:
                kept = variants[name](texts)
            mem.setdefault(name, []).append(peak.delta)
            kept_bytes[name] = tensor_bytes(kept)
        return call

    log(f"capture: {prompts} prompts, batch {profile.batch_size}, {reps} reps")
    t = compare({k: measured(k) for k in variants}, reps,
                {k: (lambda f=f: f(texts[:2])) for k, f in variants.items()}, log=log)
    overhead = ratio(t, "capture", "bare") - 1
    n_tokens = sum(tokenize(tok, profile, c)["attention_mask"].numel() for c in batches(texts, profile.batch_size))
    labels = {"bare": "bare trunk forward (no hooks; shared prefix once, as block_inputs)",
              "capture": "**block_inputs** (all layers, read position)",
              "plain": "bare trunk forward over every token (no shared prefix)",
              "whole": "all layers x all positions (run_with_cache-like)"}
    rows = [[labels[k], spread(t[k]), f"{ratio(t, k, 'bare'):.3f}", mib(med(mem[k])), mib(kept_bytes[k])] for k in labels]
    ratio_mem = kept_bytes["whole"] / max(kept_bytes["capture"], 1)
    ratio_peak = med(mem["whole"]) / max(med(mem["capture"]), 1)
    n_run = 2 * profile.n_direction + profile.n_eval  # what notebook 01 captures on this profile
    md = (f"{prompts} prompts ({n_tokens} padded tokens), batch {profile.batch_size}, "
          f"{model.config.num_hidden_layers} layers, width {model.config.hidden_size}. Time: median (min-max) of "
          f"{reps} after a warm-up; x bare: median of the per-round ratios. Memory: peak RSS above the level "
          f"before the call (sampled every 2 ms; median over the timed calls) and bytes of the tensors the call "
          f"returns.\n\n"
          + table(["variant", "time", "x bare", "peak RSS delta", "tensors kept"], rows)
          + f"\n\nCapture overhead (the hooks: block_inputs over the same loop without them) {overhead:+.1%} "
          f"(target <= {TARGET:.0%}: {verdict(overhead <= TARGET)}). Computing the template's common start once "
          f"(prefill_shared_prefix) makes the bare pass {ratio(t, 'plain', 'bare'):.2f}x faster than running every "
          f"token. "
          f"block_inputs peaks at {med(mem['capture']) / max(med(mem['bare']), 1):.1f}x the bare pass and "
          f"{med(mem['capture']) / max(med(mem['whole']), 1):.2f}x keeping whole sequences (its hook clones the "
          f"read position out, so no layer's whole input stays alive). "
          f"Keeping whole sequences holds {ratio_mem:,.0f}x the bytes of the read-position capture and peaks "
          f"{ratio_peak:.1f}x as high as block_inputs (the cache grows with sequence length; TransformerLens also caches "
          f"attention patterns, q/k/v and MLP activations, so its real cache is larger still). "
          f"Scaled to the {n_run} prompts notebook 01 captures on "
          f"`{profile.name}`: {mib(kept_bytes['capture'] / prompts * n_run)} kept by block_inputs vs "
          f"{mib(kept_bytes['whole'] / prompts * n_run)} of whole sequences.")
    targets = [("capture hook overhead <= 10 %", f"{overhead:+.1%}", overhead <= TARGET)]
    return md, targets


def main():
    import _util
    _util.model_main("Activation capture", __doc__, lambda model, tok, profile, args: run(
        model, tok, profile, args.prompts or SIZES.get(profile.name, SIZES["cpu"])["prompts"], args.reps),
        lambda parser: parser.add_argument("--prompts", type=int))


if __name__ == "__main__":
    main()
