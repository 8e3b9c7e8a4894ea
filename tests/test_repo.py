"""The repository's promises: pinned installs agree, notebooks are clean, the runner names failures."""
import json
import sys
from pathlib import Path

import nbformat
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]


def _pins(lines):
    return sorted(line.strip() for line in lines if "==" in line and not line.strip().startswith("#"))


def test_requirements_and_environment_pin_the_same_versions():
    req = _pins((REPO / "requirements.txt").read_text().splitlines())
    env = yaml.safe_load((REPO / "environment.yml").read_text())
    pip_section = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    assert req == _pins(pip_section)
    assert "torch==2.13.0" in req


def test_notebooks_are_committed_without_outputs_and_have_a_parameters_cell():
    notebooks = sorted((REPO / "notebooks").glob("[0-9][0-9]_*.ipynb"))
    assert notebooks
    for path in notebooks:
        nb = nbformat.read(path, as_version=4)
        assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), path.name
        tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
        assert len(tagged) == 1 and "profile" in tagged[0].source, path.name


def test_runner_stops_naming_the_notebook_and_cell(tmp_path, monkeypatch, capsys):
    """Everything it writes lands under tmp_path (--run-dir), never in the repository's runs/tiny/. The runner
    runs in this process (a real kernel executes the notebook); a subprocess only re-imported papermill."""
    import importlib.util
    nb = nbformat.v4.new_notebook(cells=[
        nbformat.v4.new_code_cell('profile = "tiny"', metadata={"tags": ["parameters"]}),
        nbformat.v4.new_code_cell("x = 1"),
        nbformat.v4.new_code_cell("raise ValueError('boom')"),
    ])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    (tmp_path / "notebooks").mkdir()
    nbformat.write(nb, tmp_path / "notebooks" / "07_broken.ipynb")
    in_repo = REPO / "runs" / "tiny" / "notebooks" / "07_broken.ipynb"
    before = in_repo.stat().st_mtime_ns if in_repo.exists() else None
    spec = importlib.util.spec_from_file_location("run_notebooks", REPO / "scripts" / "run_notebooks.py")
    runner = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(runner)
    monkeypatch.setattr(sys, "argv", ["run_notebooks.py", "--profile", "tiny", "--notebooks", str(tmp_path / "notebooks"),
                                      "--run-dir", str(tmp_path / "run")])
    assert runner.main() == 1
    err = capsys.readouterr().err
    assert "FAILED: 07_broken.ipynb, cell" in err and "ValueError: boom" in err
    assert (tmp_path / "run" / "notebooks" / "07_broken.ipynb").is_file()
    assert (in_repo.stat().st_mtime_ns if in_repo.exists() else None) == before


def test_make_lab_has_jupyterlab_in_the_venv():
    """`make lab` runs .venv/bin/jupyter lab: requirements must install it (and ipywidgets, for tqdm bars)."""
    makefile = (REPO / "Makefile").read_text()
    assert ".venv/bin/jupyter lab" in makefile
    pins = {p.split("==")[0].lower() for p in _pins((REPO / "requirements.txt").read_text().splitlines())}
    assert {"jupyterlab", "ipywidgets", "papermill", "bitsandbytes"} <= pins
    jupyter = Path(sys.executable).parent / "jupyter-lab"
    if (REPO / ".venv") in Path(sys.executable).parents:  # the Makefile's venv: the entry point must exist
        assert jupyter.is_file(), jupyter


def _setup_cells():
    cells = {}
    for path in sorted((REPO / "notebooks").glob("[0-9][0-9]_*.ipynb")):
        nb = nbformat.read(path, as_version=4)
        cells[path.name] = [c.source for c in nb.cells if c.cell_type == "code" and c.source.startswith("# Setup.")]
    return cells


def test_every_notebook_has_the_same_setup_cell_and_it_finds_the_repository(tmp_path, monkeypatch):
    cells = _setup_cells()
    assert all(len(found) == 1 for found in cells.values()), cells.keys()
    (source,) = {found[0] for found in cells.values()}
    monkeypatch.chdir(REPO / "notebooks")  # where Jupyter and the runner start a notebook
    scope = {"profile": "cpu", "run_dir": None}
    exec(source, scope)
    assert scope["ROOT"] == REPO and scope["profile"] == "cpu" and scope["run_dir"] is None
    monkeypatch.chdir(tmp_path)  # outside the repository, not on Colab: one clear line, no StopIteration
    with pytest.raises(SystemExit, match="helpers.py not found"):
        exec(source, {"profile": "cpu", "run_dir": None})
