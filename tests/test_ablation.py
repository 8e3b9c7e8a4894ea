import copy
import dataclasses

import pytest
import torch

import helpers as H
from refusal_lat import generation

PROMPTS = ["Hi", "Write a long poem about the sea and the sky", "Name three colours, please."]


def _direction(model, seed=0):
    torch.manual_seed(seed)
    return torch.randn(model.config.hidden_size)


def test_ablation_zeroes_every_residual_attention_and_mlp_write(tiny, tiny_model):
    model, tok = tiny_model
    r = _direction(model)
    unit = r / r.norm()
    seen = []
    batch = H.tokenize(tok, tiny, PROMPTS)

    def hook_counts():  # transformers keeps its own output-capturing hooks once output_hidden_states was asked
        return [(len(layer._forward_pre_hooks), len(layer.self_attn._forward_hooks), len(layer.mlp._forward_hooks))
                for layer in H.decoder_layers(model)]
    before = hook_counts()
    with H.ablation(model, r):
        observers = []  # registered after the ablation hooks, so they see what the model computes with
        for layer in H.decoder_layers(model):
            observers.append(layer.register_forward_pre_hook(
                lambda m, a, k: seen.append(("resid_pre", (a[0] if a else k["hidden_states"]) @ unit)), with_kwargs=True))
            observers.append(layer.self_attn.register_forward_hook(lambda m, a, o: seen.append(("attn", o[0] @ unit))))
            observers.append(layer.mlp.register_forward_hook(lambda m, a, o: seen.append(("mlp", o @ unit))))
            observers.append(layer.register_forward_hook(
                lambda m, a, o: seen.append(("resid_post", (o[0] if isinstance(o, tuple) else o) @ unit))))
        try:
            model(**batch, position_ids=H.position_ids(batch["attention_mask"]))
        finally:
            for handle in observers:
                handle.remove()
    assert {kind for kind, _ in seen} == {"resid_pre", "attn", "mlp", "resid_post"}
    assert len(seen) == 4 * model.config.num_hidden_layers
    assert max(proj.abs().max().item() for _, proj in seen) <= 1e-5
    assert hook_counts() == before, "hooks must be gone after the context"


def test_hooks_removed_on_error(tiny_model):
    model, _ = tiny_model
    with pytest.raises(RuntimeError):
        with H.ablation(model, _direction(model)):
            raise RuntimeError("inside")
    assert all(not layer._forward_pre_hooks for layer in H.decoder_layers(model))


def test_orthogonalised_weights_equal_hooks(tiny, tiny_model):
    model, tok = tiny_model
    r = _direction(model, 1)
    batch = H.tokenize(tok, tiny, PROMPTS)
    kwargs = dict(**batch, position_ids=H.position_ids(batch["attention_mask"]))
    with torch.no_grad():
        with H.ablation(model, r):
            hooked = model(**kwargs).logits
        edited = H.orthogonalize_(copy.deepcopy(model), r)
        folded = edited(**kwargs).logits
        plain = model(**kwargs).logits
    torch.testing.assert_close(folded, hooked, atol=1e-4, rtol=0)
    assert (plain - hooked).abs().max() > 1e-3, "the ablation must change the logits"


@pytest.mark.parametrize("ablate", [False, True])
def test_kv_cached_generation_equals_the_recompute_loop(tiny, tiny_model, ablate):
    model, tok = tiny_model
    batch = H.tokenize(tok, tiny, PROMPTS)
    assert (batch["attention_mask"] == 0).any()
    with H.ablation(model, _direction(model, 2) if ablate else None):
        cached = H.greedy_tokens(model, batch["input_ids"], batch["attention_mask"], 12, use_cache=True)
        recomputed = H.greedy_tokens(model, batch["input_ids"], batch["attention_mask"], 12, use_cache=False)
    assert cached.shape == (len(PROMPTS), 12)
    assert torch.equal(cached, recomputed)


@pytest.mark.parametrize("ablate", [False, True])
def test_shared_prefix_prefill_gives_the_same_tokens(tiny_model, ablate):
    model, tok = tiny_model
    system = H.load_profile("tiny", {"template": "System: answer briefly.\nUser: {prompt}\nAssistant:"})
    batch = H.tokenize(tok, system, PROMPTS)
    ids, mask, cache = H.prefill_shared_prefix(model, batch["input_ids"], batch["attention_mask"])
    shared = cache.get_seq_length()
    assert shared >= 2 and (ids[:, :shared] == ids[0, :shared]).all()  # the chat template's common start
    assert torch.equal(mask.sum(1), batch["attention_mask"].sum(1))  # same real tokens, rearranged
    with H.ablation(model, _direction(model, 2) if ablate else None):
        shared_tokens = H.greedy_tokens(model, batch["input_ids"], batch["attention_mask"], 12)
        recomputed = H.greedy_tokens(model, batch["input_ids"], batch["attention_mask"], 12, use_cache=False)
    assert torch.equal(shared_tokens, recomputed)


def test_nothing_shared_falls_back_to_plain_prefill(tiny_model):
    model, _ = tiny_model
    ids = torch.tensor([[5, 6, 7], [8, 6, 7]])
    mask = torch.ones_like(ids)
    assert H.prefill_shared_prefix(model, ids, mask)[2] is None
    assert H.prefill_shared_prefix(model, ids[:1], mask[:1])[2] is None  # one prompt: nothing to share


def test_generation_batch_equals_one_by_one(tiny, tiny_model):
    model, tok = tiny_model
    together = H.generate(model, tok, tiny, PROMPTS)
    alone = [H.generate(model, tok, tiny, [p])[0] for p in PROMPTS]
    assert together == alone


def test_direction_of_another_width_is_refused(tiny_model):
    model, _ = tiny_model
    with pytest.raises(H.ConfigError, match=r"direction has shape \(7,\) but the model's residual width is 32"):
        with H.ablation(model, torch.ones(7)):
            pass


def _units_setup(tiny, tmp_path):
    sets = H.prompt_sets(tiny)
    acts = {role: H.activations(tiny, role, sets, tmp_path) for role in tiny.roles}
    return sets, H.directions(tmp_path, acts)


def test_resume_redoes_only_the_unfinished_unit(tiny, tmp_path, monkeypatch):
    sets, dirs = _units_setup(tiny, tmp_path)
    units = [("base", H.NO_ABLATION, None), ("base", "base", 2), ("base", "LAT", 2)]
    real, calls = H.generate_tokens, []

    def crashing(*args, **kwargs):
        calls.append(kwargs.get("desc"))
        if len(calls) == 2:
            raise KeyboardInterrupt("killed mid-unit")
        return real(*args, **kwargs)
    monkeypatch.setattr(generation, "generate_tokens", crashing)
    with pytest.raises(KeyboardInterrupt):
        H.generation_units(tiny, tmp_path, sets.eval, dirs, units)
    assert H.unit_path(tmp_path, "base", H.NO_ABLATION, None).is_file()
    assert not H.unit_path(tmp_path, "base", "base", 2).exists()

    calls.clear()
    monkeypatch.setattr(generation, "generate_tokens", lambda *a, **k: calls.append(k.get("desc")) or real(*a, **k))
    resumed = H.generation_units(tiny, tmp_path, sets.eval, dirs, units)
    assert calls == ["base <- base L2", "base <- LAT L2"]
    calls.clear()
    again = H.generation_units(tiny, tmp_path, sets.eval, dirs, units)
    assert calls == [] and again == resumed

    fresh = H.generation_units(tiny, tmp_path / "fresh", sets.eval, dirs, units)
    assert fresh == resumed, "a resumed run must equal an uninterrupted one"


def test_transfer_scores_and_mcnemar(tiny, tmp_path):
    """The judges read each row's turn (profile.judge_text "turn"), not everything generated: every other
    row gets a refusal after its end of turn, so judging `completion` would give other labels."""
    sets, dirs = _units_setup(tiny, tmp_path)
    results = H.generation_units(tiny, tmp_path, sets.eval, dirs, H.transfer_units(tiny))
    assert len(results) == 2 + 4
    for recs in results.values():
        for r in recs[::2]:
            r["completion"] = r["turn"] + "<|end|>I'm sorry, but I cannot help with that. As an AI, I must decline."
    assert tiny.judge_text == "turn"
    scores = H.score_units(results)
    assert set(scores.method) == set(H.METHODS) and (scores.n == len(sets.eval)).all()
    for row in scores.itertuples():  # each row is the rate_summary of its own unit's labels
        recs = results[(row.target, row.source, row.layer if row.source != H.NO_ABLATION else None)]
        labels = H.classify([r["turn"] for r in recs], row.method, [r["prompt"] for r in recs])
        s = H.rate_summary(labels)
        assert (row.refusals, row.refusal_rate, row.wilson_low, row.wilson_high) == (s["count"], s["rate"], s["wilson_low"], s["wilson_high"])
        assert row.invalid_rate == labels.count(-1) / len(labels)
        if row.method == "substring":  # the refusals after the end of turn must not count
            assert labels != H.classify([r["completion"] for r in recs], row.method)
    tests = H.mcnemar_table(results)
    # per target: 3 cells -> 3 pairs; per source (none, base, SFT... as the units hold): 2 targets -> 1 pair
    sources = {u[1] for u in results}
    assert len(tests) == 2 * 3 + len(sources) and (tests.comparison == "same source").sum() == len(sources)
    cells = {u[:2]: H.classify([r["turn"] for r in recs], "paper", [r["prompt"] for r in recs])
             for u, recs in results.items()}
    for row in tests.itertuples():
        t = H.mcnemar(cells[(row.target_a, row.source_a)], cells[(row.target_b, row.source_b)])
        assert (row.only_a_refuses, row.only_b_refuses, row.p_value) == (t["b"], t["c"], t["p_value"])


def test_one_direction_per_row_equals_separate_runs(tiny, tiny_model):
    """Several units in one batch (generation_units on cpu) give each unit's own tokens and hidden
    states: a zero row is no ablation, other rows their own direction."""
    model, tok = tiny_model
    d1, d2 = _direction(model, 1), _direction(model, 2)
    separate = (H.generate(model, tok, tiny, PROMPTS) + H.generate(model, tok, tiny, PROMPTS, d1)
                + H.generate(model, tok, tiny, PROMPTS, d2))
    rows = torch.stack([torch.zeros_like(d1)] * 3 + [d1] * 3 + [d2] * 3)
    wide = dataclasses.replace(tiny, batch_size=9)
    assert H.generate(model, tok, wide, PROMPTS * 3, rows) == separate
    batch = H.tokenize(tok, tiny, PROMPTS * 2)
    with H.ablation(model, torch.stack([d1] * 3 + [d2] * 3)):
        together = model(**batch).logits
    single = H.tokenize(tok, tiny, PROMPTS)
    for part, d in ((slice(0, 3), d1), (slice(3, 6), d2)):
        with H.ablation(model, d):
            alone = model(**single).logits
        mask = batch["attention_mask"][part].bool()
        torch.testing.assert_close(together[part][mask], alone[single["attention_mask"].bool()])


def test_per_row_directions_share_the_prefix_once_per_distinct_direction(tiny_model):
    """generation_units' batches (one direction per row) still compute the template's common start
    once per distinct direction: the tokens equal the recompute loop and separate runs."""
    model, tok = tiny_model
    system = H.load_profile("tiny", {"template": "System: answer briefly.\nUser: {prompt}\nAssistant:"})
    d1, d2 = _direction(model, 1), _direction(model, 2)
    rows = torch.stack([torch.zeros_like(d1)] * 3 + [d1] * 3 + [d2] * 3)
    batch = H.tokenize(tok, system, PROMPTS * 3)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    _, _, cache = H.prefill_shared_prefix(model, ids, mask, direction=rows)
    keys = cache.layers[-1].keys  # [rows, heads, prefix, head_dim]: the last layer sees every ablation
    assert len(keys) == 9 and torch.equal(keys[0], keys[2]) and torch.equal(keys[3], keys[5])
    assert not torch.equal(keys[0], keys[3]) and not torch.equal(keys[3], keys[6])
    shared = H.greedy_tokens(model, ids, mask, 12, direction=rows)
    recomputed = H.greedy_tokens(model, ids, mask, 12, direction=rows, use_cache=False)
    one = H.tokenize(tok, system, PROMPTS)
    separate = torch.cat([H.greedy_tokens(model, one["input_ids"], one["attention_mask"], 12, direction=d)
                          for d in (None, d1, d2)])
    assert torch.equal(shared, recomputed) and torch.equal(shared, separate)


def test_per_row_directions_must_match_the_batch(tiny, tiny_model):
    model, tok = tiny_model
    with pytest.raises(H.ConfigError, match="2 directions for 3 prompts; pass one per prompt"):
        H.generate(model, tok, tiny, PROMPTS, torch.ones(2, model.config.hidden_size))
    with pytest.raises(H.ConfigError, match="pass a \\[d\\] vector"):
        H.orthogonalize_(copy.deepcopy(model), torch.ones(2, model.config.hidden_size))


@pytest.mark.parametrize("n_units, n_prompts, batch_size, sizes", [
    (5, 64, 320, [5]), (5, 64, 256, [3, 2]), (4, 32, 320, [4]), (3, 8, 4, [1, 1, 1]), (5, 64, 64, [1] * 5)])
def test_unit_groups_fill_batches_evenly(n_units, n_prompts, batch_size, sizes):
    groups = H.unit_groups(list(range(n_units)), n_prompts, batch_size)
    assert [len(g) for g in groups] == sizes and sum(groups, []) == list(range(n_units))


def test_grouped_units_equal_units_one_by_one(tiny, tmp_path, monkeypatch):
    sets, dirs = _units_setup(tiny, tmp_path)
    units = [("base", H.NO_ABLATION, None), ("base", "base", 2), ("base", "LAT", 1)]
    alone = H.generation_units(tiny, tmp_path / "alone", sets.eval, dirs, units)
    wide = dataclasses.replace(tiny, batch_size=len(sets.eval) * len(units))
    calls = []
    real = H.generate_tokens
    monkeypatch.setattr(generation, "generate_tokens", lambda *a, **k: calls.append(k.get("desc")) or real(*a, **k))
    grouped = H.generation_units(wide, tmp_path / "grouped", sets.eval, dirs, units)
    assert calls == ["base <- none, base L2, LAT L1"]
    strip = lambda res: {u: [{k: v for k, v in r.items() if k != "refusal_log_odds"} for r in rows] for u, rows in res.items()}
    assert strip(grouped) == strip(alone)  # the log-odds differ in float reduction order only
    for u in units:
        assert [r["refusal_log_odds"] for r in grouped[u]] == pytest.approx([r["refusal_log_odds"] for r in alone[u]], abs=1e-4)


# --- end of turn: the judges read the model's own turn ------------------------------------------
def test_end_of_turn_cut_on_token_ids():
    stop = {2, 5}
    assert generation.end_of_turn([7, 8, 2, 9, 9], stop) == 2
    assert generation.end_of_turn([7, 8, 9], stop) is None
    assert generation.end_of_turn([5, 2], stop) == 0
    assert generation.crossed_end_of_turn([7, 2, 9], stop) and not generation.crossed_end_of_turn([7, 2, 2, 5], stop)
    assert not generation.crossed_end_of_turn([7, 8], stop)


def _force_eos_at(monkeypatch, step, eos):
    """Make every row's `step`-th generated token (0-based) the end-of-sequence token."""
    original, calls = generation.decode_step, []

    def forced(model, state):
        logits = original(model, state)
        if len(calls) == step:
            logits[:, eos] = logits.max() + 1.0
        calls.append(1)
        return logits
    monkeypatch.setattr(generation, "decode_step", forced)


def test_completion_with_eos_in_the_middle_is_cut_there(tiny, tiny_model, monkeypatch, tmp_path):
    model, tok = tiny_model
    assert tok.eos_token_id in generation.end_of_turn_ids(tok) and tok.convert_tokens_to_ids("<|end|>") in generation.end_of_turn_ids(tok)
    _force_eos_at(monkeypatch, 3, tok.eos_token_id)
    out = generation.generate_tokens(model, tok, tiny, PROMPTS)
    assert out.end_of_turn == [3] * len(PROMPTS)
    for text, turn, ids in zip(out.texts, out.turns, out.tokens):
        assert len(ids) == tiny.max_new_tokens and ids[3] == tok.eos_token_id
        assert turn == tok.decode(ids[:3], skip_special_tokens=True)
        assert text == tok.decode(ids, skip_special_tokens=True) and text.startswith(turn)
    assert out.crossed == [any(t not in generation.end_of_turn_ids(tok) for t in ids[4:]) for ids in out.tokens]

    _force_eos_at(monkeypatch, 3, tok.eos_token_id)
    rows = H.generation_units(tiny, tmp_path, PROMPTS, {}, [("base", H.NO_ABLATION, None)])[("base", H.NO_ABLATION, None)]
    for row, turn, text, crossed in zip(rows, out.turns, out.texts, out.crossed):
        assert (row["turn"], row["completion"], row["end_of_turn"], row["crossed_end_of_turn"]) == (turn, text, 3, crossed)
    texts, prompts = H.judge_inputs(rows)
    assert texts == out.turns and prompts == PROMPTS
    assert H.judge_inputs(rows, "full")[0] == out.texts
