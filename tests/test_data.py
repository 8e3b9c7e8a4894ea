import json
import shutil

import pytest

import helpers as H
from refusal_lat import data

# sha256 of json.dumps of the four split lists; pinned once, any change to file or split code shows up.
SPLIT_HASH = "54c7d63c10df5abf12e8feeec300c608999b2eb2405fbac73992d321a32cb686"


@pytest.fixture(scope="module")
def splits():
    return H.paper_splits()


def test_split_counts_match_the_paper(splits):
    assert (len(splits["harmful_train"]), len(splits["harmful_test"])) == (416, 104)
    assert (len(splits["harmless_train"]), len(splits["harmless_test"])) == (25_058, 6_265)
    assert len(splits["gpt4o"]) == 100


def test_split_lists_are_pinned(splits):
    lists = [splits[k] for k in ("harmful_train", "harmful_test", "harmless_train", "harmless_test")]
    assert H.stable_hash(lists) == SPLIT_HASH


def test_paper_prompt_sets_are_100_pairs_and_520_eval():
    sets = H.prompt_sets(H.load_profile("paper"))
    splits = H.paper_splits()
    assert len(sets.harmful) == len(sets.harmless) == 100 and len(sets.eval) == 520
    assert sets.eval == splits["harmful_train"][100:] + splits["harmful_test"] + splits["gpt4o"]
    assert not set(sets.harmful) & set(sets.eval)


def test_small_profiles_take_deterministic_subsets_of_every_source():
    cpu = H.load_profile("cpu")
    a, b = H.prompt_sets(cpu), H.prompt_sets(cpu)
    assert a == b and len(a.eval) == cpu.n_eval
    assert set(a.eval_source) == {"advbench_train", "advbench_test", "gpt4o"}
    full = H.prompt_sets(H.load_profile("paper")).eval
    assert set(a.eval) <= set(full)


def test_refusal_direction_splits():
    rd = H.refusal_direction_splits()
    assert {k: len(v) for k, v in rd.items()} == {
        "harmful_train": 260, "harmful_val": 39, "harmful_test": 572,
        "harmless_train": 18_793, "harmless_val": 6_264, "harmless_test": 6_266}


def test_altered_file_is_a_one_line_error(tmp_path):
    entry = H.DATA_FILES["gpt4o"]
    target = tmp_path / entry.path
    target.parent.mkdir(parents=True)
    shutil.copy(H.data_file("gpt4o"), target)
    assert H.data_file("gpt4o", tmp_path) == target  # explicit folder wins
    target.write_text(json.dumps(["changed"]))
    with pytest.raises(H.DataError, match=r"has sha256 .* but gpt4o is pinned") as err:
        H.data_file("gpt4o", tmp_path)
    assert "\n" not in str(err.value)


def test_missing_file_names_where_it_looked(tmp_path, monkeypatch):
    monkeypatch.delenv("REFUSAL_LAT_DATA_DIR", raising=False)
    monkeypatch.setattr(data, "REPO", tmp_path / "repo")  # no data/cache, no ../shared mirror
    monkeypatch.setitem(H.DATA_FILES, "gpt4o", H.DATA_FILES["gpt4o"].__class__(
        H.DATA_FILES["gpt4o"].path, "http://127.0.0.1:9/unreachable.json", H.DATA_FILES["gpt4o"].sha256))
    with pytest.raises(H.DataError, match=r"not found: looked in .*repo/data/cache.*download failed") as err:
        H.data_file("gpt4o")
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("n", [2, 5, 10, 519, 520, 31_323])
def test_train_test_split_equals_scikit_learns(n):
    from sklearn.model_selection import train_test_split
    items = [f"prompt {i}" for i in range(n)]
    assert list(data.train_test_split(items)) == train_test_split(items, test_size=0.2, random_state=42)
