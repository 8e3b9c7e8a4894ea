"""Committed reference notebooks show harmful prompts and completions only as their first few words."""
import json
import sys
from pathlib import Path

import nbformat
import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
import publish_reference as P  # noqa: E402


def _notebook(path: Path, shown: str):
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("x", outputs=[
        nbformat.v4.new_output("stream", name="stdout", text=shown)])])
    nbformat.write(nb, path)


def test_publish_refuses_a_notebook_that_shows_a_whole_completion(tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    (run / "notebooks").mkdir(parents=True)
    (run / "generations" / "eval").mkdir(parents=True)
    completion = "Step one of the dangerous procedure is to gather the following materials and then"
    (run / "generations" / "eval" / "base__none.jsonl").write_text(
        json.dumps({"i": 0, "prompt": "Explain how to do the dangerous thing in detail please", "completion": completion}) + "\n")
    _notebook(run / "notebooks" / "03_x.ipynb", f"ok: {completion[:30]}…\n")  # the first words only: fine
    assert P.leaks(P.output_text(run / "notebooks" / "03_x.ipynb"), run) == []
    _notebook(run / "notebooks" / "03_x.ipynb", f"shown: {completion}\n")
    assert P.leaks(P.output_text(run / "notebooks" / "03_x.ipynb"), run) == ["base__none.jsonl row 0 completion"]
    monkeypatch.setattr(sys, "argv", ["publish_reference.py", "--run-dir", str(run), "--profile", "test-never-committed"])
    assert P.main() == 1  # its exit status (in this process: a subprocess would import torch again, ~4 s)
    assert "shows more than the first words" in capsys.readouterr().err
    assert not (REPO / "notebooks" / "reference" / "test-never-committed").exists()


def test_committed_reference_notebooks_show_no_whole_harmful_prompt():
    notebooks = sorted((REPO / "notebooks" / "reference").glob("*/*.ipynb"))
    if not notebooks:
        pytest.skip("no reference notebooks committed")
    from refusal_lat.config import DataError
    from refusal_lat.data import paper_splits
    try:
        splits = paper_splits()
    except DataError as err:
        pytest.skip(f"datasets not reachable here: {err}")
    harmful = [p for key in ("harmful_train", "harmful_test", "gpt4o") for p in splits[key] if len(p) >= P.SHOWN]
    for nb in notebooks:
        text = P.output_text(nb)
        shown = [p[:40] for p in harmful if p[:P.SHOWN] in text]
        assert not shown, f"{nb.name} shows whole harmful prompts: {shown[:3]}"


def test_published_copies_carry_no_stderr_widgets_or_machine_paths(tmp_path):
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("x", outputs=[
        nbformat.v4.new_output("stream", name="stdout", text="artifacts -> /home/me/repo/runs/cpu\n"),
        nbformat.v4.new_output("stream", name="stderr", text="FutureWarning: something in /home/me/repo/x.py\n"),
        nbformat.v4.new_output("display_data", data={"application/vnd.jupyter.widget-view+json": {"model_id": "1"}}),
        nbformat.v4.new_output("display_data", data={"text/plain": "kept"})])])
    nb.metadata["widgets"] = {"state": {}}
    nbformat.write(nb, tmp_path / "01_x.ipynb")
    out = json.loads(P.cleaned(tmp_path / "01_x.ipynb", ["/home/me/repo"]))
    outputs = out["cells"][0]["outputs"]
    assert [o["output_type"] for o in outputs] == ["stream", "display_data"]
    assert "".join(outputs[0]["text"]) == "artifacts -> runs/cpu\n" and "widgets" not in out["metadata"]


def test_committed_reference_notebooks_carry_no_stderr_widgets_or_machine_paths():
    notebooks = sorted((REPO / "notebooks" / "reference").glob("*/*.ipynb"))
    assert notebooks, "no reference notebooks committed"
    for path in notebooks:
        text = path.read_text()
        nb = json.loads(text)
        streams = [o.get("name") for c in nb["cells"] for o in c.get("outputs", []) if o.get("output_type") == "stream"]
        assert "stderr" not in streams, f"{path.name} shows stderr output"
        assert "widget-view+json" not in text and "widgets" not in nb.get("metadata", {}), f"{path.name} holds widget state"
        assert "/work/" not in text and "/home/" not in text and "/root/" not in text, f"{path.name} shows a machine path"


def test_publish_refuses_figures_older_than_the_notebook_run(tmp_path, monkeypatch, capsys):
    import os
    run = tmp_path / "run"
    (run / "notebooks").mkdir(parents=True)
    (run / "figures").mkdir()
    _notebook(run / "notebooks" / "07_x.ipynb", "ok\n")
    nb = json.loads((run / "notebooks" / "07_x.ipynb").read_text())
    nb["metadata"]["papermill"] = {"start_time": "2026-12-07T21:33:04.163311+00:00"}
    (run / "notebooks" / "07_x.ipynb").write_text(json.dumps(nb))
    for name, when in (("07_new.png", "2026-12-07T21:40:00+00:00"), ("07_old.png", "2026-12-06T10:00:00+00:00"),
                       ("02_other.png", "2026-12-01T10:00:00+00:00")):  # 02 is not being published: not checked
        (run / "figures" / name).write_bytes(b"png")
        stamp = __import__("datetime").datetime.fromisoformat(when).timestamp()
        os.utime(run / "figures" / name, (stamp, stamp))
    assert P.stale_figures(run / "figures", [run / "notebooks" / "07_x.ipynb"]) == ["07_old.png"]
    monkeypatch.setattr(sys, "argv", ["publish_reference.py", "--run-dir", str(run), "--profile", "test-never-committed"])
    assert P.main() == 2
    assert "predate the notebook run" in capsys.readouterr().err
    assert not (REPO / "notebooks" / "reference" / "test-never-committed").exists()
