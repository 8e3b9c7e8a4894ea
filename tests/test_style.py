"""Every figure of the series (refusal_lat/plots.py, one function per published file) drawn on tiny data:
one colour per model and arm in all of them, legends outside the data, a title, readable annotations."""
from pathlib import Path
from unittest import mock

import matplotlib

matplotlib.use("Agg")
matplotlib.rcParams["figure.max_open_warning"] = 0
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from matplotlib.colors import to_hex  # noqa: E402

import helpers as H  # noqa: E402
from refusal_lat import plots, released as R, style as S  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
ROLES = ["base", "SFT", "AT", "LAT"]
ARMS = ["base", "sft-s0", "at-s0", "lat-s0", "rand-s0", "sft-s1", "at-s1", "lat-s1", "rand-s1"]


def _acts(rng, n=8, layers=4, d=16):
    gen = torch.Generator().manual_seed(0)
    return {role: {kind: torch.randn(n, layers, d, generator=gen) + (i + 1) * (kind == "harmful")
                   for kind in ("harmful", "harmless", "eval")} for i, role in enumerate(ROLES)}


def _released(rng, n=12, d=2600, layers=(1, 12, 16)):
    out = {}
    for i, m in enumerate(("base", "AT", "LAT")):
        for layer in layers:
            h, b = rng.normal(size=(n, d)), rng.normal(size=(n, d))
            if m == "LAT":
                h[: n // 2, list(R.MASSIVE_CHANNELS)] = 20 * rng.random((n // 2, 2))
            out[(m, layer)] = (h.astype(np.float32), b.astype(np.float32))
    return out


def _rates(rng, n=40):
    p = rng.uniform(0.05, 0.95)
    return {"refusal_rate": p, "wilson_low": max(0, p - 0.1), "wilson_high": min(1, p + 0.1), "n": n}


def _train_log(arm, seed, rng, steps=6):
    rows = [{"step": s, "loss": rng.random(), "loss_attacked": rng.random(), "loss_harmless": rng.random(),
             "attack_losses": list(rng.random(3))} for s in range(steps)]
    return {"rows": rows, "perturb_layer": 3, "epsilon": {"absolute": 0.5}}


def render_all() -> dict:
    """{figure name: Figure} for every name in plots.FIGURES, from small synthetic inputs."""
    rng = np.random.default_rng(0)
    figs = {}
    logs = {(arm, seed): _train_log(arm, seed, rng) for seed in (0, 1) for arm in ("sft", "at", "lat", "rand")}
    figs["00_training_loss"] = plots.training_loss(logs, 2, "tiny")
    figs["00_attack_loss"] = plots.attack_loss([(k, v) for k, v in logs.items() if k[0] != "sft"])

    acts = _acts(rng)
    norms = pd.DataFrame([{"model": r, "prompts": k, "layer": l, "mean norm": float(v)} for r, a in acts.items()
                          for k in ("harmful", "harmless") for l, v in enumerate(a[k].norm(dim=-1).mean(0))])
    figs["01_activation_norms"] = plots.activation_norms(norms, "tiny")
    cos = pd.DataFrame([{"model": r, "layer": l, "cos(layer, layer+1)": rng.random(), "norm of mean difference": rng.random()}
                        for r in ROLES for l in range(4)])
    figs["01_direction_across_layers"] = plots.direction_across_layers(cos, 2, "tiny")

    table = H.svd_table(acts)
    nulls = H.repairing_nulls(acts, 2, n_perm=20, seed=0)
    summary = H.svd_summary(acts, 2, n_boot=20, seed=0, nulls=nulls)
    at_layer = table[(table.layer == 2) & (table.component <= 6)].assign(percent=lambda t: 100 * t.ratio)
    figs["02_svd_components"] = plots.svd_components(at_layer, summary, ROLES, 2, "tiny", H.PAPER_SVD)
    figs["02_svd_cumulative"] = plots.svd_cumulative(table, 2)
    wide = table[table.component == 2].pivot(index="model", columns="layer", values="cumulative").loc[ROLES]
    wide_c = table[table.component == 2].pivot(index="model", columns="layer", values="cumulative_centered").loc[ROLES]
    figs["02_first_two_by_layer"] = plots.first_two_by_layer(wide, wide_c)
    figs["02_pairing_null"] = plots.pairing_null(nulls, summary, ROLES)
    figs["02_mean_difference_norm"] = plots.mean_difference_norm(H.mean_difference_norms(acts))
    points = {}
    for role in ROLES:
        for layer in (1, 3):
            h, b = (H.layer_activations(acts[role], role, layer, k) for k in ("harmful", "harmless"))
            coords, ratio = H.pca_2d(h, b)
            points[(role, layer)] = (coords, ratio, len(h))
    figs["02_pca_layers"] = plots.pca_layers(points, ROLES, (1, 3), "tiny")

    acts2 = _released(rng)
    layers = sorted({l for _, l in acts2})
    peaks = {key: tuple(H.massive.row_peaks(x, R.MASSIVE_CHANNELS) for x in pair) for key, pair in acts2.items()}
    ref = {l: R.reference_maximum(acts2, l, R.MASSIVE_CHANNELS) for l in layers}
    figs["02_llama2_massive_abs"] = plots.llama2_massive_abs(peaks, ref, (2.0, 10.0), layers, list(R.MODELS),
                                                             R.MASSIVE_CHANNELS)
    figs["02_llama2_threshold_curve"] = plots.llama2_threshold_curve(
        R.threshold_curve(acts2, (12, 16), (2.0, 5.0, 10.0, 30.0), R.MASSIVE_CHANNELS))
    diffs = R.differences(acts2)
    long = R.svd_long_table(diffs, n_boot=20, k=6)
    figs["02_llama2_figure2_layer16"] = plots.llama2_figure2(long, 16, k=6)
    figs["02_llama2_figure2_layer20"] = plots.llama2_figure2(long, 12, k=6)
    llama_wide = R.svd_wide_summary(long, R.frobenius_table(diffs))
    flagged = {k: R.flagged_pairs(acts2, k, R.MASSIVE_CHANNELS) for k in (2.0, 10.0)}
    clean = {k: R.svd_wide_summary(R.svd_long_table(R.drop_pairs(diffs, flagged[k]), n_boot=20, k=2)) for k in flagged}
    figs["02_llama2_first_two_by_layer"] = plots.llama2_first_two_by_layer(llama_wide, clean, (2.0, 10.0), H.PAPER_SVD,
                                                                           layers)

    per_layer = pd.DataFrame({f"{a}·{b}": rng.random(4) for i, a in enumerate(ROLES) for b in ROLES[i + 1:]})
    figs["03_direction_cosines"] = plots.direction_cosines(per_layer)
    rates = pd.DataFrame(rng.random((4, 5)), index=ROLES, columns=[H.NO_ABLATION, *ROLES])
    figs["03_transfer_heatmap"] = plots.transfer_heatmap(rates, 2, 8, "tiny")
    bars = pd.DataFrame([{"model": t, "vector": v, **_rates(rng)} for t in ROLES for v in plots.FIGURE1_VECTORS])
    figs["03_figure1"] = plots.figure1(bars, ROLES, H.PAPER_TABLE1, 2, 8, "tiny")

    sweep = pd.DataFrame([{"target": r, "layer": l, **_rates(rng), "acceptance_rate": rng.random(),
                           "invalid_rate": rng.random()} for r in ROLES for l in (1, 2, 3)])
    figs["04_layer_sweep"] = plots.layer_sweep(sweep, H.PAPER_SWEEP_REFUSAL, 8, "tiny")
    sel = pd.DataFrame([{"model": r, "layer": l, "refusal_score": rng.normal(), "steering_score": rng.normal(),
                         "kl": rng.random()} for r in ROLES for l in (1, 2, 3)])
    figs["04_selection"] = plots.selection(sel, {"base": 2, "SFT": None, "AT": 1, "LAT": 3}, H.MAX_KL, "tiny")

    conditions = ["harmful", "ablated", "pgd_at", "pgd_lat"]
    arm_rates = pd.DataFrame([{"model": m, "condition": c, "judge": j, "rate": p, "lo": max(0, p - 0.1),
                               "hi": min(1, p + 0.1), "n": 40}
                              for m in ARMS for c in conditions for j in ("project", "substring")
                              for p in [rng.random()]])
    figs["05_robustness"] = plots.robustness(arm_rates, ARMS, conditions, {c: c for c in conditions}, "tiny", 40)
    spread = pd.DataFrame([{"arm": a, "layer": l, "seeds": 1 if a == "base" else 2,
                            **{f"{c}_{s}": v + d for c in ("comp2", "first_two") for v in [rng.random() / 2]
                               for s, d in (("mean", 0), ("min", -0.01), ("max", 0.01))}}
                           for a in ("at", "base", "lat", "rand", "sft") for l in range(1, 6)])
    figs["05_svd_shares"] = plots.svd_shares(spread, 3, "tiny")
    second = pd.DataFrame([{"a": a, "b": b, "layer": l, "component": 2, "difference": d, "lo": d - 0.01, "hi": d + 0.01}
                           for a, b in (("lat-s0", "base"), ("lat-s0", "sft-s0"), ("lat-s1", "sft-s1"))
                           for l in range(1, 6) for d in [rng.normal() / 100]])
    figs["05_second_component_differences"] = plots.second_component_differences(second)
    figs["05_transfer"] = plots.transfer_matrix(pd.DataFrame(-rng.random((9, 9)), index=ARMS, columns=ARMS), "tiny")

    sources = ["authors' Llama-2 files", "tiny: notebooks 01–03"]
    claim_rows = pd.DataFrame([{"claim": c, "source": s, "reference": r, "unit": "pp refusal", "estimate": e,
                                "lo": e - 1, "hi": e + 1, "paper": np.nan if r == "SFT" else 5.0, "paper_is_proxy": r == "AT"}
                               for c in ("C1", "C2") for s in sources for r in ("base", "SFT", "AT")
                               for e in [rng.normal() * 5]])
    figs["06_claims"] = plots.claims(claim_rows, sources, ["C1", "C2", "C3a"])

    sweep = ["base", "eps0/sft-s0", "eps0.03/at-s0", "eps0.03/lat-s0", "eps0.14/at-s0", "eps0.14/lat-s0", "eps0.14/rand-s0"]
    from refusal_lat.training.sweep_eval import arm_of, budget_of
    dose = pd.DataFrame([{"model": m, "arm": arm_of(m), "budget": budget_of(m), "seed": 0,
                          **{c: rng.normal() for c in ("comp2_minus_sft", "norm_inflation_before", "over_refusal")},
                          "comp2_minus_sft_lo": -1.0, "comp2_minus_sft_hi": 1.0, "over_refusal_lo": -2.0,
                          "over_refusal_hi": 2.0, "rate_ablated_own": 100 * rng.random()} for m in sweep[1:]])
    figs["07_dose_response"] = plots.sweep_dose_response(dose, {"spread_low": 0.12, "spread_high": 0.21}, "tiny")
    conditions = ["harmful", "ablated_own", "prefill"]
    figs["07_robustness"] = plots.sweep_robustness(pd.DataFrame(100 * rng.random((len(sweep), 3)), index=sweep,
                                                                columns=conditions), conditions, "tiny", 10)
    mech = pd.DataFrame([{"model": m, "layer": l, "norm_without": 1 + rng.random(), "peak_vs_reference": 1 + rng.random()}
                         for m in sweep for l in range(6)])
    figs["07_mechanism"] = plots.sweep_mechanism(mech, 3, "tiny")
    return figs


@pytest.fixture(scope="module")
def figures():
    """Every figure, drawn without its tight_layout pass (half the time of this file): a legend is placed in
    axes or figure coordinates outside the plotting area, which the layout pass does not change."""
    with mock.patch.object(matplotlib.figure.Figure, "tight_layout", lambda self, *a, **k: None):
        figs = render_all()
    yield figs
    plt.close("all")


def _color(artist):
    if isinstance(artist, matplotlib.text.Text):
        return artist.get_color()
    if isinstance(artist, matplotlib.lines.Line2D):
        return artist.get_color()
    if isinstance(artist, matplotlib.collections.Collection):
        return artist.get_facecolor()[0]
    return artist.get_facecolor()


def test_every_published_figure_has_a_drawing_function():
    published = {p.stem for p in (REPO / "figures" / "cpu").glob("*.png")}
    assert published <= set(plots.FIGURES), f"figures without a function in refusal_lat/plots.py: {published - set(plots.FIGURES)}"


def test_one_colour_per_model_in_every_figure(figures):
    seen = {}  # model key -> {colour: [figures]}
    for name, fig in figures.items():
        for artist in fig.findobj(lambda a: (a.get_gid() or "").startswith("model=")):
            key = S.model_key(artist.get_gid().split("=", 1)[1])
            assert key is not None, f"{name}: {artist.get_gid()} names no model"
            seen.setdefault(key, {}).setdefault(to_hex(_color(artist), keep_alpha=False), set()).add(name)
        for legend in [*fig.legends, *(ax.get_legend() for ax in fig.axes if ax.get_legend())]:
            for handle, text in zip(legend.legend_handles, legend.get_texts()):
                key = S.model_key(text.get_text())
                if key is not None and handle is not None and not isinstance(handle, matplotlib.text.Text):
                    seen.setdefault(key, {}).setdefault(to_hex(_color(handle), keep_alpha=False), set()).add(name)
    assert {"base", "SFT", "AT", "LAT", "rand", "none"} <= set(seen)
    for key, colours in seen.items():
        assert list(colours) == [S.MODEL_COLORS[key].lower()], f"{key} drawn in {colours}"


def test_the_paper_marker_is_one_style():
    assert S.PAPER_LABEL == H.PAPER_COLUMN
    fig, ax = plt.subplots()
    star = S.paper_marker(ax, 0, 1)
    assert (star.get_marker(), star.get_markerfacecolor()) == ("*", "gold")
    plt.close(fig)


def _overlaps(a, b) -> bool:
    return a.x0 < b.x1 - 1 and b.x0 < a.x1 - 1 and a.y0 < b.y1 - 1 and b.y0 < a.y1 - 1


def test_titles_and_legends_outside_the_data(figures):
    for name, fig in figures.items():
        renderer = fig.canvas.get_renderer()
        plotted = [ax for ax in fig.axes if ax.has_data() and ax.get_label() != "<colorbar>"]
        assert (fig._suptitle is not None and fig._suptitle.get_text()) or all(ax.get_title() for ax in plotted), name
        for ax in plotted:
            legend = ax.get_legend()
            if legend is not None:
                assert not _overlaps(legend.get_window_extent(renderer), ax.get_window_extent(renderer)), \
                    f"{name}: a legend over its axes"
        for legend in fig.legends:
            for ax in plotted:
                    assert not _overlaps(legend.get_window_extent(renderer), ax.get_window_extent(renderer)), \
                        f"{name}: the figure legend over an axes"


def test_heatmap_annotations_are_readable(figures):
    for name in ("02_first_two_by_layer", "03_transfer_heatmap", "05_transfer"):
        for ax in figures[name].axes:
            for image in ax.get_images():
                for text in ax.texts:
                    i, j = (int(round(v)) for v in text.get_position()[::-1])
                    cell = image.cmap(image.norm(image.get_array()[i, j]))
                    a, b = S.luminance(cell), S.luminance(text.get_color())
                    assert (max(a, b) + 0.05) / (min(a, b) + 0.05) >= 3, f"{name}: {text.get_text()} unreadable"


def test_a_one_signed_matrix_uses_the_whole_colormap():
    cmap, norm = S.value_norm(-np.array([[0.24, 0.71], [0.3, 0.5]]))
    assert cmap == S.SEQUENTIAL_CMAP and (norm.vmin, norm.vmax) == (-0.71, -0.24)
    cmap, norm = S.value_norm(np.array([[-0.2, 0.7]]))
    assert cmap == S.DIVERGING_CMAP and norm(-0.2) == 0 and norm(0.7) == 1


def test_model_names_map_to_one_key():
    assert {S.model_key(n) for n in ("LAT", "lat", "lat-s1", "lat-s0")} == {"LAT"}
    assert S.model_key("sft-s1") == "SFT" and S.model_key("none") == "none" and S.model_key("12") is None
    assert S.model_color("at-s1") == S.model_color("AT") and S.seed_linestyle("at-s1") != S.seed_linestyle("at-s0")
