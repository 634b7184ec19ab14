"""The shipped feature nets / judges of every image set (generators.features): they load offline, judge held-out
images about as well as their README says, their Fréchet distance puts real images below blur and noise, and bad
input gets a one-line error."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dreamlab import procedural as P
from dreamlab.data import load_dataset
from dreamlab.errors import DreamlabError
from generators import features as FT

FMNIST = Path("/usr/share/datasets/fashion-mnist")
SETS = ["faces", "flowers", "bricks", "mnist",
        pytest.param("fashion_mnist", marks=pytest.mark.skipif(not FMNIST.exists(), reason="no dataset-fashion-mnist"))]
#: loose floors a broken or untrained net fails (chance is 1/2 .. 1/10 per attribute; the READMEs say 0.97-1.0)
MIN_ACC = {"faces": 0.9, "flowers": 0.9, "bricks": 0.9, "mnist": 0.9, "fashion_mnist": 0.85}


def _images(set_name: str, n: int, split: str = "test") -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed random n of a split's images and labels (mnist5k's splits are sorted by digit: not the first n)."""
    s = FT.image_set(set_name)
    if set_name in P.KINDS:  # only these n are turned into float (a whole train split is 600 MB of floats)
        d = P.load_procedural(set_name, split, max_items=n)  # drawn in random order
        return d["x"], d["attrs"]
    d = load_dataset(s.dataset, split)
    idx = torch.randperm(len(d["y"]), generator=torch.Generator().manual_seed(0))[:n]
    return d["x"][idx], d["y"][idx, None]


@pytest.fixture(autouse=True)
def _one_thread_no_network(monkeypatch: pytest.MonkeyPatch):
    """Everything here must work with the network refused (the assets ship with the code)."""
    import socket

    def refuse(*a, **k):
        raise OSError("network disabled in tests")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("set_name", SETS)
def test_shipped_judge_loads_offline_and_is_accurate_on_held_out_images(set_name: str) -> None:
    FT._JUDGES.clear()  # load from disk here, not from an earlier test's cache
    j = FT.judge(set_name)
    assert not j.net.training and (j.directory / "README.md").exists()
    assert (j.directory / "model.safetensors").stat().st_size < 2 * 1024 * 1024
    x, y = _images(set_name, 300)
    acc = j.accuracy(x, y)
    assert set(acc) == {*j.attribute_names, "all"}
    assert min(acc[a] for a in j.attribute_names) >= MIN_ACC[set_name], acc
    if set_name in P.KINDS:  # combinations no generator trains on: the judge knows them too
        h = P.load_procedural(set_name, "test", held_out_only=True, max_items=100)
        assert j.accuracy(h["x"], h["attrs"])["all"] >= MIN_ACC[set_name]


@pytest.mark.parametrize("set_name", SETS)
def test_frechet_distance_puts_real_test_images_below_noise(set_name: str) -> None:
    x = _images(set_name, 100)[0]
    real = FT.frechet_distance(set_name, x, reference="val", max_reference=300)
    noise = FT.frechet_distance(set_name, torch.rand_like(x), reference="val", max_reference=300)
    assert 0 <= real < noise / 4, (real, noise)


def test_a_reference_tensor_gives_the_cached_split_statistics_number() -> None:
    x = _images("mnist", 150, "train")[0]
    ref = load_dataset("mnist5k", "test")["x"]
    by_split = FT.frechet_distance("mnist", x)
    assert FT.frechet_distance("mnist", x, reference=ref) == pytest.approx(by_split, rel=1e-4)
    # blurring moves a set away from the reference
    assert FT.frechet_distance("mnist", FT.gaussian_blur(x, 28 / 16)) > 2 * by_split


def test_other_sizes_are_resized_and_measured_against_a_reference_at_that_size() -> None:
    """The EBM's 32x32 MNIST and text-to-image's 32x32 faces are judged and measured like native images."""
    x, y = _images("mnist", 300)
    x32 = FT.resize(x, 32)
    assert FT.judge("mnist").accuracy(x32, y)["digit"] >= 0.9
    train32 = FT.resize(_images("mnist", 150, "train")[0], 32)
    assert FT.frechet_distance("mnist", train32, max_reference=300) < FT.frechet_distance(
        "mnist", torch.rand_like(train32), max_reference=300)
    fx, fy = _images("faces", 200)
    assert FT.judge("faces").accuracy(FT.resize(fx, 32), fy)["all"] >= 0.8


def test_bad_inputs_give_one_line_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    x = torch.rand(4, 3, 64, 64)
    cases = [
        (lambda: FT.frechet_distance("celeba", x), "celeba"),
        (lambda: FT.judge("imagenet"), "choose one of faces, flowers, bricks"),
        (lambda: FT.frechet_distance("faces", x[:, :1]), "need 3 channel"),
        (lambda: FT.frechet_distance("mnist", torch.rand(4, 3, 28, 28)), "need 1 channel"),
        (lambda: FT.frechet_distance("faces", x[0]), "got shape (3, 64, 64)"),
        (lambda: FT.frechet_distance("faces", x[..., :32]), "square"),
        (lambda: FT.frechet_distance("faces", x * 2 - 1), "(x + 1) / 2"),
        (lambda: FT.frechet_distance("faces", (x * 255).to(torch.uint8)), "divide uint8 by 255"),
        (lambda: FT.frechet_distance("faces", x[:1]), "at least 2 images"),
        (lambda: FT.frechet_distance("faces", x, reference="holdout"), "holdout"),
        (lambda: FT.frechet_distance("faces", x, combos="seen"), "combos='seen'"),
        (lambda: FT.frechet_distance("faces", x.numpy()), "torch tensor"),
        (lambda: FT.judge("faces").accuracy(x, torch.zeros(4, 2)), "must have shape (4, 4)"),
        (lambda: FT.FeatureNetConfig(dataset="fashion_mnist"), "faces, flowers, bricks, mnist5k"),
    ]
    for fn, words in cases:
        with pytest.raises(DreamlabError) as e:
            fn()
        assert words in str(e.value) and "\n" not in str(e.value), str(e.value)
    monkeypatch.setattr(FT, "ASSETS", tmp_path)
    monkeypatch.setattr(FT, "_JUDGES", {})
    with pytest.raises(DreamlabError, match="python -m generators.features build flowers"):
        FT.judge("flowers")
    with pytest.raises(DreamlabError, match="dreamlab train cnn --preset full"):
        FT.judge("fashion_mnist")
