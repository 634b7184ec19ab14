import os
import socket

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("SDL_VIDEODRIVER", "dummy")
os.environ.setdefault("MPLBACKEND", "Agg")


@pytest.fixture(scope="module")
def offline_small_procedural(tmp_path_factory):
    """Small procedural splits in a private cache, and no network at all (any connect raises)."""
    from dreamlab import procedural as P

    def refuse(*a, **k):
        raise OSError("network disabled in tests")

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DREAMLAB_CACHE", str(tmp_path_factory.mktemp("cache")))
        mp.setattr(P, "SPLIT_SIZES", {"train": 200, "val": 40, "test": 300})
        mp.setattr(socket.socket, "connect", refuse)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # tiny models: one thread is faster than two on a shared 2-core machine
        yield
        torch.set_num_threads(threads)


@pytest.fixture
def torch_one_thread():
    """Tiny models run faster on one torch thread than on two on a shared 2-core machine; restored afterwards.
    A test module opts in with `pytestmark = pytest.mark.usefixtures("torch_one_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
