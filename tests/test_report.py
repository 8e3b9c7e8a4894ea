"""The words of the notebooks' "What this shows" cells follow the numbers; the text progress mode."""
import io

import pandas as pd

from refusal_lat import progress as progress_mod
from refusal_lat import report as R


def _svd(lat_c2, lat_lo, lat_hi):
    row = {"layer": 2, "n_pairs": 50, "comp1": 0.5, "comp1_low": 0.4, "comp1_high": 0.6, "first_two": 0.6,
           "first_two_low": 0.55, "first_two_high": 0.65, "null_comp2_mean": 0.05, "null_comp2_p": 0.5}
    return pd.DataFrame([{**row, "model": "base", "comp2": 0.05, "comp2_low": 0.04, "comp2_high": 0.06},
                         {**row, "model": "LAT", "comp2": lat_c2, "comp2_low": lat_lo, "comp2_high": lat_hi}])


def test_overlap_words():
    assert R.overlap_words(0.4, 0.5, 0.45, 0.6) == "overlaps"
    assert R.overlap_words(0.7, 0.8, 0.45, 0.6) == "lies above"
    assert R.overlap_words(0.1, 0.2, 0.45, 0.6) == "lies below"


def test_svd_findings_words_follow_the_intervals():
    apart = R.svd_findings(_svd(0.20, 0.15, 0.25), layer=2)
    together = R.svd_findings(_svd(0.055, 0.05, 0.07), layer=2)
    assert "lies above base's" in apart and "separate LAT's second component from base" in apart
    assert "overlaps base's" in together and "from no other model" in together
    assert "not evidence" in apart  # the re-pairing null is never read as structure


def test_mcnemar_findings_names_only_significant_cells():
    def row(kind, ta, sa, tb, sb, a, b, p, p_holm):
        return {"comparison": kind, "target_a": ta, "source_a": sa, "target_b": tb, "source_b": sb,
                "only_a_refuses": a, "only_b_refuses": b, "p_value": p, "p_holm": p_holm}
    tests = pd.DataFrame([row("same target", "LAT", "none", "LAT", "LAT", 9, 0, 0.004, 0.012),
                          row("same target", "LAT", "base", "LAT", "LAT", 1, 1, 1.0, 1.0),
                          row("same source", "base", "base", "LAT", "base", 0, 6, 0.03, 0.06)])
    words = R.mcnemar_findings(tests)
    assert "against no ablation: 1 of 1 differ: LAT←none vs LAT←LAT (Holm p = 0.012" in words
    assert "between directions on one model: 0 of 1 differ." in words
    assert "between models under the same direction: 0 of 1 differ." in words  # raw p 0.03, Holm 0.06


def test_saturation_and_selection_findings():
    rates = pd.DataFrame({"none": [1.0, 1.0], "base": [1.0, 0.2], "LAT": [1.0, 0.3]}, index=["AT", "base"])
    assert R.saturation_findings(rates).startswith("AT refuses")
    assert R.saturation_findings(rates.loc[["base"]]).startswith("No attacked model")
    sweep = pd.DataFrame({"target": ["AT"] * 3 + ["base"] * 3, "layer": [1, 2, 3] * 2,
                          "refusal_rate": [1.0, 1.0, 1.0, 0.9, 0.2, 0.5]})
    checks = pd.DataFrame([{"model": "base", "layer": 2, "n": 10, "kl": 0.01, "changed_class": 0.1,
                            "refusal_before": 0.0, "refusal_after": 0.2}])
    words = R.selection_findings(sweep, {"AT": 1, "base": 2}, {"AT": None, "base": 3}, checks)
    assert "AT: the paper rule picks layer 1" in words and "degenerate" in words.split("\n")[0]
    assert "degenerate" not in words.split("\n")[1] and "over-refusal +20.0 pp" in words
    sweep["invalid_rate"] = [0.0, 0.0, 0.0, 0.1, 0.2, 0.06]  # AT: eligible but never below 100 %; base: all invalid
    words = R.selection_findings(sweep, {"AT": None, "base": None}, {}, checks.iloc[:0])
    assert "AT: the paper rule picks no layer (no layer with < 5.0 % invalid answers lowers refusal below 100 %)" in words
    assert "base: the paper rule picks no layer (every sweep layer has ≥ 5.0 % invalid answers)" in words


def test_summary_and_tables_carry_the_paper_column_on_every_profile():
    svd = _svd(0.2, 0.15, 0.25)
    table = R.svd_beside_paper(svd)
    assert table.loc[("LAT", "component 2"), R.PAPER_COLUMN] == "20"


def test_progress_text_mode_writes_plain_lines(monkeypatch):
    monkeypatch.setenv("REFUSAL_LAT_PROGRESS", "text")
    out = io.StringIO()
    bar = progress_mod.progress(total=4, desc="generate", unit="tok", mininterval=0, stream=out)
    for _ in range(4):
        bar.update(1)
    bar.close()
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue() and len(lines) == 5
    assert lines[0].startswith("generate: 1/4 tok after") and "ETA" in lines[0]
    assert lines[-1].startswith("generate: 4/4 tok in ")
    monkeypatch.delenv("REFUSAL_LAT_PROGRESS")
    assert not progress_mod.text_mode()


def test_a_short_stage_prints_one_line_not_a_0_and_a_100_percent_line(monkeypatch):
    monkeypatch.setenv("REFUSAL_LAT_PROGRESS", "text")
    out = io.StringIO()
    assert list(progress_mod.progress(range(3), desc="base/harmful", unit="batch", stream=out)) == [0, 1, 2]
    (line,) = out.getvalue().splitlines()
    assert line.startswith("base/harmful: 3/3 batch in ") and "%" not in line


def test_separation_words_read_the_auroc():
    from refusal_lat.report import separation_words
    assert "does not separate" in separation_words(0.55, [0.5, 0.48])
    assert "does not separate" in separation_words(0.45, [0.5])  # either sign of the projection
    assert "clearly better" in separation_words(0.87, [0.49, 0.52])
    assert "about as well" in separation_words(0.74, [0.70])
