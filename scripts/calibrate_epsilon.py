"""Calibrate the training radius of each attacked arm (issue 23): the per-token L2 radius, as a fraction
of the block's median token norm, at which the evaluation attack (training/robustness.py) flips about
half of the base model's refusals on held-out harmful prompts. Writes <adapters>/calibration.csv and
prints the fractions to put in configs/<profile>.yaml (`epsilon_at`, `epsilon`).

    python scripts/calibrate_epsilon.py --profile cpu --fractions 0.125 0.25 0.5 1
    python scripts/calibrate_epsilon.py --profile cpu --fractions 0.005 0.01 0.02 0.04 0.08 --append
"""
import argparse
import copy
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default="cpu")
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.125, 0.25, 0.5, 1.0])
    parser.add_argument("--steps", type=int, default=6, help="PGD steps of the evaluation attack")
    parser.add_argument("--tokens", type=int, default=32, help="greedy tokens judged per completion")
    parser.add_argument("--out", help="CSV path (default: <adapters>/calibration.csv)")
    parser.add_argument("--append", action="store_true", help="keep the rows already in --out (other fractions)")
    parser.add_argument("--publish", action="store_true", help="replace a committed --out (the default, under adapters/)")
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))
    import pandas as pd
    import helpers as H
    import training as T
    from refusal_lat.config import DTYPES
    from refusal_lat.training.data import training_examples
    from refusal_lat.training.pgd import residual_norms
    from refusal_lat.training.data import calibration_prompts
    from refusal_lat.training.robustness import calibrate_epsilon, pick_fraction
    from refusal_lat.record import check_writable
    try:
        profile = H.load_profile(args.profile)
        rec = T.recipe(profile)
        out = Path(args.out) if args.out else T.adapter_root(rec) / "calibration.csv"
        check_writable(out.parent, args.publish, "scripts/calibrate_epsilon.py")
    except H.ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    model, tokenizer = H.load_model(profile, "base")
    examples, _ = training_examples(profile, rec, model, tokenizer)
    layers = sorted({0, rec.lat_layer})
    norms = residual_norms(model, examples, layers, tokenizer.pad_token_id)
    if profile.gen_dtype != profile.dtype:
        model = copy.deepcopy(model).to(DTYPES[profile.gen_dtype])
    prompts = calibration_prompts(args.prompts)
    rows = []
    for layer in layers:
        started = time.time()
        rows += calibrate_epsilon(model, tokenizer, profile, prompts, layer, norms[layer]["token_norm"],
                                  args.fractions, args.steps, args.tokens)
        print(f"block {layer}: {time.time() - started:.0f} s", flush=True)
    table = pd.DataFrame(rows)
    table["token_norm"] = table["layer"].map({k: v["token_norm"] for k, v in norms.items()})
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.append and out.is_file():
        table = pd.concat([pd.read_csv(out), table]).drop_duplicates(["layer", "fraction"], keep="last")
    table = table.sort_values(["layer", "fraction"]).reset_index(drop=True)
    rows = table.to_dict("records")
    table.to_csv(out, index=False)
    print(table.to_string(index=False))
    for layer in layers:
        pick = pick_fraction([r for r in rows if r["layer"] == layer])
        key = "epsilon_at" if layer == 0 else "epsilon"
        print(f"{key}: {pick:.3g}   # block {layer}: flips ~half of the base model's refusals")
    return 0


if __name__ == "__main__":
    sys.exit(main())
