"""`make bench` on the tiny profile: every section runs and the recompute loop's timed steps give the
KV-cached tokens (the timings themselves are meaningless on a tiny model and are not asserted)."""
import runpy
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))


@pytest.mark.slow  # `make bench` on tiny (~6 s); CI runs it with the slow tiny checks
def test_tiny_bench_writes_every_section_and_the_recompute_steps_match(tmp_path):
    out = tmp_path / "BENCHMARKS.md"
    done = subprocess.run([sys.executable, str(BENCH / "run_all.py"), "--profile", "tiny", "--reps", "1",
                           "--threads", "1", "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    text = out.read_text()
    for heading in ("### Activation capture", "#### Overhead", "#### KV cache vs the paper's recompute loop",
                    "#### Throughput per batch size", "### Notebook series", "### Arm evaluation",
                    "### Training speed per arm"):
        assert heading in text
    speedup_rows = [line for line in text.splitlines() if line.startswith("| 4 |") or line.startswith("| 16 (paper) |")]
    assert len(speedup_rows) == 2 and all(row.rstrip(" |").endswith("yes") for row in speedup_rows), speedup_rows
    assert text.count("<!-- bench:tiny -->") == 1 and text.count("<!-- /bench:tiny -->") == 1


def test_update_section_replaces_its_block_and_refuses_a_missing_end_marker(tmp_path):
    import _util
    path = tmp_path / "B.md"
    path.write_text("# B\n\n<!-- bench:cpu -->\nold\n<!-- /bench:cpu -->\n\nhand-written\n")
    _util.update_section(path, "cpu", "new")
    assert path.read_text() == "# B\n\n<!-- bench:cpu -->\nnew\n<!-- /bench:cpu -->\n\nhand-written\n"
    path.write_text("# B\n\n<!-- bench:cpu -->\nold, end marker lost\n")
    with pytest.raises(ValueError, match="must both be there"):
        _util.update_section(path, "cpu", "new")
    assert "old, end marker lost" in path.read_text()  # nothing overwritten


@pytest.mark.slow  # every bench/gpu.py path on a tiny model (~12 s); CI runs it with the slow tiny checks
def test_gpu_script_dry_run_on_tiny_cpu():
    """bench/gpu.py --tiny runs every code path the GPU run takes (tiny Llama config, CPU); the KV
    cache and the recompute loop agree on the tokens."""
    done = subprocess.run([sys.executable, str(BENCH / "gpu.py"), "--tiny"], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "first 8 tokens equal (2 prompts): yes" in done.stdout
    assert "ablated, KV cache" in done.stdout and "floor:" in done.stdout


@pytest.mark.parametrize("script, args, expect", [
    ("bf16.py", [], ["speed-up bf16/fp32", "token-identical completions", "label unchanged, project judge", "verdict"]),
    ("peer.py", ["--reps", "1"], ["peer / project", "same tokens, one call: True", "workload completions identical: 24/24"]),
    ("nf4_cpu.py", [], ["NF4 - plain", "first two %", "refusal own (project)"]),
    ("arms_eval.py", [], ["| batched |", "attack (PGD forward + backward)", "| pgd_lat | 6 |",
                          "batched labels identical on >= 99 % of rows (project judge): 100.0 % (met)"]),
])
def test_side_by_side_benches_run_on_tiny(script, args, expect, monkeypatch, capsys):
    """Run as `python bench/<script> --profile tiny`, but in this process: a subprocess would spend ~5 s
    of CPU importing torch and transformers again for a second of work."""
    from refusal_lat.models import pool
    monkeypatch.setenv("REFUSAL_LAT_PROGRESS", "off")
    monkeypatch.setattr(sys, "argv", [script, "--profile", "tiny", *args])
    try:
        runpy.run_path(str(BENCH / script), run_name="__main__")
    finally:
        pool.invalidate()  # the resident model the script left (bf16 casts included)
    out = capsys.readouterr().out
    for text in expect:
        assert text in out, (text, out[-2000:])


def test_training_speed_reads_step_times_from_a_log(tmp_path, monkeypatch):
    import train_speed
    log = {"arm": "lat", "threads": 1, "seconds": 9.0, "cpu_seconds": 8.0,
           "rows": [{"seconds": 2.0}, {"seconds": 3.0}, {"seconds": 9.0}]}  # cumulative: steps of 2, 1 and 6 s
    assert train_speed.step_seconds(log).tolist() == [2.0, 1.0, 6.0]
    folder = tmp_path / "adapters" / "cpu" / "v9" / "lat-s0"
    folder.mkdir(parents=True)
    (folder / "train_log.json").write_text(__import__("json").dumps(log))
    monkeypatch.setattr(train_speed, "REPO", tmp_path)
    md, targets = train_speed.run("cpu")
    assert "| v9/lat-s0 | lat | 1 | 3 | 2.0 |" in md and targets == []
    assert train_speed.run("nothing")[0].startswith("No committed adapters")
