"""The project's ablated generation vs the way peer projects do it (refusal_direction's style):
transformers' `generate` with a forward pre-hook on every decoder block (its input) and a forward
hook on every attention and MLP module (their outputs), each projecting the direction out, one
direction per batch. Same prompts, same greedy tokens, same weights.

Two workloads: one call (batch 16, one direction), and notebook 03's workload for one model: its
units (no ablation + every model's direction) over the profile's eval prompts. The peer style runs
each unit as its own batches of 16; the project runs them as the series does (units.generation_units:
several units per batch, one direction per row, the shared prompt prefix computed once). Timed side
by side in one process, interleaved, medians; tokens compared for equality.

    .venv/bin/python bench/peer.py [--profile cpu] [--reps 3] [--tokens 32] [--n-eval 64]
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import tempfile
from pathlib import Path

import torch

from _util import batches, compare, med, ratio, spread, table
from refusal_lat.activations import activations  # noqa: E402
from refusal_lat.config import load_profile  # noqa: E402
from refusal_lat.data import prompt_sets  # noqa: E402
from refusal_lat.directions import directions  # noqa: E402
from refusal_lat.generation import generate_tokens  # noqa: E402
from refusal_lat.models.load import decoder_layers  # noqa: E402
from refusal_lat.prompts import tokenize  # noqa: E402
from refusal_lat.units import NO_ABLATION, generation_units, transfer_units  # noqa: E402

from refusal_lat.models import pool

PEER_BATCH = 16


def project_out(x, r):
    return x - (x @ r)[..., None] * r


@contextlib.contextmanager
def peer_hooks(model, direction):
    """Pre-hooks on the blocks' inputs, output hooks on attention and MLP, as refusal_direction wires them."""
    r = (direction / direction.norm()).to(next(model.parameters()).dtype)
    handles = []

    def pre(module, args, kwargs):
        if args:
            return (project_out(args[0], r), *args[1:]), kwargs
        kwargs["hidden_states"] = project_out(kwargs["hidden_states"], r)
        return args, kwargs

    def post(module, args, output):
        if isinstance(output, tuple):
            return (project_out(output[0], r), *output[1:])
        return project_out(output, r)

    try:
        for block in decoder_layers(model):
            handles.append(block.register_forward_pre_hook(pre, with_kwargs=True))
            handles.append(block.self_attn.register_forward_hook(post))
            handles.append(block.mlp.register_forward_hook(post))
        yield
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def peer_generate(model, tok, profile, prompts, direction, tokens):
    out = []
    for chunk in batches(prompts, PEER_BATCH):
        b = tokenize(tok, profile, chunk)
        hooks = peer_hooks(model, direction) if direction is not None else contextlib.nullcontext()
        with hooks:
            seq = model.generate(**b, do_sample=False, max_new_tokens=tokens, min_new_tokens=tokens,
                                 pad_token_id=tok.pad_token_id)
        out += seq[:, b["input_ids"].shape[1]:].tolist()
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--profile", default="cpu")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=None)
    ap.add_argument("--n-eval", type=int, default=None, help="eval prompts (default: the profile's)")
    args = ap.parse_args()
    profile = load_profile(args.profile, {"n_eval": args.n_eval} if args.n_eval else None)
    tokens = args.tokens or profile.max_new_tokens
    profile = dataclasses.replace(profile, max_new_tokens=tokens)
    sets = prompt_sets(profile)
    target = profile.roles[0]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        acts = {r: activations(profile, r, sets, tmp) for r in profile.roles}
        dirs = directions(tmp, acts)
        model, tok = pool.use_model(profile, target, profile.gen_dtype)
        r = dirs[target][profile.layer]
        call = sets.eval[:PEER_BATCH]
        one = {"project": lambda: generate_tokens(model, tok, profile, call, r, batch_size=PEER_BATCH).tokens,
               "peer": lambda: peer_generate(model, tok, profile, call, r, tokens)}
        t_call = compare(one, args.reps)
        same_call = one["project"]() == one["peer"]()
        units = [u for u in transfer_units(profile) if u[0] == target]
        runs, outputs = iter(range(10 ** 6)), {}

        def project_workload(prompts=sets.eval):
            rows = generation_units(profile, tmp / f"units{next(runs)}", prompts, dirs, units)
            outputs["project"] = [r["completion"] for u in units for r in rows[u]]

        def peer_workload(prompts=sets.eval):
            out = []
            for _, source, layer in units:
                d = None if source == NO_ABLATION else dirs[source][layer]
                out += tok.batch_decode(peer_generate(model, tok, profile, prompts, d, tokens), skip_special_tokens=True)
            outputs["peer"] = out
        small = {"project": lambda: project_workload(sets.eval[:2]), "peer": lambda: peer_workload(sets.eval[:2])}
        t_work = compare({"project": project_workload, "peer": peer_workload}, max(1, args.reps - 1), warmup=small)
        same_work = sum(a == b for a, b in zip(outputs["project"], outputs["peer"]))
    n_work = len(units) * len(sets.eval)
    print(table(["workload", "project", "peer style", "peer / project"], [
        [f"one call: {PEER_BATCH} prompts x {tokens} tokens, one direction", spread(t_call["project"]),
         spread(t_call["peer"]), f"{ratio(t_call, 'peer', 'project'):.2f}x"],
        [f"notebook 03, model {target}: {len(units)} units x {len(sets.eval)} prompts x {tokens} tokens",
         spread(t_work["project"]), spread(t_work["peer"]), f"{ratio(t_work, 'peer', 'project'):.2f}x"]]))
    print(f"\nweights in {profile.gen_dtype}; same tokens, one call: {same_call}; "
          f"workload completions identical: {same_work}/{n_work}")
    print(f"medians: one call {med(t_call['project']):.2f} vs {med(t_call['peer']):.2f} s; "
          f"workload {med(t_work['project']):.1f} vs {med(t_work['peer']):.1f} s")


if __name__ == "__main__":
    main()
