"""Every figure of the series, one function each, drawn in refusal_lat/style.py's one look; a notebook
computes the numbers, calls the function and saves what it returns (`H.style.save(fig, FIG / name)`).
FIGURES maps each published file name to the function that draws it (tests/test_style.py renders all of
them on tiny data and checks that every model keeps its one colour)."""
from __future__ import annotations

from typing import Mapping, Sequence

import matplotlib
import matplotlib.ticker
import matplotlib.pyplot as plt
import numpy as np

from . import style as S
from .report import error_bars

S.apply()


def _smooth(values, window: int) -> np.ndarray:
    values = np.asarray(values, float)
    out = np.empty_like(values)
    for i in range(len(values)):
        out[i] = values[max(0, i - window + 1):i + 1].mean()
    return out


# --- 00 · training -------------------------------------------------------------------------------

def training_loss(logs: Mapping, window: int, name: str):
    """00_training_loss: the harmful (attacked) loss and the clean harmless loss per arm and seed."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    for (arm, seed), log in logs.items():
        steps = [r["step"] for r in log["rows"]]
        kw = dict(color=S.model_color(arm), ls=S.seed_linestyle(seed), lw=1.2)
        S.tag(axes[0].plot(steps, _smooth([r.get("loss_attacked", r["loss"]) for r in log["rows"]], window),
                           label=f"{arm}-s{seed}", **kw), arm)
        if "loss_harmless" in log["rows"][0]:
            S.tag(axes[1].plot(steps, _smooth([r["loss_harmless"] for r in log["rows"]], window), **kw), arm)
    axes[0].set(ylabel=f"harmful (attacked) loss, rolling mean of {window}", title="harmful examples, under the arm's perturbation")
    axes[1].set(ylabel="clean harmless loss", title="harmless examples, clean")
    for ax in axes:
        ax.set_xlabel("optimiser step")
    S.legend_outside(axes[1], *axes[0].get_legend_handles_labels(), title="arm-seed (line style: seed)")
    S.title(fig, f"{name}: training losses per arm and seed")
    fig.tight_layout()
    return fig


def attack_loss(attacked: Sequence):
    """00_attack_loss: [((arm, seed), log)] of the attacked arms: the PGD loss per attack step, early vs late."""
    fig, axes = plt.subplots(1, len(attacked), figsize=(3.2 * len(attacked), 3.4), sharey=True, squeeze=False)
    for ax, ((arm, seed), log) in zip(axes[0], attacked):
        rows = log["rows"]
        third = max(1, len(rows) // 3)
        for label, part, ls in (("first third of training", rows[:third], "-"), ("last third", rows[-third:], "--")):
            curve = [sum(r["attack_losses"][i] for r in part) / len(part) for i in range(len(part[0]["attack_losses"]))]
            curve.append(sum(r["loss_attacked"] if "loss_attacked" in r else r["loss"] for r in part) / len(part))
            S.tag(ax.plot(range(len(curve)), curve, marker="o", ls=ls, color=S.model_color(arm), label=label), arm)
        ax.set_title(f"{arm}-s{seed}: block {log['perturb_layer']}, ε {log['epsilon']['absolute']:.3g}", fontsize=9)
        ax.set_xlabel("PGD step (last: final)")
    axes[0][0].set_ylabel("harmful loss (mean over optimiser steps)")
    S.legend_outside(axes[0][-1], *axes[0][0].get_legend_handles_labels())
    S.title(fig, "The training attack: harmful loss along the PGD steps, early and late in training")
    fig.tight_layout()
    return fig


# --- 01 · activations ----------------------------------------------------------------------------

def activation_norms(norms, name: str):
    """01_activation_norms: `norms` rows model, prompts (harmful/harmless), layer, mean norm."""
    models = list(dict.fromkeys(norms["model"]))
    fig, axes = plt.subplots(1, len(models), figsize=(3.6 * len(models), 3.0), sharey=True, squeeze=False)
    for ax, model in zip(axes[0], models):
        part = norms[norms["model"] == model]
        for kind, g in part.groupby("prompts", sort=False):
            ax.plot(g["layer"], g["mean norm"], marker="o", color=S.CLASS_COLORS[kind], label=f"{kind} prompts")
        ax.set_title(model, color=S.model_color(model), gid=f"model={model}")
        ax.set_xlabel("block input (layer)")
        S.integer_ticks(ax)
    axes[0][0].set_ylabel("mean ‖residual‖ at the read position")
    S.legend_outside(axes[0][-1])
    S.title(fig, f"Residual-stream norm at the read position ({name})")
    fig.tight_layout()
    return fig


def direction_across_layers(cosines, layer: int, name: str):
    """01_direction_across_layers: rows model, layer, cos(layer, layer+1), norm of mean difference."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.4))
    for ax, column in zip(axes, ["cos(layer, layer+1)", "norm of mean difference"]):
        for model, g in cosines.groupby("model", sort=False):
            S.tag(ax.plot(g["layer"], g[column], marker="o", color=S.model_color(model), label=model), model)
        ax.axvline(layer, color=S.NEUTRAL, ls="--", lw=1, label=f"profile layer {layer}")
        ax.set(xlabel="block input (layer)", ylabel=column)
        S.integer_ticks(ax)
    axes[0].set_title("adjacent layers' directions: cosine")
    axes[1].set_title("size of the mean difference")
    S.legend_outside(axes[1], *axes[0].get_legend_handles_labels())
    S.title(fig, f"The difference-of-means direction across layers ({name})")
    fig.tight_layout()
    return fig


# --- 02 · SVD ------------------------------------------------------------------------------------

def svd_components(at_layer, summary, roles: Sequence[str], layer: int, name: str, paper: Mapping):
    """02_svd_components: the paper's Figure 2 at the profile's layer. `at_layer` rows model, component
    (1..6), percent; `summary` (svd_summary) gives comp1/comp2 and their 95 % intervals; `paper` maps
    a role to the paper's (comp1, comp2) %."""
    fig, ax = plt.subplots(figsize=(9, 3.8))
    components = sorted(at_layer["component"].unique())
    width = 0.8 / len(roles)
    by_model = summary.set_index("model")
    for i, role in enumerate(roles):
        part = at_layer[at_layer["model"] == role].set_index("component").reindex(components)
        x = np.arange(len(components)) - 0.4 + width * (i + 0.5)
        bars = S.tag(ax.bar(x, part["percent"], width, color=S.model_color(role), label=role), role)
        for c in (1, 2):
            if c not in components or role not in by_model.index:
                continue
            row = by_model.loc[role]
            mid, low, high = (100 * row[f"comp{c}{s}"] for s in ("", "_low", "_high"))
            k = components.index(c)
            ax.errorbar(x[k], mid, yerr=error_bars(mid, low, high), color="black", capsize=3, lw=1)
            if role in paper:
                S.paper_marker(ax, x[k], paper[role][c - 1])
        for k, bar in enumerate(bars):
            top = bar.get_height()
            if components[k] in (1, 2) and role in by_model.index:
                top = max(top, 100 * by_model.loc[role, f"comp{components[k]}_high"])
            ax.text(bar.get_x() + bar.get_width() / 2, top + 1, f"{bar.get_height():.1f}", ha="center", va="bottom",
                    fontsize=6.5)
    ax.set_xticks(range(len(components)), [str(c) for c in components])
    ax.set(xlabel="SVD component", ylabel="share of s² (uncentered)")
    S.percent_axis(ax, lim=(0, min(100, 1.15 * max(at_layer["percent"].max(), 100 * summary["comp1_high"].max()) + 5)))
    S.legend_outside(ax)
    ax.set_title(f"Explained variance of the harmful − harmless differences by SVD component, layer {layer} ({name}); "
                 "bars 1–2: bootstrap 95 %", fontsize=9)
    fig.tight_layout()
    return fig


def svd_cumulative(table, layer: int):
    """02_svd_cumulative: `table` (svd_table) rows at one layer: model, component, cumulative(_centered)."""
    fig, ax = plt.subplots(figsize=(7, 3.8))
    for role, part in table[table["layer"] == layer].groupby("model", sort=False):
        color = S.model_color(role)
        S.tag(ax.plot(part["component"], 100 * part["cumulative"], marker="o", color=color, label=role), role)
        S.tag(ax.plot(part["component"], 100 * part["cumulative_centered"], ls="--", color=color), role)
    handles, labels = ax.get_legend_handles_labels()
    handles += [plt.Line2D([], [], color=S.NEUTRAL, marker="o", label="uncentered (the paper)"),
                plt.Line2D([], [], color=S.NEUTRAL, ls="--", label="centered (PCA of the differences)")]
    ax.set(xlabel="components", ylabel="cumulative share of s²")
    S.percent_axis(ax)
    S.legend_outside(ax, handles)
    ax.set_title(f"Cumulative explained variance, layer {layer}")
    fig.tight_layout()
    return fig


def first_two_by_layer(uncentered, centered):
    """02_first_two_by_layer: model x layer tables (fractions) of the first two components' share."""
    fig, axes = plt.subplots(2, 1, figsize=(min(18, 2 + 0.55 * uncentered.shape[1]), 1.6 + 1.2 * 2 * len(uncentered)))
    for ax, data, label in ((axes[0], uncentered, "uncentered (the paper)"), (axes[1], centered, "centered")):
        S.heatmap(ax, 100 * data.to_numpy(), list(data.index), list(data.columns), fmt="{:.0f}", vmin=0, vmax=100,
                  label="first two, % of s²", percent=True)
        ax.set(title=f"first two components' share — {label}", xlabel="block input (layer)")
    S.title(fig, "The first two SVD components' share at every layer")
    fig.tight_layout()
    return fig


def pairing_null(nulls: Mapping, summary, roles: Sequence[str]):
    """02_pairing_null: component 2 under random re-pairings (grey) vs the index pairing (the model's colour)."""
    fig, axes = plt.subplots(1, len(roles), figsize=(3.6 * len(roles), 2.9), squeeze=False)
    observed = summary.set_index("model")["comp2"]
    for ax, role in zip(axes[0], roles):
        ax.hist(100 * np.asarray(nulls[role])[:, 1], bins=30, color="0.8", label="random pairings")
        S.tag(ax.axvline(100 * observed[role], color=S.model_color(role), lw=2, label="index pairing (the paper's)"), role)
        ax.set_title(role, color=S.model_color(role))
        ax.set_xlabel("component 2, % of s²")
    axes[0][0].set_ylabel("pairings")
    S.legend_outside(axes[0][-1])
    S.title(fig, "Component 2 under random re-pairings of harmful and harmless prompts")
    fig.tight_layout()
    return fig


def mean_difference_norm(norms):
    """02_mean_difference_norm: rows model, layer, norm."""
    fig, ax = plt.subplots(figsize=(7, 3.4))
    for model, g in norms.groupby("model", sort=False):
        S.tag(ax.plot(g["layer"], g["norm"], marker="o", color=S.model_color(model), label=model), model)
    ax.set(xlabel="block input (layer)", ylabel="‖mean(harmful) − mean(harmless)‖",
           title="Size of the mean difference per block input")
    S.integer_ticks(ax)
    S.legend_outside(ax)
    fig.tight_layout()
    return fig


def pca_layers(points: Mapping, roles: Sequence[str], layers: Sequence[int], name: str):
    """02_pca_layers: the paper's Figure 3. `points[(role, layer)]` = (coords [n, 2] with the harmful rows
    first, ratio [2], n_harmful)."""
    fig, axes = plt.subplots(len(roles), len(layers), figsize=(3.0 * len(layers), 2.8 * len(roles)), squeeze=False)
    for r, role in enumerate(roles):
        for c, layer in enumerate(layers):
            coords, ratio, n_harmful = points[(role, layer)]
            ax = axes[r][c]
            ax.scatter(*coords[n_harmful:].T, s=6, color=S.CLASS_COLORS["harmless"], alpha=0.6, label="harmless")
            ax.scatter(*coords[:n_harmful].T, s=6, color=S.CLASS_COLORS["harmful"], alpha=0.6, label="harmful")
            ax.set_title(f"{role} · layer {layer} ({100 * ratio.sum():.0f} %)", fontsize=9, color=S.model_color(role))
            ax.set_xlabel(f"PC1 ({100 * ratio[0]:.0f} %)", fontsize=8)
            ax.set_ylabel(f"PC2 ({100 * ratio[1]:.0f} %)", fontsize=8)
            ax.set_xticks([])
            ax.set_yticks([])
    S.legend_outside(fig, *axes[0][0].get_legend_handles_labels(), title="prompts")
    S.title(fig, f"2-D PCA of harmful and harmless activations ({name}); (x %) in a title: the share of the "
                 "activations' variance the two components explain")
    fig.tight_layout()
    return fig


def llama2_massive_abs(peaks: Mapping, reference_max: Mapping, cuts: Sequence[float], layers: Sequence[int],
                       models: Sequence[str], channels: Sequence[int], seed: int = 0):
    """02_llama2_massive_abs: per released layer, each row's peak on the massive channels.
    `peaks[(model, layer)]` = (harmful peaks, harmless peaks); `reference_max[layer]` = base's largest."""
    fig, axes = plt.subplots(1, len(layers), figsize=(2.0 * len(layers), 3.6), sharey=True)
    rng = np.random.default_rng(seed)
    for ax, layer in zip(axes, layers):
        for i, model in enumerate(models):
            for j, (kind, marker) in enumerate((("harmful", "o"), ("harmless", "^"))):
                peak = np.asarray(peaks[(model, layer)][j])
                S.tag(ax.scatter(i + rng.uniform(-0.3, 0.3, len(peak)), peak, s=5, marker=marker,
                                 color=S.model_color(model), alpha=0.6), model)
        ax.axhline(reference_max[layer], color="0.2", ls=":", lw=1)
        for k in cuts:
            ax.axhline(k, color="0.6", ls="--", lw=0.8)
        ax.set(yscale="log", title=f"layer {layer}")
        ax.set_xticks(range(len(models)), list(models))
        S.color_model_ticks(ax)
    axes[0].set_ylabel(f"max(|x{channels[0]}|, |x{channels[1]}|) per row")
    handles = S.model_handles(models, marker="o")
    for h in handles:
        h.set_linestyle("none")
    handles += [plt.Line2D([], [], color="0.3", marker="o", ls="none", label="harmful prompt"),
                plt.Line2D([], [], color="0.3", marker="^", ls="none", label="harmless prompt"),
                plt.Line2D([], [], color="0.2", ls=":", label="base's largest at the layer"),
                plt.Line2D([], [], color="0.6", ls="--", label="cuts " + ", ".join(f"{k:g}" for k in cuts))]
    S.legend_outside(fig, handles)
    S.title(fig, "The authors' released Llama-2 rows: the massive channels per model and layer")
    fig.tight_layout()
    return fig


def llama2_threshold_curve(curve):
    """02_llama2_threshold_curve: component 2 against the cut, per layer; rows layer, model, threshold, c2, pairs_kept."""
    layers = sorted(curve["layer"].unique())
    fig, axes = plt.subplots(1, len(layers), figsize=(4.2 * len(layers), 3.6), sharey=True, squeeze=False)
    axes = axes[0]
    for ax, layer in zip(axes, layers):
        part = curve[curve["layer"] == layer]
        for model, g in part.groupby("model", sort=False):
            color = S.model_color(model)
            S.tag(ax.plot(g["threshold"], 100 * g["c2"], "o-", ms=3, color=color, label=model), model)
            S.tag(ax.plot(g["threshold"].iloc[0], 100 * g["c2"].iloc[0], "s", ms=7, mfc="none", color=color), model)
        kept = part.drop_duplicates("threshold")
        for t, n in zip(kept["threshold"], kept["pairs_kept"]):
            ax.annotate(str(n), (t, 0), xytext=(0, 2), textcoords="offset points", fontsize=6, ha="center", color="0.35")
        ax.set(xscale="log", xlabel="cut on the massive channels' |x|", title=f"layer {layer}")
        ax.set_xticks([1, 2, 5, 10, 20, 50], labels=["1", "2", "5", "10", "20", "50"])
        ax.xaxis.set_minor_formatter(plt.NullFormatter())
    S.percent_axis(axes[0], lim=(0, 105 * curve["c2"].max()), decimals=0)
    axes[0].set_ylabel("component 2, share of s² (uncentered)")
    handles = axes[0].get_legend_handles_labels()[0]
    handles += [plt.Line2D([], [], color=S.NEUTRAL, marker="s", mfc="none", ls="none", ms=7, label="cut at base's largest"),
                plt.Line2D([], [], color="none", label="grey numbers: pairs kept of 100")]
    S.legend_outside(axes[-1], handles)
    S.title(fig, "LAT's second component against the cut on the massive channels (the authors' released Llama-2 rows)")
    fig.tight_layout()
    return fig


def llama2_figure2(long, layer: int, models: Sequence[str] = ("base", "AT", "LAT"), k: int = 10,
                   interval: str = "basic"):
    """02_llama2_figure2_layer<L>: the paper's Figure 2 layout, one panel per model: bars = uncentered share
    (%) of the first k components at `layer`, error bars = bootstrap 95 % interval (an interval that
    excludes its estimate is drawn clipped at the bar)."""
    lo_col, hi_col = {"basic": ("lo", "hi"), "percentile": ("pct_lo", "pct_hi")}[interval]
    sub = long[long["layer"] == layer]
    if sub.empty:
        raise ValueError(f"no rows for layer {layer}; layers in the table: {sorted(long['layer'].unique())}")
    fig, axes = plt.subplots(1, len(models), figsize=(4.0 * len(models), 3.4), sharey=True, squeeze=False)
    for ax, model in zip(axes[0], models):
        g = sub[sub["model"] == model].sort_values("component").head(k)
        if g.empty:
            raise ValueError(f"no rows for model {model!r} at layer {layer}")
        y = 100 * g["ratio"].to_numpy()
        lo, hi = 100 * g[lo_col].to_numpy(), 100 * g[hi_col].to_numpy()
        S.tag(ax.bar(g["component"], y, color=S.model_color(model), yerr=error_bars(y, lo, hi), capsize=2,
                     ecolor="0.2", label=model), model)
        for x, v in zip(g["component"].iloc[:2], y[:2]):
            ax.text(x, v + 1, f"{v:.1f}", ha="center", va="bottom", fontsize=8)
        ax.set_title(f"{model}, layer {layer}", color=S.model_color(model))
        ax.set_xlabel("SVD component")
        ax.set_xticks(range(1, len(g) + 1))
    S.percent_axis(axes[0][0], lim=(0, None))
    axes[0][0].set_ylabel("share of s² (uncentered)")
    S.title(fig, f"The authors' released Llama-2 activations, layer {layer}: the paper's Figure 2 layout "
                 f"(95 % {interval} bootstrap intervals)")
    fig.tight_layout()
    return fig


def llama2_first_two_by_layer(wide, clean: Mapping, cuts: Sequence[float], paper: Mapping, layers: Sequence[int]):
    """02_llama2_first_two_by_layer: components 1 and 2 by layer with all pairs (bands: basic 95 %) and
    without the pairs above each cut; stars: the paper's layer-14 values."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8), sharex=True)
    styles = dict(zip(cuts, ("--", ":")))
    for ax, c in zip(axes, (1, 2)):
        for model, part in wide.groupby("model", sort=False):
            color = S.model_color(model)
            S.tag(ax.plot(part["layer"], 100 * part[f"c{c}"], "o-", color=color, label=model), model)
            ax.fill_between(part["layer"], 100 * part[f"c{c}_lo"], 100 * part[f"c{c}_hi"], color=color, alpha=0.2)
            for k in cuts:
                cl = clean[k][clean[k]["model"] == model]
                S.tag(ax.plot(cl["layer"], 100 * cl[f"c{c}"], styles[k], color=color), model)
            if model in paper:
                S.paper_marker(ax, 14, paper[model][c - 1], label=False, model=model)
        ax.set(xlabel="layer (block input)", ylabel="share of s² (uncentered)", title=f"component {c}",
               xticks=sorted({*layers, 14}))
        S.percent_axis(ax, lim=(0, None))
    handles = axes[0].get_legend_handles_labels()[0]
    handles += [plt.Line2D([], [], color=S.NEUTRAL, ls="-", label="all 100 pairs (band: basic 95 %)")]
    handles += [plt.Line2D([], [], color=S.NEUTRAL, ls=styles[k], label=f"without the pairs above {k:g}") for k in cuts]
    handles += [plt.Line2D([], [], label=f"{S.PAPER_LABEL}, in the model's colour", **dict(S.PAPER_STYLE, mfc="white"))]
    S.legend_outside(axes[1], handles)
    S.title(fig, "Llama-2-7b-chat, the authors' released activations: the first two SVD components by layer")
    fig.tight_layout()
    return fig


# --- 03 · directions and transfer ----------------------------------------------------------------

def direction_cosines(per_layer):
    """03_direction_cosines: columns 'a·b' (cosine between two models' directions), index = layer. Colour:
    the second model's; line style: the first model's position."""
    fig, ax = plt.subplots(figsize=(7, 3.2))
    firsts = list(dict.fromkeys(col.split("·")[0] for col in per_layer.columns))
    for col in per_layer.columns:
        a, b = col.split("·")
        S.tag(ax.plot(per_layer.index, per_layer[col], marker="o", color=S.model_color(b),
                      ls=S.LINESTYLES[firsts.index(a) % len(S.LINESTYLES)], label=f"{a} · {b}"), b)
    ax.set(xlabel="block input (layer)", ylabel="cosine", ylim=(-0.1, 1.05),
           title="Cosine between two models' refusal directions per layer")
    S.integer_ticks(ax)
    S.legend_outside(ax, title="models (colour: the second)")
    fig.tight_layout()
    return fig


def transfer_heatmap(rates, layer: int, n: int, name: str):
    """03_transfer_heatmap: target x source refusal rates (fractions), the no-ablation column first."""
    fig, ax = plt.subplots(figsize=(1.8 + 1.3 * rates.shape[1], 1.0 + 0.7 * rates.shape[0]))
    S.heatmap(ax, 100 * rates.to_numpy(), list(rates.index), list(rates.columns), fmt="{:.1f}", vmin=0, vmax=100,
              label="refusal", percent=True, fontsize=8)
    ax.set(xlabel="direction ablated (source)", ylabel="attacked model (target)",
           title=f"Refusal rate after ablation, layer {layer} ({name}, n = {n}, paper heuristic)")
    fig.tight_layout()
    return fig


FIGURE1_VECTORS = ("own direction", "base's direction", "LAT's direction", "no ablation")


def figure1(bars, roles: Sequence[str], paper: Mapping, layer: int, n: int, name: str):
    """03_figure1: per attacked model, refusal with its own direction, base's and LAT's direction ablated and
    with none; Wilson 95 % bars; stars: the paper's Table 1. `bars` rows model, vector (FIGURE1_VECTORS),
    refusal_rate, wilson_low, wilson_high. A bar wears the colour of the model whose direction is ablated
    (hatched: the target's own); no ablation is grey."""
    fig, ax = plt.subplots(figsize=(2.4 + 2 * len(roles), 3.8))
    kinds = [k for k in FIGURE1_VECTORS if k in set(bars["vector"])]
    width = 0.8 / len(kinds)
    source_of = {"own direction": None, "base's direction": "base", "LAT's direction": "LAT", "no ablation": "none"}
    for k, kind in enumerate(kinds):
        part = bars[bars["vector"] == kind]
        for _, row in part.iterrows():
            m = roles.index(row["model"])
            source = source_of[kind] or row["model"]
            x = m - 0.4 + width * (k + 0.5)
            mid = 100 * row["refusal_rate"]
            bar = ax.bar(x, mid, width, color=S.model_color(source), hatch="//" if kind == "own direction" else "",
                         edgecolor="white", lw=0.5, yerr=error_bars(mid, 100 * row["wilson_low"], 100 * row["wilson_high"]),
                         capsize=3)
            S.tag(bar, source)
            target_source = {"own direction": row["model"], "base's direction": "base", "LAT's direction": "LAT"}.get(kind)
            if (row["model"], target_source) in paper:
                S.paper_marker(ax, x, paper[(row["model"], target_source)])
    ax.set_xticks(range(len(roles)), list(roles))
    S.color_model_ticks(ax)
    ax.set(xlabel="attacked model", ylabel="refusal rate",
           title=f"Refusal over harmful instructions, layer {layer}, n = {n}, {name}; Wilson 95 %")
    S.percent_axis(ax, lim=(0, 105))
    handles = [plt.Rectangle((0, 0), 1, 1, facecolor="white", edgecolor="0.3", hatch="//",
                             label="own direction (the target's colour, hatched)")]
    handles += [S.tag(plt.Rectangle((0, 0), 1, 1, facecolor=S.model_color(m), label=label), m)
                for label, m in (("base's direction", "base"), ("LAT's direction", "LAT"), ("no ablation", "none"))
                if label in kinds]
    S.legend_outside(ax, handles + [S.paper_handle()], title="direction ablated")
    fig.tight_layout()
    return fig


# --- 04 · layer sweep and selection --------------------------------------------------------------

def layer_sweep(sweep, paper_refusal: Mapping, n: int, name: str):
    """04_layer_sweep: self-direction ablation by layer; rows target, layer, refusal_rate, acceptance_rate,
    invalid_rate, wilson_low, wilson_high (paper heuristic). Dotted lines ending in a star: the paper's
    refusal for the same role with its layer-14 direction ablated (`paper_refusal[role]` = % by layer 1..20)."""
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.4), sharey=True)
    for ax, column, label in zip(axes, ["refusal_rate", "acceptance_rate", "invalid_rate"],
                                 ["refusal", "acceptance", "invalid answers"]):
        for role, part in sweep.groupby("target", sort=False):
            color = S.model_color(role)
            S.tag(ax.plot(part["layer"], 100 * part[column], marker="o", color=color, label=role), role)
            if column == "refusal_rate":
                ax.fill_between(part["layer"], 100 * part["wilson_low"], 100 * part["wilson_high"], color=color, alpha=0.12)
                if role in paper_refusal:
                    S.paper_level(ax, paper_refusal[role][13], role)
        ax.set(title=label, xlabel="layer of the ablated direction")
        S.percent_axis(ax, lim=(0, 105))
        S.integer_ticks(ax)
    axes[0].set_ylabel("share of answers")
    handles, labels = axes[0].get_legend_handles_labels()
    S.legend_outside(axes[2], handles, labels, title="model (band: Wilson 95 %)")
    S.title(fig, f"Self-direction ablation by layer ({name}, n = {n}, paper heuristic); dotted: the paper's refusal at its "
                 "layer 14")
    fig.tight_layout()
    return fig


def selection(table, chosen: Mapping, max_kl: float, name: str):
    """04_selection: refusal_direction's scores per layer (rows model, layer, refusal_score, steering_score, kl);
    dashed: the layer the rule chose for a model."""
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.5))
    specs = [("refusal_score", "harmful prompts, direction ablated", "refusal score (log-odds)"),
             ("steering_score", "harmless prompts, direction added", "refusal score (log-odds)"),
             ("kl", "harmless prompts, direction ablated", "KL divergence (nats)")]
    for ax, (column, label, ylabel) in zip(axes, specs):
        for model, g in table.groupby("model", sort=False):
            S.tag(ax.plot(g["layer"], g[column], marker="o", color=S.model_color(model), label=model), model)
        for model, layer in chosen.items():
            if layer is not None:
                S.tag(ax.axvline(layer, color=S.model_color(model), ls="--", lw=1), model)
        ax.set(title=label, xlabel="layer of the direction", ylabel=ylabel)
        S.integer_ticks(ax)
    axes[2].axhline(max_kl, color=S.NEUTRAL, ls=":", lw=1)
    axes[2].set_yscale("log")
    handles = axes[0].get_legend_handles_labels()[0]
    handles += [plt.Line2D([], [], color="black", ls="--", lw=1, label="chosen layer"),
                plt.Line2D([], [], color=S.NEUTRAL, ls=":", lw=1, label=f"KL limit {max_kl:g}")]
    S.legend_outside(axes[2], handles)
    S.title(fig, f"Direction selection on held-out prompts ({name}): refusal_direction's scores per layer")
    fig.tight_layout()
    return fig


# --- 05 · trained arms ---------------------------------------------------------------------------

def robustness(rates, models: Sequence[str], conditions: Sequence[str], titles: Mapping, name: str, n: int):
    """05_robustness: refusal per model (project judge) in each condition; rows of `rates`: model, condition,
    judge, rate, lo, hi (fractions). Seeds of an arm share its colour (hatch: seed 1)."""
    fig, axes = plt.subplots(1, len(conditions), figsize=(3.3 * len(conditions) + 1.5, 3.6), sharey=True)
    project = rates[rates["judge"] == "project"].set_index(["model", "condition"])
    for ax, condition in zip(axes, conditions):
        for i, model in enumerate(models):
            r = project.loc[(model, condition)]
            S.tag(ax.bar(i, 100 * r["rate"], color=S.model_color(model), hatch=S.seed_hatch(model), edgecolor="white",
                         lw=0.5, yerr=error_bars(100 * r["rate"], 100 * r["lo"], 100 * r["hi"]), capsize=2,
                         ecolor="black"), model)
        ax.set_xticks(range(len(models)), list(models), rotation=70, fontsize=7)
        S.color_model_ticks(ax)
        ax.set_title(titles[condition])
        S.percent_axis(ax, lim=(0, 102))
    axes[0].set_ylabel("refusal rate (project judge, Wilson 95 %)")
    arms = S.order_models(dict.fromkeys(S.model_key(m) or m for m in models))
    handles = S.model_handles(arms, kind="patch")
    handles += [plt.Rectangle((0, 0), 1, 1, facecolor="white", edgecolor="0.3", hatch="//", label="seed 1")]
    S.legend_outside(axes[-1], handles, title="arm")
    S.title(fig, f"{name}: refusal on {n} held-out harmful prompts")
    fig.tight_layout()
    return fig


def svd_shares(spread, layer: int, name: str):
    """05_svd_shares: per arm, the second and the first two components' share at every layer (line: mean over
    seeds, band: min-max), and below each arm minus SFT in percentage points (the differences the lines
    above are too close to show). Rows of `spread`: arm, layer, seeds, comp2_/first_two_ mean/min/max."""
    fig, axes = plt.subplots(2, 2, figsize=(11, 6.2), sharex=True, gridspec_kw={"height_ratios": [3, 2]})
    arms = S.order_models(dict.fromkeys(spread["arm"]))
    reference = "sft" if "sft" in arms else arms[0]
    ref = spread[spread["arm"] == reference].set_index("layer")
    for c, (col, label) in enumerate((("comp2", "second component's"), ("first_two", "first two components'"))):
        top, bottom = axes[0][c], axes[1][c]
        for arm in arms:
            s = spread[spread["arm"] == arm]
            color, n_seeds = S.model_color(arm), int(s["seeds"].iloc[0])
            shown = S.ARM_NAMES.get(arm, arm) + ("" if arm == "base" else f" ({n_seeds} seed{'s' if n_seeds > 1 else ''})")
            S.tag(top.plot(s["layer"], 100 * s[f"{col}_mean"], color=color, label=shown, lw=1.3), arm)
            top.fill_between(s["layer"], 100 * s[f"{col}_min"], 100 * s[f"{col}_max"], color=color, alpha=0.2, lw=0)
            if arm != reference:
                d = s.set_index("layer")[f"{col}_mean"] - ref[f"{col}_mean"]
                S.tag(bottom.plot(d.index, 100 * d, color=color, marker=".", lw=1.3), arm)
        for ax in (top, bottom):
            ax.axvline(layer, color=S.NEUTRAL, ls=":", lw=1, label=f"the profile's layer ({layer})" if ax is top else None)
        bottom.axhline(0, color=S.model_color(reference), lw=1)
        top.set(title=f"the {label} share of s²", ylabel="share of s² (uncentered)")
        S.integer_ticks(top, bottom)
        S.percent_axis(top, lim=None)
        bottom.set(xlabel="block input (layer)", ylabel=f"minus {S.ARM_NAMES.get(reference, reference)} (pp)")
    S.legend_outside(axes[0][1], *axes[0][0].get_legend_handles_labels(), title="arm (band: min–max over seeds)")
    S.title(fig, f"{name}: how concentrated refusal is, per arm and layer (mean over seeds)")
    fig.tight_layout()
    return fig


def second_component_differences(second):
    """05_second_component_differences: paired differences of the second component's share (a − b, fractions),
    95 % bootstrap bands; colour: the reference b's, line style: a's seed."""
    fig, ax = plt.subplots(figsize=(8, 3.6))
    for (a, b), d in second.groupby(["a", "b"], sort=False):
        color = S.model_color(b)
        S.tag(ax.plot(d["layer"], 100 * d["difference"], marker=".", color=color, ls=S.seed_linestyle(a), label=f"{a} − {b}"), b)
        ax.fill_between(d["layer"], 100 * d["lo"], 100 * d["hi"], color=color, alpha=0.12, lw=0)
    ax.axhline(0, color="black", lw=0.8)
    ax.set(xlabel="block input (layer)", ylabel="difference of the second component's share (pp)",
           title="The second component: LAT minus its references, paired over prompt pairs (95 % bootstrap)")
    S.integer_ticks(ax)
    S.legend_outside(ax, title="pair (colour: the reference)")
    fig.tight_layout()
    return fig


def transfer_matrix(transfer, name: str):
    """05_transfer: Δ first-token refusal log-odds with a model's direction (column) ablated in a model (row)."""
    models = list(transfer.index)
    fig, ax = plt.subplots(figsize=(1.8 + 0.75 * len(models), 1.4 + 0.55 * len(models)))
    S.heatmap(ax, transfer.to_numpy(), models, list(transfer.columns), fmt="{:+.2f}", label="Δ refusal log-odds",
              fontsize=7)
    plt.setp(ax.get_xticklabels(), rotation=70)
    ax.set(xlabel="direction of", ylabel="ablated in",
           title=f"{name}: refusal log-odds change with a direction ablated\n(more negative: removes more refusal)")
    fig.tight_layout()
    return fig


# --- 06 · claims ---------------------------------------------------------------------------------

def claims(table, sources: Sequence[str], claim_names: Sequence[str]):
    """06_claims: every comparison in percentage units as LAT − reference with its 95 % basic interval, one panel
    per claim; stars: the paper's value, x: the paper's smallest effect where it has none."""
    rows_per = max(1, table.groupby("claim").size().max())
    fig, axes = plt.subplots(1, len(claim_names), figsize=(4.0 * len(claim_names), 0.9 + 0.3 * rows_per), squeeze=False)
    colors = dict(zip(sources, S.SOURCE_COLORS))
    for ax, claim in zip(axes[0], claim_names):
        part = table[(table["claim"] == claim) & (table["unit"] != "log-odds")].reset_index(drop=True)
        for i, r in part.iterrows():
            ax.errorbar(r["estimate"], i, xerr=[[max(0, r["estimate"] - r["lo"])], [max(0, r["hi"] - r["estimate"])]],
                        fmt="o", color=colors[r["source"]], capsize=2)
            if r["paper"] == r["paper"]:
                S.paper_marker(ax, r["paper"], i, label=False, proxy=bool(r["paper_is_proxy"]))
        ax.axvline(0, color="black", lw=0.8)
        ax.set_yticks(range(len(part)), [str(x) for x in part["reference"]], fontsize=7)
        S.color_model_ticks(ax)
        ax.set_ylim(-0.7, max(len(part), 1) - 0.3)
        ax.set_title(f"{claim}: LAT − reference")
        ax.set_xlabel("pp of s²" if claim in ("C1", "headline") else "pp refusal")
    handles = [plt.Line2D([], [], color=c, marker="o", ls="", label=s) for s, c in colors.items()]
    handles += [S.paper_handle(), S.paper_handle(proxy=True)]
    S.legend_outside(fig, handles, below=True, ncol=3)
    S.title(fig, "The paper's claims as paired differences (95 % basic intervals); log-odds rows in the table only")
    fig.tight_layout()
    return fig



def _budget_width(budget: float, top: float = 0.3) -> float:
    """Line width / opacity scale of a sweep budget (larger budget: heavier)."""
    return min(1.0, max(0.0, budget) / top)


def sweep_dose_response(dose, authors: Mapping, name: str):
    """07_dose_response: x = relative budget (log); per arm the second component's share minus SFT's (with its
    interval), the last-token norm before the perturbed block (x base), refusal with the own direction ablated,
    and over-refusal (with its TOST interval; grey band: the +-5-point margin). SFT: a dashed level. A budget with
    several seeds: the line and band follow the mean over its seeds, and each seed is a small dot."""
    panels = [("comp2_minus_sft", "2nd component share − SFT's (points)", "(c) C1: second component"),
              ("norm_inflation_before", "last-token norm w/o top channels (× base)", "(b) norm before the block"),
              ("rate_ablated_own", "refusal, own direction ablated", "(d) own direction ablated"),
              ("over_refusal", "harmless refusal − base's (points)", "(a) over-refusal")]
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.8))
    for ax, (col, ylabel, heading) in zip(axes, panels):
        for arm in ("at", "lat", "rand"):
            part = dose[(dose["arm"] == arm) & (dose["budget"] > 0)].sort_values("budget")
            if col in part and part[col].notna().any():
                mean = part.groupby("budget").mean(numeric_only=True)
                S.tag(ax.plot(mean.index, mean[col], "o-", color=S.model_color(arm), label=S.ARM_NAMES[arm]), arm)
                if f"{col}_lo" in part:
                    ax.fill_between(mean.index, mean[f"{col}_lo"], mean[f"{col}_hi"], color=S.model_color(arm),
                                    alpha=0.15, lw=0)
                if len(mean) < len(part):  # several seeds at some budget
                    S.tag(ax.plot(part["budget"], part[col], ".", ms=4, color=S.model_color(arm), alpha=0.6), arm)
        sft = dose[dose["arm"] == "sft"]
        if col in sft and sft[col].notna().any():
            S.tag(ax.axhline(sft[col].mean(), color=S.model_color("sft"), ls="--", label="SFT"), "sft")
        ax.axvspan(authors["spread_low"], authors["spread_high"], color="gold", alpha=0.25, lw=0,
                   label="the authors' budget")
        ax.set_xscale("log")
        budgets = sorted(set(dose.loc[dose["budget"] > 0, "budget"]))
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xticks(budgets, [f"{b:g}" for b in budgets], rotation=45 if len(budgets) > 3 else 0)
        ax.set_xlabel("relative budget b")
        ax.set_ylabel(ylabel)
        ax.set_title(heading)
    S.percent_axis(axes[2], lim=(0, 102))
    axes[0].axhline(0, color=S.NEUTRAL, lw=0.8)
    axes[3].axhspan(-5, 5, color="0.9", zorder=0, label="±5-point margin")
    handles = {}  # one entry per label over the four panels
    for ax in axes:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(lab, h)
    S.legend_outside(fig, list(handles.values()), list(handles), below=True)
    S.title(fig, f"{name}: what the adversary's budget does (training v3)")
    fig.tight_layout()
    return fig


def sweep_robustness(wide, conditions: Sequence[str], name: str, n: int):
    """07_robustness: refusal (%) of every sweep model under each held-out condition; a model's bars in its
    arm's colour, more opaque for a larger budget. `wide`: index model (eps<b>/<arm>-s<seed> or base),
    columns conditions, values in %."""
    from .training.sweep_eval import arm_of, budget_of
    fig, ax = plt.subplots(figsize=(11, 3.8))
    models = list(wide.index)
    width = 0.8 / max(1, len(models))
    for i, model in enumerate(models):
        arm = arm_of(model)
        alpha = 0.35 + 0.65 * _budget_width(budget_of(model)) if arm in ("at", "lat", "rand") else 1.0
        S.tag(ax.bar(np.arange(len(conditions)) + i * width, wide.loc[model, list(conditions)], width,
                     color=S.model_color(arm), alpha=alpha, label=model), arm)
    ax.set_xticks(np.arange(len(conditions)) + 0.4 - width / 2, list(conditions))
    ax.set_ylabel("refusal (project judge)")
    S.percent_axis(ax, lim=(0, 102))
    S.legend_outside(ax)
    S.title(ax, f"{name}: refusal of {n} held-out harmful prompts under attacks no arm trained on "
                f"(more opaque: larger budget)")
    fig.tight_layout()
    return fig


def sweep_mechanism(mech, lat_layer: int, name: str):
    """07_mechanism: per sweep model and block input, the median last-token norm without the two largest
    channels (x base's) and the peak channel (x base's peak); dotted: LAT's block."""
    from .training.sweep_eval import arm_of, budget_of
    fig, axes = plt.subplots(1, 2, figsize=(12, 3.8))
    ratio = mech.pivot_table(index="layer", columns="model", values="norm_without", sort=False)
    ratio = ratio.div(ratio["base"], axis=0)
    for model in ratio.columns:
        if model == "base":
            continue
        color, lw = S.model_color(arm_of(model)), 1 + 2 * _budget_width(budget_of(model))
        S.tag(axes[0].plot(ratio.index, ratio[model], color=color, lw=lw, label=model), arm_of(model))
        peak = mech[mech["model"] == model].set_index("layer")["peak_vs_reference"]
        S.tag(axes[1].plot(peak.index, peak, color=color, lw=lw), arm_of(model))
    for ax in axes:
        ax.axvline(lat_layer, color=S.NEUTRAL, ls=":", lw=1)
        ax.set_xlabel("block input")
    S.tag(axes[0].axhline(1, color=S.model_color("base"), lw=0.8, label="base"), "base")
    axes[0].set_ylabel("norm without top channels (× base)")
    axes[0].set_title("last-token norm (dotted: LAT's block)")
    axes[1].set_ylabel("peak |channel| (× base's peak)")
    axes[1].set_yscale("log")
    axes[1].yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g×"))
    axes[1].yaxis.set_minor_formatter(matplotlib.ticker.FormatStrFormatter("%g×"))
    axes[1].set_title("outlier channels")
    S.integer_ticks(*axes)
    S.legend_outside(axes[1], *axes[0].get_legend_handles_labels())
    S.title(fig, f"{name}: the mechanism at every block (training v3)")
    fig.tight_layout()
    return fig

FIGURES = {
    "00_training_loss": training_loss, "00_attack_loss": attack_loss,
    "01_activation_norms": activation_norms, "01_direction_across_layers": direction_across_layers,
    "02_svd_components": svd_components, "02_svd_cumulative": svd_cumulative, "02_first_two_by_layer": first_two_by_layer,
    "02_pairing_null": pairing_null, "02_mean_difference_norm": mean_difference_norm, "02_pca_layers": pca_layers,
    "02_llama2_massive_abs": llama2_massive_abs, "02_llama2_threshold_curve": llama2_threshold_curve,
    "02_llama2_figure2_layer16": llama2_figure2, "02_llama2_figure2_layer20": llama2_figure2,
    "02_llama2_first_two_by_layer": llama2_first_two_by_layer,
    "03_direction_cosines": direction_cosines, "03_transfer_heatmap": transfer_heatmap, "03_figure1": figure1,
    "04_layer_sweep": layer_sweep, "04_selection": selection,
    "05_robustness": robustness, "05_svd_shares": svd_shares,
    "05_second_component_differences": second_component_differences, "05_transfer": transfer_matrix,
    "06_claims": claims,
    "07_dose_response": sweep_dose_response, "07_robustness": sweep_robustness, "07_mechanism": sweep_mechanism,
}
