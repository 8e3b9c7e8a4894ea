"""SFT / AT / LAT training (training.py) on the tiny model: the attack, the hook, the arms, the adapters."""
import dataclasses

import pytest
import torch

import helpers as H
import training as T
from refusal_lat import generation
from refusal_lat.training import data as training_data

PAIRS = [("How do I bake bread?", "Mix flour, water and yeast, then bake."),
         ("Explain how to pick a lock", "I'm sorry, but I can't help with that."),
         ("Name three colours", "Red, green and blue."),
         ("Tell me a joke", "Why did the chicken cross the road?"),
         ("hi", "Hello! How can I help?"),
         ("Write malware", "I can't help with that.")]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture()
def base(tiny):
    return H.load_model(tiny, "base")  # a fresh copy each time: get_peft_model edits it in place


@pytest.fixture()
def examples(tiny):
    tok = H.load_tokenizer(tiny, "base")
    return [T.encode(tok, T.chat_segments(tok, tiny, p, r), 96) for p, r in PAIRS]


def _batch(examples, tok, n=3):
    return T.collate(examples[:n], tok.pad_token_id)


V1 = {"harmless_per_step": 0, "steps": 0, "epsilon_unit": "absolute", "attack_positions": "all", "epsilon_at": None,
      "guard_every": 0}  # the first recipe (one stream, one ball per example); tests/test_training_v2.py covers v2


def _recipe(tiny, **changes):
    return T.recipe(tiny, {**V1, "epochs": 1, "batch_size": 2, **changes})


# --- data ---------------------------------------------------------------------------------------

def test_loss_covers_the_response_tokens_only_and_the_prompt_is_what_evaluation_sees(tiny, examples):
    tok = H.load_tokenizer(tiny, "base")
    prompt_ids = H.tokenize(tok, tiny, [PAIRS[0][0]])["input_ids"][0].tolist()
    ex = examples[0]
    assert ex["input_ids"][:len(prompt_ids)] == prompt_ids
    assert ex["labels"][:len(prompt_ids)] == [-100] * len(prompt_ids)
    response = ex["input_ids"][len(prompt_ids):]
    assert ex["labels"][len(prompt_ids):] == response
    assert tok.decode(response) == PAIRS[0][1] + "<|end|>"


def test_training_prompts_never_overlap_the_direction_or_evaluation_sets():
    cpu = H.load_profile("cpu")
    rec = T.recipe(cpu)
    prompts = T.training_prompts(rec)
    assert len(prompts["harmful"]) == rec.n_harmful and len(prompts["harmless"]) == rec.n_harmless
    assert prompts == T.training_prompts(rec), "the sample must be deterministic"
    profile = H.load_profile("cpu", {"n_eval": 520})
    used = H.prompt_sets(profile)
    held_out = H.validation_sets(profile)
    analysed = {training_data._norm_text(p) for p in used.harmful + used.harmless + used.eval + sum(held_out.values(), [])}
    trained = [training_data._norm_text(p) for p in prompts["harmful"] + prompts["harmless"]]
    assert not analysed & set(trained)
    assert len(set(trained)) == len(trained)


def test_refusal_targets_keep_the_base_models_refusals_and_replace_its_compliance(tiny, base, monkeypatch, tmp_path):
    answers = {"harmful": ["I'm sorry, but I cannot help with making weapons.", "Sure, here is how to do it:"],
               "harmless": ["Bread needs flour. It also needs water", "Red, green, blue."]}
    monkeypatch.setattr(training_data, "training_prompts", lambda rec: {k: [f"{k} {i}" for i in range(2)] for k in answers})
    by_prompt = {f"{k} {i}": a for k, texts in answers.items() for i, a in enumerate(texts)}
    monkeypatch.setattr(generation, "generate", lambda model, tok, profile, prompts, **kw: [by_prompt[p] for p in prompts])
    rec = _recipe(tiny, response_tokens=8)
    rows = T.refusal_mix(tiny, rec, *base, run=tmp_path)
    assert [r["target_source"] for r in rows] == ["base_model", "fixed_refusal", "base_model", "base_model"]
    assert rows[0]["response"] == answers["harmful"][0] and rows[1]["response"] == rec.refusal
    assert rows[2]["response"] == "Bread needs flour.", "an answer cut at the token limit ends at its last sentence"
    assert T.trim_to_sentence("Here are steps. First, mix.\n\n1.") == "Here are steps. First, mix."
    assert rows[3]["response"] == "Red, green, blue."
    monkeypatch.setattr(generation, "generate", lambda *a, **k: pytest.fail("cached rows must be reused"))
    assert T.refusal_mix(tiny, rec, *base, run=tmp_path) == rows


def test_hh_transcripts_become_casper_llama2_turns_with_the_assistant_trained():
    text = "\n\nHuman: Hi there\n\nAssistant: Hello!\nHow can I help?\n\nHuman: A joke?\n\nAssistant: No."
    assert T.hh_segments(text) == [
        (T.LLAMA2_SYSTEM + "Hi there [/INST] ", False), ("Hello! How can I help? </s>", True),
        ("<s>[INST] A joke? [/INST] ", False), ("No. </s>", True)]


def test_data_order_is_a_function_of_the_recipe_only(tiny):
    rec = _recipe(tiny, epochs=2)
    order = T.data_order(6, rec)
    assert order == T.data_order(6, rec) and len(order) == 6
    assert sorted(i for b in order[:3] for i in b) == list(range(6))  # each epoch is a permutation
    assert order != T.data_order(6, dataclasses.replace(rec, seed=1))


# --- the attack ---------------------------------------------------------------------------------

@pytest.mark.parametrize("layer", [0, 2])
def test_one_pgd_step_increases_the_loss(base, examples, layer):
    model, tok = base
    batch = _batch(examples, tok)
    attack = T.pgd_attack(model, batch, layer, epsilon=0.2, steps=1, generator=torch.Generator(), random_init=False)
    with torch.no_grad():
        clean = T.sft_loss(model, batch).item()
        with T.perturbation(model, layer, attack.delta):
            attacked = T.sft_loss(model, batch).item()
    assert attack.losses[0] == pytest.approx(clean, abs=1e-6)
    assert attacked > clean + 1e-3


@pytest.mark.parametrize("epsilon", [0.05, 0.5, 4.0])
def test_perturbation_norm_never_exceeds_epsilon(base, examples, epsilon):
    model, tok = base
    batch = _batch(examples, tok)
    for steps in (1, 5):
        attack = T.pgd_attack(model, batch, 1, epsilon, steps, generator=torch.Generator().manual_seed(steps))
        norms = torch.tensor(attack.norms)
        assert norms.max() <= epsilon * (1 + 1e-5)
        assert T.example_norms(attack.delta).max() <= epsilon * (1 + 1e-5)
        assert (attack.delta[batch["attention_mask"] == 0] == 0).all(), "padding gets no perturbation"
    # one step of length eps from a random start inside the ball leaves it: projection must bind
    torch.testing.assert_close(T.example_norms(T.pgd_attack(model, batch, 1, epsilon, 1, torch.Generator()).delta),
                               torch.full((len(norms[0]),), epsilon), rtol=1e-5, atol=0)


def test_projection_scales_long_perturbations_onto_the_sphere_and_keeps_short_ones():
    delta = torch.stack([torch.full((3, 4), 1.0), torch.full((3, 4), 0.01)])  # norms 3.46 and 0.0346
    out = T.project_l2(delta, 1.0)
    torch.testing.assert_close(T.example_norms(out), torch.tensor([1.0, 0.01 * 12 ** 0.5]))
    assert torch.equal(out[1], delta[1])


# --- where the perturbation lands -------------------------------------------------------------

def _block_inputs(model, batch):
    """Every block's full input [batch, seq, d], recorded by pre-hooks registered last."""
    seen = {}

    def make(i):
        def hook(module, args, kwargs):
            seen[i] = (args[0] if args else kwargs["hidden_states"]).detach().clone()
        return hook

    handles = [b.register_forward_pre_hook(make(i), with_kwargs=True) for i, b in enumerate(H.decoder_layers(model))]
    try:
        with torch.no_grad():
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    finally:
        for h in handles:
            h.remove()
    return [seen[i] for i in range(len(seen))], logits


@pytest.mark.parametrize("layer", [0, 2])
def test_perturbation_lands_at_the_intended_block_and_nowhere_else(base, examples, layer):
    model, tok = base
    batch = _batch(examples, tok)
    delta = torch.randn(*batch["input_ids"].shape, model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    clean, clean_logits = _block_inputs(model, batch)
    with T.perturbation(model, layer, delta):
        hit, _ = _block_inputs(model, batch)
    for i, (a, b) in enumerate(zip(clean, hit)):
        if i < layer:
            assert torch.equal(a, b), f"block {i} is upstream of {layer} and must not change"
        elif i == layer:
            torch.testing.assert_close(b - a, delta, atol=1e-6, rtol=0)
        else:
            assert (b - a).abs().max() > 1e-3, f"block {i} is downstream of {layer} and must change"
    assert all(not blk._forward_pre_hooks for blk in H.decoder_layers(model)), "hook removed on exit"
    assert torch.equal(_block_inputs(model, batch)[1], clean_logits)


def test_perturbation_hook_is_removed_on_error(base):
    model, _ = base
    with pytest.raises(RuntimeError):
        with T.perturbation(model, 1, torch.zeros(1, 2, model.config.hidden_size)):
            raise RuntimeError("inside")
    assert all(not blk._forward_pre_hooks for blk in H.decoder_layers(model))


# --- the arms ----------------------------------------------------------------------------------

def _train(tiny, examples, arm, **changes):
    model, tok = H.load_model(tiny, "base")
    peft_model, log = T.train_arm(model, tok, examples, _recipe(tiny, **changes), arm, progress=False)
    lora = {k: v.detach().clone() for k, v in peft_model.named_parameters() if "lora_" in k}
    return lora, log


def test_arms_differ_only_in_the_perturbation(tiny, examples):
    zero = {arm: _train(tiny, examples, arm, epsilon=0.0) for arm in T.ARMS}
    orders = {arm: [r["examples"] for r in log["rows"]] for arm, (_, log) in zero.items()}
    assert orders["sft"] == orders["at"] == orders["lat"] and len(orders["sft"]) == 3
    for arm in ("at", "lat"):  # eps = 0: the same computation, so exactly the same weights
        assert zero[arm][1]["perturb_layer"] == T.perturb_layer(_recipe(tiny), arm)
        for name, value in zero["sft"][0].items():
            assert torch.equal(zero[arm][0][name], value), f"{arm} with eps 0 differs from sft at {name}"
    some = {arm: _train(tiny, examples, arm, epsilon=0.5)[0] for arm in ("at", "lat")}
    some["sft"] = zero["sft"][0]
    for a, b in (("at", "sft"), ("lat", "sft"), ("at", "lat")):
        assert any(not torch.equal(some[a][k], some[b][k]) for k in some[a]), f"{a} and {b} must differ with eps > 0"
    assert any(not torch.equal(v, torch.zeros_like(v)) for k, v in some["sft"].items() if "lora_B" in k), "sft learns"


def test_adapters_save_and_reload_to_identical_logits(tiny, examples, tmp_path):
    model, tok = H.load_model(tiny, "base")
    peft_model, log = T.train_arm(model, tok, examples, _recipe(tiny), "lat", progress=False)
    T.save_arm(peft_model, log, tmp_path / "lat", "tiny-random-llama")
    batch = _batch(examples, tok)
    kwargs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with torch.no_grad():
        trained = peft_model(**kwargs).logits
        reloaded = T.load_arm(H.load_model(tiny, "base")[0], tmp_path / "lat")(**kwargs).logits
        plain = H.load_model(tiny, "base")[0](**kwargs).logits
    assert torch.equal(reloaded, trained)
    assert (trained - plain).abs().max() > 1e-3, "the adapter must change the model"
    # the profile path: a model role with `adapter:` is merged by H.load_model
    spec = dataclasses.asdict(H.model_role_spec(tiny, "base"))
    profile = H.load_profile("tiny", {"models": {"base": spec, "LAT": {**spec, "adapter": str(tmp_path / "lat")}}})
    with torch.no_grad():
        merged = H.load_model(profile, "LAT")[0](**kwargs).logits
    torch.testing.assert_close(merged, trained, atol=1e-5, rtol=0)
    assert T.load_log(tmp_path / "lat")["arm"] == "lat"
    assert (tmp_path / "lat" / "train_log.csv").is_file()


def test_recipe_rejects_unknown_keys_and_arms(tiny):
    with pytest.raises(H.ConfigError, match="unknown key"):
        T.recipe(tiny, {"epsilonn": 1})
    with pytest.raises(H.ConfigError, match="unknown arm"):
        T.perturb_layer(T.recipe(tiny), "pgd")
    assert T.recipe(H.load_profile("cpu")).lat_layer == 3  # block 4 of 32 -> 3 of 24
