"""The paper's claims as directional tests, scored the same way on every source (docs/method.md,
"Scoring the paper's claims").

    C1        LAT's second SVD component carries a larger share of s² than the references'
    headline  LAT's first two components carry ≈ 75 % vs ≈ 49–54 % for the references
    C2        LAT's direction removes more refusal from each other model than that model's own direction
    C3a       LAT under another model's direction refuses more than that model under its own
    C3b       LAT under its own direction refuses LESS than base and AT under theirs (more vulnerable)

Every comparison is a paired difference a − b in percentage points (of s² for C1 / headline, of the
refusal rate for C2 / C3), with a basic bootstrap 95 % interval over the shared prompts (pairs) and the
sign the paper claims. `verdict` turns it into words, one rule for every cell:

    reproduced            the interval excludes 0 on the paper's side and reaches the paper's effect
    reproduced, weaker    the interval excludes 0 on the paper's side but lies short of the paper's effect
    opposite              the interval excludes 0 on the other side
    not reproduced        the interval holds 0 but excludes the paper's own effect (we could have seen it)
    cannot tell (power)   the interval holds both 0 and the paper's effect

Where the paper has no value for a comparison (our SFT control, AT's direction on LAT), the claim's
smallest paper effect stands in for it (flagged `paper_is_proxy`). A claim's cell combines its
comparisons: one verdict if they agree, else "mixed: …" with the counts.

Rows whose refusal values are a judge's labels (generation_cells, the arms' labels) also carry the
Rogan–Gladen corrected rates and difference (CORRECTED columns): the judge's sensitivity and specificity
measured on the held-out half of the labelled set of the same domain (data/labels/validation, written by
`scripts/label_set.py validate --publish`), with a bootstrap interval that resamples both the prompts and
those validation rows (stats.corrected_difference), and the verdict of the corrected interval. The markdown
shows the corrected values where a row has them (the raw judge values stay in the CSV).
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from .reference import PAPER_SVD, PAPER_TABLE1

CLAIMS = {
    "C1": "LAT concentrates refusal: its second SVD component's share is larger than the references'",
    "headline": "LAT's first two SVD components carry ≈ 75 % of s², the references' ≈ 49–54 %",
    "C2": "LAT's direction removes more refusal from the other models than their own directions do",
    "C3a": "LAT is more robust to the other models' directions than they are to their own",
    "C3b": "LAT is more vulnerable to its own direction than base and AT are to theirs",
}
EXPECT = {"C1": +1, "headline": +1, "C2": -1, "C3a": +1, "C3b": -1}  # the sign of a − b the paper claims
VERDICTS = ("reproduced", "reproduced, weaker", "opposite", "not reproduced", "cannot tell (power)")
CORRECTED = ["corrected_a_value", "corrected_b_value", "corrected_estimate", "corrected_lo", "corrected_hi",
             "corrected_verdict", "judge", "judge_validation"]
COLUMNS = ["claim", "source", "reference", "comparison", "a", "b", "unit", "n", "a_value", "b_value", "estimate", "lo", "hi",
           "p", "paper", "paper_is_proxy", "verdict", *CORRECTED]


# ----------------------------------------------------------------------------------------------
# 1. The paper's values of each comparison (from reference.py; None where the paper did not run it)

def paper_share(model: str, what: str) -> float | None:
    """The paper's layer-14 share in % (what: "comp2" or "first_two") of base / AT / LAT."""
    if model not in PAPER_SVD:
        return None
    comp1, comp2 = PAPER_SVD[model]
    return comp2 if what == "comp2" else comp1 + comp2


def paper_difference(claim: str, a: str, b: str) -> float | None:
    """The paper's value of `a − b` for a claim's comparison, in percentage points (roles base/AT/LAT
    and, for C2 / C3, cells (target, source) of Table 1)."""
    if claim in ("C1", "headline"):
        what = "comp2" if claim == "C1" else "first_two"
        x, y = paper_share(a, what), paper_share(b, what)
        return None if x is None or y is None else x - y
    cell = {"C2": lambda: ((b, "LAT"), (b, b)), "C3a": lambda: (("LAT", b), (b, b)),
            "C3b": lambda: (("LAT", "LAT"), (b, b))}[claim]()
    if cell[0] not in PAPER_TABLE1 or cell[1] not in PAPER_TABLE1:
        return None
    return PAPER_TABLE1[cell[0]] - PAPER_TABLE1[cell[1]]


def smallest_paper_effect(claim: str, references=("base", "AT")) -> float:
    """The claim's smallest paper effect (in magnitude) over the references the paper ran."""
    values = [paper_difference(claim, "LAT", ref) for ref in references]
    values = [v for v in values if v is not None]
    return min(values, key=abs)


# ----------------------------------------------------------------------------------------------
# 2. The verdict (the one rule)

def verdict(lo: float, hi: float, expect: int, paper: float | None) -> str:
    """Words for a paired difference's 95 % interval [lo, hi] given the claimed sign `expect` (+1 / -1) and
    the paper's effect (same units)."""
    if any(map(math.isnan, (lo, hi))):
        return "cannot tell (power)"
    known = paper is not None and not math.isnan(paper)
    if lo > 0 or hi < 0:
        if (1 if lo > 0 else -1) != expect:
            return "opposite"
        short = known and (hi < paper if expect > 0 else lo > paper)
        return "reproduced, weaker" if short else "reproduced"
    if paper is not None and not math.isnan(paper) and not lo <= paper <= hi:
        return "not reproduced"
    return "cannot tell (power)"


def combine(verdicts) -> str:
    """One verdict for a claim's comparisons: the shared one, else 'mixed: 2 reproduced; 1 opposite'."""
    verdicts = list(verdicts)
    if not verdicts:
        return "not measured"
    if len(set(verdicts)) == 1:
        return verdicts[0]
    counts = [f"{verdicts.count(v)} {v}" for v in VERDICTS if v in verdicts]
    return "mixed: " + "; ".join(counts)


def comparison_row(claim: str, source: str, reference: str, a: str, b: str, unit: str, n: int, a_value: float,
                   b_value: float, estimate: float, lo: float, hi: float, p: float, paper_role: str | None = None,
                   like_paper: bool = True, corrected: dict | None = None) -> dict:
    """One scored comparison of LAT against the reference model `reference` (paper_role: its role in the
    paper, base / AT, for the paper's value of the same comparison; default: `reference`). like_paper=False:
    units the paper has no value in (log-odds), so no paper value and no proxy. corrected: the judge-corrected
    values in the row's units {a, b, estimate, lo, hi, judge, judge_validation} (judge_corrected); without it the
    CORRECTED columns are empty (NaN / "")."""
    paper = paper_difference(claim, "LAT", paper_role or reference) if like_paper else math.nan
    proxy = paper is None
    if proxy:
        paper = smallest_paper_effect(claim)
    row = {"claim": claim, "source": source, "reference": reference, "comparison": f"{a} − {b}", "a": a, "b": b, "unit": unit, "n": int(n),
           "a_value": a_value, "b_value": b_value, "estimate": estimate, "lo": lo, "hi": hi, "p": p,
           "paper": paper, "paper_is_proxy": proxy, "verdict": verdict(lo, hi, EXPECT[claim], paper)}
    c = corrected or {}
    row.update({"corrected_a_value": c.get("a", math.nan), "corrected_b_value": c.get("b", math.nan),
                "corrected_estimate": c.get("estimate", math.nan), "corrected_lo": c.get("lo", math.nan),
                "corrected_hi": c.get("hi", math.nan),
                "corrected_verdict": verdict(c["lo"], c["hi"], EXPECT[claim], paper) if c else "",
                "judge": c.get("judge", ""), "judge_validation": c.get("judge_validation", "")})
    return row


# ----------------------------------------------------------------------------------------------
# 3. Comparisons from a source's tables

def svd_rows(paired, shares: dict, n: int, source: str, layer: int, lats=("LAT",), roles: dict | None = None
             ) -> list[dict]:
    """C1 (component 2) and headline (component "1+2") rows from a svd.paired_model_differences table
    (fractions, a − b, basic intervals, p_boot) at `layer`, for the rows whose a is one of `lats`.
    shares[(model, "comp2" | "first_two")]: the point shares (fractions); n: prompt pairs; `roles` maps
    the table's model names to the paper's roles (base / AT / LAT)."""
    roles = roles or {}
    rows = []
    at_layer = paired[(paired.layer == layer) & paired.a.isin(list(lats))]
    for claim, component, what in (("C1", "2", "comp2"), ("headline", "1+2", "first_two")):
        for r in at_layer[at_layer.component.astype(str) == component].itertuples():
            reference = f"{r.b}{'' if len(lats) == 1 else ' vs ' + r.a} L{layer}"
            rows.append(comparison_row(claim, source, reference, f"{r.a} {what}", f"{r.b} {what}",
                                       "pp of s²", n, 100 * shares[(r.a, what)], 100 * shares[(r.b, what)],
                                       100 * r.difference, 100 * r.lo, 100 * r.hi, r.p_boot, roles.get(r.b, r.b)))
    return rows


def svd_comparisons(diffs: dict, source: str, layer: int, lat: str = "LAT", others=("base", "SFT", "AT"),
                    roles: dict | None = None, n_boot: int = 1000, seed: int = 0) -> list[dict]:
    """C1 and headline rows from the harmful − harmless difference matrices diffs[(model, layer)]
    (rows paired across models): LAT minus each of `others` present, both resampled with the same pairs."""
    from .svd import paired_model_differences, variance_ratios
    others = [m for m in others if (m, layer) in diffs]
    at_layer = {k: d for k, d in diffs.items() if k[1] == layer}
    paired = paired_model_differences(at_layer, [(lat, m) for m in others], (1, 2), n_boot, seed, first_two=True)
    shares = {}
    for m in (lat, *others):
        r = variance_ratios(diffs[(m, layer)], 2)
        shares[(m, "comp2")], shares[(m, "first_two")] = r[1], r[0] + r[1]
    return svd_rows(paired, shares, len(diffs[(lat, layer)]), source, layer, (lat,), roles)


def paired_rate_difference(x, y, n_boot: int = 2000, seed: int = 0) -> tuple[float, float, float, float]:
    """(estimate, lo, hi, p) of mean(x − y) for per-prompt values x, y (0/1 labels, or seed averages),
    in the input's units: basic bootstrap 95 % interval over prompts, paired sign-flip p."""
    from .stats import mean_interval, sign_flip_p, sign_patterns
    from .svd import bootstrap_indices
    d = np.asarray(x, np.float64) - np.asarray(y, np.float64)
    est, lo, hi = mean_interval(d, bootstrap_indices(len(d), n_boot, seed))
    return est, lo, hi, sign_flip_p(d, sign_patterns(len(d), 10000, seed))


class JudgedCells(dict):
    """{(target, source): per-prompt refusal values} that a judge made: `judge` (judges.classify's method) and
    `domain` (whose labelled set validates it: "qwen" for this project's model, "llama2" for the authors')."""

    def __init__(self, cells: dict, judge: str, domain: str = "qwen"):
        super().__init__(cells)
        self.judge, self.domain = judge, domain


def judge_validation(judge: str, domain: str = "qwen", folder=None) -> dict | None:
    """{counts (tp, fn, fp, tn), judge, judge_validation (words)}: the judge against the human labels on the
    held-out half of `domain`'s labelled set, from the published validation table (data/labels/validation/
    <domain>.csv, sealed; scripts/label_set.py validate --publish). None when no table is published. A table
    that validated another version of the judge (its judge_id differs from judges.fingerprint) is an error:
    its counts do not describe the labels being corrected."""
    import pandas as pd
    from .config import ConfigError
    from .judges import fingerprint
    from .labelset import VALIDATION_DIR, held_out_counts
    from .record import verify
    folder = Path(folder or VALIDATION_DIR)
    path = folder / f"{domain}.csv"
    if not path.is_file():
        return None
    verify(folder)
    table = pd.read_csv(path, keep_default_na=False, dtype={"judge_id": str, "judge": str})
    mine = table[(table.judge == judge) & (table.half == "held_out") & (table.scope == "overall")]
    if len(mine) and mine.judge_id.iloc[0] != fingerprint(judge):
        raise ConfigError(f"{path} validated judge {mine.judge_id.iloc[0]}, but {judge!r} is now {fingerprint(judge)}; "
                          f"republish it: .venv/bin/python scripts/label_set.py validate --publish")
    tp, fn, fp, tn = held_out_counts(table, judge, domain)
    words = (f"{domain} held-out half: sensitivity {tp}/{tp + fn}, specificity {tn}/{tn + fp}")
    return {"counts": (tp, fn, fp, tn), "judge": fingerprint(judge), "judge_validation": words}


def judge_corrected(x, y, validation: dict, scale: float, n_boot: int, seed: int) -> dict:
    """The corrected values of comparison_row from per-prompt judge values x, y (stats.corrected_difference)."""
    from .stats import corrected_difference
    c = corrected_difference(x, y, validation["counts"], n_boot, seed)
    return {"a": scale * c["a"], "b": scale * c["b"], "estimate": scale * c["estimate"], "lo": scale * c["lo"],
            "hi": scale * c["hi"], "judge": validation["judge"], "judge_validation": validation["judge_validation"]}


def transfer_comparisons(cells: dict, source: str, lat: str = "LAT", others=None, roles: dict | None = None,
                         claims=("C2", "C3a", "C3b"), unit: str = "pp refusal", scale: float = 100.0,
                         n_boot: int = 2000, seed: int = 0, validation="auto") -> list[dict]:
    """C2 / C3a / C3b rows from per-prompt refusal values `cells[(target, source_of_direction)]` (arrays
    over the same prompts, in the same order; 1 = refusal). `others`: the reference models (default:
    every target but LAT); `roles` maps names to the paper's roles (base/AT/LAT). A comparison whose cells
    are missing is skipped (e.g. the authors' file has only each model's own direction). validation: the
    judge's held-out validation (judge_validation) for the corrected columns of refusal rows; "auto" takes it
    from JudgedCells (generation_cells) and gives none for other cells (human labels, log-odds)."""
    if validation == "auto":
        validation = judge_validation(cells.judge, cells.domain) if isinstance(cells, JudgedCells) else None
    roles = roles or {}
    others = others or [t for t, _ in cells if t != lat]
    others = list(dict.fromkeys(others))
    plan = {"C2": lambda m: ((m, lat), (m, m), f"{m} under {lat}'s direction", f"{m} under its own"),
            "C3a": lambda m: ((lat, m), (m, m), f"{lat} under {m}'s direction", f"{m} under its own"),
            "C3b": lambda m: ((lat, lat), (m, m), f"{lat} under its own direction", f"{m} under its own")}
    rows = []
    for claim in claims:
        for m in others:
            ca, cb, a, b = plan[claim](m)
            if ca not in cells or cb not in cells:
                continue
            x, y = np.asarray(cells[ca], np.float64), np.asarray(cells[cb], np.float64)
            est, lo, hi, p = paired_rate_difference(x, y, n_boot, seed)
            corrected = (judge_corrected(x, y, validation, scale, n_boot, seed)
                         if validation is not None and unit == "pp refusal" else None)
            rows.append(comparison_row(claim, source, m, a, b, unit, len(x), scale * x.mean(), scale * y.mean(),
                                       scale * est, scale * lo, scale * hi, p, roles.get(m, m),
                                       like_paper=unit == "pp refusal",  # the paper's numbers are refusal rates
                                       corrected=corrected))
    return rows


def generation_cells(results: dict, layer: int, method: str = "project", judge_text: str = "turn",
                     domain: str = "qwen") -> "JudgedCells":
    """{(target, source): 0/1 refusal labels} from notebook 03's generation units at `layer` (the
    judge's invalid label counts as not refusing, as in the paper's refusal rate), as JudgedCells: the judge
    and the labelled domain that validates it on such text (default "qwen": this project's model)."""
    from .judges import classify, judge_inputs
    out = JudgedCells({}, method, domain)
    for (target, source, unit_layer), records in results.items():
        if unit_layer != layer:
            continue
        texts, prompts = judge_inputs(records, judge_text)
        out[(target, source)] = np.array([label == 1 for label in classify(texts, method, prompts)], np.float64)
    return out


def human_label_cells(human) -> dict:
    """{(model, model): 0/1 refusal} from the authors' human-labelled completions (released.human_labels):
    each model with its own direction ablated, rows matched on (dataset, instruction)."""
    ablated = human[human.ablated]
    wide = ablated.assign(key=list(zip(ablated.dataset, ablated.instruction))).pivot_table(
        index="key", columns="model", values="human", aggfunc="first").dropna()
    return {(m, m): (~wide[m].astype(bool)).to_numpy(np.float64) for m in wide.columns}


# ----------------------------------------------------------------------------------------------
# 4. The verdict table: a long CSV (one row per comparison) and the markdown made from it alone

PAPER_TEXT = {
    "C1": "comp 2: LAT {LAT_comp2:.0f} % vs base {base_comp2:.2f} / AT {AT_comp2:.2f} %",
    "headline": "first two: LAT {LAT_first_two:.0f} % vs base {base_first_two:.1f} / AT {AT_first_two:.1f} %",
    "C2": "base {base_base:.2f} → {base_LAT:.2f} %, AT {AT_AT:.2f} → {AT_LAT:.2f} % under LAT's direction",
    "C3a": "LAT under base's {LAT_base:.2f} % vs base under its own {base_base:.2f} %",
    "C3b": "LAT {LAT_LAT:.2f} % vs base {base_base:.2f} / AT {AT_AT:.2f} % (own directions)",
}


def paper_column() -> dict:
    """The paper's numbers behind each claim, as text (from reference.py)."""
    values = {f"{m}_{w}": paper_share(m, w) for m in PAPER_SVD for w in ("comp2", "first_two")}
    values.update({f"{t}_{s}": v for (t, s), v in PAPER_TABLE1.items()})
    return {claim: text.format(**values) for claim, text in PAPER_TEXT.items()}


def corrected(rows) -> bool:
    """Whether every row of a cell carries judge-corrected values (CORRECTED columns, a non-empty verdict)."""
    if "corrected_verdict" not in rows or not len(rows):
        return False
    v = rows.corrected_verdict
    return bool((v.notna() & (v.astype(str) != "") & (v.astype(str) != "nan")).all())


def cell_text(rows) -> str:
    """A claim's cell for one source: the combined verdict, then each comparison's estimate [interval]; for
    judged refusal rows the judge-corrected ones (marked), the raw judge values staying in the CSV."""
    if len(rows) == 0:
        return "not measured"
    unit = rows.unit.iloc[0]
    f = ".2f" if unit == "log-odds" else ".1f"
    if corrected(rows):
        parts = [f"{r.reference} {r.corrected_estimate:+{f}} [{r.corrected_lo:+{f}}, {r.corrected_hi:+{f}}]"
                 for r in rows.itertuples()]
        return f"**{combine(rows.corrected_verdict)}**: " + "; ".join(parts) + f" {unit}, judge-corrected"
    parts = [f"{r.reference} {r.estimate:+{f}} [{r.lo:+{f}}, {r.hi:+{f}}]" for r in rows.itertuples()]
    return f"**{combine(rows.verdict)}**: " + "; ".join(parts) + f" {unit}"


def claims_markdown(table, sources, not_run=()) -> str:
    """The verdict table (rows: claims; columns: the paper, each source, then `not_run` sources) built
    from the long table alone, so every number in it is in the CSV."""
    paper = paper_column()
    head = ["claim", "the paper (Llama-2-7B, layer 14)", *sources, *not_run]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for claim, text in CLAIMS.items():
        cells = [cell_text(table[(table.claim == claim) & (table.source == s)]) for s in sources]
        lines.append("| " + " | ".join([f"**{claim}** {text}", paper[claim], *cells, *["not run"] * len(not_run)])
                     + " |")
    return "\n".join(lines) + "\n"


def write_claims(table, folder, sources, not_run=(), note: str = "") -> Path:
    """claims.csv (every comparison) and claims.md (the verdict table + the rule) into `folder`."""
    from .store import atomic_write
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write(folder / "claims.csv", table[COLUMNS].to_csv(index=False).encode())
    rule = ("Verdicts: LAT minus each reference, paired differences with basic bootstrap 95 % intervals; *reproduced* = "
            "the interval excludes 0 on the paper's side and reaches the paper's effect, *reproduced, weaker* = it "
            "excludes 0 on the paper's side but lies short of the paper's effect, *opposite* = it excludes 0 on the "
            "other side, *not reproduced* = it holds 0 but excludes the paper's effect, *cannot tell (power)* = it "
            "holds both. Where the paper has no value (SFT, AT's direction in LAT) its smallest effect for the claim "
            "stands in; log-odds rows have none. *judge-corrected*: refusal rates from a judge's labels, Rogan–Gladen "
            "corrected with the judge's sensitivity and specificity on the held-out half of the labelled set of the same "
            "model family, the interval resampling both the prompts and those labelled rows (raw judge values: the CSV). "
            "Every number: claims.csv.")
    atomic_write(folder / "claims.md", (claims_markdown(table, sources, not_run) + "\n" + rule + "\n"
                                        + (note + "\n" if note else "")).encode())
    return folder / "claims.md"


def read_claims(folder):
    """claims.csv of a folder; a committed (sealed) folder is checked against its manifest first."""
    import pandas as pd
    from .record import verify
    verify(folder)
    return pd.read_csv(Path(folder) / "claims.csv")


# ----------------------------------------------------------------------------------------------
# 5. The trained arms' tables (notebook 05: every arm and seed), pooled over seeds

ARM_ROLES = {"base": "base", "sft": "SFT", "at": "AT", "lat": "LAT"}


def arm_table_comparisons(tables: dict, source: str, layer: int, n_boot: int = 2000, seed: int = 0,
                          judge: str = "project", domain: str = "qwen") -> list[dict]:
    """The claims on notebook 05's tables (training.evaluate.TABLES), each arm's seeds pooled per prompt:
    C1 from svd_paired_differences at `layer` (LAT − SFT of the same seed, LAT − base; one row per seed),
    C3b from the own-direction-ablated completions (labels.csv's `project` column; `judge`: the judge that
    made it, i.e. the project judge when the tables were evaluated, corrected with its validation on `domain`),
    C2 / C3a from the first-token refusal log-odds with every model's direction ablated in every model
    (judge-free; no paper value in these units)."""
    from .training.evaluate import arm_of
    rows = []
    paired, shares = tables["svd_paired_differences"], tables["svd_shares"]
    if len(paired):
        at_layer = shares[shares.layer == layer].set_index("model")
        point = {(m, w): at_layer.at[m, w] for m in at_layer.index for w in ("comp2", "first_two")}
        lats = [m for m in at_layer.index if arm_of(m) == "lat"]
        rows += svd_rows(paired, point, int(tables["labels"].prompt.max() + 1), source, layer, lats,
                         {m: ARM_ROLES.get(arm_of(m), m) for m in at_layer.index})
    labels = tables["labels"]
    ablated = labels[labels.condition == "ablated"]
    pooled = {ARM_ROLES[a]: ablated[ablated.model.map(arm_of) == a].groupby("prompt").project.mean().to_numpy()
              for a in ARM_ROLES if (ablated.model.map(arm_of) == a).any()}
    if "LAT" in pooled:
        rows += transfer_comparisons(JudgedCells({(m, m): v for m, v in pooled.items()}, judge, domain), source,
                                     claims=("C3b",), n_boot=n_boot, seed=seed)
    scores = tables["transfer_log_odds"]
    scores = scores[scores.direction_of != "none"].assign(target=lambda d: d.model.map(arm_of).map(ARM_ROLES),
                                                          source_arm=lambda d: d.direction_of.map(arm_of).map(ARM_ROLES))
    own = scores[scores.model == scores.direction_of]
    cells = {}
    for (target, src), part in scores.dropna(subset=["target", "source_arm"]).groupby(["target", "source_arm"]):
        part = own[own.target == target] if target == src else part
        cells[(target, src)] = part.groupby("prompt").log_odds.mean().to_numpy()
    if ("LAT", "LAT") in cells:
        rows += transfer_comparisons(cells, source, claims=("C2", "C3a"), unit="log-odds", scale=1.0,
                                     n_boot=n_boot, seed=seed)
    return rows


# --- do the claims' verdicts change between a judge and the labels? (issue 29) ------------------------------

CLAIM_CELLS = {  # claim -> (a cell, b cell) for reference model m, as transfer_comparisons
    "C2": lambda m: ((m, "LAT"), (m, m)), "C3a": lambda m: (("LAT", m), (m, m)), "C3b": lambda m: (("LAT", "LAT"), (m, m)),
}


def eval_cell(source: str, layer: int) -> tuple[str, str] | None:
    """(target, direction source) of a labelled row from notebook 03's eval units at `layer`, else None."""
    artifact = source.rsplit("#", 1)[0]
    parts = Path(artifact).parts
    if parts[:2] != ("generations", "eval") or "__" not in Path(artifact).stem:
        return None
    target, tag = Path(artifact).stem.split("__", 1)
    if "_L" not in tag:
        return None
    src, at = tag.rsplit("_L", 1)
    return (target, src) if at == str(layer) else None


def unpaired_difference(x, y, n_boot: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """(mean(x) - mean(y), basic bootstrap 95 % interval) with each cell's items resampled on their own."""
    rng = np.random.default_rng(seed)
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    est = x.mean() - y.mean()
    reps = x[rng.integers(0, len(x), (n_boot, len(x)))].mean(1) - y[rng.integers(0, len(y), (n_boot, len(y)))].mean(1)
    q_lo, q_hi = np.quantile(reps, [0.025, 0.975])
    return float(est), float(2 * est - q_hi), float(2 * est - q_lo)


def claims_on_labels(judged_rows: "pd.DataFrame", layer: int, methods, references=("base", "SFT", "AT"),
                     n_boot: int = 2000, seed: int = 0) -> "pd.DataFrame":
    """The claims table's judged comparisons (C2, C3a, C3b of notebook 03's series at `layer`) on the labelled Qwen
    rows that lie in their cells, once per rater: the labels (refusal = 1; invalid = not, as the judges' invalid)
    and each judge in `methods`. The labelled rows of two cells hold different prompts, so each difference is
    unpaired (each cell resampled on its own); the verdict is `verdict` with the paper's value (or its
    proxy). Plus "C3b, own direction at any layer": LAT against each reference with its own direction ablated at
    any layer (the own_direction condition, sweep rows included), a condition-level analogue with more rows."""
    import pandas as pd
    rows = judged_rows[judged_rows.domain == "qwen"].copy()
    rows["cell"] = [eval_cell(s, layer) for s in rows.source]
    raters = {"labels": (rows.label == "refusal").astype(float), **{m: rows[m].astype(float) for m in methods}}
    plans = []
    for claim, cells in CLAIM_CELLS.items():
        for m in references:
            ca, cb = cells(m)
            plans.append((claim, m, rows.cell == ca, rows.cell == cb))
    for m in references:
        own = rows.condition == "own_direction"
        plans.append(("C3b, own direction at any layer", m, own & (rows.model == "LAT"), own & (rows.model == m)))
    out = []
    for claim, m, in_a, in_b in plans:
        if not in_a.any() or not in_b.any():
            continue
        base_claim = claim.split(",")[0]
        paper = paper_difference(base_claim, "LAT", m)
        paper = smallest_paper_effect(base_claim) if paper is None else paper
        for rater, values in raters.items():
            est, lo, hi = unpaired_difference(values[in_a], values[in_b], n_boot, seed)
            out.append({"claim": claim, "reference": m, "n_a": int(in_a.sum()), "n_b": int(in_b.sum()),
                        "shared_prompts": len(set(rows.prompt[in_a]) & set(rows.prompt[in_b])), "rater": rater,
                        "estimate": 100 * est, "lo": 100 * lo, "hi": 100 * hi, "paper": paper,
                        "verdict": verdict(100 * lo, 100 * hi, EXPECT[base_claim], paper)})
    table = pd.DataFrame(out)
    if len(table):
        labels = table[table.rater == "labels"].set_index(["claim", "reference"]).verdict
        table["same_verdict_as_labels"] = [labels[(c, r)] == v for c, r, v in
                                           zip(table.claim, table.reference, table.verdict)]
    return table
