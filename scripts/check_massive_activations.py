"""Is the massive activation in LAT's released Llama-2 rows a property of the LAT model, or of how it was loaded?
(docs/results_llama2.md, "What a GPU run decides").

For each of base, AT and LAT and each loading in VARIANTS -- (a) bfloat16, adapter unmerged; (b) the adapter merged
into NF4 4-bit weights with float16 compute, as the authors loaded it -- this runs the prompts of the released
activations (harmful_test[:100], harmless_test[:100]; the profile's template, for `paper` the authors'
"\\n[INST]{prompt}[/INST]\\n") in batches of 1 and of 2 (left padded, as the authors read them), logs the massive
channels and the norm at every position of the block inputs, and writes to --out:
  positions_<variant>_<role>_b<batch>.npz   channel values [prompts, blocks, tokens, channels] and norms (NaN = padding)
  spikes.csv         last-token mechanism table per variant x batch x block (massive.mechanism_table)
  positions.csv      where the spike sits: first token, last token, anywhere between
  reproduction.csv   cosine of the batch-2 last-token rows with the released rows (Llama-2 only)
  svd.csv            the first two SVD shares at --svd-layer on harmful_train[:n] - harmless_train[:n], with and
                     without the pairs whose last token spikes in any model (union)
  report.md          the verdicts, computed from the tables
Usage (one GPU, the paper's models; Llama-2 is gated: log in to the hub first):
  python scripts/check_massive_activations.py --profile paper
Any profile runs it; `tiny` in seconds (tests/test_massive.py plants a massive channel through an adapter)."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from refusal_lat import massive, released  # noqa: E402
from refusal_lat.activations import block_inputs  # noqa: E402
from refusal_lat.config import DataError, load_profile, run_dir  # noqa: E402
from refusal_lat.data import paper_splits  # noqa: E402
from refusal_lat.hooks import capture_channels  # noqa: E402
from refusal_lat.models import load  # noqa: E402
from refusal_lat.prefix import forward_after_prefix, trunk  # noqa: E402
from refusal_lat.prompts import tokenize  # noqa: E402
from refusal_lat.svd import paired_differences, variance_ratios  # noqa: E402

ROLES = ("base", "AT", "LAT")
VARIANTS = {  # name: (profile overrides, merge the adapter into the weights)
    "bf16_unmerged": ({"quantization": "none", "dtype": "bfloat16"}, False),
    "nf4_merged": ({"quantization": "nf4", "dtype": "float16", "exact_paper_path": True}, True),  # the authors' path
}
KS = (2.0, 5.0, 10.0)  # multiples of the base model's largest last-token |x| on the channels


@torch.no_grad()
def trace(model, tokenizer, profile, prompts: list[str], batch_size: int, channels, blocks) -> dict:
    """Per prompt and block in `blocks`: the input's values on `channels` and its norm at every real position
    (NaN-padded to the longest prompt) and the last position's vector; left-padded batches of `batch_size`."""
    device = next(model.parameters()).device
    values, norms, last = [], [], []
    for start in range(0, len(prompts), batch_size):
        batch = tokenize(tokenizer, profile, prompts[start:start + batch_size], device)
        with capture_channels(model, channels, blocks) as got:
            forward_after_prefix(trunk(model), batch["input_ids"], batch["attention_mask"], None)
        for row, n in enumerate(batch["attention_mask"].sum(1).tolist()):
            values.append(torch.stack([got[b][0][0][row, -n:] for b in blocks]).numpy())  # [blocks, n, C]
            norms.append(torch.stack([got[b][0][1][row, -n:] for b in blocks]).numpy())   # [blocks, n]
            last.append(torch.stack([got[b][0][2][row] for b in blocks]).numpy())  # [blocks, d], float32
    width = max(v.shape[1] for v in values)
    pad = lambda a, tail: np.concatenate([a, np.full((a.shape[0], width - a.shape[1], *tail), np.nan)], axis=1)
    return {"values": np.stack([pad(v, (len(channels),)) for v in values]),
            "norms": np.stack([pad(n, ()) for n in norms]), "last": np.stack(last)}


def position_table(traces: dict, blocks, channels) -> "pd.DataFrame":
    """Where the spike sits, per variant x batch x role x block: the median peak |x| on the channels at the
    first real token and at the last token, and the largest anywhere between."""
    import pandas as pd
    rows = []
    for (variant, batch, role), sets in traces.items():
        first, final, between = [], [], []  # [prompts, blocks] each
        for t in sets.values():
            peak = np.abs(t["values"]).max(-1)  # [n, blocks, T], NaN past a prompt's length
            for p in peak:
                n = int((~np.isnan(p[0])).sum())
                first.append(p[:, 0])
                final.append(p[:, n - 1])
                between.append(p[:, 1:n - 1].max(1) if n > 2 else np.full(len(p), np.nan))
        first, final, between = np.array(first), np.array(final), np.array(between)
        for j, block in enumerate(blocks):
            rows.append({"variant": variant, "batch": batch, "role": role, "block": block,
                         "first_token_median": float(np.median(first[:, j])),
                         "last_token_median": float(np.median(final[:, j])), "last_token_max": float(final[:, j].max()),
                         "between_max": float(np.nanmax(between[:, j])) if np.isfinite(between[:, j]).any() else np.nan})
    return pd.DataFrame(rows)


def spike_table(traces: dict, blocks, channels, ks=KS) -> "pd.DataFrame":
    """massive.mechanism_table on the last-token rows, per variant x batch (reference: base in the same loading)."""
    import pandas as pd
    out = []
    for variant, batch in dict.fromkeys((v, b) for v, b, _ in traces):
        acts = {(role, block): (sets["harmful"]["last"][:, j], sets["harmless"]["last"][:, j])
                for (v, b, role), sets in traces.items() if (v, b) == (variant, batch) for j, block in enumerate(blocks)}
        out.append(massive.mechanism_table(acts, channels, "base", ks).assign(variant=variant, batch=batch))
    return pd.concat(out, ignore_index=True)


def reproduction_table(traces: dict, blocks, released_rows: dict, channels, threshold: float = 10.0) -> "pd.DataFrame":
    """Cosine of each batch-2 last-token row with the released row of the same role, set and layer, and whether
    both flag the same rows (peak on `channels` > threshold). released_rows: {(role, layer): (harmful, harmless)}."""
    import pandas as pd
    rows = []
    for (variant, batch, role), sets in traces.items():
        for j, block in enumerate(blocks):
            if batch != 2 or (role, block) not in released_rows:
                continue
            for kind, ref in zip(("harmful", "harmless"), released_rows[(role, block)]):
                ours = massive.as_rows(sets[kind]["last"][:, j])
                ref = massive.as_rows(ref)[:len(ours)]
                cos = (ours * ref).sum(1) / (np.linalg.norm(ours, axis=1) * np.linalg.norm(ref, axis=1))
                a, b = massive.row_peaks(ours, channels) > threshold, massive.row_peaks(ref, channels) > threshold
                rows.append({"variant": variant, "role": role, "block": block, "set": kind, "rows": len(ours),
                             "cos_median": float(np.median(cos)), "cos_min": float(cos.min()),
                             "flagged_ours": int(a.sum()), "flagged_released": int(b.sum()), "flag_agree": int((a == b).sum())})
    return pd.DataFrame(rows)


def svd_table(direction_rows: dict, layer: int, channels, factor: float = 2.0) -> "pd.DataFrame":
    """First two uncentered shares at `layer` per variant x role, with all pairs and without the pairs whose
    last token peaks above factor x the base model's largest |x| on `channels` in any model (the union mask).
    direction_rows: {(variant, role): (harmful, harmless)} [n, d] at that layer."""
    import pandas as pd
    rows = []
    for variant in dict.fromkeys(v for v, _ in direction_rows):
        pairs = {r: p for (v, r), p in direction_rows.items() if v == variant}
        cut = factor * massive.row_peaks(massive.pooled(pairs["base"]), channels).max()
        drop = massive.flag_pairs(pairs, cut, channels)
        for role, (h, hl) in pairs.items():
            d = paired_differences(h, hl)
            full = variance_ratios(d, 2)
            kept = variance_ratios(d[~drop], 2) if (~drop).sum() >= 2 else np.full(2, np.nan)
            rows.append({"variant": variant, "role": role, "layer": layer, "pairs": len(d), "dropped": int(drop.sum()),
                         "threshold": cut, "c1": full[0], "c2": full[1], "c1_without": kept[0], "c2_without": kept[1]})
    return pd.DataFrame(rows)


def verdicts(spikes, block: int, k: float = KS[-1], role: str = "LAT") -> list[str]:
    """Sentences from the spike table at `block`: is the spike in `role`'s last token under each loading and
    batching, and so a model property (present in bfloat16 with the adapter unmerged) or an artifact of NF4?"""
    at = spikes[(spikes.layer == block) & (spikes.model == role)]
    col = f"above_{k:g}x"
    count = {(r["variant"], r["batch"]): int(r[col]) for _, r in at.iterrows()}
    lines = [f"block {block}, {role}: prompts whose last-token peak exceeds {k:g} x base's largest -- " +
             ", ".join(f"{v} batch {b}: {n} of {int(at[(at.variant == v) & (at.batch == b)].n_prompts.iloc[0])}"
                       for (v, b), n in count.items())]
    bf16 = max((n for (v, _), n in count.items() if v == "bf16_unmerged"), default=None)
    nf4 = max((n for (v, _), n in count.items() if v == "nf4_merged"), default=None)
    if bf16:
        lines.append(f"{role}'s spike is a property of the model: it is there in bfloat16 with the adapter unmerged.")
    elif nf4:
        lines.append(f"{role}'s spike is a quantisation artifact: only the NF4-merged model has it.")
    else:
        lines.append(f"{role}'s last token carries no spike under these loadings: the released rows are not reproduced.")
    batches = {b for _, b in count}
    if len(batches) > 1:
        same = all(len({n for (v, b), n in count.items() if v == variant}) == 1 for variant in {v for v, _ in count})
        lines.append("batch 1 and batch 2 give the same counts" if same else "batch 1 and batch 2 differ: padding matters")
    return lines


def run(profile_name: str = "paper", overrides: dict | None = None, out: str | Path | None = None,
        channels=released.MASSIVE_CHANNELS, blocks=None, n_prompts: int = 100, n_direction: int = 100,
        svd_layer: int | None = None, variants=tuple(VARIANTS), batches=(1, 2), report_block: int | None = None) -> dict:
    """The whole check for one profile; returns the tables (also written to `out`)."""
    base_profile = load_profile(profile_name, overrides)
    out = Path(out) if out else run_dir(base_profile) / "massive_check"
    out.mkdir(parents=True, exist_ok=True)
    splits = paper_splits()
    prompts = {"harmful": splits["harmful_test"][:n_prompts], "harmless": splits["harmless_test"][:n_prompts]}
    direction = {"harmful": splits["harmful_train"][:n_direction], "harmless": splits["harmless_train"][:n_direction]}
    roles = [r for r in ROLES if r in base_profile.roles]
    svd_layer = base_profile.layer if svd_layer is None else svd_layer
    traces, direction_rows = {}, {}
    for variant in variants:
        changes, merge = VARIANTS[variant]
        profile = load_profile(profile_name, {**(overrides or {}), **changes})
        for role in roles:
            model, tokenizer = load.load_model(profile, role, merge=merge)
            n_blocks = len(load.decoder_layers(model))
            blocks = list(blocks or range(1, min(21, n_blocks)))
            for batch in batches:
                traces[(variant, batch, role)] = {kind: trace(model, tokenizer, profile, p, batch, channels, blocks)
                                                  for kind, p in prompts.items()}
                np.savez_compressed(out / f"positions_{variant}_{role}_b{batch}.npz", blocks=np.array(blocks),
                                    channels=np.array(channels),
                                    **{f"{kind}_{name}": t[name] for kind, t in traces[(variant, batch, role)].items()
                                       for name in ("values", "norms")})
            direction_rows[(variant, role)] = tuple(
                block_inputs(model, tokenizer, profile, p, desc=f"{variant}/{role}/{kind}", batch_size=2)[:, svd_layer].double().numpy()
                for kind, p in direction.items())
            del model
            load.free_memory()
    if report_block is None:
        report_block = svd_layer if svd_layer in blocks else blocks[len(blocks) // 2]
    tables = {"spikes": spike_table(traces, blocks, channels), "positions": position_table(traces, blocks, channels),
              "svd": svd_table(direction_rows, svd_layer, channels)}
    try:  # the released rows exist for Llama-2-7b (d = 4096) only
        width = next(iter(traces.values()))["harmful"]["last"].shape[-1]
        rows = released.released_activations(roles, [b for b in blocks if b in released.RELEASED_LAYERS]) if width == 4096 else {}
    except DataError as err:
        print(f"released rows not available ({err}); no reproduction table")
        rows = {}
    tables["reproduction"] = reproduction_table(traces, blocks, rows, channels)
    for name, table in tables.items():
        table.to_csv(out / f"{name}.csv", index=False)
    lines = verdicts(tables["spikes"], report_block)
    if not tables["reproduction"].empty:
        rep = tables["reproduction"]
        lines += [f"released rows, {v} {r}: median cosine {g.cos_median.median():.4f} (lowest row {g.cos_min.min():.4f}); "
                  f"spike flags agree on {g.flag_agree.sum()} of {g.rows.sum()} rows"
                  for (v, r), g in rep.groupby(["variant", "role"], sort=False)]
    for r in tables["svd"].itertuples(index=False):
        without = (f"{100 * r.c1_without:.2f}/{100 * r.c2_without:.2f} % without the {r.dropped} spike pairs"
                   if r.pairs - r.dropped >= 2 else f"{r.dropped} of {r.pairs} pairs spike, too few left without them")
        lines.append(f"layer {r.layer} SVD, {r.variant} {r.role}: c1/c2 {100 * r.c1:.2f}/{100 * r.c2:.2f} % with all "
                     f"{r.pairs} pairs; {without}")
    (out / "report.md").write_text("\n".join(f"- {line}" for line in lines) + "\n")
    print("\n".join(lines))
    return {**tables, "verdicts": lines, "out": out}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default="paper")
    parser.add_argument("--overrides", default=None, help="profile keys to change, as JSON")
    parser.add_argument("--out", default=None, help="default: runs/<profile>/massive_check")
    parser.add_argument("--channels", type=int, nargs="+", default=list(released.MASSIVE_CHANNELS))
    parser.add_argument("--blocks", type=int, nargs="+", default=None, help="default: 1-20 (or every block but 0)")
    parser.add_argument("--n-prompts", type=int, default=100)
    parser.add_argument("--n-direction", type=int, default=100)
    parser.add_argument("--svd-layer", type=int, default=None, help="default: the profile's layer (paper: 14)")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    args = parser.parse_args()
    run(args.profile, json.loads(args.overrides) if args.overrides else None, args.out, tuple(args.channels),
        args.blocks, args.n_prompts, args.n_direction, args.svd_layer, tuple(args.variants))


if __name__ == "__main__":
    main()
