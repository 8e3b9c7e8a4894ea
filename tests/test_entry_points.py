"""A newcomer's entry points: bare papermill with a misspelled parameter, the runner's --overrides and ETA,
`make lab` as root on a port, the README's size and first screen, no import cycle in the engine."""
import ast
import importlib.util
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

import helpers as H
from refusal_lat import config

REPO = Path(__file__).resolve().parents[1]
VALID = ["profile", "run_dir", "overrides"]


class FakeShell:
    def __init__(self, history):
        self.user_ns = {"In": ["", *history]}


def test_a_misspelled_notebook_parameter_is_one_line_naming_the_valid_ones():
    shell = FakeShell(['profile = "cpu"     # cpu | tiny\nrun_dir = None\noverrides = {}', '# Parameters\nprofil = "tiny"\n'])
    with pytest.raises(H.ConfigError) as e:
        config.check_parameters(shell)
    assert str(e.value) == f"unknown notebook parameter(s) ['profil']; valid parameters: {VALID}"
    config.check_parameters(FakeShell(['profile = "cpu"\nrun_dir = None\noverrides = {}', '# Parameters\nprofile = "tiny"\n']))
    config.check_parameters(FakeShell(['x = 1']))  # interactive: no injected cell, nothing to check


def test_every_notebook_declares_the_same_parameters_and_lists_every_profile():
    for path in sorted((REPO / "notebooks").glob("0[0-6]_*.ipynb")):  # the series of the paper's analyses
        cells = json.loads(path.read_text())["cells"]
        (source,) = ["".join(c["source"]) for c in cells if "parameters" in c["metadata"].get("tags", [])]
        assert config._assigned(source)[:3] == VALID, path.name
        listed = re.search(r"profile = \"cpu\"\s+# ([a-z |]+?) \(", source).group(1).split(" | ")
        assert sorted(listed) == config.available_profiles(), path.name


def test_overridden_runs_get_their_own_folder():
    tiny = H.load_profile("tiny")
    assert config.default_run_dir(tiny) == REPO / "runs" / "tiny"
    one, same = config.default_run_dir(tiny, {"n_eval": 4}), config.default_run_dir(tiny, '{"n_eval": 4}')
    assert one == same and one.parent == REPO / "runs" and re.fullmatch(r"tiny-[0-9a-f]{8}", one.name)
    assert config.default_run_dir(tiny, {"n_eval": 5}) != one


def _runner(monkeypatch, *argv):
    spec = importlib.util.spec_from_file_location("run_notebooks", REPO / "scripts" / "run_notebooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(sys, "argv", ["run_notebooks.py", *argv])
    return module


@pytest.mark.parametrize("given", [["n_eval=4", "layer=1"], ['{"n_eval": 4, "layer": 1}']])
def test_runner_overrides_reach_every_notebook_in_a_folder_of_their_own(given, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(config, "REPO", tmp_path)  # default_run_dir: <REPO>/runs/<profile>-<hash>
    module = _runner(monkeypatch, "--profile", "tiny", "--only", "01", "--overrides", *given)
    seen = []
    monkeypatch.setattr(module.pm, "execute_notebook", lambda nb, out, **k: seen.append((out, k["parameters"])))
    assert module.main() == 0
    (out, params), = seen
    run = config.default_run_dir(H.load_profile("tiny"), {"n_eval": 4, "layer": 1})
    assert Path(out).parent == run / "notebooks" and params["overrides"] == {"n_eval": 4, "layer": 1}
    assert params["profile"] == "tiny" and Path(params["run_dir"]) == run


def test_runner_rejects_a_bad_override_in_one_line(monkeypatch, capsys):
    module = _runner(monkeypatch, "--profile", "tiny", "--overrides", "n_eval")
    assert module.main() == 2
    assert capsys.readouterr().err.strip().count("\n") == 0


def test_runner_prints_a_series_eta_from_the_last_series_csv(tmp_path, monkeypatch, capsys):
    (tmp_path / "series.csv").write_text("notebook,seconds,cpu_seconds,peak_rss_gib_so_far\n"
                                         "01_activations.ipynb,30.0,20,1\n02_svd_variance.ipynb,90.0,80,1\n")
    module = _runner(monkeypatch, "--profile", "tiny", "--run-dir", str(tmp_path), "--only", "01", "02")
    monkeypatch.setattr(module.pm, "execute_notebook", lambda *a, **k: None)
    assert module.main() == 0
    out = capsys.readouterr().out
    assert "== 01_activations.ipynb on profile 'tiny' (last run: 30.0 s)" in out
    assert "series ETA: about 2 min 00 s left" in out and "series ETA: about 1 min 30 s left" in out


def test_runner_and_training_name_the_same_adapter_folders(tiny):
    import training as T
    spec = importlib.util.spec_from_file_location("run_notebooks", REPO / "scripts" / "run_notebooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    rec = T.recipe(tiny)
    expected = [T.arm_folder(a, s) for s in T.training_seeds(rec) for a in rec.arms
                if not (T.adapter_root(rec) / T.arm_folder(a, s) / "adapter_config.json").is_file()]
    assert module.untrained_arms(module.engine(), tiny) == expected


def test_the_readme_starts_with_the_answer_and_the_cheapest_command():
    readme = (REPO / "README.md").read_text()
    assert len(readme.encode()) <= 12 * 1024
    first_screen = readme[:readme.index("<!-- claims:end -->")]
    assert "PROFILE=tiny make reproduce" in first_screen and "<!-- claims:start -->" in first_screen
    assert ".venv/bin/papermill" in readme and "refusal-lat" in readme  # the papermill example, the kernel's name


def _imports(path: Path) -> set:
    """Every refusal_lat module a module imports, at the top or inside a function."""
    package = ".".join(path.relative_to(REPO).with_suffix("").parts[:-1])
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package.split(".")[:len(package.split(".")) - node.level + 1]
            target = ".".join(base + ([node.module] if node.module else []))
            out |= {target, *(f"{target}.{a.name}" for a in node.names)}
    return out


def test_no_import_cycle_between_selection_stats_and_units():
    core = {m: REPO / "refusal_lat" / f"{m}.py" for m in ("selection", "stats", "units", "generation")}
    reach = {m: {t.split(".")[1] for t in _imports(p) if t.startswith("refusal_lat.") and t.count(".") == 1}
             for m, p in core.items()}
    assert "selection" not in reach["units"] and "stats" not in reach["units"]
    assert not ({"selection", "stats", "units"} & reach["generation"])


@pytest.mark.slow
def test_bare_papermill_with_a_misspelled_parameter_stops_in_one_line(tmp_path):
    papermill = REPO / ".venv" / "bin" / "papermill"
    if not papermill.is_file():
        pytest.skip("no .venv/bin/papermill (make setup)")
    out = tmp_path / "01.ipynb"
    result = subprocess.run([str(papermill), "notebooks/01_activations.ipynb", str(out), "-p", "profil", "tiny",
                             "-p", "run_dir", str(tmp_path / "run")], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    line = f"ConfigError: unknown notebook parameter(s) ['profil']; valid parameters: {VALID}"
    assert result.stderr.rstrip().endswith(line), result.stderr[-2000:]
    assert not (tmp_path / "run" / "activations").exists()  # nothing of the default profile ran


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_make_lab_serves_on_a_port_as_root(tmp_path):
    port = _free_port()
    proc = subprocess.Popen(["make", "lab", f"ARGS=--port {port} --no-browser --allow-root --ServerApp.ip=127.0.0.1"],
                            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, env={**os.environ, "JUPYTER_RUNTIME_DIR": str(tmp_path)})
    try:
        deadline, answer = time.time() + 180, None
        while time.time() < deadline and proc.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api", timeout=2) as r:
                    answer = json.loads(r.read())
                break
            except OSError:
                time.sleep(1)
        assert answer and "version" in answer, proc.stderr.read() if proc.poll() is not None else "no answer on /api"
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_library_noise_is_filtered_at_the_source():
    import logging
    import warnings
    from refusal_lat import quiet
    quiet.install()
    assert not logging.getLogger("bitsandbytes.backends.cpu.ops").isEnabledFor(logging.WARNING)
    with warnings.catch_warnings(record=True) as caught:
        quiet.install()
        warnings.warn("`is_gradient_checkpointing` is deprecated and will be removed in v6.", FutureWarning)
    assert caught == []
    from transformers.utils import logging as hf_logging
    with quiet.no_loading_bars():
        assert hf_logging.tqdm(range(3), desc="Loading weights").disable
        assert not hf_logging.tqdm(range(3), desc="Downloading").disable or not hf_logging.is_progress_bar_enabled()
