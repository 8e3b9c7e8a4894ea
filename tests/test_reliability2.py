"""Issue 17: caches that cannot lie (content hash and row count in the sidecar, written last), profile
values checked in the one validator, figures that follow run_dir, torn folders never used, and the
documented commands failing with one line instead of silently doing nothing."""
import dataclasses
import errno
import importlib.util
import json
import os
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

import helpers as H
import training as T
from refusal_lat import generation, store
from refusal_lat.models import gguf

REPO = Path(__file__).resolve().parents[1]


def one_line(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message, message
    return message


# --- silent wrong results ------------------------------------------------------------------------

def test_a_unit_with_no_or_too_few_rows_is_never_saved(tiny, tmp_path, monkeypatch):
    dirs = {"base": torch.randn(4, 32), "LAT": torch.randn(4, 32)}
    def returning(n_missing):  # what batch_size -1 used to do: fewer completions than prompts
        return lambda m, t, p, prompts, *a, **k: generation.Generation(
            texts=["x"] * (len(prompts) - n_missing), tokens=[], first_logits=torch.zeros(len(prompts) - n_missing, 8))
    monkeypatch.setattr(generation, "generate_tokens", returning(2))
    with pytest.raises(store.StoreError) as e:
        H.generation_units(tiny, tmp_path, ["hi", "there"], dirs, [("base", "LAT", 2)])
    assert "returned 0 completions for 2 prompts" in one_line(e) and "refusing to save" in one_line(e)
    monkeypatch.setattr(generation, "generate_tokens", returning(1))
    with pytest.raises(store.StoreError) as e:
        H.generation_units(tiny, tmp_path, ["hi", "there"], dirs, [("base", "LAT", 2)])
    assert "returned 1 completions for 2 prompts" in one_line(e)
    assert not list(tmp_path.rglob("*.jsonl")) and not list(tmp_path.rglob("*.tmp"))


def test_store_refuses_an_empty_table(tmp_path):
    with pytest.raises(store.StoreError) as e:
        store.cached(tmp_path / "t.csv", {"k": 1}, lambda info: pd.DataFrame({"a": []}), store.read_table,
                     store.encode_table)
    assert "no rows" in one_line(e)
    assert not (tmp_path / "t.csv").exists()


@pytest.mark.parametrize("overrides, message", [
    ({"batch_size": -1}, "batch_size = -1 is out of range; need 1 <= batch_size"),
    ({"batch_size": 0}, "batch_size = 0 is out of range"),
    ({"read_position": 5}, "a position >= 0 would read padding"),
    ({"read_position": 0}, "read_position = 0 is out of range"),
    ({"read_position": -1000}, "read_position = -1000 is out of range"),
    ({"layer": -1}, "layer = -1 is out of range; need 0 <= layer"),
    ({"max_new_tokens": 0}, "max_new_tokens = 0 is out of range"),
    ({"max_new_tokens": -1}, "max_new_tokens = -1 is out of range"),
    ({"n_bootstrap": 0}, "n_bootstrap = 0 is out of range"),
    ({"n_bootstrap": -1}, "n_bootstrap = -1 is out of range"),
    ({"seed": -1}, "seed = -1 is out of range"),
    ({"n_val": 0}, "n_val = 0 is out of range"),
    ({"template": "{prompt}{x}"}, "no other braces"),
    ({"template": "{prompt}}"}, "no other braces"),
    ({"models": {}}, "models is empty"),
    ({"refusal_tokens": [""]}, "refusal_tokens must be a non-empty list of non-empty strings"),
    ({"refusal_tokens": [5]}, "refusal_tokens must be a non-empty list of non-empty strings"),
    ({"refusal_tokens": []}, "refusal_tokens must be a non-empty list of non-empty strings"),
    ({"sweep_layers": ["a"]}, "sweep_layers must list block indices"),
    ({"pca_layers": [-2]}, "pca_layers must list block indices"),
])
def test_profile_values_out_of_range(overrides, message):
    with pytest.raises(H.ConfigError) as e:
        H.load_profile("tiny", overrides)
    assert message in one_line(e)


def test_a_read_position_beyond_the_shortest_prompt(tiny, tiny_model):
    model, tok = tiny_model
    far = dataclasses.replace(tiny, read_position=-64)
    with pytest.raises(H.ConfigError) as e:
        H.block_inputs(model, tok, far, ["hi", "a much longer prompt " * 4])
    assert "read_position -64 lies outside prompt 'hi'" in one_line(e)


def _two_keys_same_file(tmp_path, payload_a, payload_b, read):
    path = tmp_path / "artifact"
    store.store(path, {"setting": "a"}, payload_a, rows=1)
    assert read(path) is not None and store.fresh(path, {"setting": "a"}, read) is not None
    return path


def test_a_kill_between_data_and_sidecar_never_serves_the_wrong_data(tmp_path, monkeypatch):
    path = tmp_path / "units.jsonl"
    a, b = [{"i": 0, "completion": "from a"}], [{"i": 0, "completion": "from b"}]
    store.store(path, {"setting": "a"}, store.encode_jsonl(a), rows=1)
    assert store.fresh(path, {"setting": "a"}, store.read_jsonl) == a
    real = store.atomic_write

    def killed_before_sidecar(target, payload):
        if Path(target).suffix == ".json":
            raise KeyboardInterrupt  # the kill lands after the data rename, before the sidecar's
        real(target, payload)
    monkeypatch.setattr(store, "atomic_write", killed_before_sidecar)
    with pytest.raises(KeyboardInterrupt):
        store.store(path, {"setting": "b"}, store.encode_jsonl(b), rows=1)
    monkeypatch.setattr(store, "atomic_write", real)
    assert store.read_jsonl(path) == b  # the data of b sits there ...
    assert store.fresh(path, {"setting": "a"}, store.read_jsonl) is None  # ... and is not served as a
    assert store.fresh(path, {"setting": "b"}, store.read_jsonl) is None  # nor as b without its sidecar
    # the old order (a's sidecar left beside b's data) is caught by the content hash
    store.store(path, {"setting": "a"}, store.encode_jsonl(a), rows=1)
    store.atomic_write(path, store.encode_jsonl(b))
    assert store.fresh(path, {"setting": "a"}, store.read_jsonl) is None


def test_a_unit_cut_on_a_line_boundary_is_regenerated(tiny, tmp_path, monkeypatch):
    dirs = {"base": torch.randn(4, 32), "LAT": torch.randn(4, 32)}
    units = [("base", "LAT", 2)]
    first = H.generation_units(tiny, tmp_path, ["hi", "there"], dirs, units)
    path = H.unit_path(tmp_path, "base", "LAT", 2)
    path.write_text("".join(path.read_text().splitlines(keepends=True)[:-1]))  # sed -i '$d'
    calls = []
    real = generation.generate_tokens
    monkeypatch.setattr(generation, "generate_tokens", lambda *a, **k: calls.append(1) or real(*a, **k))
    assert H.generation_units(tiny, tmp_path, ["hi", "there"], dirs, units) == first
    assert calls == [1] and len(store.read_jsonl(path)) == 2


def test_a_cut_table_and_edited_tensors_are_recomputed(tmp_path):
    table = pd.DataFrame({"layer": [1, 2, 3], "score": [0.1, 0.2, 0.3]})
    path = tmp_path / "selection.csv"
    store.cached(path, {"k": 1}, lambda info: table, store.read_table, store.encode_table)
    path.write_text("".join(path.read_text().splitlines(keepends=True)[:2]))  # header + one row
    assert store.fresh(path, {"k": 1}, store.read_table) is None
    assert store.cached(path, {"k": 1}, lambda info: table, store.read_table, store.encode_table).equals(table)

    tensors = {"harmful": torch.arange(12.0).reshape(3, 4)}
    path = tmp_path / "base.safetensors"
    store.cached(path, {"k": 2}, lambda info: tensors, store.read_tensors, store.encode_tensors)
    raw = bytearray(path.read_bytes())
    raw[-3] ^= 0xFF  # a byte inside the data, the file still loads
    path.write_bytes(bytes(raw))
    assert store.read_tensors(path)["harmful"].shape == (3, 4)
    assert store.fresh(path, {"k": 2}, store.read_tensors) is None
    from safetensors import safe_open
    store.cached(path, {"k": 2}, lambda info: tensors, store.read_tensors, store.encode_tensors)
    with safe_open(str(path), "pt") as f:  # the tensors name their key
        assert f.metadata()["key"] == store.key_hash({"k": 2})


def test_cache_keys_include_library_versions_and_device(tiny, monkeypatch):
    key = {"stage": "x"}
    before = store.key_hash(key)
    monkeypatch.setattr(store, "library_versions", lambda: {"torch": "0.0", "transformers": "0.0"})
    assert store.key_hash(key) != before
    assert H.model_fingerprint(tiny, "base")["device"] == "cpu"
    assert H.model_fingerprint(dataclasses.replace(tiny, device="cpu"), "base")["device"] == "cpu"


def test_figures_follow_run_dir_and_overrides(tmp_path, monkeypatch):
    _, run, fig = H.start("tiny", {}, tmp_path / "elsewhere" / "run")
    assert fig == tmp_path / "elsewhere" / "run" / "figures"
    _, run, fig = H.start("tiny", {"n_eval": 4}, tmp_path / "other")
    assert fig == tmp_path / "other" / "figures"
    from refusal_lat import config
    monkeypatch.setattr(config, "REPO", tmp_path / "repo")  # the default run and figures/ of a stand-in repository
    profile = H.load_profile("tiny")
    assert H.figure_dir(profile) == tmp_path / "repo" / "runs" / "tiny" / "figures"  # not publishing: the run's
    monkeypatch.setenv(config.PUBLISH_ENV, "1")  # scripts/run_notebooks.py --publish
    assert H.figure_dir(profile) == tmp_path / "repo" / "figures" / "tiny"  # the default run publishes
    assert H.figure_dir(profile, tmp_path / "repo" / "runs" / "tiny") == tmp_path / "repo" / "figures" / "tiny"
    assert H.figure_dir(profile, tmp_path / "other") == tmp_path / "other" / "figures"
    assert H.figure_dir(profile, changed=True) == tmp_path / "repo" / "runs" / "tiny" / "figures"
    monkeypatch.delenv(config.PUBLISH_ENV)
    (tmp_path / "blocked").mkdir()
    (tmp_path / "blocked" / "figures").write_text("not a folder")
    with pytest.raises(H.ConfigError) as e:
        H.start("tiny", {}, tmp_path / "blocked")
    assert "figure folder" in one_line(e) and "a file?" in one_line(e)


def _run_notebooks(monkeypatch, *argv):
    spec = importlib.util.spec_from_file_location("run_notebooks", REPO / "scripts" / "run_notebooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(sys, "argv", ["run_notebooks.py", *argv])
    return module


@pytest.mark.parametrize("args, message", [
    (["--only", "99"], "--only 99 matches no notebook"),
    (["--only", "1"], "--only 1 matches no notebook"),
    (["--notebooks", "/nonexistent"], "no NN_*.ipynb notebooks in /nonexistent"),
])
def test_run_notebooks_with_nothing_to_run(args, message, tmp_path, monkeypatch, capsys):
    (tmp_path / "series.csv").write_text("notebook,seconds\n01_activations.ipynb,3.0\n")
    module = _run_notebooks(monkeypatch, "--profile", "tiny", "--run-dir", str(tmp_path), *args)
    ran = []
    monkeypatch.setattr(module.pm, "execute_notebook", lambda *a, **k: ran.append(a))
    assert module.main() == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert ran == [] and (tmp_path / "series.csv").read_text() == "notebook,seconds\n01_activations.ipynb,3.0\n"


def test_run_notebooks_only_takes_full_names(tmp_path, monkeypatch):
    module = _run_notebooks(monkeypatch, "--profile", "tiny", "--run-dir", str(tmp_path), "--only", "01_activations")
    ran = []
    monkeypatch.setattr(module.pm, "execute_notebook", lambda nb, out, **k: ran.append(Path(nb).name))
    assert module.main() == 0 and ran == ["01_activations.ipynb"]
    assert "01_activations.ipynb" in (tmp_path / "series.csv").read_text()


def test_run_notebooks_on_a_full_disk(tmp_path, monkeypatch, capsys):
    module = _run_notebooks(monkeypatch, "--profile", "tiny", "--run-dir", str(tmp_path), "--only", "01")

    def disk_full(nb, out, **k):
        Path(out).write_text('{"cells": [')  # half-written executed copy
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(module.pm, "execute_notebook", disk_full)
    assert module.main() == 1
    err = capsys.readouterr().err
    assert f"could not write in {tmp_path / 'notebooks'} (No space left on device); free space" in err
    assert not (tmp_path / "notebooks" / "01_activations.ipynb").exists()


# --- one-line errors -----------------------------------------------------------------------------

def test_overrides_as_json_or_yaml_text():
    assert H.load_profile("tiny", '{"layer": 1}').layer == 1  # papermill -p overrides '{"layer": 1}'
    assert H.load_profile("tiny", "{n_eval: 4}").n_eval == 4
    assert H.load_profile("tiny", "").layer == 2
    with pytest.raises(H.ConfigError) as e:
        H.load_profile("tiny", "[1, 2]")
    assert "overrides must be a dict" in one_line(e)


def test_error_bars_never_negative_and_used_by_every_bar_plot():
    below, above = H.error_bars(5.0, 6.0, 9.0)  # an interval that excludes its point estimate
    assert below.tolist() == [0.0] and above.tolist() == [4.0]
    below, above = H.error_bars([50, 20], [40, 25], [60, 30])
    assert below.tolist() == [10, 0] and above.tolist() == [10, 10]
    for nb in sorted((REPO / "notebooks").glob("*.ipynb")):
        source = "".join("".join(c["source"]) for c in json.loads(nb.read_text())["cells"])
        assert "yerr=[" not in source, f"{nb.name}: compute yerr with H.error_bars"


def test_atomic_write_on_a_full_disk_leaves_no_temp_file(tmp_path, monkeypatch):
    def full(*a):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(store.os, "replace", full)
    with pytest.raises(store.StoreError) as e:
        store.atomic_write(tmp_path / "gen" / "unit.jsonl", b"rows\n")
    assert one_line(e) == (f"could not write in {tmp_path / 'gen'} (No space left on device); "
                           f"free space on that disk (or pass another run_dir) and rerun")
    assert list((tmp_path / "gen").iterdir()) == []


@pytest.mark.parametrize("prompt, message", [
    (None, "prompt 1 is NoneType None, not text"),
    ("bad \ud800 text", "is not valid text (surrogates not allowed at character 4)"),
    (7, "prompt 1 is int 7, not text"),
])
def test_prompts_that_are_not_text(tiny, tiny_model, prompt, message):
    model, tok = tiny_model
    for call in (lambda: H.block_inputs(model, tok, tiny, ["hi", prompt]), lambda: H.generate(model, tok, tiny, ["hi", prompt])):
        with pytest.raises(H.ConfigError) as e:
            call()
        assert message in one_line(e)


def test_an_explicit_data_dir_that_cannot_be_used(tmp_path, monkeypatch):
    monkeypatch.setenv("REFUSAL_LAT_DATA_DIR", str(tmp_path / "missing"))
    with pytest.raises(H.DataError) as e:
        H.data_file("gpt4o")
    assert f"REFUSAL_LAT_DATA_DIR={tmp_path / 'missing'} does not exist" in one_line(e)
    (tmp_path / "file").write_text("x")
    monkeypatch.setenv("REFUSAL_LAT_DATA_DIR", str(tmp_path / "file"))
    with pytest.raises(H.DataError) as e:
        H.data_file("gpt4o")
    assert "is a file" in one_line(e)
    (tmp_path / "empty").mkdir()
    monkeypatch.setenv("REFUSAL_LAT_DATA_DIR", str(tmp_path / "empty"))
    with pytest.raises(H.DataError) as e:
        H.data_file("gpt4o")
    assert f"has no {H.DATA_FILES['gpt4o'].path}" in one_line(e)


# --- torn folders --------------------------------------------------------------------------------

def test_a_cut_or_torn_converted_model_folder_is_converted_again(tmp_path, monkeypatch):
    spec = H.ModelSpec(source="pypi_gguf", id="fake", sha256="ab" * 32)
    monkeypatch.setattr(gguf, "CACHE_DIR", tmp_path)
    monkeypatch.setattr(gguf, "gguf_from_pypi", lambda s: tmp_path / "fake.gguf")
    calls = []

    def convert(source, out, fail=False):
        calls.append(out)
        (out / "config.json").write_text(json.dumps({"hidden_size": 32, "pad": "x" * 100}))
        if len(calls) == 1:
            raise KeyboardInterrupt  # killed mid-conversion: the weights were never written
        (out / "model.safetensors").write_bytes(b"w" * 1000)
    monkeypatch.setattr(gguf, "convert", convert)
    with pytest.raises(KeyboardInterrupt):
        gguf.converted_gguf_folder(spec)
    folder = tmp_path / "models" / "fake" / "safetensors"
    assert not folder.exists()  # the torn conversion stayed in safetensors.tmp
    assert gguf.converted_gguf_folder(spec) == folder and len(calls) == 2
    assert gguf.converted_gguf_folder(spec) == folder and len(calls) == 2  # verified: not converted again
    config = folder / "config.json"
    config.write_text(config.read_text()[:20])  # a cut config.json under a valid marker
    assert gguf.converted_gguf_folder(spec) == folder and len(calls) == 3
    assert json.loads(config.read_text())["hidden_size"] == 32


def test_an_interrupted_adapter_save_leaves_no_torn_folder(tmp_path):
    class Killed:
        peft_config = {}

        def save_pretrained(self, out, **kwargs):
            (Path(out) / "adapter_config.json").write_text("{}")
            (Path(out) / "adapter_model.safetensors").write_bytes(b"half")
            raise KeyboardInterrupt  # kill -9 lands in the middle of the weights
    log = {"rows": [{"step": 0, "loss": 1.0}]}
    with pytest.raises(KeyboardInterrupt):
        T.save_arm(Killed(), log, tmp_path / "lat", "tiny-random-llama")
    assert list(tmp_path.iterdir()) == []  # neither lat/ nor lat.tmp/
    (tmp_path / "lat.tmp").mkdir()  # what a real kill -9 leaves: a .tmp folder nothing loads
    (tmp_path / "lat.tmp" / "adapter_config.json").write_text("{}")
    rec = T.recipe(H.load_profile("tiny"))
    assert T.existing_logs(rec, tmp_path) == {}
