"""The paper's scale on one CUDA GPU: Llama-2-7B's architecture with random weights (speed does not
depend on the weights), built directly on the device from its config, in bf16 and, where
bitsandbytes works, NF4 4-bit with fp16 compute (the paper's setting). Measures
  - all-layer capture (trunk_forward with capture, read position) of 620 prompts vs the bare trunk;
  - 520 prompts x 64 tokens of ablated greedy generation (greedy_tokens with a direction, KV cache)
    vs the paper's recompute loop (use_cache=False), timed on one batch and extrapolated to 520;
  - the floor: weight bytes read per decode step / measured device copy bandwidth.
Prompts are random token ids with the lengths of the paper's prompts under its template (estimated
from word counts when the datasets are reachable; else a fixed spread of lengths).

    python bench/gpu.py                 # on a CUDA machine: ~5 min, writes the gpu section of BENCHMARKS.md
    python bench/gpu.py --tiny          # CPU dry run of every code path with a tiny config (numbers meaningless)
"""
from __future__ import annotations

import argparse
import gc
import math
import sys
import time

import torch

from _util import compare, machine, med, ratio, set_threads, spread, table, unit_direction, update_section, verdict
from refusal_lat.activations import block_inputs, trunk_forward  # noqa: E402
from refusal_lat.config import REPO, load_profile  # noqa: E402
from refusal_lat.data import DATA_FILES, data_search_dirs, prompt_sets  # noqa: E402
from refusal_lat.generation import greedy_tokens  # noqa: E402
from refusal_lat.models.load import decoder_layers  # noqa: E402

LLAMA2_7B = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=32, vocab_size=32000)
TINY = dict(hidden_size=64, intermediate_size=172, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=4, vocab_size=32000)
TARGET_SECONDS = 10.0  # 520 x 64 ablated at 7B shape; the paper's loop took ~11-12.7 min per run


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def free():
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# --- model ----------------------------------------------------------------------------------------

def build(cfg: dict, dtype, device):
    """Random-weight Llama created on `device` in `dtype` (no host copy of the weights)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    config = LlamaConfig(**cfg, max_position_embeddings=4096, tie_word_embeddings=False,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    return model.eval().requires_grad_(False)


def nf4_problem(device) -> str | None:
    """None if bitsandbytes' NF4 Linear runs on `device`, else why not."""
    try:
        import bitsandbytes as bnb
        layer = bnb.nn.Linear4bit(64, 64, bias=False, compute_dtype=torch.float16, quant_type="nf4").to(device)
        layer(torch.randn(2, 64, device=device, dtype=torch.float16))
        return None
    except Exception as err:  # ImportError, no binary for this CUDA, no CPU backend, ...
        return f"{type(err).__name__}: {str(err).splitlines()[0][:120] if str(err) else ''}"


def quantize_nf4(model):
    """Every Linear in the decoder blocks -> bnb Linear4bit NF4, double quant, fp16 compute (what
    BitsAndBytesConfig(load_in_4bit, nf4, double quant) gives; lm_head stays fp16 as there)."""
    import bitsandbytes as bnb
    for layer in decoder_layers(model):
        for parent in (layer.self_attn, layer.mlp):
            for name, linear in list(parent.named_children()):
                if not isinstance(linear, torch.nn.Linear):
                    continue
                q = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                                      compute_dtype=torch.float16, compress_statistics=True, quant_type="nf4",
                                      device="meta")
                q.weight = bnb.nn.Params4bit(linear.weight.data, requires_grad=False, compress_statistics=True,
                                             quant_type="nf4").to(linear.weight.device)
                if linear.bias is not None:
                    q.bias = linear.bias
                setattr(parent, name, q)
                del linear
        free()
    return model


def weight_bytes(model) -> int:
    """Bytes of weights: parameters and buffers (packed 4-bit where quantised) plus NF4 block scales."""
    total = sum(t.nbytes for t in [*model.parameters(), *model.buffers()])
    for module in model.modules():
        state = getattr(getattr(module, "weight", None), "quant_state", None)
        if state is not None:
            total += state.absmax.nbytes
            if getattr(state, "state2", None) is not None:  # double quantisation: scales of the scales
                total += state.state2.absmax.nbytes
    return total


def copy_bandwidth(device, nbytes: int) -> float:
    """Device memory bandwidth from a large copy (bytes read + bytes written per second), median of 5."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    t = compare({"copy": lambda: dst.copy_(src)}, reps=5, sync=sync, log=lambda *_: None)
    del src, dst
    free()
    return 2 * nbytes / med(t["copy"])


# --- prompts --------------------------------------------------------------------------------------

def prompt_lengths(n_capture: int, n_eval: int) -> tuple[list[int], list[int], str]:
    """Token counts of the paper's prompts under "\\n[INST]{prompt}[/INST]\\n" with BOS, estimated as
    1.3 Llama tokens per word + 10 for BOS and the template."""
    local = all(any((d / DATA_FILES[name].path).is_file() for d in data_search_dirs())
                for name in ("advbench", "alpaca", "gpt4o"))  # never wait on a download here
    texts, how = None, "the datasets are not on this machine: uniform 18-34 tokens (the paper's mean is ~26)"
    if local:
        sets = prompt_sets(load_profile("paper"))
        texts, how = sets.eval + sets.harmful + sets.harmless, "estimated from the paper's prompts (1.3 tokens/word + 10)"
    if texts:
        lengths = [10 + math.ceil(1.3 * len(t.split())) for t in texts]
    else:
        gen = torch.Generator().manual_seed(0)
        lengths = torch.randint(18, 35, (max(n_capture, n_eval),), generator=gen).tolist()
    cycle = lambda n: [lengths[i % len(lengths)] for i in range(n)]  # noqa: E731
    return cycle(n_capture), cycle(n_eval), how


def make_batches(lengths: list[int], size: int, vocab: int, device) -> list[dict]:
    """Left-padded batches of random token ids (pad 0, masked)."""
    gen = torch.Generator().manual_seed(1)
    out = []
    for start in range(0, len(lengths), size):
        chunk = lengths[start:start + size]
        width = max(chunk)
        ids = torch.zeros(len(chunk), width, dtype=torch.long)
        mask = torch.zeros(len(chunk), width, dtype=torch.long)
        for row, n in enumerate(chunk):
            ids[row, width - n:] = torch.randint(3, vocab, (n,), generator=gen)
            mask[row, width - n:] = 1
        out.append({"input_ids": ids.to(device), "attention_mask": mask.to(device)})
    return out


# --- workloads ------------------------------------------------------------------------------------

def trunk_pass(model, batches, capture: bool):
    """trunk_forward (what block_inputs runs per batch) on pre-tokenised batches, with or without capture."""
    chunks = [trunk_forward(model, b["input_ids"], b["attention_mask"], -1, capture) for b in batches]
    return torch.cat(chunks) if capture else None


def generate(model, batches, r, tokens: int, use_cache: bool = True):
    return [greedy_tokens(model, b["input_ids"], b["attention_mask"], tokens, use_cache=use_cache, direction=r)
            for b in batches]


def bench_one(label, model, args, device, bandwidth, log):
    cfg = model.config
    r = unit_direction(cfg.hidden_size)
    cap_len, gen_len, _ = prompt_lengths(args.capture_prompts, args.eval_prompts)
    cap = make_batches(cap_len, args.capture_batch, cfg.vocab_size, device)
    gen = make_batches(gen_len, args.gen_batch, cfg.vocab_size, device)
    one = make_batches(gen_len[:args.recompute_batch], args.recompute_batch, cfg.vocab_size, device)
    warm = make_batches(gen_len[:2], 2, cfg.vocab_size, device)
    n = args.tokens

    log(f"[{label}] capture {args.capture_prompts} prompts")
    tc = compare({"bare": lambda: trunk_pass(model, cap, False), "capture": lambda: trunk_pass(model, cap, True)},
                 args.reps, {"bare": lambda: trunk_pass(model, warm, False),
                             "capture": lambda: trunk_pass(model, warm, True)}, sync=sync, log=log)
    log(f"[{label}] generation {args.eval_prompts} x {n}, batch {args.gen_batch}")
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    tg = compare({"kv": lambda: generate(model, gen, r, n)}, args.reps, {"kv": lambda: generate(model, warm, r, 2)},
                 sync=sync, log=log)
    peak = f"{torch.cuda.max_memory_allocated() / 2**30:.1f} GiB" if device == "cuda" else "-"
    log(f"[{label}] one batch of {args.recompute_batch}: KV vs recompute, {n} tokens")
    tr = compare({"kv": lambda: generate(model, one, r, n), "rec": lambda: generate(model, one, r, n, False)},
                 args.recompute_reps, {"kv": lambda: None, "rec": lambda: generate(model, warm, r, 2, False)},
                 sync=sync, log=log)
    batches_paper = args.eval_prompts / args.recompute_batch
    rec_total = med(tr["rec"]) * batches_paper
    same = all(torch.equal(a, b) for a, b in zip(generate(model, warm, r, 8), generate(model, warm, r, 8, False)))
    read = weight_bytes(model) - model.get_input_embeddings().weight.nbytes  # a step reads all but the embedding
    floor = len(gen) * n * read / bandwidth
    seconds = med(tg["kv"])
    rows = [
        [label, "capture overhead (all layers vs bare trunk)", f"{ratio(tc, 'capture', 'bare') - 1:+.1%}",
         f"{spread(tc['capture'])} vs {spread(tc['bare'])}"],
        [label, f"**{args.eval_prompts} x {n} ablated, KV cache, batch {args.gen_batch}**", f"**{seconds:.1f} s**",
         f"{spread(tg['kv'])}; peak memory {peak}; {verdict(seconds <= TARGET_SECONDS)} (<= {TARGET_SECONDS:.0f} s)"],
        [label, f"floor: {len(gen)} batches x {n} steps x {read / 2**30:.2f} GiB / {bandwidth / 1e9:.0f} GB/s",
         f"{floor:.2f} s", f"KV run = {seconds / floor:.1f}x the floor"],
        [label, f"recompute loop, batch {args.recompute_batch}, x {batches_paper:.1f} batches (extrapolated)",
         f"{rec_total:.0f} s", f"one batch {spread(tr['rec'])}"],
        [label, f"KV vs recompute, same batch of {args.recompute_batch}", f"{ratio(tr, 'rec', 'kv'):.1f}x",
         f"KV one batch {spread(tr['kv'])}; first 8 tokens equal (2 prompts): {'yes' if same else '**NO**'}"],
        [label, f"our {args.eval_prompts} x {n} vs the paper's loop (batch {args.recompute_batch})",
         f"{rec_total / seconds:.0f}x", ""],
    ]
    return rows, (seconds, seconds <= TARGET_SECONDS)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny config on CPU (or the GPU): exercise the code")
    parser.add_argument("--capture-prompts", type=int, help="default 620 (--tiny 64)")
    parser.add_argument("--capture-batch", type=int, default=64)
    parser.add_argument("--eval-prompts", type=int, help="default 520 (--tiny 64)")
    parser.add_argument("--gen-batch", type=int, help="ablated generation batch, default 260: 520 = 2 x 260 (--tiny 32)")
    parser.add_argument("--recompute-batch", type=int, help="default 16, the paper's batch size (--tiny 4)")
    parser.add_argument("--tokens", type=int, help="default 64 (--tiny 16)")
    parser.add_argument("--reps", type=int, help="default 3 (--tiny 1)")
    parser.add_argument("--recompute-reps", type=int, help="default 3 (--tiny 1)")
    parser.add_argument("--no-nf4", action="store_true")
    parser.add_argument("--out", help="markdown file for the gpu section (default BENCHMARKS.md; --tiny: print only)")
    args = parser.parse_args()
    sizes = dict(capture_prompts=(620, 64), eval_prompts=(520, 64), gen_batch=(260, 32), recompute_batch=(16, 4),
                 tokens=(64, 16), reps=(3, 1), recompute_reps=(3, 1))
    for name, (full, tiny) in sizes.items():
        if getattr(args, name) is None:
            setattr(args, name, tiny if args.tiny else full)
    cuda = torch.cuda.is_available()
    if not cuda and not args.tiny:
        print("bench/gpu.py: no CUDA device here; nothing measured (run it on a GPU machine, or --tiny for a CPU dry run)")
        return 0
    device, log = ("cuda" if cuda else "cpu"), (lambda *a: print(*a, flush=True))
    if not cuda:
        set_threads("auto")
    cfg = TINY if args.tiny else LLAMA2_7B
    _, _, how = prompt_lengths(args.capture_prompts, args.eval_prompts)
    started, where = time.time(), machine()
    bandwidth = copy_bandwidth(device, (64 << 20) if args.tiny else (2 << 30))
    log(f"copy bandwidth {bandwidth / 1e9:.0f} GB/s")

    variants = [("bf16", torch.bfloat16, False) if cuda else ("fp32 (CPU dry run)", torch.float32, False)]
    problem = "--no-nf4" if args.no_nf4 else nf4_problem(device)
    if problem is None:
        variants.append(("NF4", torch.float16, True))
    rows, results = [], {}
    for label, dtype, nf4 in variants:
        model = build(cfg, dtype, device)
        if nf4:
            model = quantize_nf4(model)
        log(f"[{label}] built: {weight_bytes(model) / 2**30:.2f} GiB of weights")
        got, results[label] = bench_one(label, model, args, device, bandwidth, log)
        rows += got
        del model
        free()
    shape = "tiny Llama (meaningless numbers)" if args.tiny else "Llama-2-7B shape (4096 x 32 layers, MLP 11008, vocab 32000)"
    body = (f"## GPU: {shape}, random weights\n\n{where}. Wall time {(time.time() - started) / 60:.1f} min. "
            f"Device copy bandwidth {bandwidth / 1e9:.0f} GB/s (read + write). Prompt lengths {how}. "
            f"Median (min-max) of {args.reps} after a warm-up"
            + ("" if problem is None else f"; NF4 not measured: {problem}") + ".\n\n"
            + table(["weights", "measure", "result", "detail"], rows)
            + f"\n\nTarget: {args.eval_prompts} x {args.tokens} ablated in <= 10 s at 7B shape: "
            + ", ".join(f"{k} {v[0]:.1f} s {verdict(v[1])}" for k, v in results.items()) + ".")
    print(body)
    if args.out or not args.tiny:
        out = args.out or REPO / "BENCHMARKS.md"
        update_section(out, "gpu", body)
        print(f"\nwritten to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
