"""All-layer activation capture (H.block_inputs: one pre-hook per block, read position only) vs the
same batches through the bare trunk, and its memory vs keeping every layer's whole sequence (what
TransformerLens run_with_cache keeps; emulated with output_hidden_states=True, which holds only the
residual stream, so the real run_with_cache cache is larger still).

    .venv/bin/python bench/capture.py [--profile cpu] [--prompts 32] [--reps 3]
"""
from __future__ import annotations

import argparse

import torch

from _util import H, PeakRSS, bench_prompts, batches, compare, med, mib, spread, table, tensor_bytes, verdict

SIZES = {"cpu": {"prompts": 32}, "tiny": {"prompts": 16}}
TARGET = 0.10  # capture costs at most 10 % over the bare forward pass


@torch.no_grad()
def bare_forward(model, tok, profile, prompts):
    """block_inputs' loop without its hooks: tokenize, run the trunk, keep nothing."""
    trunk = model.get_decoder()
    for chunk in batches(prompts, profile.batch_size):
        b = H.tokenize(tok, profile, chunk)
        trunk(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
              position_ids=H.position_ids(b["attention_mask"]), use_cache=False)


@torch.no_grad()
def whole_sequences(model, tok, profile, prompts):
    """Every layer's residual stream at every position, kept for all prompts."""
    trunk, kept = model.get_decoder(), []
    for chunk in batches(prompts, profile.batch_size):
        b = H.tokenize(tok, profile, chunk)
        out = trunk(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                    position_ids=H.position_ids(b["attention_mask"]), use_cache=False, output_hidden_states=True)
        kept.append(out.hidden_states)
    return kept


def run(model, tok, profile, prompts: int = 32, reps: int = 3, log=print):
    texts = bench_prompts(profile, prompts)
    few = texts[:2]
    fns = {"bare": lambda: bare_forward(model, tok, profile, texts),
           "capture": lambda: H.block_inputs(model, tok, profile, texts),
           "whole": lambda: whole_sequences(model, tok, profile, texts)}
    warm = {"bare": lambda: bare_forward(model, tok, profile, few),
            "capture": lambda: H.block_inputs(model, tok, profile, few),
            "whole": lambda: whole_sequences(model, tok, profile, few)}
    log(f"capture: {prompts} prompts, batch {profile.batch_size}, {reps} reps")
    t = compare(fns, reps, warm, log=log)
    overhead = med(t["capture"]) / med(t["bare"]) - 1

    mem = {}
    for name in fns:
        with PeakRSS() as peak:
            kept = fns[name]()
        mem[name] = (peak.delta, tensor_bytes(kept))
        del kept
    n_tokens = sum(H.tokenize(tok, profile, c)["attention_mask"].numel() for c in batches(texts, profile.batch_size))

    rows = [["bare trunk forward (no hooks)", spread(t["bare"]), "1.00", mib(mem["bare"][0]), mib(0)],
            ["**H.block_inputs** (all layers, read position)", spread(t["capture"]),
             f"{med(t['capture']) / med(t['bare']):.3f}", mib(mem["capture"][0]), mib(mem["capture"][1])],
            ["all layers x all positions (run_with_cache-like)", spread(t["whole"]),
             f"{med(t['whole']) / med(t['bare']):.3f}", mib(mem["whole"][0]), mib(mem["whole"][1])]]
    ratio_mem = mem["whole"][1] / max(mem["capture"][1], 1)
    md = (f"{prompts} prompts ({n_tokens} padded tokens), batch {profile.batch_size}, "
          f"{model.config.num_hidden_layers} layers, width {model.config.hidden_size}; time: median (min-max) of "
          f"{reps} after a warm-up; memory: peak RSS above the level before the call (sampled every 2 ms) and "
          f"bytes of the tensors the call returns.\n\n"
          + table(["variant", "time", "x bare", "peak RSS delta", "tensors kept"], rows)
          + f"\n\nCapture overhead {overhead:+.1%} (target <= {TARGET:.0%}: {verdict(overhead <= TARGET)}). "
          f"Keeping whole sequences holds {ratio_mem:,.0f}x the bytes of the read-position capture "
          f"(it grows with sequence length; TransformerLens also caches attention patterns, q/k/v and MLP "
          f"activations, so its real cache is larger still).")
    targets = [("capture hook overhead <= 10 %", f"{overhead:+.1%}", overhead <= TARGET)]
    return md, targets


def main():
    import _util
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default="cpu")
    parser.add_argument("--prompts", type=int)
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    profile = H.load_profile(args.profile)
    model, tok = H.load_model(profile, "base")
    md, _ = run(model, tok, profile, args.prompts or SIZES.get(args.profile, SIZES["cpu"])["prompts"], args.reps)
    print(f"## Activation capture ({profile.name})\n\n{_util.machine()}\n\n{md}")


if __name__ == "__main__":
    main()
