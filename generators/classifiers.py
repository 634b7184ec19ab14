"""The ch. 2 classifiers (MLP and CNN on Fashion-MNIST) and `fid_fmnist`, built on the CNN.

The trained CNN is dreamlab's offline feature network: `fid_fmnist` is the Fréchet distance between
Gaussians fitted to its 128-d penultimate features. It is *not* Inception FID (no Inception weights
exist offline); its values are comparable only with other `fid_fmnist` values. The shipped network lives
in `generators/assets/fmnist_cnn` (trained with `dreamlab train cnn --preset full`).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dreamlab.config import check_ranges
from dreamlab.data import FMNIST_CLASSES
from dreamlab.errors import DreamlabError
from dreamlab.metrics import frechet_distance_features
from generators.base import Batch, Metrics, Model, register

FEATURE_NET_DIR = Path(__file__).parent / "assets" / "fmnist_cnn"


class _Classifier(Model):
    kind = "classifier"

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def loss(self, batch: Batch) -> tuple[torch.Tensor, Metrics]:
        logits = self.logits(batch["x"]).float()
        loss = F.cross_entropy(logits, batch["y"])
        acc = (logits.argmax(1) == batch["y"]).float().mean()
        return loss, {"accuracy": acc.detach()}

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.logits(b.to(self.device)).argmax(1).cpu() for b in x.split(1000)])

    def write_artifacts(self, run_dir: Path) -> list[Path]:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        from dreamlab.images import plot_curves, save_figure, save_grid
        from generators.trainer import read_metrics

        self.eval()
        d = self.train_data("test")
        pred = self.predict(d["x"])
        cm = torch.zeros(10, 10, dtype=torch.long)
        cm.index_put_((d["y"], pred), torch.ones_like(pred), accumulate=True)
        fig, ax = plt.subplots(figsize=(6, 5))
        ax.imshow(cm.numpy(), cmap="Blues")
        ax.set_xticks(range(10), FMNIST_CLASSES, rotation=90, fontsize=7)
        ax.set_yticks(range(10), FMNIST_CLASSES, fontsize=7)
        for i in range(10):
            for j in range(10):
                ax.text(j, i, int(cm[i, j]), ha="center", va="center", fontsize=6)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(f"{self.name}: test accuracy {float((pred == d['y']).float().mean()):.4f}")
        out = [save_figure(fig, Path(run_dir) / "confusion_matrix.png")]
        wrong = (pred != d["y"]).nonzero().flatten()[:64]
        if len(wrong):
            out.append(save_grid(d["x"][wrong], Path(run_dir) / "misclassified.png", nrow=16))
        p = plot_curves(read_metrics(run_dir), ["loss", "accuracy"], Path(run_dir) / "loss_curves.png", self.name)
        return out + ([p] if p else [])


@dataclass
class MLPConfig:
    dataset: str = "fashion_mnist"
    hidden: tuple[int, ...] = (200, 150)

    def __post_init__(self) -> None:
        check_ranges(self, positive=("hidden",))


@register
class MLPClassifier(_Classifier):
    """Fashion-MNIST multilayer perceptron (book ch. 2): 784 -> 200 -> 150 -> 10."""

    name = "mlp"
    config_class = MLPConfig
    presets = {
        "tiny": {"hidden": (8,), "steps": 3, "batch_size": 16, "eval_items": 200},
        "quick": {"steps": 2000, "batch_size": 128, "lr": 5e-4},
        "full": {"steps": 10000, "batch_size": 128, "lr": 5e-4},
    }

    def __init__(self, config: MLPConfig) -> None:
        super().__init__(config)
        dims = [784, *config.hidden]
        layers: list[nn.Module] = [nn.Flatten()]
        for a, b in zip(dims[:-1], dims[1:]):
            layers += [nn.Linear(a, b), nn.ReLU()]
        layers.append(nn.Linear(dims[-1], 10))
        self.net = nn.Sequential(*layers)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


@dataclass
class CNNConfig:
    dataset: str = "fashion_mnist"
    channels: tuple[int, ...] = (32, 32, 64, 64)
    features: int = 128
    dropout: float = 0.5

    def __post_init__(self) -> None:
        check_ranges(self, positive=("channels", "features"), fraction=("dropout",))


@register
class CNNClassifier(_Classifier):
    """Fashion-MNIST CNN (book ch. 2): 4 conv+BN+LeakyReLU, dense 128, dropout; the fid_fmnist feature net."""

    name = "cnn"
    config_class = CNNConfig
    presets = {
        "tiny": {"channels": (4, 4, 8, 8), "features": 8, "steps": 3, "batch_size": 16, "eval_items": 200},
        "quick": {"steps": 1500, "batch_size": 128, "lr": 1e-3},
        "full": {"steps": 8000, "batch_size": 128, "lr": 1e-3},
    }

    def __init__(self, config: CNNConfig) -> None:
        super().__init__(config)
        c = config.channels
        layers: list[nn.Module] = []
        cin = 1
        for i, cout in enumerate(c):
            layers += [nn.Conv2d(cin, cout, 3, 2 if i % 2 else 1, 1), nn.BatchNorm2d(cout), nn.LeakyReLU(0.2)]
            cin = cout
        self.conv = nn.Sequential(*layers, nn.Flatten())
        self.fc = nn.Sequential(
            nn.Linear(cin * 7 * 7, config.features), nn.BatchNorm1d(config.features), nn.LeakyReLU(0.2)
        )
        self.drop = nn.Dropout(config.dropout)
        self.head = nn.Linear(config.features, 10)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate activations (what fid_fmnist compares)."""
        return self.fc(self.conv(x))

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.drop(self.features(x)))


# ----------------------------------------------------------------------------- fid_fmnist

_FEATURE_NET: dict[str, CNNClassifier] = {}


def feature_net(directory: str | Path | None = None, device: str | torch.device = "cpu") -> CNNClassifier:
    directory = Path(directory or FEATURE_NET_DIR)
    key = f"{directory}:{device}"
    if key not in _FEATURE_NET:
        if not (directory / "model.safetensors").exists():
            raise DreamlabError(
                f"the fid_fmnist feature network is missing at {directory}; train it with: "
                f"dreamlab train cnn --preset full --out runs/cnn-full && cp -r runs/cnn-full/model {directory}"
            )
        _FEATURE_NET[key] = CNNClassifier.from_pretrained(directory, device=device)
    return _FEATURE_NET[key]


@torch.no_grad()
def fmnist_features(images: torch.Tensor, net: CNNClassifier | None = None) -> torch.Tensor:
    """128-d features of (N, 1, 28, 28) images in [0, 1] (other sizes / RGB are converted first)."""
    net = net or feature_net()
    x = images.float()
    if x.shape[1] == 3:
        x = x.mean(1, keepdim=True)
    if x.shape[-2:] != (28, 28):
        x = F.interpolate(x, size=(28, 28), mode="bilinear", align_corners=False)
    return torch.cat([net.features(b.to(net.device)).cpu() for b in x.split(1000)])


def fid_fmnist(images_a: torch.Tensor, images_b: torch.Tensor, net: CNNClassifier | None = None) -> float:
    """Fréchet distance on our Fashion-MNIST CNN's penultimate features (not Inception FID)."""
    if len(images_a) < 2 or len(images_b) < 2:
        raise DreamlabError("fid_fmnist needs at least 2 images per set (use thousands for a stable value)")
    return frechet_distance_features(fmnist_features(images_a, net), fmnist_features(images_b, net))


def extra_eval_any(model: Any, n: int = 5000) -> dict[str, float]:
    """fid_fmnist of a Fashion-MNIST generator's samples against the test set."""
    from dreamlab.data import load_dataset

    test = load_dataset("fashion_mnist", "test")["x"][:n]
    g = torch.Generator(device=model.device).manual_seed(0)
    samples = torch.cat([model.sample(min(500, n - i), generator=g).cpu() for i in range(0, n, 500)])
    return {"fid_fmnist": fid_fmnist(samples, test)}
