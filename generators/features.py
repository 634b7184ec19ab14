"""Feature networks and judges for every image set we train on: dreamlab's Fréchet distances.

No Inception weights exist offline, so each image set gets a small classifier trained here, shipped as a small
asset under `generators/assets/`. Its two uses:

- **features** (the penultimate layer): `frechet_distance(set_name, images)` is the Fréchet distance between
  Gaussians fitted to the features of `images` and of a reference split (the test split by default). These are
  *our* distances, not Inception FID: compare them only with each other, on the same set, at the same sample
  count, beside the floor and ceiling in docs/metrics.md.
- **heads**: `judge(set_name).predict(images)` gives one value index per attribute (per label for MNIST and
  Fashion-MNIST): the independent judge of conditional generators (a CGAN's requested attributes, text-to-image
  prompts). It is never a network that a generator was guided by.

- faces, flowers, bricks: `FeatureNet` with one softmax head per attribute, trained on 20,000 fresh draws of
  *every* attribute combination (held-out ones included) with seed 4242, disjoint from the dataset splits
  (seeds 0/1/2); asset `featnet_<set>`.
- mnist (`mnist5k`): `FeatureNet` with one head `digit`, trained on the mnist5k train split (3,500 images: the
  only MNIST offline); asset `featnet_mnist`.
- fashion_mnist: the ch. 2 CNN of `generators.classifiers`, trained on the Fashion-MNIST train split; asset
  `fmnist_cnn`.

Images are float (N, C, H, W) in [0, 1], square, with the set's channel count. A size other than the net's
native one (64 for the procedural sets, 28 for MNIST; e.g. the 32x32 MNIST of the EBM, taken as a resized digit,
not a padded one) is resized to it (area when shrinking, bilinear when enlarging), and for a Fréchet distance the
reference images are first brought to the input's size the same way, so a 32x32 model is measured against 32x32
test images. Reference statistics are cached in memory and in the data cache (keyed by the asset's hash).

Rebuild the assets (deterministic from the seed, minutes on 2 CPU cores per set; changes every number in
docs/metrics.md) and measure the floors and ceilings:

    python -m generators.features build faces flowers bricks mnist
    python -m generators.features table --n 2000
"""
from __future__ import annotations

import argparse
import hashlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dreamlab import procedural as P
from dreamlab.config import check_ranges
from dreamlab.data import FMNIST_CLASSES, load_dataset
from dreamlab.errors import DreamlabError
from dreamlab.io import cached_array, load_json
from dreamlab.metrics import frechet_distance as _frechet
from dreamlab.metrics import gaussian_stats
from generators.base import Batch, Metrics, Model, TrainConfig, register

ASSETS = Path(__file__).parent / "assets"
BUILD_COMMAND = "python -m generators.features build {set}"


@dataclass(frozen=True)
class ImageSet:
    """What the features of one image set are: its dataset, image format, net asset and labels."""

    name: str
    dataset: str                            # the registered dataset (dreamlab.data)
    channels: int
    size: int                               # the feature net's native input size
    asset: str                              # folder under generators/assets
    attributes: dict[str, tuple]            # attribute -> its values (the judge's heads, in order)


SETS: dict[str, ImageSet] = {
    **{k: ImageSet(k, k, 3, P.SIZE, f"featnet_{k}", P.ATTRIBUTES[k]) for k in P.KINDS},
    "mnist": ImageSet("mnist", "mnist5k", 1, 28, "featnet_mnist", {"digit": tuple(range(10))}),
    "fashion_mnist": ImageSet("fashion_mnist", "fashion_mnist", 1, 28, "fmnist_cnn", {"class": FMNIST_CLASSES}),
}
_ALIASES = {"mnist5k": "mnist"}
#: the datasets a FeatureNet trains on (fashion_mnist has its ch. 2 CNN)
_TRAINABLE = {s.dataset: s.name for s in SETS.values() if s.asset.startswith("featnet_")}
JUDGE_SEED = 4242  # fresh procedural training draws: disjoint from the split seeds 0, 1, 2


def image_set(set_name: str) -> ImageSet:
    name = _ALIASES.get(set_name, set_name)
    if name not in SETS:
        raise DreamlabError(f"no feature network for image set {set_name!r}; choose one of {', '.join(SETS)}")
    return SETS[name]


# ----------------------------------------------------------------------------- resizing and input checks

def resize(x: torch.Tensor, size: int) -> torch.Tensor:
    """Square images to `size`: area averaging when shrinking (no aliasing), bilinear when enlarging."""
    if x.shape[-1] == size:
        return x
    if x.shape[-1] > size:
        return F.interpolate(x, size=(size, size), mode="area")
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)


def check_images(s: ImageSet, images: Any, what: str = "images") -> torch.Tensor:
    """The images as a float tensor, or a one-line DreamlabError saying what is wrong and what is expected."""
    want = f"float (N, {s.channels}, H, H) in [0, 1]"
    if not torch.is_tensor(images):
        raise DreamlabError(f"{what} for {s.name} must be a torch tensor {want}, got {type(images).__name__}")
    if images.ndim != 4:
        raise DreamlabError(f"{what} for {s.name} must be {want}, got shape {tuple(images.shape)}")
    n, c, h, w = images.shape
    if c != s.channels:
        fix = "average the colour channels (x.mean(1, keepdim=True))" if s.channels == 1 else "repeat the grey channel"
        raise DreamlabError(f"{what} for {s.name} need {s.channels} channel(s), got {c} in shape "
                            f"{tuple(images.shape)}; {fix} if that is what you mean")
    if h != w or h < 8:
        raise DreamlabError(f"{what} for {s.name} must be square and at least 8x8, got {h}x{w}")
    if not images.is_floating_point():
        raise DreamlabError(f"{what} for {s.name} must be float in [0, 1], got {images.dtype}; divide uint8 by 255")
    if n:
        lo, hi = float(images.min()), float(images.max())
        if not (math.isfinite(lo) and math.isfinite(hi)):
            raise DreamlabError(f"{what} for {s.name} hold NaN or inf values")
        if lo < -1e-3 or hi > 1 + 1e-3:
            raise DreamlabError(f"{what} for {s.name} must lie in [0, 1], got [{lo:.3g}, {hi:.3g}]; "
                                "map [-1, 1] outputs with (x + 1) / 2")
    return images.float()


# ----------------------------------------------------------------------------- the network


@dataclass
class FeatureNetConfig:
    dataset: str = "faces"                   # faces, flowers, bricks (fresh draws) or mnist5k (its train split)
    channels: tuple[int, ...] = (32, 48, 96, 96)  # one stride-2 stage each (then a stride-1 conv from stage 2 on)
    features: int = 128                      # the penultimate width: what the Fréchet distance compares
    dropout: float = 0.3
    train_images: int = 20000                # fresh procedural images drawn for training (ignored for mnist5k)
    train_seed: int = JUDGE_SEED
    shift: float = 0.08                      # random translation, up to this fraction of the width
    lowres: float = 0.25                     # fraction of each batch shown at 1/2..3/4 resolution (32x32 models)

    def __post_init__(self) -> None:
        check_ranges(self, positive=("channels", "features", "train_images"), nonneg=("train_seed",),
                     fraction=("dropout", "shift", "lowres"))
        if self.dataset not in _TRAINABLE:
            raise DreamlabError(f"dataset={self.dataset!r}: a FeatureNet trains on one of {', '.join(_TRAINABLE)}")


@register
class FeatureNet(Model):
    """Feature net and attribute judge of one image set (faces/flowers/bricks/mnist5k): Fréchet features + heads."""

    name = "featnet"
    kind = "classifier"
    config_class = FeatureNetConfig
    presets = {
        "tiny": {"channels": (4, 8), "features": 8, "train_images": 64, "steps": 3, "batch_size": 16, "eval_items": 64},
        # what ships in generators/assets (python -m generators.features build): minutes on 2 CPU cores
        "quick": {"steps": 1000, "batch_size": 64, "lr": 2e-3, "weight_decay": 1e-4, "ckpt_every": 500},
        "full": {"train_images": 60000, "steps": 6000, "batch_size": 128, "lr": 2e-3, "weight_decay": 1e-4},
    }

    def __init__(self, config: FeatureNetConfig) -> None:
        super().__init__(config)
        self.set = SETS[_TRAINABLE[config.dataset]]
        self.num_values = [len(v) for v in self.set.attributes.values()]
        layers: list[nn.Module] = []
        cin = self.set.channels
        for i, c in enumerate(config.channels):
            layers += [nn.Conv2d(cin, c, 3, 2, 1), nn.BatchNorm2d(c), nn.LeakyReLU(0.2)]
            if i:  # a second conv per stage from the 2nd on; the first stage at full resolution is the costly one
                layers += [nn.Conv2d(c, c, 3, 1, 1), nn.BatchNorm2d(c), nn.LeakyReLU(0.2)]
            cin = c
        self.conv = nn.Sequential(*layers, nn.Flatten())
        with torch.no_grad():  # flattened, not pooled: the features keep where things are in the image
            flat = self.conv(torch.zeros(2, self.set.channels, self.set.size, self.set.size)).shape[1]
        self.fc = nn.Sequential(nn.Linear(flat, config.features), nn.BatchNorm1d(config.features), nn.LeakyReLU(0.2))
        self.drop = nn.Dropout(config.dropout)
        self.head = nn.Linear(config.features, sum(self.num_values))

    # ---- forward ----------------------------------------------------------------------------
    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate activations of images in [0, 1] at the native size (what the Fréchet distance compares)."""
        return self.fc(self.conv(x * 2 - 1))

    def logits(self, x: torch.Tensor) -> list[torch.Tensor]:
        return list(self.head(self.drop(self.features(x))).split(self.num_values, dim=1))

    # ---- training ---------------------------------------------------------------------------
    def train_data(self, split: str) -> dict[str, torch.Tensor]:
        """train: fresh draws of every combination (procedural) or the mnist5k train split; val/test: the dataset's.

        Images stay uint8 in memory (20k 64x64 RGB = 250 MB instead of 1 GB); `_inputs` scales them."""
        c = self.config
        if split == "train" and self.set.name in P.KINDS:
            x, y = P.generate(self.set.name, c.train_images, seed=c.train_seed)
            return {"x": torch.from_numpy(x).permute(0, 3, 1, 2).contiguous(), "y": torch.from_numpy(y)}
        d = load_dataset(self.set.dataset, split)
        y = d["attrs"] if "attrs" in d else d["y"][:, None]
        return {"x": d["x"], "y": y}

    @staticmethod
    def _inputs(x: torch.Tensor) -> torch.Tensor:
        return x.float().div_(255) if x.dtype == torch.uint8 else x.float()

    def _augment(self, x: torch.Tensor) -> torch.Tensor:
        """Per-image random translation (generated images are not centred exactly) and, for a fraction of the
        batch, a lower resolution resized back (so 32x32 samples are judged as well as 64x64 ones)."""
        c, n, s = self.config, len(x), x.shape[-1]
        if c.shift > 0:
            theta = torch.zeros(n, 2, 3, device=x.device)
            theta[:, 0, 0] = theta[:, 1, 1] = 1
            theta[:, :, 2] = (torch.rand(n, 2, device=x.device) * 2 - 1) * 2 * c.shift  # grid units: 2 per width
            grid = F.affine_grid(theta, list(x.shape), align_corners=False)
            x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
        k = int(round(c.lowres * n))
        if k:
            low = int(torch.randint(s // 2, (3 * s) // 4 + 1, ()))  # below half size a smile is a pixel or two
            x = torch.cat([resize(resize(x[:k], low), s), x[k:]])
        return x

    def loss(self, batch: Batch) -> tuple[torch.Tensor, Metrics]:
        x, y = self._inputs(batch["x"]), batch["y"]
        if self.training:
            x = self._augment(x)
        logits = self.logits(x)
        loss = sum(F.cross_entropy(lg.float(), y[:, j]) for j, lg in enumerate(logits)) / len(logits)
        right = torch.stack([lg.argmax(1) == y[:, j] for j, lg in enumerate(logits)], 1)
        m: Metrics = {f"acc_{a}": right[:, j].float().mean().detach() for j, a in enumerate(self.set.attributes)}
        if len(logits) > 1:
            m["acc_all"] = right.all(1).float().mean().detach()
        return loss, m

    def train_step(self, batch: Batch, optimizers: list[torch.optim.Optimizer], step: int, tc: TrainConfig) -> Metrics:
        # cosine learning-rate decay from the step alone (so a resumed run follows the same schedule)
        for g in optimizers[0].param_groups:
            g["lr"] = tc.lr * 0.5 * (1 + math.cos(math.pi * min(step / tc.steps, 1.0)))
        return super().train_step(batch, optimizers, step, tc)

    @torch.no_grad()
    def evaluate(self, split: str = "test", max_items: int | None = None) -> dict[str, float]:
        res = super().evaluate(split, max_items)
        if self.set.name in P.KINDS:  # the combinations no generator saw in training: the judge must know them too
            d = P.load_procedural(self.set.name, split, held_out_only=True, max_items=max_items)
            right = predict(self, self.set, d["x"]) == d["attrs"]
            res.update({f"{split}_heldout_acc_{a}": float(right[:, j].float().mean())
                        for j, a in enumerate(self.set.attributes)})
            res[f"{split}_heldout_acc_all"] = float(right.all(1).float().mean())
        return res

    def write_artifacts(self, run_dir: Path) -> list[Path]:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        from dreamlab.images import plot_curves, save_figure, save_grid
        from generators.trainer import read_metrics

        self.eval()
        d = self.train_data("test")
        x, y = self._inputs(d["x"]), d["y"]
        pred = predict(self, self.set, x)
        attrs = list(self.set.attributes.items())
        fig, axes = plt.subplots(1, len(attrs), figsize=(4.2 * len(attrs), 4), squeeze=False)
        for j, (a, vals) in enumerate(attrs):
            k = len(vals)
            cm = torch.zeros(k, k, dtype=torch.long)
            cm.index_put_((y[:, j], pred[:, j]), torch.ones(len(y), dtype=torch.long), accumulate=True)
            ax = axes[0, j]
            ax.imshow(cm.numpy(), cmap="Blues")
            ax.set_xticks(range(k), [str(v) for v in vals], rotation=90, fontsize=7)
            ax.set_yticks(range(k), [str(v) for v in vals], fontsize=7)
            for r in range(k):
                for q in range(k):
                    ax.text(q, r, int(cm[r, q]), ha="center", va="center", fontsize=6)
            ax.set_title(f"{a}: acc {float((pred[:, j] == y[:, j]).float().mean()):.4f}", fontsize=9)
            ax.set_xlabel("predicted")
        axes[0, 0].set_ylabel("true")
        out = [save_figure(fig, Path(run_dir) / "confusion_matrices.png")]
        wrong = (pred != y).any(1).nonzero().flatten()[:64]
        if len(wrong):
            out.append(save_grid(x[wrong], Path(run_dir) / "misjudged_test_images.png", nrow=16))
        keys = ["loss", *[f"acc_{a}" for a, _ in attrs]]
        title = f"{self.name} ({self.set.name})"
        p = plot_curves(read_metrics(run_dir), keys, Path(run_dir) / "loss_curves.png", title)
        return out + ([p] if p else [])


# ----------------------------------------------------------------------------- judges and features


@torch.no_grad()
def _batched(net: nn.Module, s: ImageSet, x: torch.Tensor, fn: str, batch_size: int = 500) -> list[Any]:
    was = net.training
    net.eval()
    dev = next(net.parameters()).device
    out = [getattr(net, fn)(resize(b.to(dev).float(), s.size)) for b in x.split(batch_size)]
    net.train(was)
    return out


def predict(net: nn.Module, s: ImageSet, x: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
    """(N, n_attributes) predicted value indices of a net with `logits(x)` (a list per head, or one tensor)."""
    rows = []
    for lg in _batched(net, s, x, "logits", batch_size):
        heads = lg if isinstance(lg, (list, tuple)) else [lg]
        rows.append(torch.stack([h.argmax(1) for h in heads], 1).cpu())
    return torch.cat(rows) if rows else torch.zeros(0, len(s.attributes), dtype=torch.long)


class Judge:
    """The shipped classifier of one image set, with checked inputs: `predict`, `accuracy` and `features`."""

    def __init__(self, s: ImageSet, net: nn.Module, directory: Path) -> None:
        self.set, self.net, self.directory = s, net, directory
        self.attributes = s.attributes
        ev = directory / "eval.json"
        self.reported = load_json(ev) if ev.exists() else {}  # held-out accuracy measured when the asset was built

    @property
    def attribute_names(self) -> list[str]:
        return list(self.attributes)

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        """(N, n_attributes) long: the value index of each attribute (MNIST/Fashion-MNIST: one column, the class)."""
        return predict(self.net, self.set, check_images(self.set, images))

    def accuracy(self, images: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
        """Per-attribute accuracy of the judged labels against `labels` (N, n_attributes) or (N,), and `all`."""
        labels = torch.as_tensor(labels).long().cpu()
        labels = labels[:, None] if labels.ndim == 1 else labels
        if labels.shape != (len(images), len(self.attributes)):
            want = f"({len(images)}, {len(self.attributes)})"
            raise DreamlabError(f"labels for {self.set.name} must have shape {want} (one value index per attribute: "
                                f"{', '.join(self.attributes)}), got {tuple(labels.shape)}")
        right = self.predict(images) == labels
        res = {a: float(right[:, j].float().mean()) for j, a in enumerate(self.attributes)}
        res["all"] = float(right.all(1).float().mean())
        return res

    def features(self, images: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
        """(N, F) penultimate features, on the CPU."""
        x = check_images(self.set, images)
        return torch.cat([f.float().cpu() for f in _batched(self.net, self.set, x, "features", batch_size)])


_JUDGES: dict[tuple[str, str], Judge] = {}


def judge(set_name: str, device: str | torch.device = "cpu") -> Judge:
    """The shipped classifier of `set_name` (loaded once per device; offline)."""
    s = image_set(set_name)
    key = (s.name, str(device))
    if key not in _JUDGES:
        d = ASSETS / s.asset
        if not (d / "model.safetensors").exists() or not (d / "config.json").exists():
            cmd = ("dreamlab train cnn --preset full --out runs/cnn-full && cp -r runs/cnn-full/model " + str(d)
                   if s.name == "fashion_mnist" else BUILD_COMMAND.format(set=s.name))
            raise DreamlabError(f"the {s.name} feature network is missing at {d}; rebuild it with: {cmd}")
        net = Model.from_pretrained(d, device=device)
        _JUDGES[key] = Judge(s, net, d)
    return _JUDGES[key]


def features(set_name: str, images: torch.Tensor) -> torch.Tensor:
    return judge(set_name).features(images)


_STATS: dict[tuple[str, str, int, int, str], tuple[np.ndarray, np.ndarray]] = {}


def _asset_hash(d: Path) -> str:
    return hashlib.sha1((d / "model.safetensors").read_bytes()).hexdigest()[:12]


def reference_images(set_name: str, split: str = "test", combos: str = "train") -> torch.Tensor:
    """The images of a split; for a procedural set with `combos="train"` only those whose attribute combination
    occurs in the train split (the held-out ones removed: they are not in the distribution a generator learns)."""
    s = image_set(set_name)
    if combos not in ("train", "all"):
        raise DreamlabError(f"combos={combos!r} must be 'train' (the train split's attribute combinations) or 'all'")
    if split not in ("train", "val", "test"):
        raise DreamlabError(f"reference={split!r} must be a split (train, val, test) or an image tensor")
    d = load_dataset(s.dataset, split)
    if combos == "train" and "attrs" in d:
        return d["x"][~torch.from_numpy(P.is_held_out(s.name, d["attrs"]))]
    return d["x"]


def reference_stats(set_name: str, split: str = "test", size: int | None = None, max_items: int = 0,
                    combos: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance of the features of `reference_images` (a fixed random `max_items` of them, 0 = all), seen
    at `size` x `size`.

    Cached in memory and in the data cache; the key holds the asset's hash, so a rebuilt net never reuses them."""
    s = image_set(set_name)
    size = size or s.size
    combos = combos if s.name in P.KINDS else "all"
    key = (s.name, split, size, max_items, combos)
    if key not in _STATS:
        j = judge(s.name)

        def build() -> np.ndarray:
            x = reference_images(s.name, split, combos)
            if 0 < max_items < len(x):  # a fixed random subset: a split may be ordered (mnist5k's are sorted by digit)
                x = x[torch.randperm(len(x), generator=torch.Generator().manual_seed(0))[:max_items]]
            mu, cov = gaussian_stats(j.features(resize(x, size).clamp_(0, 1)))
            return np.concatenate([mu[None], cov])

        name = f"fd_ref_{s.name}_{split}_{combos}_{max_items or 'all'}_{size}px_{_asset_hash(j.directory)}"
        arr = cached_array(name, build)
        _STATS[key] = (arr[0], arr[1:])
    return _STATS[key]


def frechet_distance(set_name: str, images: torch.Tensor, reference: str | torch.Tensor = "test",
                     max_reference: int = 0, combos: str = "train") -> float:
    """Fréchet distance of `images` (float (N, C, H, H) in [0, 1], N >= 2) to `reference`: a split name of the set
    ("test", "val", "train"; a fixed random `max_reference` of its images, 0 = all) or another image tensor.

    For the procedural sets a split reference keeps, by default (`combos="train"`), only the attribute combinations
    of the train split, which is what an unconditional generator trained on it can learn (`combos="all"` keeps the
    held-out ones too: it adds a constant to every value, up to 30x the floor for bricks).
    Our features, not Inception: compare only on the same set at the same N (see docs/metrics.md for the floor)."""
    s = image_set(set_name)
    x = check_images(s, images)
    if len(x) < 2:
        raise DreamlabError(f"a Fréchet distance needs at least 2 images, got {len(x)} (thousands give a stable value)")
    j = judge(s.name)
    if isinstance(reference, str):
        mu_r, cov_r = reference_stats(s.name, reference, x.shape[-1], max_reference, combos)
    else:
        r = check_images(s, reference, "reference images")
        if len(r) < 2:
            raise DreamlabError(f"a Fréchet distance needs at least 2 reference images, got {len(r)}")
        mu_r, cov_r = gaussian_stats(j.features(resize(r, x.shape[-1]).clamp_(0, 1)))
    mu, cov = gaussian_stats(j.features(x))
    return _frechet(mu, cov, mu_r, cov_r)


# ----------------------------------------------------------------------------- floors and ceilings


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur (reflect padding) of (N, C, H, W) images."""
    r = max(1, int(math.ceil(3 * sigma)))
    t = torch.arange(-r, r + 1, dtype=torch.float32)
    k = torch.exp(-t**2 / (2 * sigma**2))
    k = (k / k.sum()).to(x)
    c = x.shape[1]
    x = F.conv2d(F.pad(x, (r, r, 0, 0), mode="reflect"), k.view(1, 1, 1, -1).repeat(c, 1, 1, 1), groups=c)
    return F.conv2d(F.pad(x, (0, 0, r, r), mode="reflect"), k.view(1, 1, -1, 1).repeat(c, 1, 1, 1), groups=c)


def floor_and_ceiling(set_name: str, n: int = 2000, seed: int = 0) -> dict[str, float]:
    """FD to the test split (default reference) of: n train images (the floor; also at n/4, and against every
    combination of the test split), the same images heavily blurred (sigma = 1/16 of the width) and n images of
    uniform noise (the ceilings)."""
    s = image_set(set_name)
    train = load_dataset(s.dataset, "train")["x"]
    if len(train) < n:
        raise DreamlabError(f"{s.name} has {len(train)} train images, fewer than n={n}")
    x = train[torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))[:n]]
    noise = torch.rand(x.shape, generator=torch.Generator().manual_seed(seed))
    return {"n": n, "n_ref": len(reference_images(s.name, "test")),
            "floor": frechet_distance(s.name, x), f"floor_n{n // 4}": frechet_distance(s.name, x[: n // 4]),
            "floor_all_combos": frechet_distance(s.name, x, combos="all") if s.name in P.KINDS else float("nan"),
            "blur": frechet_distance(s.name, gaussian_blur(x, s.size / 16).clamp(0, 1)),
            "noise": frechet_distance(s.name, noise)}


# ----------------------------------------------------------------------------- building the assets


def export_asset(run_dir: str | Path, out_dir: str | Path, command: str) -> dict[str, float]:
    """The run's final model as an fp16 asset (config.json, model.safetensors), its held-out accuracy measured
    from the fp16 weights (eval.json) and a README.md with the command that made it."""
    import shutil

    from dreamlab.io import atomic_write_text, save_json, save_tensors
    from generators.trainer import load_run

    net = load_run(run_dir, device="cpu")
    if not isinstance(net, FeatureNet):
        raise DreamlabError(f"{run_dir} holds a {net.name}, not a featnet")
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    net.save_pretrained(tmp)
    state = {k: v.half() if v.is_floating_point() else v for k, v in net.state_dict().items()}
    save_tensors(tmp / "model.safetensors", state, metadata={"name": net.name})
    fp16 = Model.from_pretrained(tmp, device="cpu")
    s = fp16.set
    acc: dict[str, float] = {}
    d = fp16.train_data("test")
    right = predict(fp16, s, FeatureNet._inputs(d["x"])) == d["y"]
    acc.update({f"test_acc_{a}": float(right[:, j].float().mean()) for j, a in enumerate(s.attributes)})
    acc["test_acc_all"] = float(right.all(1).float().mean())
    acc["test_images"] = len(right)
    if s.name in P.KINDS:
        h = P.load_procedural(s.name, "test", held_out_only=True)
        right = predict(fp16, s, h["x"]) == h["attrs"]
        acc.update({f"heldout_acc_{a}": float(right[:, j].float().mean()) for j, a in enumerate(s.attributes)})
        acc["heldout_acc_all"] = float(right.all(1).float().mean())
        acc["heldout_images"] = len(right)
    save_json(tmp / "eval.json", acc)
    c = fp16.config
    data = (f"{c.train_images:,} freshly drawn images of every attribute combination (held-out ones included), "
            f"seed {c.train_seed}, disjoint from the dataset splits (seeds 0/1/2)" if s.name in P.KINDS
            else "the mnist5k train split (3,500 images; val and test never seen)")
    rows = ["| attribute | values | test accuracy |" + (" held-out combinations |" if s.name in P.KINDS else ""),
            "|---|---|---:|" + ("---:|" if s.name in P.KINDS else "")]
    for a, vals in [*s.attributes.items(), ("all", ("every attribute right",))]:
        row = f"| {a} | {', '.join(map(str, vals))} | {acc[f'test_acc_{a}']:.4f} |"
        rows.append(row + (f" {acc[f'heldout_acc_{a}']:.4f} |" if s.name in P.KINDS else ""))
    held = f" and its {acc['heldout_images']} images of held-out combinations" if s.name in P.KINDS else ""
    kb = (tmp / "model.safetensors").stat().st_size / 1024
    atomic_write_text(tmp / "README.md", "\n".join([
        f"# {s.name} feature network and judge (`featnet`, dataset `{c.dataset}`)", "",
        f"Made by `{command}` (run folder `{run_dir}`), trained on {data}; {fp16.num_parameters():,} parameters, "
        f"stored as fp16 safetensors ({kb:.0f} KiB).", "",
        f"`generators.features.frechet_distance({s.name!r}, images)` compares its {c.features}-d penultimate features "
        f"(not Inception: compare only with other values on this set, see docs/metrics.md); "
        f"`generators.features.judge({s.name!r}).predict(images)` is the independent judge of attributes.", "",
        f"Accuracy of these fp16 weights on the {acc['test_images']} images of the `{c.dataset}` test split{held}:", "",
        *rows, "",
        "Rebuilding it changes every Fréchet distance of this set: do so only together with docs/metrics.md.", ""]))
    from dreamlab.io import replace_dir

    replace_dir(tmp, out_dir)
    _JUDGES.clear()
    _STATS.clear()
    return acc


def build(set_names: list[str], runs: Path, preset: str = "quick", progress: bool = True) -> None:
    from generators.trainer import train_from_name

    for name in set_names:
        s = image_set(name)
        if s.name not in _TRAINABLE.values():
            raise DreamlabError(f"{s.name} uses the ch. 2 CNN: rebuild it with dreamlab train cnn --preset full")
        run_dir = runs / f"featnet-{s.name}"
        command = BUILD_COMMAND.format(set=s.name) + (f" --preset {preset}" if preset != "quick" else "")
        train_from_name("featnet", preset=preset, overrides={"dataset": s.dataset, "threads": 1}, out=run_dir,
                        progress=progress)
        acc = export_asset(run_dir, ASSETS / s.asset, command)
        print(f"{s.name}: wrote {ASSETS / s.asset} " + " ".join(f"{k}={v:.4f}" for k, v in acc.items()
                                                                  if isinstance(v, float)))


def table(set_names: list[str], n: int) -> str:
    lines = ["| set | N | reference: test images | floor: N train vs test | floor at N/4 | floor vs every test "
             "combination | ceiling: N train blurred | ceiling: N uniform noise |", "|---|" + "---:|" * 7]
    print(*lines, sep="\n", flush=True)
    for name in set_names:
        r = floor_and_ceiling(name, n)
        allc = "—" if math.isnan(r["floor_all_combos"]) else f"{r['floor_all_combos']:.3f}"
        lines.append(f"| {name} | {r['n']} | {r['n_ref']} | {r['floor']:.3f} | {r[f'floor_n{n // 4}']:.3f} | {allc} | "
                     f"{r['blur']:.2f} | {r['noise']:.2f} |")
        print(lines[-1], flush=True)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m generators.features", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="train the feature nets of the given sets and write their fp16 assets")
    b.add_argument("sets", nargs="+", choices=list(_TRAINABLE.values()))
    b.add_argument("--preset", default="quick")
    b.add_argument("--runs", default="runs", help="where the training run folders go (default: runs/)")
    t = sub.add_parser("table", help="print the floor/ceiling Fréchet distances of every set (markdown)")
    t.add_argument("sets", nargs="*", default=list(SETS))
    t.add_argument("--n", type=int, default=2000, help="images per measured set (FD depends on it)")
    t.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    try:
        if a.cmd == "build":
            build(a.sets, Path(a.runs), a.preset)
        else:
            torch.set_num_threads(a.threads)
            table(a.sets, a.n)
    except DreamlabError as e:
        print(f"error: {e}")
        return 2
    return 0


if __name__ == "__main__":
    # run the imported module, not this __main__ copy: the registry and `load_run` know generators.features' classes
    from generators.features import main as _main

    raise SystemExit(_main())
