"""Summary tables for the notebooks and the README: this run's numbers beside the paper's, and the
"What this shows" paragraphs, computed from the numbers so the words cannot go stale."""
from __future__ import annotations

from .config import Profile
from .reference import PAPER_SVD, PAPER_SWEEP_BEST, PAPER_TABLE1
from .selection import MAX_INVALID, NO_BEST_LAYER
from .units import NO_ABLATION


PAPER_COLUMN = "paper (Llama-2-7B, L14)"


def compares_to_paper(profile: Profile) -> bool:
    """Only the paper profile runs the paper's models, so only it is set beside the paper's numbers."""
    return profile.name == "paper"


def summary_table(profile: Profile, transfer: "pd.DataFrame", svd: "pd.DataFrame", best_by_sweep: dict,
                  best_by_selection: dict) -> "pd.DataFrame":
    """Notebook 04's summary: per model, refusal with no ablation and with each model's direction at
    the profile's layer (`transfer`: score_units rows of the paper judge), the SVD share of the first
    two components (`svd`: svd_summary indexed by model) and the layer each rule picks. The paper
    column holds the paper's value for the same model role on every profile (a reference, not a
    like-for-like comparison off the paper profile)."""
    import pandas as pd

    def cell(target, source):
        row = transfer[(transfer.target == target) & (transfer.source == source)].iloc[0]
        return f"{100 * row.refusal_rate:.1f} ({row.refusals}/{row.n})"

    rows = []
    for role in profile.roles:
        svd_paper = PAPER_SVD.get(role)
        first_two = (f"{100 * svd.loc[role, 'first_two']:.1f} [{100 * svd.loc[role, 'first_two_low']:.1f}, "
                     f"{100 * svd.loc[role, 'first_two_high']:.1f}]")
        rows += [
            {"model": role, "quantity": "refusal %, no ablation", "ours": cell(role, NO_ABLATION),
             "paper": "not reported"},
            {"model": role, "quantity": f"refusal %, own direction at layer {profile.layer}", "ours": cell(role, role),
             "paper": PAPER_TABLE1.get((role, role))},
            {"model": role, "quantity": f"SVD first two components % at layer {profile.layer} [95 % CI]",
             "ours": first_two, "paper": None if svd_paper is None else f"{svd_paper[0]} + {svd_paper[1]}"},
            {"model": role, "quantity": "best layer, paper rule",
             "ours": NO_BEST_LAYER if role in best_by_sweep and best_by_sweep[role] is None else best_by_sweep.get(role),
             "paper": PAPER_SWEEP_BEST.get(role)},
            {"model": role, "quantity": "best layer, refusal_direction rule", "ours": best_by_selection.get(role),
             "paper": "not run"},
        ]
        for other in profile.roles:
            if other != role:
                rows.append({"model": role, "quantity": f"refusal %, direction of {other} at layer {profile.layer}",
                             "ours": cell(role, other), "paper": PAPER_TABLE1.get((role, other))})
    return pd.DataFrame(rows).rename(columns={"paper": PAPER_COLUMN})


def svd_beside_paper(summary: "pd.DataFrame") -> "pd.DataFrame":
    """Notebook 02's table: per model, components 1, 2 and both with bootstrap intervals (%), and the
    paper's value for the same role at layer 14 (Llama-2-7B; "–" where the paper has no such model)."""
    import pandas as pd
    rows = []
    for r in summary.itertuples():
        paper = PAPER_SVD.get(r.model)
        for name, label, ref in (("comp1", "component 1", None if paper is None else paper[0]),
                                 ("comp2", "component 2", None if paper is None else paper[1]),
                                 ("first_two", "first two", None if paper is None else round(sum(paper), 2))):
            rows.append({"model": r.model, "share of s², %": label,
                         f"ours, layer {r.layer} [95 % CI]": interval_text(getattr(r, name), getattr(r, f"{name}_low"),
                                                                          getattr(r, f"{name}_high")),
                         PAPER_COLUMN: "–" if ref is None else f"{ref:g}"})
    return pd.DataFrame(rows).set_index(["model", "share of s², %"])


def transfer_beside_paper(scores: "pd.DataFrame", roles: list[str], layer: int) -> "pd.DataFrame":
    """Notebook 03's Table 1: refusal % per (attacked model, ablated direction) with counts and Wilson
    intervals (`scores`: score_units rows of one judge), and the paper's Table 1 value where it has one."""
    import pandas as pd
    rows = []
    for target in roles:
        for source in [NO_ABLATION, *roles]:
            hit = scores[(scores.target == target) & (scores.source == source)]
            if hit.empty:
                continue
            r = hit.iloc[0]
            ref = PAPER_TABLE1.get((target, source))
            rows.append({"attacked model": target, "direction ablated": source,
                         f"ours, layer {layer}: refusal % (k/n) [Wilson 95 %]":
                             f"{100 * r.refusal_rate:.1f} ({r.refusals}/{r.n}) [{100 * r.wilson_low:.1f}, {100 * r.wilson_high:.1f}]",
                         PAPER_COLUMN: "not reported" if source == NO_ABLATION else ("not run" if ref is None else f"{ref:g}")})
    return pd.DataFrame(rows).set_index(["attacked model", "direction ablated"])


def markdown_table(table: "pd.DataFrame") -> str:
    """A GitHub markdown table (what the README embeds), without extra dependencies."""
    cells = [[str(c) for c in table.columns]] + [["–" if v is None or v != v else str(v) for v in row]
                                                 for row in table.itertuples(index=False)]
    lines = ["| " + " | ".join(row) + " |" for row in cells]
    return "\n".join([lines[0], "|" + "---|" * len(table.columns)] + lines[1:])


def error_bars(estimate, low, high):
    """matplotlib's yerr [[below], [above]] for interval bounds around point estimates (scalars or arrays),
    clipped at 0: a bootstrap interval need not contain its point estimate, and yerr must not be negative."""
    import numpy as np
    estimate, low, high = (np.atleast_1d(np.asarray(v, dtype=float)) for v in (estimate, low, high))
    return [np.clip(estimate - low, 0, None), np.clip(high - estimate, 0, None)]


def percent(value: float, digits: int = 1) -> str:
    """A share (0-1) as a percentage string, '42.2 %'."""
    return f"{100 * value:.{digits}f} %"


def interval_text(estimate: float, low: float, high: float) -> str:
    """'42.2 % [40.2, 47.3]' from shares (0-1)."""
    return f"{percent(estimate)} [{100 * low:.1f}, {100 * high:.1f}]"


def overlap_words(a_lo: float, a_hi: float, b_lo: float, b_hi: float) -> str:
    """How interval a sits against interval b: 'lies above', 'lies below' or 'overlaps'."""
    if a_lo > b_hi:
        return "lies above"
    if a_hi < b_lo:
        return "lies below"
    return "overlaps"


CHANCE_BAND = 0.1  # an AUROC within 0.5 +- this (in-sample, no interval) is read as chance


def separation_words(auc: float, others: list[float]) -> str:
    """How well one model's projection separates two classes (AUROC, either sign) against other models'."""
    strength = abs(auc - 0.5)
    if strength < CHANCE_BAND:
        return f"does not separate the classes (AUROC {auc:.2f}, within {CHANCE_BAND} of chance)"
    if all(strength > abs(o - 0.5) + CHANCE_BAND for o in others):
        return f"separates the classes (AUROC {auc:.2f}) clearly better than the others"
    return f"separates the classes (AUROC {auc:.2f}) about as well as the others"


def focus_model(roles: list[str]) -> str:
    """The model the paper's claims are about: LAT where the profile has it, else the last role."""
    return "LAT" if "LAT" in roles else roles[-1]


def svd_findings(summary: "pd.DataFrame", layer: int) -> str:
    """Notebook 02's "What this shows": the focus model's first-two and component-2 shares against every
    other model's (bootstrap intervals overlapping or not), the paper's values, and what the re-pairing
    null does and does not support. `summary`: svd_summary rows (column model)."""
    rows = summary.set_index("model")
    roles = list(rows.index)
    focus = focus_model(roles)
    lines = [f"At layer {layer}, n = {int(rows.n_pairs.iloc[0])} pairs, bootstrap 95 % intervals:"]
    for name, label in (("first_two", "first-two share"), ("comp2", "second-component share")):
        f = rows.loc[focus]
        parts = []
        for other in roles:
            if other == focus:
                continue
            o = rows.loc[other]
            words = overlap_words(f[f"{name}_low"], f[f"{name}_high"], o[f"{name}_low"], o[f"{name}_high"])
            parts.append(f"{words} {other}'s {interval_text(o[name], o[f'{name}_low'], o[f'{name}_high'])}")
        if parts:
            lines.append(f"- {focus}'s {label} {interval_text(f[name], f[f'{name}_low'], f[f'{name}_high'])} "
                         + "; ".join(parts) + ".")
    separated = [o for o in roles if o != focus and overlap_words(
        *rows.loc[focus, ["comp2_low", "comp2_high"]], *rows.loc[o, ["comp2_low", "comp2_high"]]) != "overlaps"]
    lines.append(f"- So the data separate {focus}'s second component from "
                 + (", ".join(separated) if separated else "no other model")
                 + " at this n" + ("" if separated else ": these data do not show the paper's larger second component")
                 + ".")
    if focus in PAPER_SVD and "base" in PAPER_SVD:
        c1, c2 = PAPER_SVD[focus]
        lines.append(f"- The paper (Llama-2-7B, layer 14): {focus} {c1:g} + {c2:g} = {c1 + c2:g} %, base "
                     f"{PAPER_SVD['base'][0]:g} + {PAPER_SVD['base'][1]:g} = {sum(PAPER_SVD['base']):g} %, without intervals.")
    if "null_comp2_p" in rows and rows.null_comp2_p.notna().all():
        f = rows.loc[focus]
        lines.append(f"- Re-pairing null: {focus}'s component 2 with the index pairing is {percent(f.comp2)} against "
                     f"{percent(f.null_comp2_mean)} on average over random pairings (share of pairings at least as "
                     f"large: {f.null_comp2_p:.3f}). The paper's pairing of prompt i with prompt i is itself "
                     "arbitrary, so this says only whether that one pairing is typical of random ones; it is not "
                     "evidence that component 2 encodes structure.")
    return "\n".join(lines)


def mcnemar_findings(tests: "pd.DataFrame", alpha: float = 0.05) -> str:
    """Notebook 03's paired tests in words (stats.mcnemar_table): which cells differ from their target's
    no-ablation cell, from each other, and across models under the same direction, at `alpha` after Holm's
    adjustment over the whole table."""
    if tests.empty:
        return "No two cells share prompts, so there is nothing to test."
    lines = [f"Exact McNemar tests, Holm-adjusted p < {alpha:g} over all {len(tests)} tests of the table:"]
    same_target = tests[tests.comparison == "same target"]
    vs_none = same_target[(same_target.source_a == NO_ABLATION) | (same_target.source_b == NO_ABLATION)]
    parts = (("against no ablation", vs_none), ("between directions on one model", same_target.drop(vs_none.index)),
             ("between models under the same direction", tests[tests.comparison == "same source"]))
    for title, part in parts:
        if part.empty:
            continue
        sig = part[part.p_holm < alpha]
        named = [f"{r.target_a}←{r.source_a} vs {r.target_b}←{r.source_b} (Holm p = {r.p_holm:.2g}; only the first "
                 f"refuses {r.only_a_refuses}, only the second {r.only_b_refuses})" for r in sig.itertuples()]
        shown = named[:6] + ([f"{len(named) - 6} more"] if len(named) > 6 else [])
        lines.append(f"- {title}: {len(sig)} of {len(part)} differ" + (": " + "; ".join(shown) if shown else "") + ".")
    return "\n".join(lines)


def saturation_findings(rates: "pd.DataFrame", threshold: float = 0.99) -> str:
    """Which attacked models still refuse (>= threshold) under every ablated direction: there the transfer
    matrix cannot rank directions. `rates`: refusal rates, targets x sources (NO_ABLATION included)."""
    ablated = rates.drop(columns=[c for c in rates.columns if c == NO_ABLATION])
    full = [t for t in ablated.index if (ablated.loc[t] >= threshold).all()]
    if not full:
        return (f"No attacked model refuses ≥ {percent(threshold, 0)} under every direction: lowest ablated rate per "
                "model " + ", ".join(f"{t} {percent(ablated.loc[t].min())}" for t in ablated.index) + ".")
    return (f"{', '.join(full)} refuse{'s' if len(full) == 1 else ''} ≥ {percent(threshold, 0)} under every ablated "
            "direction: ablation at this layer does not remove refusal there, so those rows cannot rank the "
            "directions (which transfers better) and say nothing about how the paper's numbers would move.")


def selection_findings(sweep: "pd.DataFrame", best_by_sweep: dict, best_by_selection: dict,
                       checks: "pd.DataFrame") -> str:
    """Notebook 04's "What this shows": the layer each rule picks per model, whether the paper rule is
    degenerate (every sweep layer gives the same refusal rate, so it falls back to the lowest layer), and
    the harmless-side KL and over-refusal of each pick. `sweep`: score_units rows of one judge."""
    lines = []
    for role, part in sweep.groupby("target", sort=False):
        rates = part.refusal_rate
        pick, other = best_by_sweep.get(role), best_by_selection.get(role)
        pick = None if pick is None or pick != pick else int(pick)
        other = None if other is None or other != other else int(other)
        if pick is None:
            eligible = part[part.invalid_rate < MAX_INVALID]
            why = (f"every sweep layer has ≥ {percent(MAX_INVALID)} invalid answers" if eligible.empty else
                   f"no layer with < {percent(MAX_INVALID)} invalid answers lowers refusal below 100 %")
            line = f"- {role}: the paper rule picks no layer ({why})"
        else:
            at = part[part.layer == pick].refusal_rate.iloc[0]
            line = f"- {role}: the paper rule picks layer {pick} (refusal {percent(at)})"
        line += f"; the refusal_direction rule picks " + ("no layer." if other is None else f"layer {other}.")
        if pick is not None and rates.nunique() == 1:
            line += (f" Every sweep layer gives {percent(rates.iloc[0])} refusal, so the paper rule is degenerate: "
                     "its pick is only the tie-break (the lowest layer).")
        if PAPER_SWEEP_BEST.get(role) is not None:
            line += f" The paper picked layer {PAPER_SWEEP_BEST[role]} for {role} (Llama-2-7B, 32 layers)."
        lines.append(line)
    for r in checks.itertuples():
        over = r.refusal_after - r.refusal_before
        lines.append(f"- {r.model}, layer {r.layer} on {r.n} harmless prompts: KL {r.kl:.3g}, refusal "
                     f"{percent(r.refusal_before)} → {percent(r.refusal_after)} (over-refusal {100 * over:+.1f} pp), "
                     f"{percent(r.changed_class)} of answers change class.")
    return "\n".join(lines)


def score_matrix_findings(table: "pd.DataFrame", alpha: float = 0.05) -> str:
    """The refusal-score matrix (stats.log_odds_matrix on scores.refusal_score_matrix) in words: per
    target, how far its own direction lowers the refusal log-odds, and which other models' directions
    lower it significantly less or more than its own (paired sign-flip test, Holm over the column)."""
    if "diff_vs_self_p_holm" not in table:
        return "The matrix has no cross-model cells to test."
    lines = [f"Paired sign-flip tests over the same {int(table.n.iloc[0])} prompts, Holm-adjusted within each "
             f"column of the table, at p < {alpha:g}:"]
    for target, part in table.groupby("target", sort=False):
        own = part[part.source == target]
        if own.empty or "diff_vs_none" not in own:
            continue
        o = own.iloc[0]
        words = (f"- {target}: its own direction moves refusal log-odds by {o.diff_vs_none:+.2f} "
                 f"[{o.diff_vs_none_lo:+.2f}, {o.diff_vs_none_hi:+.2f}] (Holm p = {o.diff_vs_none_p_holm:.2g})")
        others = part[(part.source != target) & (part.source != NO_ABLATION)]
        weaker = [f"{r.source} ({r.diff_vs_self:+.2f}, Holm p = {r.diff_vs_self_p_holm:.2g})"
                  for r in others.itertuples() if r.diff_vs_self_p_holm < alpha and r.diff_vs_self > 0]
        stronger = [f"{r.source} ({r.diff_vs_self:+.2f}, Holm p = {r.diff_vs_self_p_holm:.2g})"
                    for r in others.itertuples() if r.diff_vs_self_p_holm < alpha and r.diff_vs_self < 0]
        same = [r.source for r in others.itertuples() if not r.diff_vs_self_p_holm < alpha]
        words += ("; directions that remove less refusal than its own: " + (", ".join(weaker) or "none")
                  + "; more: " + (", ".join(stronger) or "none")
                  + "; not distinguishable from its own: " + (", ".join(same) or "none") + ".")
        lines.append(words)
    return "\n".join(lines)


def activation_findings(norms: "pd.DataFrame", cosines: "pd.DataFrame", layer: int, stable: float = 0.9) -> str:
    """Notebook 01's "What this shows", from its two tables: per model, whether harmful and harmless residuals
    have similar norms at the profile's layer (so the mean difference is no scale effect), how large the
    mean difference is against them, and over which layers the direction stays put (adjacent cosine >= stable)."""
    lines = []
    for model, part in cosines.groupby("model", sort=False):
        n = norms[(norms.model == model) & (norms.layer == layer)].set_index("prompts")["mean norm"]
        ratio = n["harmful"] / n["harmless"]
        diff = float(part.loc[part.layer == layer, "norm of mean difference"].iloc[0])
        scale = ("similar norms" if abs(ratio - 1) < 0.1 else f"norms {100 * abs(ratio - 1):.0f} % apart "
                 f"({'harmful' if ratio > 1 else 'harmless'} larger: part of the difference of means is scale)")
        steady = part[(part["cos(layer, layer+1)"] >= stable) & (part.layer >= 1)].layer.tolist()
        runs, start = [], None
        for a, b in zip([None, *steady], [*steady, None]):
            if a is None or b is None or b != a + 1:
                if a is not None:
                    runs.append((start, a + 1))
                start = b
        span = max(runs, key=lambda r: r[1] - r[0]) if runs else None
        where = (f"the direction changes little between adjacent layers from {span[0]} to {span[1]} "
                 f"(cosine ≥ {stable})" if span else f"no two adjacent layers share the direction (cosine < {stable} "
                 "everywhere)")
        lines.append(f"- **{model}**: at layer {layer} harmful and harmless prompts have {scale} "
                     f"(harmful / harmless {ratio:.2f}); the mean difference is {100 * diff / n.mean():.0f} % of their mean "
                     f"norm; {where}.")
    return "\n".join(lines)
