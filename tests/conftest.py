import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import helpers as H  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: loads a real model (minutes); run with `make test-slow`")
    if os.environ.get("PYTEST_XDIST_WORKER"):  # `make test` runs one worker per core: one torch thread each
        import torch
        torch.set_num_threads(1)


@pytest.fixture()
def one_thread():
    """The tiny model's ops are microseconds; a second thread only adds synchronisation."""
    import torch
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny():
    return H.load_profile("tiny")


@pytest.fixture(scope="session")
def tiny_model(tiny):
    return H.load_model(tiny, "base")
