import dataclasses
import sys

import pytest
import torch

import helpers as H


@pytest.mark.parametrize("name", ["paper", "cpu", "tiny"])
def test_every_profile_loads(name):
    profile = H.load_profile(name)
    assert profile.name == name and profile.roles
    assert all(isinstance(spec, H.ModelSpec) for spec in profile.models.values())


def test_paper_profile_is_the_papers_setting():
    p = H.load_profile("paper")
    assert p.roles == ["base", "AT", "LAT"]
    assert p.models["LAT"].adapter == "nlpett/llama-2-7b-chat-hf-LAT-layer4-hh"
    assert p.template == "\n[INST]{prompt}[/INST]\n"
    assert (p.layer, p.read_position, p.n_direction, p.n_eval, p.max_new_tokens) == (14, -1, 100, 520, 64)
    assert (p.quantization, p.dtype) == ("nf4", "float16")


def test_unknown_key_lists_valid_keys():
    with pytest.raises(H.ConfigError, match=r"unknown key\(s\) \['layers'\]; valid keys: .*'layer'"):
        H.load_profile("tiny", {"layers": 3})


def test_wrong_type_is_an_error():
    with pytest.raises(H.ConfigError, match="key 'n_eval' must be int, got str"):
        H.load_profile("tiny", {"n_eval": "8"})


def test_overrides_apply():
    assert H.load_profile("tiny", {"n_eval": 3}).n_eval == 3


def test_unknown_model_role():
    with pytest.raises(H.ConfigError, match=r"has no model 'AT'; its models: \['base', 'LAT'\]"):
        H.model_role_spec(H.load_profile("tiny"), "AT")


def test_nf4_without_bitsandbytes_says_what_to_do(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import fails as if not installed
    profile = H.load_profile("tiny", {"quantization": "nf4"})
    with pytest.raises(H.ConfigError, match="needs bitsandbytes.*'quantization': 'none'"):
        H.load_model(profile, "base")


def test_every_profile_has_a_training_recipe_of_the_right_types():
    import training as T
    for name in H.available_profiles():
        rec = T.recipe(H.load_profile(name))
        assert isinstance(rec.lr, float) and isinstance(rec.weight_decay, float), name


def test_a_float_written_as_yaml_text_is_a_clear_error():
    import training as T
    profile = H.load_profile("tiny")
    with pytest.raises(H.ConfigError, match="key 'lr' must be float, got str '6e-4'"):
        T.recipe(profile, {"lr": "6e-4"})


def test_cpu_profile_is_the_controlled_trio_on_one_base():
    cpu = H.load_profile("cpu")
    assert cpu.roles == ["base", "SFT", "AT", "LAT"]
    bases = {H.stable_hash(dataclasses.asdict(dataclasses.replace(s, adapter=None))) for s in cpu.models.values()}
    assert len(bases) == 1, "all four roles must share one base (use_model switches adapters)"
    for role in cpu.roles[1:]:
        assert (H.REPO / cpu.models[role].adapter / "adapter_model.safetensors").is_file()
