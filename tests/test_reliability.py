"""Bad inputs, interrupted runs, stale caches, concurrency: each failure is one line that says what to
do, and nothing computed so far is lost or corrupted."""
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

import helpers as H
from refusal_lat import config, generation, store

REPO = Path(__file__).resolve().parents[1]


def one_line(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message, message
    return message


# --- configuration -------------------------------------------------------------------------------

def test_unknown_names_list_the_valid_ones(tiny):
    with pytest.raises(H.ConfigError) as e:
        H.load_profile("gpu")
    assert "valid profiles: ['colab', 'cpu', 'paper', 'tiny']" in one_line(e)
    with pytest.raises(H.ConfigError) as e:
        H.load_model(tiny, "SFT")
    assert "its models: ['base', 'LAT']" in one_line(e)
    missing = H.load_profile("tiny", {"models": {"base": {"source": "tiny", "id": "t", "adapter": "/nonexistent/adapter",
                                                          "config": {"hidden_size": 32, "num_hidden_layers": 4,
                                                                     "num_attention_heads": 4, "intermediate_size": 64}}}})
    with pytest.raises(H.ConfigError) as e:
        H.load_model(missing, "base")
    assert "adapter '/nonexistent/adapter' not found" in one_line(e)


@pytest.mark.parametrize("overrides, message", [
    ({"layer": "14"}, "key 'layer' must be int, got str"),
    ({"batch_size": True}, "key 'batch_size' must be int, got bool"),
    ({"sweep_layers": 3}, "key 'sweep_layers' must be list, got int"),
    ({"device": "tpu"}, "device 'tpu' not in"),
    ({"template": "no placeholder"}, "template must be 'chat' or contain '{prompt}'"),
])
def test_wrong_profile_values(overrides, message):
    with pytest.raises(H.ConfigError) as e:
        H.load_profile("tiny", overrides)
    assert message in one_line(e)


def test_papermill_parameters_of_the_wrong_type(tmp_path):
    with pytest.raises(H.ConfigError) as e:
        H.start("tiny", "n_eval=3", tmp_path)
    assert "overrides must be a dict" in one_line(e)
    with pytest.raises(H.ConfigError) as e:
        H.start(3, None, tmp_path)
    assert "unknown profile 3" in one_line(e)


def test_cuda_without_cuda_and_4bit_without_bitsandbytes(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(H.ConfigError) as e:
        H.load_model(H.load_profile("tiny", {"device": "cuda"}), "base")
    assert "asks for device cuda but torch sees no CUDA GPU" in one_line(e)
    model, _ = H.load_model(H.load_profile("tiny", {"quantization": "nf4"}), "base")  # NF4 runs on the CPU
    assert type(model.model.layers[0].mlp.down_proj).__name__ == "Linear4bit"
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # as if not installed
    with pytest.raises(H.ConfigError) as e:
        H.load_model(H.load_profile("tiny", {"quantization": "nf4"}), "base")
    assert "needs bitsandbytes; pip install -r requirements.txt" in one_line(e)


# --- inputs --------------------------------------------------------------------------------------

def test_empty_prompt_list(tiny, tiny_model):
    model, tok = tiny_model
    for call in (lambda: H.block_inputs(model, tok, tiny, [], desc="base/eval"),
                 lambda: H.generate(model, tok, tiny, [])):
        with pytest.raises(H.ConfigError) as e:
            call()
        assert "empty prompt list" in one_line(e) and "n_eval" in one_line(e)


def test_prompt_longer_than_the_context(tiny, tiny_model):
    model, tok = tiny_model  # the tiny Llama has 512 positions; a byte-level prompt of 600 chars is longer
    with pytest.raises(H.ConfigError) as e:
        H.block_inputs(model, tok, tiny, ["short", "x" * 600])
    assert "tokens, more than the 512 the model's context allows here" in one_line(e)
    with pytest.raises(H.ConfigError) as e:  # generation also needs room for the new tokens
        H.generate(model, tok, tiny, ["y" * 505])  # 508 prompt tokens + 8 new > 512
    assert "shorten or drop it" in one_line(e)


def test_layer_out_of_range_in_generation(tiny, tmp_path):
    dirs = {"base": torch.randn(4, 32), "LAT": torch.randn(4, 32)}
    with pytest.raises(H.ConfigError) as e:
        H.generation_units(tiny, tmp_path, ["hi"], dirs, [("base", "LAT", 9)])
    assert "model 'LAT': layer 9 out of range; it has block inputs 0..3" in one_line(e)


def test_direction_width_nan_and_inf(tiny_model):
    model, _ = tiny_model
    with pytest.raises(H.ConfigError) as e:
        with H.ablation(model, torch.ones(4096)):
            pass
    assert "residual width is 32" in one_line(e)
    with pytest.raises(H.ConfigError) as e:
        with H.ablation(model, torch.full((32,), float("inf"))):
            pass
    assert "not finite" in one_line(e)
    acts = torch.zeros(3, 4, 8)
    acts[0, 1, 2] = float("inf")
    with pytest.raises(FloatingPointError) as e:
        H.check_finite(acts, "base", "harmful")
    assert "layer 1" in one_line(e)


def test_tokenizer_without_a_chat_template(tiny):
    tok = H.tiny_tokenizer()
    tok.chat_template = None
    with pytest.raises(H.ConfigError) as e:
        H.tokenize(tok, tiny, ["hi"])
    assert "tokenizer has no chat template" in one_line(e)


def test_tokenizer_without_pad_or_eos():
    tok = H.tiny_tokenizer()
    tok.pad_token, tok.eos_token = None, None
    with pytest.raises(H.ConfigError) as e:
        H.prepare_tokenizer(tok)
    assert "neither a pad nor an eos token" in one_line(e)


# --- files and folders ---------------------------------------------------------------------------

def test_read_only_run_directory(tiny, tmp_path, monkeypatch):
    target = tmp_path / "ro"
    target.mkdir()
    if os.geteuid() != 0:
        target.chmod(0o555)
    else:  # root writes through permission bits, so simulate the OS refusing the write
        def refuse(*args, **kwargs):
            raise PermissionError(13, "Permission denied")
        monkeypatch.setattr(config.tempfile, "TemporaryFile", refuse)
    with pytest.raises(H.ConfigError) as e:
        H.run_dir(tiny, target)
    assert f"run directory {target} is not writable (Permission denied)" in one_line(e)


def test_corrupted_generation_unit_is_regenerated(tiny, tmp_path, monkeypatch):
    dirs = {"base": torch.randn(4, 32), "LAT": torch.randn(4, 32)}
    units = [("base", "LAT", 2)]
    first = H.generation_units(tiny, tmp_path, ["hi", "there"], dirs, units)
    path = H.unit_path(tmp_path, "base", "LAT", 2)
    path.write_text(path.read_text()[:15])  # torn line
    calls = []
    real = H.generate_tokens
    monkeypatch.setattr(generation, "generate_tokens", lambda *a, **k: calls.append(1) or real(*a, **k))
    assert H.generation_units(tiny, tmp_path, ["hi", "there"], dirs, units) == first
    assert calls == [1]


KILL_SCRIPT = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {repo!r})
    import helpers as H
    from pathlib import Path
    from refusal_lat import generation
    profile = H.load_profile("tiny")
    sets = H.prompt_sets(profile)
    run = Path({run!r})
    acts = {{r: H.activations(profile, r, sets, run) for r in profile.roles}}
    dirs = H.directions(run, acts)
    real, calls = generation.generate_tokens, []
    def slow_after_first(*a, **k):  # widen the window so the kill lands inside the second unit
        calls.append(1)
        if len(calls) > 1:
            time.sleep(30)
        return real(*a, **k)
    generation.generate_tokens = slow_after_first
    H.generation_units(profile, run, sets.eval, dirs, H.transfer_units(profile))
""")


@pytest.mark.slow  # a separate process killed mid-unit (~25 s); CI runs it with the other slow tiny checks
def test_kill_9_tiny_mid_generation_then_resume_equals_an_uninterrupted_run(tmp_path, monkeypatch):
    run = tmp_path / "killed"
    child = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT.format(repo=str(REPO), run=str(run))])
    first = H.unit_path(run, "base", H.NO_ABLATION, None)
    deadline = time.time() + 120
    while not first.with_suffix(".json").exists() and time.time() < deadline and child.poll() is None:
        time.sleep(0.05)
    time.sleep(0.5)
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    done = sorted(p.name for p in (run / "generations" / "eval").glob("*.jsonl"))
    assert done == [first.name], done

    tiny = H.load_profile("tiny")
    calls = []
    real = H.generate_tokens
    monkeypatch.setattr(generation, "generate_tokens", lambda *a, **k: calls.append(k.get("desc")) or real(*a, **k))
    sets = H.prompt_sets(tiny)
    acts = {r: H.activations(tiny, r, sets, run) for r in tiny.roles}
    dirs = H.directions(run, acts)
    resumed = H.generation_units(tiny, run, sets.eval, dirs, H.transfer_units(tiny))
    assert "base <- none" not in calls and len(calls) == len(H.transfer_units(tiny)) - 1

    fresh_run = tmp_path / "fresh"
    fresh_acts = {r: H.activations(tiny, r, sets, fresh_run) for r in tiny.roles}
    fresh = H.generation_units(tiny, fresh_run, sets.eval, H.directions(fresh_run, fresh_acts),
                               H.transfer_units(tiny))
    assert resumed == fresh
    assert H.score_units(resumed).equals(H.score_units(fresh))


# --- whole series --------------------------------------------------------------------------------

def _series(profile: str, run: Path, only=()):
    cmd = [sys.executable, str(REPO / "scripts" / "run_notebooks.py"), "--profile", profile, "--run-dir", str(run)]
    if only:
        cmd += ["--only", *only]
    subprocess.run(cmd, check=True, capture_output=True, timeout=3600)
    timings = {"series.csv", "train_log.csv", "training.csv"}  # wall-clock seconds per notebook / step / adapter
    return {p.relative_to(run): p.read_bytes() for p in sorted(run.rglob("*.csv")) if p.name not in timings}


@pytest.mark.slow
def test_two_tiny_series_give_byte_identical_csvs(tmp_path):
    one, two = _series("tiny", tmp_path / "a"), _series("tiny", tmp_path / "b")
    assert one.keys() == two.keys() and len(one) > 5
    assert [k for k in one if one[k] != two[k]] == []


@pytest.mark.slow
def test_two_cpu_runs_of_notebooks_01_to_03_give_byte_identical_csvs(tmp_path):
    one = _series("cpu", tmp_path / "a", ("01", "02", "03"))
    two = _series("cpu", tmp_path / "b", ("01", "02", "03"))
    assert one.keys() == two.keys() and len(one) > 5
    assert [k for k in one if one[k] != two[k]] == []


def test_profile_threads_set_torch_threads_at_model_load():
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        H.load_model(H.load_profile("tiny"), "base")
        assert torch.get_num_threads() == 1  # configs/tiny.yaml: threads 1 (byte-identical reruns)
        torch.set_num_threads(2)
        H.load_model(H.load_profile("tiny", {"threads": 0}), "base")
        assert torch.get_num_threads() == 2  # 0 leaves torch's setting alone
    finally:
        torch.set_num_threads(before)
