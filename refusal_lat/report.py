"""Summary tables for the notebooks and the README: this run's numbers beside the paper's."""
from __future__ import annotations

from .config import Profile
from .reference import PAPER_SVD, PAPER_SWEEP_BEST, PAPER_TABLE1
from .selection import NO_BEST_LAYER
from .units import NO_ABLATION


def compares_to_paper(profile: Profile) -> bool:
    """Only the paper profile runs the paper's models, so only it is set beside the paper's numbers."""
    return profile.name == "paper"


def summary_table(profile: Profile, transfer: "pd.DataFrame", svd: "pd.DataFrame", best_by_sweep: dict,
                  best_by_selection: dict) -> "pd.DataFrame":
    """Notebook 04's summary: per model, refusal with no ablation and with each model's direction at
    the profile's layer (`transfer`: score_units rows of the paper judge), the SVD share of the first
    two components (`svd`: svd_summary indexed by model) and the layer each rule picks."""
    import pandas as pd
    paper = compares_to_paper(profile)

    def cell(target, source):
        row = transfer[(transfer.target == target) & (transfer.source == source)].iloc[0]
        return f"{100 * row.refusal_rate:.1f} ({row.refusals}/{row.n})"

    rows = []
    for role in profile.roles:
        svd_paper = PAPER_SVD.get(role) if paper else None
        first_two = (f"{100 * svd.loc[role, 'first_two']:.1f} [{100 * svd.loc[role, 'first_two_low']:.1f}, "
                     f"{100 * svd.loc[role, 'first_two_high']:.1f}]")
        rows += [
            {"model": role, "quantity": "refusal %, no ablation", "ours": cell(role, NO_ABLATION),
             "paper": "not reported" if paper else None},
            {"model": role, "quantity": f"refusal %, own direction at layer {profile.layer}", "ours": cell(role, role),
             "paper": PAPER_TABLE1.get((role, role)) if paper else None},
            {"model": role, "quantity": f"SVD first two components % at layer {profile.layer} [95 % CI]",
             "ours": first_two, "paper": None if svd_paper is None else f"{svd_paper[0]} + {svd_paper[1]}"},
            {"model": role, "quantity": "best layer, paper rule", "ours": NO_BEST_LAYER if role in best_by_sweep and best_by_sweep[role] is None
             else best_by_sweep.get(role),
             "paper": PAPER_SWEEP_BEST.get(role) if paper else None},
            {"model": role, "quantity": "best layer, refusal_direction rule", "ours": best_by_selection.get(role),
             "paper": None},
        ]
        for other in profile.roles:
            if other != role:
                rows.append({"model": role, "quantity": f"refusal %, direction of {other} at layer {profile.layer}",
                             "ours": cell(role, other), "paper": PAPER_TABLE1.get((role, other)) if paper else None})
    return pd.DataFrame(rows)


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
