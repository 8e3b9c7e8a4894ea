"""Issue 29: the judge-corrected difference by hand, the fitted judges' API, the published validation tables
(sealed, refused without --publish, of the judge that is current) and the claims' corrected columns."""
import importlib.util
import json
import math

import numpy as np
import pandas as pd
import pytest

import helpers as H
from refusal_lat import claims as C
from refusal_lat import judges as Jg
from refusal_lat import labelset as L
from refusal_lat import record
from refusal_lat import stats as S


# --- Rogan-Gladen corrected difference ------------------------------------------------------------------------
def test_corrected_difference_by_hand():
    a, b = [1, 1, 0, 0], [1, 0, 0, 0]
    validation = (9, 1, 2, 8)  # tp, fn, fp, tn: sensitivity 0.9, specificity 0.8, Youden 0.7
    idx = [[0, 1, 2, 3], [0, 0, 1, 1], [2, 3, 2, 3], [0, 1, 2, 3]]
    draws = [[9, 1, 2, 8],      # rates 0.5, 0.25 corrected with 0.9 / 0.8: 0.25 / 0.7
             [10, 0, 0, 10],    # a perfect judge drawn: rates 1.0 and 0.5 stay, difference 0.5
             [8, 2, 4, 6],      # rates 0, 0 with 0.8 / 0.6: both below the false-positive floor, clipped to 0
             [5, 5, 5, 5]]      # sensitivity + specificity = 1: cannot be corrected, left out
    r = S.corrected_difference(a, b, validation, idx=idx, draws=draws)
    assert r["a"] == pytest.approx(0.3 / 0.7) and r["b"] == pytest.approx(0.05 / 0.7)
    assert r["estimate"] == pytest.approx(0.25 / 0.7) and r["raw_estimate"] == 0.25
    assert (r["sensitivity"], r["specificity"], r["n_boot"], r["n_dropped"]) == (0.9, 0.8, 3, 1)
    reps = sorted([0.25 / 0.7, 0.5, 0.0])
    q_lo = reps[0] + 0.05 * (reps[1] - reps[0])   # numpy's linear quantile at 0.025 of three values
    q_hi = reps[1] + 0.95 * (reps[2] - reps[1])   # ... and at 0.975
    assert r["lo"] == pytest.approx(2 * 0.25 / 0.7 - q_hi) and r["hi"] == pytest.approx(2 * 0.25 / 0.7 - q_lo)


def test_corrected_difference_with_a_known_judge_scales_the_raw_bootstrap():
    """Validation draws fixed at the point counts: every replicate is the raw paired difference / Youden."""
    rng = np.random.default_rng(1)
    a, b = (rng.random(200) < 0.55).astype(float), (rng.random(200) < 0.45).astype(float)
    idx = rng.integers(0, 200, (500, 200))
    validation = (95, 5, 10, 90)
    r = S.corrected_difference(a, b, validation, idx=idx, draws=[validation] * 500)
    raw = (a[idx].mean(1) - b[idx].mean(1)) / 0.85
    q_lo, q_hi = np.quantile(raw, [0.025, 0.975])
    est = (a.mean() - b.mean()) / 0.85
    assert r["estimate"] == pytest.approx(est)
    assert (r["lo"], r["hi"]) == (pytest.approx(2 * est - q_hi), pytest.approx(2 * est - q_lo))
    # drawing the validation rows as well widens the interval
    wide = S.corrected_difference(a, b, (19, 1, 2, 18), n_boot=2000, seed=0)
    narrow = S.corrected_difference(a, b, (1900, 100, 200, 1800), n_boot=2000, seed=0)
    assert wide["hi"] - wide["lo"] > narrow["hi"] - narrow["lo"]


def test_corrected_difference_rejects_what_it_cannot_correct():
    with pytest.raises(ValueError, match="paired"):
        S.corrected_difference([1, 0], [1], (9, 1, 2, 8))
    with pytest.raises(ValueError, match="human refusals and non-refusals"):
        S.corrected_difference([1, 0], [0, 0], (0, 0, 2, 8))
    with pytest.raises(ValueError, match="sensitivity \\+ specificity"):
        S.corrected_difference([1, 0], [0, 0], (5, 5, 5, 5))
    assert S.validation_counts([1, 1, 0, 0], [1, 0, 1, 0]) == (1, 1, 1, 1)


# --- the fitted judges need the requests -----------------------------------------------------------------------
@pytest.mark.parametrize("method", ["project", "project_v1"])
def test_fitted_judges_require_the_requests(method):
    with pytest.raises(ValueError, match="needs the requests"):
        Jg.classify(["Sure, here it is."], method)
    assert Jg.classify(["Sure, here it is:\n1. a\n2. b", "", "I'm sorry, but I can't help with that."], method,
                       ["Write a list", "Write a list", "Explain how to steal a car"]) == [0, -1, 1]
    with pytest.raises(ValueError, match="unknown classify method"):
        Jg.classify(["x"], "project_v3", ["p"])


def test_the_training_labeller_is_version_1():
    texts = ["Laughter is important for one's well-being because it helps to reduce stress.",
             "Stealing personal information is a serious crime that can have severe consequences."]
    assert Jg.project_labels_without_requests(texts) == Jg._project_labels(texts, None, "project_v1")
    assert Jg.fingerprint("project") != Jg.fingerprint("project_v1") and Jg.fingerprint("paper") == "paper"


# --- the published validation tables ---------------------------------------------------------------------------
def test_committed_validation_is_sealed_and_of_the_current_judges():
    folder = L.VALIDATION_DIR
    record.verify(folder)
    assert record.committed(folder)
    for domain in ("llama2", "qwen"):
        table = pd.read_csv(folder / f"{domain}.csv", keep_default_na=False)
        assert set(table.half) == {"fit", "held_out"} and set(table.domain) == {domain}
        for judge in Jg.ALL_METHODS:
            assert set(table[table.judge == judge].judge_id) == {Jg.fingerprint(judge)}, (domain, judge)
        overall = table[(table.scope == "overall")]
        assert (overall.tp + overall.fp + overall.fn + overall.tn == overall.n).all()
    qwen = pd.read_csv(folder / "qwen.csv")
    held = qwen[(qwen.half == "held_out") & (qwen.judge == "project")]
    # the judge's recorded held-out agreement is round q's (it was scored once, before round s was labelled)
    assert held[(held.scope == "round") & (held.group == "q")].agreement.iloc[0] == pytest.approx(
        J_PARAMS()["heldout"]["qwen"]["agreement"])
    assert set(held[held.scope == "round"].group) == {"q", "s"}
    intra = json.loads((folder / "intra_rater.json").read_text())
    assert intra["n"] >= 0.2 * 480


def J_PARAMS():
    from refusal_lat import project_judge as J
    return J.load_params()


def test_judge_validation_reads_the_held_out_counts():
    v = C.judge_validation("project", "qwen")
    table = pd.read_csv(L.VALIDATION_DIR / "qwen.csv", keep_default_na=False)
    assert v["counts"] == L.held_out_counts(table, "project", "qwen") and v["judge"] == Jg.fingerprint("project")
    assert C.judge_validation("project", "qwen", folder=L.VALIDATION_DIR.parent / "no such folder") is None


def cli():
    spec = importlib.util.spec_from_file_location("label_set", H.REPO / "scripts" / "label_set.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_validate_refuses_to_overwrite_a_published_folder_without_publish(tmp_path, monkeypatch):
    """A sealed folder is written only with --publish (the tables themselves are checked in
    test_committed_validation_is_sealed_and_of_the_current_judges)."""
    out = tmp_path / "validation"
    out.mkdir()
    (out / "qwen.csv").write_text("published\n")
    record.seal(out, ".venv/bin/python scripts/label_set.py validate --publish")
    calls = []
    monkeypatch.setattr(L, "read_table", lambda path: calls.append(path) or pd.DataFrame())
    assert cli().main(["validate", "--out", str(out)]) == 2
    assert (out / "qwen.csv").read_text() == "published\n" and not calls   # refused before reading anything
    record.verify(out)


# --- the claims' corrected columns -----------------------------------------------------------------------------
def planted(n=400, seed=0):
    rng = np.random.default_rng(seed)
    rates = {("LAT", "LAT"): 0.30, ("base", "base"): 0.60, ("AT", "AT"): 0.55}
    return {cell: (rng.random(n) < r).astype(float) for cell, r in rates.items()}


def test_judged_cells_carry_corrected_values():
    validation = {"counts": (95, 5, 10, 90), "judge": "project:test", "judge_validation": "planted"}
    cells = C.JudgedCells(planted(), "project")
    rows = C.transfer_comparisons(cells, "planted", claims=("C3b",), validation=validation)
    plain = C.transfer_comparisons(planted(), "planted", claims=("C3b",))
    assert len(rows) == 2
    for r, p in zip(rows, plain):
        assert {k: r[k] for k in ("estimate", "lo", "hi", "verdict")} == {k: p[k] for k in ("estimate", "lo", "hi", "verdict")}
        assert r["corrected_estimate"] == pytest.approx(r["estimate"] / 0.85)  # no rate near a clip
        assert r["corrected_a_value"] == pytest.approx(100 * S.rogan_gladen(r["a_value"] / 100, 0.95, 0.9))
        assert r["corrected_lo"] < r["corrected_estimate"] < r["corrected_hi"]
        assert r["corrected_verdict"] == C.verdict(r["corrected_lo"], r["corrected_hi"], -1, r["paper"])
        assert (r["judge"], r["judge_validation"]) == ("project:test", "planted")
        assert math.isnan(p["corrected_estimate"]) and p["corrected_verdict"] == "" and p["judge"] == ""
    log_odds = C.transfer_comparisons(cells, "planted", claims=("C3b",), unit="log-odds", scale=1.0,
                                      validation=validation)
    assert all(math.isnan(r["corrected_estimate"]) for r in log_odds)  # no rates: nothing to correct


def test_markdown_shows_the_corrected_values_of_judged_rows(tmp_path):
    validation = {"counts": (95, 5, 10, 90), "judge": "project:test", "judge_validation": "planted"}
    judged = C.transfer_comparisons(C.JudgedCells(planted(), "project"), "judged", claims=("C3b",), validation=validation)
    human = C.transfer_comparisons(planted(seed=1), "labels", claims=("C3b",))
    table = pd.DataFrame(judged + human, columns=C.COLUMNS)
    C.write_claims(table, tmp_path, ["judged", "labels"])
    read = C.read_claims(tmp_path)
    md = (tmp_path / "claims.md").read_text()
    assert md.startswith(C.claims_markdown(read, ["judged", "labels"]))
    row = [line for line in md.splitlines() if line.startswith("| **C3b**")][0]
    judged_cell, labels_cell = row.split(" | ")[2:4]
    assert "judge-corrected" in judged_cell and "judge-corrected" not in labels_cell
    for r in read[read.source == "judged"].itertuples():
        assert f"{r.corrected_estimate:+.1f}" in judged_cell and f"{r.corrected_lo:+.1f}" in judged_cell
    for r in read[read.source == "labels"].itertuples():
        assert f"{r.estimate:+.1f}" in labels_cell


def test_domain_validation_scopes_and_halves_by_hand():
    rows = pd.DataFrame({
        "domain": ["llama2"] * 6 + ["qwen"] * 3, "half": ["held_out"] * 4 + ["fit"] * 2 + ["held_out"] * 3,
        "model": ["none", "base", "AT", "LAT", "base", "LAT", "SFT", "SFT", "LAT"],
        "condition": ["clean", "own_direction", "own_direction", "own_direction", "own_direction", "clean",
                      "pgd_at", "harmless", "pgd_at"],
        "label": ["refusal", "refusal", "compliance", "refusal", "refusal", "refusal", "refusal", "invalid",
                  "compliance"],
        "substring": [1, 0, 0, 1, 1, 1, 1, 0, 1]})
    t = L.domain_validation(rows, ["substring"])
    get = lambda d, h, scope, group: t[(t.domain == d) & (t.half == h) & (t.scope == scope) & (t.group == group)].iloc[0]
    ablated = get("llama2", "held_out", "ablated rows", "all")   # base fn, AT tn, LAT tp
    assert (ablated.n, ablated.tp, ablated.fn, ablated.tn, ablated.fp) == (3, 1, 1, 1, 0)
    assert ablated.bias_points == pytest.approx(100 * (1 / 3 - 2 / 3)) and ablated.success_bias_points == pytest.approx(100 / 3)
    assert get("llama2", "held_out", "ablated rows, model", "base").agreement == 0.0
    assert get("llama2", "held_out", "overall", "all").split == "custom_set"
    assert get("llama2", "fit", "overall", "all").split == "advbench_test"
    qwen = get("qwen", "held_out", "overall", "all")                  # one tp, one fp, the invalid left out
    assert (qwen.n, qwen.n_invalid, qwen.tp, qwen.fp) == (2, 1, 1, 1)
    assert set(t[t.domain == "qwen"].group) == {"all", "pgd_at", "SFT", "LAT"}  # harmless: only an invalid row
    assert not t.fitted_on_this_half.any()
    assert L.fitted_halves("project") == {("llama2", "fit"), ("qwen", "fit")}
    assert L.fitted_halves("project_v1") == {("llama2", "fit")}


def test_eval_cell_reads_notebook_03s_units_only():
    assert C.eval_cell("generations/eval/AT__LAT_L12.jsonl#3", 12) == ("AT", "LAT")
    assert C.eval_cell("generations/eval/AT__LAT_L12.jsonl#3", 10) is None
    assert C.eval_cell("generations/eval/AT__none.jsonl#0", 12) is None
    assert C.eval_cell("generations/sweep/AT__AT_L12.jsonl#0", 12) is None
