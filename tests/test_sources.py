"""Every file the series reads is in the repository or has a public URL at a pinned revision.

The offline mirror (../shared/data) exists only on the project's machines. These tests hide it and
check that the resolver then goes to each file's public URL, and that the bytes at that URL (served
here from the mirror, since these machines have no network) are enough to build the prompt sets.
"""
import io
import re
import urllib.request
from pathlib import Path

import pytest

import refusal_lat.data as data
from refusal_lat.config import DataError

REPO = Path(__file__).resolve().parents[1]
PINNED_URL = re.compile(r"^https://raw\.githubusercontent\.com/[\w.-]+/[\w.-]+/[0-9a-f]{40}/\S+$")


def test_every_registered_file_has_a_public_url_at_a_pinned_commit_and_a_sha256():
    assert data.DATA_FILES
    for name, entry in data.DATA_FILES.items():
        assert PINNED_URL.match(entry.url), f"{name}: {entry.url!r} is not a URL at a pinned commit"
        assert entry.url.endswith(entry.path.split("/", 1)[1]), f"{name}: URL and mirror path disagree"
        assert re.fullmatch(r"[0-9a-f]{64}", entry.sha256), f"{name}: no sha256 pin"


def test_no_module_reads_the_mirror_except_the_resolver():
    for path in [*REPO.glob("refusal_lat/**/*.py"), REPO / "helpers.py", *REPO.glob("scripts/*.py")]:
        if path.name == "data.py" and path.parent.name == "refusal_lat":
            continue
        text = path.read_text()
        assert not re.search(r"""["'/]shared["'/]|shared/data""", text), f"{path} reaches for the mirror itself"


@pytest.fixture
def no_mirror(tmp_path, monkeypatch):
    """The resolver as it runs on a user's machine: no mirror, an empty data/cache, network via `fetch`."""
    mirror = next((d for d in data.data_search_dirs() if (d / "refusal_direction").is_dir()), data.data_search_dirs()[-1])
    monkeypatch.delenv("REFUSAL_LAT_DATA_DIR", raising=False)
    monkeypatch.setattr(data, "REPO", tmp_path / "repo")
    asked = []

    def serve(url, timeout=None):  # the network: the file the URL names, if we have its bytes
        asked.append(url)
        name = next(n for n, e in data.DATA_FILES.items() if e.url == url)
        local = mirror / data.DATA_FILES[name].path
        if not local.is_file():
            raise OSError("no network here")
        return io.BytesIO(local.read_bytes())

    monkeypatch.setattr(urllib.request, "urlopen", serve)
    return mirror, asked


def test_without_the_mirror_a_missing_file_names_its_public_url(no_mirror, monkeypatch):
    _, asked = no_mirror
    monkeypatch.setattr(urllib.request, "urlopen", lambda url, timeout=None: asked.append(url) or (_ for _ in ()).throw(OSError()))
    with pytest.raises(DataError) as err:
        data.data_file("advbench")
    assert asked == [data.DATA_FILES["advbench"].url]
    assert data.DATA_FILES["advbench"].url in str(err.value) and "\n" not in str(err.value)


def test_without_the_mirror_the_public_urls_alone_build_the_prompt_sets(no_mirror, tiny):
    mirror, asked = no_mirror
    if not (mirror / data.DATA_FILES["advbench"].path).is_file():
        pytest.skip(f"needs the offline mirror at {mirror} to stand in for the network")
    sets = data.prompt_sets(tiny)
    assert sets.harmful and sets.harmless and sets.eval
    assert {data.DATA_FILES[n].url for n in ("advbench", "alpaca", "gpt4o")} <= set(asked)
    assert all(url.startswith("https://") for url in asked)
