"""Cache-key sensitivity (issue 15): every field that determines an artifact changes its key AND makes
the next call recompute it. A recompute is observed on disk: artifacts are written to a temp file and
renamed, so a rewrite gives the file a new inode; a reuse leaves the inode alone."""
import shutil
import threading

import pytest
import torch
from filelock import FileLock

import helpers as H
from refusal_lat import store
from refusal_lat.units import unit_key

HARMFUL = ["How do I pick a lock?", "Write a phishing email."]
HARMLESS = ["How do I bake bread?", "Write a thank-you note."]


def small_sets(harmless=HARMLESS):
    return H.PromptSets(harmful=HARMFUL, harmless=list(harmless), eval=["Tell me a secret."], eval_source=["gpt4o"])


def inode(path):
    return path.stat().st_ino


def tiny_with_adapter(adapter_dir, **overrides):
    spec = H.load_profile("tiny").models["base"]
    model = {"source": "tiny", "id": spec.id, "config": dict(spec.config), "adapter": str(adapter_dir)}
    return H.load_profile("tiny", {"models": {"base": model}, **overrides})


# --- activations ------------------------------------------------------------------------------------
ACTIVATION_VARIANTS = {
    "read_position": ({"read_position": -2}, HARMLESS, b"A"),
    "dtype": ({"dtype": "bfloat16"}, HARMLESS, b"A"),
    "adapter_sha": ({}, HARMLESS, b"B"),
    "prompts": ({}, ["How do I bake bread?", "Write a sorry note."], b"A"),
}


@pytest.mark.parametrize("field", list(ACTIVATION_VARIANTS))
def test_activation_key_fields_force_a_recompute(field, tiny_model, tmp_path):
    model, tok = tiny_model
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_model.safetensors").write_bytes(b"A")
    base_profile = tiny_with_adapter(adapter)
    run = tmp_path / "run"
    path = run / "activations" / "base.safetensors"
    first = H.activations(base_profile, "base", small_sets(), run, model, tok)
    written = inode(path)
    H.activations(base_profile, "base", small_sets(), run, model, tok)
    assert inode(path) == written, "same inputs must reuse the cache"

    old_key = H.activation_key(base_profile, "base", small_sets().as_dict())
    overrides, harmless, adapter_bytes = ACTIVATION_VARIANTS[field]
    (adapter / "adapter_model.safetensors").write_bytes(adapter_bytes)  # b"B": the adapter was retrained
    profile = tiny_with_adapter(adapter, **overrides)
    new_key = H.activation_key(profile, "base", small_sets(harmless).as_dict())
    assert H.stable_hash(new_key) != H.stable_hash(old_key)
    again = H.activations(profile, "base", small_sets(harmless), run, model, tok)
    assert inode(path) != written, f"changing {field} must recompute the activations"
    assert H.activation_metadata(run, "base")["hash"] == store.key_hash(new_key)
    if field in ("read_position", "prompts"):  # template: test_activations.py
        assert not torch.equal(again["harmless"], first["harmless"])


def test_activation_key_names_quantization(tiny):
    sets = small_sets().as_dict()
    nf4 = H.load_profile("tiny", {"quantization": "nf4"})
    assert H.activation_key(nf4, "base", sets) != H.activation_key(tiny, "base", sets)


# --- generation units ------------------------------------------------------------------------------
PROMPTS = ["hi", "Name a colour."]


@pytest.fixture(scope="module")
def unit_dirs():
    gen = torch.Generator().manual_seed(0)
    return {"base": torch.randn(4, 32, generator=gen), "LAT": torch.randn(4, 32, generator=gen)}


def other_direction(dirs):
    changed = {k: v.clone() for k, v in dirs.items()}
    changed["base"][2] = torch.randn(32, generator=torch.Generator().manual_seed(5))
    return changed


UNIT_VARIANTS = {  # field: (profile overrides, prompts, dirs -> dirs, stop_at_eos)
    "direction": ({}, PROMPTS, other_direction, False),
    "max_new_tokens": ({"max_new_tokens": 5}, PROMPTS, None, False),
    "prompts": ({}, ["hi", "Name a fruit."], None, False),
    "stop_at_eos": ({}, PROMPTS, None, True),
    "template": ({"template": "{prompt}\n"}, PROMPTS, None, False),
}


def test_unit_key_names_dtype_quantization_and_target(tiny, unit_dirs):
    """Fields whose recompute would need another model load (seconds each) are checked on the key only;
    the reuse/recompute decision is the same hash comparison the test above exercises."""
    key = lambda profile: H.stable_hash(unit_key(profile, "base", "base", 2, unit_dirs["base"][2], PROMPTS, False))
    base = key(tiny)
    assert key(H.load_profile("tiny", {"dtype": "bfloat16"})) != base
    assert key(H.load_profile("tiny", {"quantization": "nf4"})) != base
    spec = tiny.models["base"]
    other = H.load_profile("tiny", {"models": {"base": {"source": "tiny", "id": spec.id, "config": {**spec.config, "seed": 7}}}})
    assert key(other) != base


@pytest.fixture(scope="module")
def cached_unit_run(tmp_path_factory, unit_dirs):
    run = tmp_path_factory.mktemp("units")
    tiny = H.load_profile("tiny")
    H.generation_units(tiny, run, PROMPTS, unit_dirs, [("base", "base", 2)])
    return run


@pytest.mark.parametrize("field", list(UNIT_VARIANTS))
def test_unit_key_fields_force_a_recompute(field, cached_unit_run, unit_dirs, tmp_path):
    tiny = H.load_profile("tiny")
    run = tmp_path / "run"
    shutil.copytree(cached_unit_run, run)
    path = H.unit_path(run, "base", "base", 2)
    written = inode(path)
    unit = [("base", "base", 2)]
    before = H.generation_units(tiny, run, PROMPTS, unit_dirs, unit)[unit[0]]
    assert inode(path) == written, "same inputs must reuse the unit"

    overrides, prompts, change_dirs, stop_at_eos = UNIT_VARIANTS[field]
    profile = H.load_profile("tiny", overrides)
    dirs = change_dirs(unit_dirs) if change_dirs else unit_dirs
    old_key = unit_key(tiny, "base", "base", 2, unit_dirs["base"][2], PROMPTS, False)
    new_key = unit_key(profile, "base", "base", 2, dirs["base"][2], prompts, stop_at_eos)
    assert H.stable_hash(new_key) != H.stable_hash(old_key)
    after = H.generation_units(profile, run, prompts, dirs, unit, stop_at_eos=stop_at_eos)[unit[0]]
    assert inode(path) != written, f"changing {field} must regenerate the unit"
    if field in ("direction", "max_new_tokens", "prompts", "template"):
        assert [r["completion"] for r in after] != [r["completion"] for r in before]


# --- the lock -------------------------------------------------------------------------------------------
def test_activation_writer_waits_for_the_lock_then_reuses_the_finished_cache(tiny, tiny_model, tmp_path):
    """While another process holds the cache's lock, activations() must not compute or write; once the
    lock is released it must read what the other process wrote instead of computing it again."""
    model, tok = tiny_model
    sets = small_sets()
    path = tmp_path / "activations" / "base.safetensors"
    path.parent.mkdir(parents=True)
    key = H.activation_key(tiny, "base", sets.as_dict())
    marker = {name: torch.full((len(p), 5, 32), 7.0) for name, p in sets.as_dict().items()}
    result = {}
    worker = threading.Thread(target=lambda: result.update(acts=H.activations(tiny, "base", sets, tmp_path, model, tok)))
    with FileLock(str(path) + ".lock"):
        worker.start()
        worker.join(2)
        assert worker.is_alive() and not path.exists(), "activations() computed while the lock was held"
        store.store(path, key, store.encode_tensors(marker), rows=store.count_rows(marker))  # the other process finishes
    worker.join(60)
    assert not worker.is_alive()
    assert torch.equal(result["acts"]["eval"], marker["eval"]), "recomputed instead of reading the finished cache"
