"""One look for every figure of the series (refusal_lat/plots.py draws them, notebooks call those).

- One colour per model and trained arm, everywhere: `model_color("LAT")`, `model_color("lat-s1")`; the paper's
  Llama-2 models (base, AT, LAT) wear the colours of the profile's roles of the same name, and the seeds of one
  arm share its colour (told apart by `seed_linestyle` / `seed_hatch`).
- Shares and rates in percent (`percent_axis`), a title on every figure, legends outside the data
  (`legend_outside`), annotations whose colour follows the cell they sit on (`heatmap`), and the paper's
  values in one style (`paper_marker`, `paper_level`: a gold star).
- `tag(artist, model)` marks what a model's colour was drawn on, so tests/test_style.py can check that the
  model -> colour map is the same in every figure.
"""
from __future__ import annotations

import re
import zlib
from pathlib import Path

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.colors import Normalize, TwoSlopeNorm, to_rgb
from matplotlib.ticker import MaxNLocator, PercentFormatter

from .report import PAPER_COLUMN

# Okabe-Ito colours (distinguishable with the common colour-vision deficiencies).
MODEL_COLORS = {
    "base": "#3d3d3d",   # the untouched model (Llama-2-7b-chat, Qwen2.5-0.5B, the tiny base)
    "SFT": "#CC79A7",    # plain fine-tuning: the control the paper lacked
    "AT": "#0072B2",     # embedding-space adversarial training
    "LAT": "#D55E00",    # latent adversarial training
    "rand": "#009E73",   # random noise of LAT's radius at LAT's block
    "none": "#BBBBBB",   # no intervention (the no-ablation column / bar)
}
ARM_NAMES = {"base": "base", "sft": "SFT", "at": "AT", "lat": "LAT", "rand": "rand", "none": "none"}
_FALLBACK = ["#56B4E9", "#E69F00", "#F0E442", "#882255", "#44AA99", "#999933", "#661100", "#6699CC"]
CLASS_COLORS = {"harmful": "#B2182B", "harmless": "#2166AC"}  # prompt classes, never a model
SOURCE_COLORS = ["#332288", "#44AA99", "#882255", "#DDCC77", "#117733", "#88CCEE"]  # data sources (06)
NEUTRAL = "0.45"
RATE_CMAP = "viridis"           # percentages on a fixed 0-100 scale
SEQUENTIAL_CMAP = "viridis"     # one-signed values scaled to their own range
DIVERGING_CMAP = "RdBu_r"       # values on both sides of 0, each half spanning its side's range
LINESTYLES = ["-", "--", ":", "-."]
HATCHES = ["", "//", "..", "xx"]
PAPER_LABEL = PAPER_COLUMN  # "paper (Llama-2-7B, L14)"
PAPER_STYLE = dict(marker="*", ms=12, mfc="gold", mec="black", mew=0.8, ls="none", zorder=5)
PROXY_STYLE = dict(marker="X", ms=7, mfc="0.6", mec="black", mew=0.6, ls="none", zorder=5)
DPI = 120

_NAME = re.compile(r"\s*([A-Za-z]+)(?:-s(\d+))?\s*")


def model_key(name) -> str | None:
    """'LAT', 'lat', 'lat-s1' -> 'LAT'; 'sft-s0' -> 'SFT'; None for a name that is no model or arm."""
    m = _NAME.fullmatch(str(name))
    if not m:
        return None
    return ARM_NAMES.get(m.group(1).lower())


def seed_of(name) -> int | None:
    m = _NAME.fullmatch(str(name))
    return int(m.group(2)) if m and m.group(2) is not None else None


def model_color(name) -> str:
    """The one colour of a model / arm (any seed); a name outside MODEL_COLORS gets a fixed fallback colour
    (the same in every figure: chosen by a hash of the name)."""
    key = model_key(name)
    if key is not None:
        return MODEL_COLORS[key]
    return _FALLBACK[zlib.crc32(str(name).encode()) % len(_FALLBACK)]


def model_colors(names) -> dict:
    return {n: model_color(n) for n in names}


def order_models(names) -> list:
    """Models and arms in the series' order: base, SFT, AT, LAT, rand, none (seeds in order), others last."""
    keys = list(MODEL_COLORS)
    return sorted(names, key=lambda n: (keys.index(model_key(n)) if model_key(n) in keys else len(keys),
                                       seed_of(n) or 0, str(n)))


def seed_linestyle(name_or_seed) -> str:
    seed = name_or_seed if isinstance(name_or_seed, (int, np.integer)) else seed_of(name_or_seed)
    return LINESTYLES[(seed or 0) % len(LINESTYLES)]


def seed_hatch(name_or_seed) -> str:
    seed = name_or_seed if isinstance(name_or_seed, (int, np.integer)) else seed_of(name_or_seed)
    return HATCHES[(seed or 0) % len(HATCHES)]


def tag(artists, model):
    """Mark artists drawn in a model's colour (gid 'model=<name>'): tests/test_style.py reads them back."""
    items = artists if isinstance(artists, (list, tuple)) else [artists]
    for a in items:
        for part in (a.patches if hasattr(a, "patches") else [a]):
            part.set_gid(f"model={model}")
    return artists


def apply():
    """The series' matplotlib defaults (called when refusal_lat.plots is imported)."""
    matplotlib.rcParams.update({
        "figure.dpi": 100, "savefig.dpi": DPI, "font.size": 9, "axes.titlesize": 10, "axes.labelsize": 9,
        "figure.titlesize": 11, "legend.fontsize": 8, "legend.frameon": False, "axes.spines.top": False,
        "axes.spines.right": False, "axes.grid": True, "grid.alpha": 0.25, "grid.linewidth": 0.6,
        "lines.linewidth": 1.5, "lines.markersize": 4, "image.cmap": SEQUENTIAL_CMAP,
        "axes.prop_cycle": matplotlib.cycler(color=_FALLBACK),  # a line without a model colour is never mistaken for one
    })


def percent_axis(ax, axis: str = "y", lim: tuple | None = (0, 100), decimals: int = 0):
    """Tick labels in % of a 0-100 quantity (shares and rates are plotted as percentages everywhere)."""
    target = ax.yaxis if axis == "y" else ax.xaxis
    target.set_major_formatter(PercentFormatter(100, decimals=decimals))
    if lim is not None:
        (ax.set_ylim if axis == "y" else ax.set_xlim)(*lim)


PAPER_LABELS = (PAPER_LABEL, "the paper's smallest effect (no own value)")


def legend_outside(where, handles=None, labels=None, title=None, below: bool = False, ncol: int | None = None):
    """A legend beside (or below) the plotting area, never over the data, the paper's markers last. `where` is
    an Axes or a Figure."""
    if handles is None and hasattr(where, "get_legend_handles_labels"):
        handles, labels = where.get_legend_handles_labels()
    if handles is not None:
        labels = list(labels) if labels is not None else [h.get_label() for h in handles]
        pairs = sorted(zip(handles, labels), key=lambda hl: hl[1] in PAPER_LABELS)
        handles, labels = [h for h, _ in pairs], [lab for _, lab in pairs]
    kwargs = {} if handles is None else {"handles": handles, "labels": labels}
    if below:
        n = len(handles if handles is not None else where.get_legend_handles_labels()[0]) if hasattr(
            where, "get_legend_handles_labels") else len(handles or [])
        kwargs.update(loc="upper center", bbox_to_anchor=(0.5, -0.02 if isinstance(where, plt.Figure) else -0.18),
                      ncol=ncol or max(1, min(5, n)))
    else:
        kwargs.update(loc="upper left", bbox_to_anchor=(1.0, 0.95) if isinstance(where, plt.Figure) else (1.01, 1.0),
                      ncol=ncol or 1)
    return where.legend(title=title, borderaxespad=0.2, **kwargs)


def paper_marker(ax, x, y, label: bool = True, proxy: bool = False, model=None):
    """The paper's value: a star with a black edge, gold where its place already says which model it belongs to
    (on that model's bar), in the model's colour where it does not (on a line plot); an x for the paper's
    smallest effect standing in for a value it does not have."""
    style = PROXY_STYLE if proxy else dict(PAPER_STYLE, **({"mfc": model_color(model), "color": model_color(model)}
                                                          if model is not None else {}))
    name = "the paper's smallest effect (no own value)" if proxy else PAPER_LABEL
    shown = name in ax.get_legend_handles_labels()[1]
    star = ax.plot(x, y, label=name if label and not shown else None, **style)[0]
    return tag(star, model) if model is not None else star


def paper_level(ax, y, model, label: bool = True):
    """A reference level from the paper (its value at its own layer 14): a dotted line in the model's colour
    ending in the paper's star at the right edge."""
    tag(ax.axhline(y, color=model_color(model), ls=":", lw=1), model)
    shown = PAPER_LABEL in ax.get_legend_handles_labels()[1]
    return ax.plot([1.0], [y], transform=ax.get_yaxis_transform(), clip_on=False,
                   label=PAPER_LABEL if label and not shown else None, **PAPER_STYLE)[0]


def paper_handle(proxy: bool = False):
    style = PROXY_STYLE if proxy else PAPER_STYLE
    return plt.Line2D([], [], label="the paper's smallest effect (no own value)" if proxy else PAPER_LABEL, **style)


def model_handles(names, marker=None, kind: str = "line") -> list:
    """Legend handles, one per model / arm in its colour."""
    if kind == "patch":
        return [tag(matplotlib.patches.Patch(facecolor=model_color(n), label=str(n)), n) for n in names]
    return [tag(plt.Line2D([], [], color=model_color(n), marker=marker, label=str(n)), n) for n in names]


def luminance(color) -> float:
    """Relative luminance (WCAG) of a colour: 0 black, 1 white."""
    rgb = np.array(to_rgb(color))
    lin = np.where(rgb <= 0.04045, rgb / 12.92, ((rgb + 0.055) / 1.055) ** 2.4)
    return float(lin @ [0.2126, 0.7152, 0.0722])


def text_color_on(color) -> str:
    """Black on light cells, white on dark ones (contrast ratio: the better of the two)."""
    lum = luminance(color)
    return "black" if (lum + 0.05) / 0.05 >= 1.05 / (lum + 0.05) else "white"


def value_norm(values, vmin=None, vmax=None):
    """(colormap, norm) for a heatmap: a fixed range when given; values of both signs on a diverging map
    whose halves each span their side's range; one-signed values on a sequential map over their own range
    (so the range the data use is the range the colours show)."""
    finite = np.asarray(values, float)
    finite = finite[np.isfinite(finite)]
    if vmin is not None and vmax is not None:
        return RATE_CMAP, Normalize(vmin, vmax)
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    if lo < 0 < hi:
        return DIVERGING_CMAP, TwoSlopeNorm(0.0, lo, hi)
    if lo == hi:
        lo, hi = lo - 0.5, hi + 0.5
    return SEQUENTIAL_CMAP, Normalize(lo, hi)


def heatmap(ax, values, rows, cols, fmt: str = "{:.1f}", label: str = "", vmin=None, vmax=None,
            colorbar: bool = True, fontsize: float = 7, percent: bool = False):
    """A matrix with every cell annotated, the annotation black or white by the cell's brightness."""
    values = np.asarray(values, float)
    cmap, norm = value_norm(values, vmin, vmax)
    image = ax.imshow(values, cmap=cmap, norm=norm, aspect="auto")
    mapper = matplotlib.colormaps[cmap]
    for i in range(values.shape[0]):
        for j in range(values.shape[1]):
            v = values[i, j]
            if np.isfinite(v):
                ax.text(j, i, fmt.format(v), ha="center", va="center", fontsize=fontsize,
                        color=text_color_on(mapper(norm(v))))
    ax.set_xticks(range(len(cols)), [str(c) for c in cols])
    ax.set_yticks(range(len(rows)), [str(r) for r in rows])
    ax.grid(False)
    for spine in ax.spines.values():
        spine.set_visible(False)
    color_model_ticks(ax)
    if colorbar:
        bar = ax.figure.colorbar(image, ax=ax, label=label, fraction=0.05, pad=0.02)
        if percent:
            bar.ax.yaxis.set_major_formatter(PercentFormatter(100, decimals=0))
    return image


def color_model_ticks(ax):
    """Tick labels that name a model or arm in that model's colour."""
    for text in [*ax.get_xticklabels(), *ax.get_yticklabels()]:
        if model_key(text.get_text()) is not None:
            text.set_color(model_color(text.get_text()))
            text.set_gid(f"model={text.get_text()}")


def integer_ticks(*axes, axis: str = "x"):
    """Layer axes count blocks: integer ticks only."""
    for ax in axes:
        (ax.xaxis if axis == "x" else ax.yaxis).set_major_locator(MaxNLocator(integer=True))


def title(fig_or_ax, text: str):
    if isinstance(fig_or_ax, plt.Figure):
        return fig_or_ax.suptitle(text)
    return fig_or_ax.set_title(text)


def save(fig, path: str | Path, dpi: int = DPI) -> None:
    """Every figure the same way: DPI, tight bounding box (legends outside the axes stay in the picture). In a
    Jupyter kernel the notebook then shows the file just written and the figure is closed: one render instead of
    two, and the notebook's picture is the published one. Returns nothing (a cell ending in save shows no path)."""
    path = Path(path)
    fig.savefig(path, dpi=dpi, bbox_inches="tight")
    shell = _kernel_shell()
    if shell is not None:
        from IPython.display import Image, display
        display(Image(data=path.read_bytes(), format="png"))
        plt.close(fig)


def _kernel_shell():
    """The IPython shell of a Jupyter kernel, else None (a script, a test, a terminal IPython)."""
    import sys
    if "IPython" not in sys.modules:
        return None
    from IPython import get_ipython
    shell = get_ipython()
    return shell if getattr(shell, "kernel", None) is not None else None
