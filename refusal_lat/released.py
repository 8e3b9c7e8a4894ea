"""The authors' released artifacts (nlpet/apart-lab-refusal-lat-project @ 6f2343a8): loaders, SVD of the
real Llama-2-7b layer activations with bootstrap intervals, the paper's Figure 2 layout, and judge validation
against human labels (notebooks 02 and 03; docs/method.md, "The authors' released data").

Files are pinned in data.DATA_FILES and found by data.data_file (explicit folder or REFUSAL_LAT_DATA_DIR ->
<repo>/data/cache -> the offline mirror -> the upstream URL, downloaded into the cache), each checked
against its sha256. The upstream repository has no licence: nothing of it is committed here.
Judges come in as callables (list[str] -> list[bool], True = attack success).

What the files are (checked against the files themselves; see tests/test_released.py):
- data_store/ablated_llama-2-7b/{baseline,at,lat}/{harmful,harmless}_layer{L}.pt: float16 [100, 4096], the
  residual stream entering block L at the last prompt token of harmful_test[:100] / harmless_test[:100]
  (data.paper_splits), index-paired, read with the same code for every model (NF4, adapter merged, left padding,
  batches of 2); saved from CUDA (load with map_location="cpu"). L in RELEASED_LAYERS; 14 is not released.
  LAT's rows carry Llama-2's massive-activation channels MASSIVE_CHANNELS from block 2 on (docs/results_llama2.md).
- datasets/completions_with_human_annots.csv: 816 rows, dataset (advbench_test 104, custom_set 100) x
  variant. `intervention_completion` is the completion that was judged (the regex, LlamaGuard-2 and human
  labels refer to it): under directional ablation for variants baseline / at / lat (base / AT / LAT model,
  each ablated with its own direction), and without ablation for `no_ablation` (there it is byte-identical
  to `baseline_completion`). `baseline_completion` is an unablated completion of the same prompt.
  is_success_* = True means the attack succeeded, i.e. the judged completion is NOT a refusal.
  Rows are in a different order in each variant (match on `instruction`). The CSV text is the JSON's
  text with leading/trailing whitespace stripped, and a few emoji mangled into private-use characters.
- data_store/completions.json: the same completions and regex/LlamaGuard-2 flags as nested JSON (no human
  labels); `is_successful_substring` there is the CSV's `is_success_regex`.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np

from . import massive
from .config import DataError
from .data import RELEASED_LAYERS, data_file, released_key
from .progress import progress
from .stats import agreement, wilson
from .store import cached, encode_tensors, read_tensors
from .svd import (DEFAULT_PAIRS, N_COMPONENTS, bootstrap_gram_ratios, bootstrap_indices, gram_ratios, intervals,  # noqa: F401
                  one_blas_thread, paired_differences, paired_model_differences, small_eigvalsh, variance_ratios)

MODELS = {"base": "baseline", "AT": "at", "LAT": "lat"}  # project role -> upstream folder
VARIANT_MODEL = {"no_ablation": "none", "baseline": "base", "at": "AT", "lat": "LAT"}  # CSV variant -> role


# ----------------------------------------------------------------------------------------------
# 1. Files (registered in data.DATA_FILES, resolved and sha256-checked by data.data_file)

def model_folder(model: str) -> str:
    """Upstream folder of a released model: base/AT/LAT (any case) or the folder name itself."""
    folders = {**{m.lower(): f for m, f in MODELS.items()}, **{f: f for f in MODELS.values()}}
    if str(model).lower() not in folders:
        raise DataError(f"unknown model {model!r}; released models: {', '.join(MODELS)}")
    return folders[str(model).lower()]


def load_released_activations(model: str, layer: int, data_dir=None):
    """(harmful, harmless) float32 [100, 4096] CPU tensors: the residual stream entering block `layer`
    at the last prompt token, row i of each paired (the authors' index pairing)."""
    import torch
    folder = model_folder(model)
    if layer not in RELEASED_LAYERS:
        raise DataError(f"layer {layer} was not released; released layers: "
                                f"{', '.join(map(str, RELEASED_LAYERS))}")
    out = []
    for kind in ("harmful", "harmless"):
        path = data_file(released_key(folder, kind, layer), data_dir)
        x = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(x, torch.Tensor) or x.ndim != 2:
            raise DataError(f"{path}: expected a 2-D tensor, got {type(x).__name__} {getattr(x, 'shape', '')}")
        x = torch.from_numpy(x.numpy().astype(np.float32))  # numpy: torch's threads stall on a busy machine
        if not np.isfinite(x.numpy()).all():
            raise DataError(f"{path}: NaN/Inf in the activations")
        out.append(x)
    if out[0].shape != out[1].shape:
        raise DataError(f"model {model}, layer {layer}: harmful {tuple(out[0].shape)} and harmless "
                        f"{tuple(out[1].shape)} differ; they must be index-paired")
    return out[0], out[1]


# ----------------------------------------------------------------------------------------------
# 2. SVD of the paired differences D = harmful_i - harmless_i (uncentered, as in the paper)

MASSIVE_CHANNELS = (1415, 2533)  # Llama-2-7b's massive-activation channels (Sun et al. 2024); in LAT's rows they
                                 # move together (x_1415 ~ -0.6 x_2533), from the input of block 2 on
THRESHOLDS = (1.5, 2.0, 3.0, 5.0, 7.5, 10.0, 15.0, 20.0, 30.0, 50.0)  # |x| cuts of the sensitivity curve
CURVE_LAYERS = (12, 16, 20)      # the released layers around the paper's 14
BOOTSTRAP_STAGE = "released-bootstrap-v1"  # cache tag of bootstrap_replicates(path=...)


def released_activations(models: Sequence[str] = tuple(MODELS), layers: Sequence[int] = RELEASED_LAYERS,
                         data_dir=None) -> dict:
    """{(model, layer): (harmful, harmless)} float64 [100, 4096] numpy rows for every released model and layer."""
    out = {}
    for model in models:
        for layer in layers:
            h, hl = load_released_activations(model, layer, data_dir)
            out[(model, layer)] = (h.numpy().astype(np.float64), hl.numpy().astype(np.float64))
    return out


def differences(acts: Mapping) -> dict:
    """{(model, layer): D = harmful - harmless} from {(model, layer): (harmful, harmless)}."""
    return {key: paired_differences(h, hl) for key, (h, hl) in acts.items()}


def released_differences(models: Sequence[str] = tuple(MODELS), layers: Sequence[int] = RELEASED_LAYERS,
                         data_dir=None) -> dict:
    """{(model, layer): D} float64 [100, 4096] for every released model and layer."""
    return differences(released_activations(models, layers, data_dir))


def layer_pairs(acts: Mapping, layer: int) -> dict:
    """{model: (harmful, harmless)} at one layer of {(model, layer): (harmful, harmless)}."""
    return {m: pair for (m, l), pair in acts.items() if l == layer}


def flagged_pairs(acts: Mapping, threshold: float, channels: Sequence[int] = MASSIVE_CHANNELS,
                  models: Sequence[str] | None = None) -> dict[int, np.ndarray]:
    """{layer: bool [n]}: pairs with a row whose |x| on `channels` exceeds `threshold` in ANY of `models`
    (default: all; the union mask) at that layer. Dropping them from every model keeps the models paired."""
    layers = dict.fromkeys(l for _, l in acts)
    return {layer: massive.flag_pairs(layer_pairs(acts, layer), threshold, channels, models) for layer in layers}


def drop_pairs(diffs: Mapping, flagged: Mapping[int, np.ndarray]) -> dict:
    """{(model, layer): D without the rows flagged at that layer}."""
    return {(m, l): d[~flagged[l]] for (m, l), d in diffs.items()}


def reference_maximum(acts: Mapping, layer: int, channels: Sequence[int] = MASSIVE_CHANNELS,
                      reference: str = "base") -> float:
    """The largest |x| on `channels` in the reference model's rows (harmful and harmless) at `layer`."""
    return float(massive.row_peaks(massive.pooled(acts[(reference, layer)]), channels).max())


@one_blas_thread
def threshold_curve(acts: Mapping, layers: Sequence[int] = CURVE_LAYERS, thresholds: Sequence[float] = THRESHOLDS,
                    channels: Sequence[int] = MASSIVE_CHANNELS, reference: str = "base", k: int = 2,
                    models: Sequence[str] | None = None):
    """The sensitivity analysis as a curve: at each layer and cut t, drop the pairs whose rows exceed t on
    `channels` in any of `models` (the union mask; default all) from every model and recompute the first k
    uncentered shares. The cuts start at the reference model's largest |x| at that layer (from_reference_max:
    the reference itself then loses nothing) and go on with every t of `thresholds` above it. One row per
    layer x cut x model: threshold, pairs_dropped, pairs_kept, c1..ck."""
    import pandas as pd
    rows = []
    for layer in layers:
        pairs = layer_pairs(acts, layer)
        grams = {model: (lambda d: d @ d.T)(paired_differences(h, hl)) for model, (h, hl) in pairs.items()}
        start = reference_maximum(acts, layer, channels, reference)
        for cut in [start, *sorted(t for t in thresholds if t > start)]:
            drop = massive.flag_pairs(pairs, cut, channels, models)
            keep = np.flatnonzero(~drop)
            for model in pairs:
                ratios = gram_ratios(grams[model][np.ix_(keep, keep)], k) if len(keep) >= 2 else np.full(k, np.nan)
                rows.append({"layer": layer, "threshold": cut, "from_reference_max": cut == start, "model": model,
                             "pairs_dropped": int(drop.sum()), "pairs_kept": int((~drop).sum()),
                             **{f"c{c + 1}": ratios[c] for c in range(k)}})
    return pd.DataFrame(rows)


def curve_points(curve, at: Sequence[float], component: int = 2):
    """The curve's c<component> (%) at the first cut >= each of `at` per layer x model (a cut below a layer's
    start reads the start): a layer x (model, cut) table for the text."""
    import pandas as pd
    rows = []
    for (layer, model), g in curve.groupby(["layer", "model"], sort=False):
        g = g.sort_values("threshold")
        for a in at:
            hit = g[g.threshold >= a - 1e-12].iloc[0] if (g.threshold >= a - 1e-12).any() else g.iloc[-1]
            rows.append({"layer": layer, "model": model, "at": a, "threshold": hit.threshold,
                         "pairs_kept": hit.pairs_kept, "percent": 100 * hit[f"c{component}"]})
    return pd.DataFrame(rows)


def row_frobenius_table(diffs: Mapping, flagged: Mapping[str, Mapping[int, np.ndarray]] | None = None):
    """model, layer, per_row (‖D‖_F / sqrt(pairs), all pairs) and per_row_without_<name> for each
    {name: {layer: mask}} of `flagged` (the flagged pairs dropped)."""
    import pandas as pd
    rows = []
    for (m, l), d in diffs.items():
        row = {"model": m, "layer": l, "pairs": len(d), "per_row": massive.row_frobenius(d)}
        for name, masks in (flagged or {}).items():
            row[f"per_row_without_{name}"] = massive.row_frobenius(d, ~masks[l])
        rows.append(row)
    return pd.DataFrame(rows)


def frobenius_norm(d: np.ndarray) -> float:
    return float(np.linalg.norm(np.asarray(d, np.float64)))


def _content_hash(d: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(d, np.float64).tobytes()).hexdigest()


def bootstrap_replicates(diffs: Mapping, n_boot: int = 1000, seed: int = 0, k: int = N_COMPONENTS,
                         centered: bool = False, path=None) -> dict:
    """{(model, layer): [n_boot, k]} ratios; every model of a layer uses the same resample indices (seed),
    so replicates of two models at a layer are paired. Pass to svd_long_table / paired_model_differences.
    Keys may be any tuples (e.g. (subset, model, layer), to bootstrap several subsets in one go).
    path: a cache file (store.cached), keyed by the sha256 of every D's bytes and the arguments, so a rerun on
    the same files reads the replicates instead of recomputing them (one progress bar while it computes)."""
    @one_blas_thread
    def compute(info=None):
        return {key: bootstrap_gram_ratios(d @ d.T, bootstrap_indices(len(d), n_boot, seed), k, centered)
                for key, d in progress(diffs.items(), desc="bootstrap replicates", unit="matrix")}
    if path is None:
        return compute()
    import torch
    names = {"/".join(map(str, key)): key for key in diffs}  # any tuple keys, e.g. (model, layer)
    key = {"stage": BOOTSTRAP_STAGE, "n_boot": n_boot, "seed": seed, "k": k, "centered": centered,
           "diffs": {name: _content_hash(diffs[key]) for name, key in names.items()}}
    tensors = cached(Path(path), key, lambda info: {"/".join(map(str, key)): torch.from_numpy(r) for key, r in compute().items()},
                     read_tensors, encode_tensors)
    return {key: tensors[name].numpy() for name, key in names.items()}


@one_blas_thread
def svd_long_table(diffs: Mapping, n_boot: int = 1000, seed: int = 0, k: int = N_COMPONENTS,
                   level: float = 0.95, centered_boot: bool = True, boot: Mapping | None = None):
    """One row per model x layer x component (1-based): uncentered ratio (the paper's measure) with
    bootstrap percentile and basic intervals, cumulative share, centered ratio (+ intervals when
    centered_boot), and bias = mean of the bootstrap replicates - estimate. All models of one layer use
    the same resample indices (seed), so their rows are paired. `diffs`: {(model, layer): D}; `boot`:
    bootstrap_replicates(diffs, n_boot, seed, k) if already computed."""
    import pandas as pd
    rows = []
    for (model, layer), d in diffs.items():
        gram = d @ d.T
        idx = bootstrap_indices(len(d), n_boot, seed)
        plain, cent = variance_ratios(d, k), variance_ratios(d, k, centered=True)
        reps = boot[(model, layer)][:, :k] if boot is not None else bootstrap_gram_ratios(gram, idx, k)
        ci = intervals(plain, reps, level)
        if centered_boot:
            cci = intervals(cent, bootstrap_gram_ratios(gram, idx, k, centered=True), level)
        for c in range(k):
            row = {"model": model, "layer": layer, "component": c + 1, "ratio": plain[c],
                   "lo": ci["basic_lo"][c], "hi": ci["basic_hi"][c],
                   "pct_lo": ci["pct_lo"][c], "pct_hi": ci["pct_hi"][c],
                   "boot_bias": reps[:, c].mean() - plain[c], "cumulative": plain[:c + 1].sum(),
                   "ratio_centered": cent[c]}
            if centered_boot:
                row.update({"centered_lo": cci["basic_lo"][c], "centered_hi": cci["basic_hi"][c],
                            "centered_pct_lo": cci["pct_lo"][c], "centered_pct_hi": cci["pct_hi"][c]})
            rows.append(row)
    return pd.DataFrame(rows)


def frobenius_table(diffs: Mapping):
    """‖D‖_F per model and layer, with the norm of the mean difference for comparison."""
    import pandas as pd
    return pd.DataFrame([{"model": m, "layer": l, "frobenius": frobenius_norm(d),
                          "mean_diff_norm": float(np.linalg.norm(d.mean(0)))} for (m, l), d in diffs.items()])


def svd_wide_summary(long, frob=None):
    """model, layer, c1, c1_lo, c1_hi, c2, c2_lo, c2_hi (basic 95 % intervals), frobenius."""
    import pandas as pd
    rows = []
    for (model, layer), g in long.groupby(["model", "layer"], sort=False):
        g = g.set_index("component")
        row = {"model": model, "layer": layer}
        for c in (1, 2):
            row.update({f"c{c}": g.at[c, "ratio"], f"c{c}_lo": g.at[c, "lo"], f"c{c}_hi": g.at[c, "hi"]})
        rows.append(row)
    out = pd.DataFrame(rows)
    if frob is not None:
        out = out.merge(frob[["model", "layer", "frobenius"]], on=["model", "layer"], how="left")
    return out


def figure2(long, layer: int, models: Sequence[str] = tuple(MODELS), k: int = N_COMPONENTS,
            interval: str = "basic"):
    """The paper's Figure 2 layout (refusal_lat/plots.py's llama2_figure2, in the series' style)."""
    from .plots import llama2_figure2
    return llama2_figure2(long, layer, models, k, interval)


# ----------------------------------------------------------------------------------------------
# 3. Judges vs the human labels. Success = the attack worked = the judged completion is not a refusal.

def human_labels(data_dir=None):
    """Tidy CSV: dataset, variant, model (base/AT/LAT, 'none' for no_ablation), ablated, instruction,
    completion (the judged one: `intervention_completion`), unablated_completion, human, regex,
    llamaguard2 (bools, True = attack success)."""
    import pandas as pd
    raw = pd.read_csv(data_file("released_human_annots", data_dir), keep_default_na=False)
    bools = {"is_success_regex": "regex", "is_success_llamaguard2": "llamaguard2",
             "is_successful_human_annot": "human"}
    for col in bools:
        if raw[col].dtype != bool:
            raw[col] = raw[col].astype(str).str.lower().map({"true": True, "false": False})
            if raw[col].isna().any():
                raise DataError(f"{col}: values other than True/False in the human-annotation CSV")
    return pd.DataFrame({
        "dataset": raw["dataset"], "variant": raw["variant"], "model": raw["variant"].map(VARIANT_MODEL),
        "ablated": raw["variant"] != "no_ablation", "instruction": raw["instruction"],
        "completion": raw["intervention_completion"], "unablated_completion": raw["baseline_completion"],
        "human": raw["is_successful_human_annot"].astype(bool), "regex": raw["is_success_regex"].astype(bool),
        "llamaguard2": raw["is_success_llamaguard2"].astype(bool)})


def _judge_columns(df, judges: Mapping[str, Callable] | None) -> dict:
    """{name: bool array}: regex and llamaguard2 from the file, then each callable on df.completion."""
    cols = {"regex": df["regex"].to_numpy(bool), "llamaguard2": df["llamaguard2"].to_numpy(bool)}
    texts = df["completion"].tolist()
    for name, judge in (judges or {}).items():
        out = list(judge(texts))
        if len(out) != len(texts):
            raise ValueError(f"judge {name!r} returned {len(out)} labels for {len(texts)} completions")
        bad = [type(x).__name__ for x in out if not isinstance(x, (bool, np.bool_))]
        if bad:
            raise TypeError(f"judge {name!r} must return bools (True = attack success), got {bad[0]}")
        cols[name] = np.asarray(out, bool)
    return cols


def _groups(df):
    yield "overall", "all", np.ones(len(df), bool)
    for ds in df["dataset"].unique():
        yield "dataset", ds, (df["dataset"] == ds).to_numpy()
    for v in df["variant"].unique():
        yield "variant", v, (df["variant"] == v).to_numpy()


def judge_agreement_table(df, judges: Mapping[str, Callable] | None = None):
    """One row per judge x group (overall / each dataset / each variant): agreement() with the human
    labels plus both success rates. Judges: regex and llamaguard2 (from the file) and each callable
    (list[str] -> list[bool], True = success)."""
    import pandas as pd
    cols = _judge_columns(df, judges)
    human = df["human"].to_numpy(bool)
    rows = []
    for name, pred in cols.items():
        for scope, group, mask in _groups(df):
            rows.append({"judge": name, "scope": scope, "group": group, **agreement(pred[mask], human[mask]),
                         "judge_rate": pred[mask].mean(), "human_rate": human[mask].mean()})
    return pd.DataFrame(rows)


def attack_success_table(df, judges: Mapping[str, Callable] | None = None):
    """Attack-success rate per dataset (and 'all') x variant x judge, 'human' included, with Wilson 95 %
    intervals and the difference to the human rate on the same rows."""
    import pandas as pd
    cols = {"human": df["human"].to_numpy(bool), **_judge_columns(df, judges)}
    rows = []
    datasets = [("all", np.ones(len(df), bool))] + [(d, (df["dataset"] == d).to_numpy())
                                                      for d in df["dataset"].unique()]
    for ds, dmask in datasets:
        for v in df["variant"].unique():
            mask = dmask & (df["variant"] == v).to_numpy()
            n = int(mask.sum())
            if n == 0:
                continue
            human_rate = cols["human"][mask].mean()
            for name, pred in cols.items():
                count = int(pred[mask].sum())
                lo, hi = wilson(count, n)
                rows.append({"dataset": ds, "variant": v, "model": VARIANT_MODEL.get(v, v), "judge": name,
                             "count": count, "n": n, "rate": count / n, "wilson_low": lo, "wilson_high": hi,
                             "minus_human": count / n - human_rate})
    return pd.DataFrame(rows)


def paired_model_tests(df, judges: Mapping[str, Callable] | None = None,
                       pairs=(("lat", "at"), ("lat", "baseline"), ("at", "baseline"))):
    """Does one model resist its own direction's ablation better than another? Per rater (human and each
    judge): attack-success rates of two ablated variants on the same instructions and an exact McNemar
    test of the paired labels, with Holm's adjustment over the pairs of that rater."""
    import pandas as pd
    from .stats import holm, mcnemar
    df = df[df["variant"].isin({v for pair in pairs for v in pair})].reset_index(drop=True)
    cols = {"human": df["human"].to_numpy(bool), **_judge_columns(df, judges)}
    rows = []
    for name, success in cols.items():
        wide = pd.DataFrame({"key": list(zip(df["dataset"], df["instruction"])), "variant": df["variant"],
                             "success": success}).pivot_table(index="key", columns="variant", values="success",
                                                              aggfunc="first").dropna()
        tests = [(a, b, mcnemar(wide[a].astype(int).tolist(), wide[b].astype(int).tolist())) for a, b in pairs]
        for (a, b, t), p_holm in zip(tests, holm([t["p_value"] for _, _, t in tests])):
            rows.append({"rater": name, "a": VARIANT_MODEL.get(a, a), "b": VARIANT_MODEL.get(b, b), "n": len(wide),
                         "success_a": wide[a].mean(), "success_b": wide[b].mean(), "only_a": t["b"], "only_b": t["c"],
                         "p_value": t["p_value"], "p_holm": p_holm})
    return pd.DataFrame(rows)
