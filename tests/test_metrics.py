from pathlib import Path

import numpy as np
import pytest
import torch

from dreamlab.errors import DreamlabError
from dreamlab.metrics import frechet_distance

FMNIST = Path("/usr/share/datasets/fashion-mnist")


def test_frechet_distance_matches_closed_form_for_diagonal_gaussians() -> None:
    mu1, mu2 = np.array([0.0, 1.0]), np.array([2.0, -1.0])
    v1, v2 = np.array([1.0, 4.0]), np.array([9.0, 0.25])
    expected = ((mu1 - mu2) ** 2).sum() + (v1 + v2 - 2 * np.sqrt(v1 * v2)).sum()
    assert frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2)) == pytest.approx(expected, rel=1e-6)
    assert frechet_distance(mu1, np.diag(v1), mu1, np.diag(v1)) == pytest.approx(0.0, abs=1e-6)


@pytest.mark.skipif(not FMNIST.exists(), reason="Debian dataset-fashion-mnist not installed")
def test_fid_fmnist_orders_real_below_noise() -> None:
    from dreamlab.data import load_dataset
    from generators.classifiers import feature_net, fid_fmnist

    net = feature_net()
    assert net.name == "cnn" and not net.training
    test = load_dataset("fashion_mnist", "test")["x"][:1000]
    train = load_dataset("fashion_mnist", "train")["x"][:1000]
    real = fid_fmnist(train, test)
    blurred = fid_fmnist(torch.nn.functional.avg_pool2d(train, 3, 1, 1), test)
    noise = fid_fmnist(torch.rand_like(test), test)
    assert real < blurred < noise
    with pytest.raises(DreamlabError, match="at least 2"):
        fid_fmnist(test[:1], test)


def test_missing_feature_net_names_the_fix(tmp_path: Path) -> None:
    from generators.classifiers import feature_net

    with pytest.raises(DreamlabError, match="dreamlab train cnn --preset full"):
        feature_net(tmp_path / "none")


def test_save_video_writes_gif_when_ffmpeg_is_missing(tmp_path, monkeypatch) -> None:
    import importlib.util

    import imageio.v3 as iio
    import numpy as np

    from dreamlab.images import save_video

    frames = np.random.default_rng(0).integers(0, 256, (5, 16, 16, 3), dtype=np.uint8)
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "imageio_ffmpeg" else real(name, *a)
    )
    out = save_video(frames, tmp_path / "v.mp4")
    assert out == tmp_path / "v.gif" and not (tmp_path / "v.mp4").exists()
    assert iio.imread(out, index=None).shape[0] == 5
