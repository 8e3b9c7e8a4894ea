"""The paper's claims as directional tests (refusal_lat/claims.py): the verdict rule, each claim on planted
data (the paper's direction -> reproduced, the reversed planting -> opposite), and the verdict table's
numbers traced to its CSV."""
import math
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from refusal_lat import claims as C

REPO = Path(__file__).resolve().parents[1]


def test_verdict_rule():
    assert C.verdict(1.0, 3.0, +1, 15.0) == "reproduced, weaker"   # right sign, far short of the paper's +15
    assert C.verdict(1.0, 16.0, +1, 15.0) == "reproduced"
    assert C.verdict(-30.0, -10.0, -1, -24.4) == "reproduced"
    assert C.verdict(-8.0, -1.0, -1, -24.4) == "reproduced, weaker"
    assert C.verdict(-3.0, -1.0, +1, 15.0) == "opposite"
    assert C.verdict(-3.0, -1.0, -1, None) == "reproduced"
    assert C.verdict(-1.0, 2.0, +1, 15.0) == "not reproduced"      # 0 inside, the paper's effect outside
    assert C.verdict(-1.0, 20.0, +1, 15.0) == "cannot tell (power)"  # both inside
    assert C.verdict(-1.0, 2.0, +1, None) == "cannot tell (power)"
    assert C.combine(["reproduced", "reproduced"]) == "reproduced"
    assert C.combine(["reproduced", "opposite", "opposite"]) == "mixed: 1 reproduced; 2 opposite"


def test_paper_values_come_from_table1_and_the_svd_table():
    assert C.paper_difference("C2", "LAT", "base") == pytest.approx(10.77 - 20.38)
    assert C.paper_difference("C2", "LAT", "AT") == pytest.approx(13.65 - 38.08)
    assert C.paper_difference("C3a", "LAT", "base") == pytest.approx(25.77 - 20.38)
    assert C.paper_difference("C3a", "LAT", "AT") is None          # the paper never ablated AT's direction in LAT
    assert C.paper_difference("C3b", "LAT", "AT") == pytest.approx(16.92 - 38.08)
    assert C.paper_difference("C1", "LAT", "base") == pytest.approx(20.0 - 4.76)
    assert C.paper_difference("headline", "LAT", "AT") == pytest.approx(74.0 - (43.76 + 4.79))
    assert C.smallest_paper_effect("C3b") == pytest.approx(16.92 - 20.38)


def planted_cells(n, rates, seed=0):
    """cells[(target, source)]: n 0/1 labels with the given refusal rates (independent draws)."""
    rng = np.random.default_rng(seed)
    return {cell: (rng.random(n) < rate).astype(float) for cell, rate in rates.items()}


def test_c3b_planted_more_vulnerable_is_reproduced_and_the_reverse_is_opposite():
    vulnerable = planted_cells(400, {("LAT", "LAT"): 0.10, ("base", "base"): 0.40, ("AT", "AT"): 0.60})
    rows = C.transfer_comparisons(vulnerable, "planted", claims=("C3b",))
    assert {r["verdict"] for r in rows} == {"reproduced"} and len(rows) == 2
    robust = planted_cells(400, {("LAT", "LAT"): 0.70, ("base", "base"): 0.20, ("AT", "AT"): 0.30})
    rows = C.transfer_comparisons(robust, "planted", claims=("C3b",))
    assert {r["verdict"] for r in rows} == {"opposite"}


def test_c2_and_c3a_planted():
    rates = {("base", "base"): 0.40, ("base", "LAT"): 0.10, ("AT", "AT"): 0.50, ("AT", "LAT"): 0.15,
             ("LAT", "base"): 0.80, ("LAT", "AT"): 0.85, ("LAT", "LAT"): 0.30}
    rows = pd.DataFrame(C.transfer_comparisons(planted_cells(400, rates), "planted"))
    assert set(rows[rows.claim == "C2"].verdict) == {"reproduced"}
    assert set(rows[rows.claim == "C3a"].verdict) == {"reproduced"}
    swapped = {("base", "base"): 0.10, ("base", "LAT"): 0.40, ("AT", "AT"): 0.15, ("AT", "LAT"): 0.50,
               ("LAT", "base"): 0.05, ("LAT", "AT"): 0.05, ("LAT", "LAT"): 0.30}
    rows = pd.DataFrame(C.transfer_comparisons(planted_cells(400, swapped), "planted"))
    assert set(rows[rows.claim == "C2"].verdict) == {"opposite"}
    assert set(rows[rows.claim == "C3a"].verdict) == {"opposite"}


def test_no_difference_with_many_prompts_is_not_reproduced_with_few_cannot_tell():
    def same(n):  # equal rates, half the prompts discordant each way
        return {("LAT", "LAT"): np.tile([1.0, 0.0], n // 2), ("base", "base"): np.tile([0.0, 1.0], n // 2)}
    many = C.transfer_comparisons(same(4000), "x", claims=("C3b",), others=["base"])
    assert many[0]["lo"] < 0 < many[0]["hi"] and many[0]["verdict"] == "not reproduced"   # paper: -3.46 pp
    few = C.transfer_comparisons(same(30), "x", claims=("C3b",), others=["base"])
    assert few[0]["verdict"] == "cannot tell (power)"


def planted_differences(n, second, seed=0):
    """D = harmful - harmless rows: a strong first axis and a second axis of relative size `second`."""
    rng = np.random.default_rng(seed)
    d = np.zeros((n, 16))
    d[:, 0] = 5 + rng.normal(0, 0.3, n)
    d[:, 1] = second * rng.normal(0, 1, n) * 5
    d[:, 2:] = rng.normal(0, 0.3, (n, 14))
    return d


def test_c1_planted_second_component():
    diffs = {("LAT", 12): planted_differences(100, 0.8), ("base", 12): planted_differences(100, 0.1, 1),
             ("AT", 12): planted_differences(100, 0.1, 2)}
    rows = pd.DataFrame(C.svd_comparisons(diffs, "planted", 12, n_boot=200))
    assert set(rows[rows.claim == "C1"].verdict) == {"reproduced"}
    assert set(rows.reference) == {"base L12", "AT L12"}
    reverse = {("LAT", 12): planted_differences(100, 0.1), ("base", 12): planted_differences(100, 0.8, 1)}
    rows = pd.DataFrame(C.svd_comparisons(reverse, "planted", 12, n_boot=200))
    assert set(rows[rows.claim == "C1"].verdict) == {"opposite"}
    # the shares are those of numpy's SVD
    s = np.linalg.svd(diffs[("LAT", 12)], compute_uv=False) ** 2
    lat = C.svd_comparisons(diffs, "planted", 12, n_boot=50)[0]
    assert lat["a_value"] == pytest.approx(100 * s[1] / s.sum())


def test_human_label_cells_pair_on_instruction():
    human = pd.DataFrame({"dataset": ["d"] * 6, "instruction": ["p1", "p2", "p2", "p1", "p1", "p2"],
                          "model": ["base", "base", "LAT", "LAT", "none", "none"],
                          "ablated": [True, True, True, True, False, False],
                          "human": [True, False, True, False, False, False]})
    cells = C.human_label_cells(human)
    assert set(cells) == {("base", "base"), ("LAT", "LAT")}
    assert cells[("base", "base")].tolist() == [0.0, 1.0]   # p1 succeeded (no refusal), p2 refused
    assert cells[("LAT", "LAT")].tolist() == [1.0, 0.0]     # matched on the instruction, not the row order


def numbers(text):
    return [float(x) for x in re.findall(r"[+-]\d+\.\d+", text)]


def test_markdown_numbers_are_the_csv_numbers(tmp_path):
    rates = {("base", "base"): 0.40, ("base", "LAT"): 0.10, ("LAT", "base"): 0.80, ("LAT", "LAT"): 0.30}
    table = pd.DataFrame(C.transfer_comparisons(planted_cells(200, rates), "planted"))
    C.write_claims(table, tmp_path, ["planted"], not_run=["paper profile"])
    read = C.read_claims(tmp_path)
    md = (tmp_path / "claims.md").read_text()
    assert md.startswith(C.claims_markdown(read, ["planted"], ["paper profile"]))
    shown = numbers(md.split("\n\nVerdicts")[0])
    from_csv = [round(v, 1) for col in ("estimate", "lo", "hi") for v in read[col]]
    assert shown and all(any(math.isclose(x, y, abs_tol=0.051) for y in from_csv) for x in shown)


def test_committed_claims_table_matches_its_csv():
    folder = REPO / "figures" / "cpu"
    read = C.read_claims(folder)
    sources = list(dict.fromkeys(read.source))
    md = (folder / "claims.md").read_text()
    assert md.startswith(C.claims_markdown(read, sources, ["paper profile"]))
    readme = (REPO / "README.md").read_text()
    assert C.claims_markdown(read, sources, ["paper profile"]).splitlines()[2] in readme, \
        "README shows a claims table that is not figures/cpu/claims.md"


def test_committed_claims_verdicts_follow_from_their_numbers():
    """Every verdict of the committed table is the rule applied to its own interval and paper value; where a row
    carries judge-corrected values (claims.CORRECTED, issue 29), its corrected verdict is the rule applied to the
    corrected interval, and the markdown shows those (test_committed_claims_table_matches_its_csv)."""
    read = C.read_claims(REPO / "figures" / "cpu")
    for r in read.itertuples():
        paper = None if pd.isna(r.paper) else r.paper
        assert r.verdict == C.verdict(r.lo, r.hi, C.EXPECT[r.claim], paper), r
    if "corrected_verdict" in read:
        judged = read[read.corrected_verdict.notna() & (read.corrected_verdict.astype(str) != "")]
        for r in judged.itertuples():
            paper = None if pd.isna(r.paper) else r.paper
            assert r.unit == "pp refusal" and isinstance(r.judge, str) and r.judge
            assert r.corrected_verdict == C.verdict(r.corrected_lo, r.corrected_hi, C.EXPECT[r.claim], paper), r
