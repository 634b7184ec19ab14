"""Generative adversarial networks (book ch. 4): DCGAN, WGAN-GP and the conditional GAN.

* `DCGAN` ("dcgan"): the book's bricks DCGAN (z=100, Adam 2e-4, beta1 0.5, transposed-conv generator with batch
  norm, conv discriminator with batch norm and dropout 0.3). The book adds uniform noise to the 0/1 targets, which
  puts the real targets above 1 where binary cross-entropy is not a divergence; here real targets are 0.9 and fake
  ones 0 (one-sided label smoothing, Salimans et al. 2016).
* `WGANGP` ("wgan_gp"): the same generator against a critic without batch norm, several critic steps per generator
  step on the same real batch (as the book), and the gradient penalty of Gulrajani et al. 2017 with a per-sample
  uniform interpolation weight (the book draws it from a normal) and an epsilon inside the norm's square root (the
  gradient of sqrt at 0 is infinite).
* `CGAN` ("cgan"): WGAN-GP conditioned on labels as the book does it: one-hot labels concatenated to z, and as
  constant maps to the critic's input channels. On faces it takes all four attributes (hair, skin, smiling,
  glasses), on Fashion-MNIST the class: `sample(n, labels="hair=blonde,smiling=True")` or `labels=3`.

`_GAN` holds what every adversarial model here shares (ProGAN and StyleGAN2 build on it in their own files): images
to [-1, 1] and back, the model owning its optimisers (`configure_optimizers` returns generator's and critic's; the
trainer's checkpoints hold both), a progress frame of a fixed latent batch every few steps (`progress.gif`), loss
curves, latent interpolations, and `evaluate`: the Fréchet distance of samples to the set's test images on our own
feature network for that set (not Inception FID), and for conditional models the accuracy of the requested labels
as judged by an independent classifier.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dreamlab import procedural
from dreamlab.config import check_ranges
from dreamlab.data import FMNIST_CLASSES
from dreamlab.device import autocast, rand, randn
from dreamlab.errors import DreamlabError
from generators.base import Batch, Generator, Metrics, TrainConfig, register

# ----------------------------------------------------------------------------- the image sets a GAN trains on

_GREY_SETS = {"fashion_mnist": FMNIST_CLASSES, "mnist5k": tuple(str(i) for i in range(10))}


def image_spec(dataset: str) -> tuple[int, int, int]:
    """(channels, network size, image size) of a set: 28x28 grey images are padded to 32 (the nets halve sizes)."""
    if dataset in procedural.KINDS:
        return 3, procedural.SIZE, procedural.SIZE
    if dataset in _GREY_SETS:
        return 1, 32, 28
    raise DreamlabError(f"dataset={dataset!r} is not an image set the GANs train on; choose one of "
                        f"{', '.join([*procedural.KINDS, *_GREY_SETS])}")


def label_spec(dataset: str) -> dict[str, tuple[str, ...]]:
    """Batch key -> value names of the labels of a set (procedural attributes, or the class as "y")."""
    if dataset in procedural.ATTRIBUTES:
        return {k: tuple(str(v) for v in vals) for k, vals in procedural.ATTRIBUTES[dataset].items()}
    if dataset in _GREY_SETS:
        return {"y": _GREY_SETS[dataset]}
    raise DreamlabError(f"dataset={dataset!r} has no labels to condition on")


def parse_labels(spec: Any, dataset: str, n: int, generator: torch.Generator | None = None,
                 attributes: tuple[str, ...] | None = None) -> torch.Tensor:
    """(n, n_attributes) value indices from what `sample(labels=...)` accepts: None (uniform), an int, a value name,
    "hair=blonde,smiling=True" (unnamed attributes drawn uniformly), a dict, or a tensor (n,) / (n, n_attributes)."""
    spec_all = label_spec(dataset)
    keys = list(attributes or spec_all)
    sizes = [len(spec_all[k]) for k in keys]
    out = torch.stack([(rand((n,), generator=generator) * s).long().clamp(max=s - 1) for s in sizes], 1)
    if spec is None:
        return out
    if torch.is_tensor(spec):
        t = spec.long().cpu()
        t = t[:, None] if t.ndim == 1 else t
        if t.shape[1] != len(keys) or len(t) not in (1, n):
            raise DreamlabError(f"labels tensor of shape {tuple(spec.shape)} must be ({n},) or ({n}, {len(keys)}) "
                                f"for attributes {', '.join(keys)}")
        if (t < 0).any() or (t >= torch.tensor(sizes)).any():
            raise DreamlabError(f"labels out of range: value counts are {dict(zip(keys, sizes))}")
        return t.expand(n, -1).clone()
    if isinstance(spec, int):
        spec = str(spec)
    pairs: dict[str, str] = {}
    if isinstance(spec, dict):
        pairs = {str(k): str(v) for k, v in spec.items()}
    else:
        for part in str(spec).split(","):
            k, eq, v = part.strip().partition("=")
            if not eq:
                if len(keys) != 1:
                    raise DreamlabError(f"label {part!r}: name the attribute, e.g. --label {keys[0]}="
                                        f"{spec_all[keys[0]][-1]} (attributes: {', '.join(keys)})")
                k, v = keys[0], k
            pairs[k.strip()] = v.strip()
    for k, v in pairs.items():
        key = "y" if k in ("class", "label") and "y" in keys else k
        if key not in keys:
            raise DreamlabError(f"label attribute {k!r} is not one of {', '.join(keys)}")
        names = [s.lower() for s in spec_all[key]]
        j = keys.index(key)
        if v.lower() in names:
            idx = names.index(v.lower())
        elif v.isdigit() and int(v) < len(names):
            idx = int(v)
        else:
            raise DreamlabError(f"label {k}={v} is not one of {'|'.join(spec_all[key])} (or 0..{len(names) - 1})")
        out[:, j] = idx
    return out


def one_hot(labels: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """(n, k) value indices -> (n, sum(sizes)) concatenated one-hot vectors."""
    return torch.cat([F.one_hot(labels[:, j], s) for j, s in enumerate(sizes)], 1).float()


def slerp(a: torch.Tensor, b: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Spherical interpolation between Gaussian latents (a straight line passes through atypically short vectors)."""
    an, bn = a / a.norm(dim=-1, keepdim=True), b / b.norm(dim=-1, keepdim=True)
    omega = torch.acos((an * bn).sum(-1, keepdim=True).clamp(-1 + 1e-7, 1 - 1e-7))
    so = torch.sin(omega)
    return (torch.sin((1 - t) * omega) / so) * a + (torch.sin(t * omega) / so) * b


def gradient_penalty(critic: Any, real: torch.Tensor, fake: torch.Tensor, *, alpha: torch.Tensor | None = None,
                     eps: float = 1e-12) -> torch.Tensor:
    """WGAN-GP's penalty mean((||grad critic(x_hat)||_2 - 1)^2) at x_hat = alpha real + (1 - alpha) fake, with one
    uniform alpha per sample (Gulrajani et al. 2017) and eps inside the square root, so a zero gradient has a finite
    gradient of its norm. The graph is kept (create_graph) so the penalty trains the critic."""
    if alpha is None:
        alpha = torch.rand(real.shape[0], *([1] * (real.ndim - 1)), device=real.device, dtype=real.dtype)
    x = (alpha * real + (1 - alpha) * fake).detach().requires_grad_(True)
    (g,) = torch.autograd.grad(critic(x).sum(), x, create_graph=True)
    norm = torch.sqrt(g.float().flatten(1).pow(2).sum(1) + eps)
    return (norm - 1).pow(2).mean()


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, beta: float) -> None:
    """ema <- beta ema + (1 - beta) model for parameters; buffers (batch-norm statistics, w_avg) are copied."""
    for pe, p in zip(ema.parameters(), model.parameters()):
        pe.lerp_(p.detach(), 1.0 - beta)
    for be, b in zip(ema.buffers(), model.buffers()):
        be.copy_(b)


def ema_beta(batch: int, images_seen: int, half_life_kimg: float, rampup: float = 0.05) -> float:
    """Per-step EMA decay from a half-life in images (StyleGAN2-ADA), ramped up over the first images so that a
    short run's average is not dominated by the initial weights."""
    half = half_life_kimg * 1000
    if rampup > 0:
        half = min(half, images_seen * rampup)
    return 0.5 ** (batch / max(half, 1e-8))


def requires_grad(module: nn.Module, flag: bool) -> None:
    """Freeze the critic while the generator steps (no wasted weight gradients), and back."""
    for p in module.parameters():
        p.requires_grad_(flag)


# ----------------------------------------------------------------------------- what every GAN here shares


class _GAN(Generator):
    """Shared by the adversarial models: data scaling, progress frames, pictures, Fréchet evaluation."""

    #: whether `sample` takes `labels=` (conditional models)
    conditional: bool = False

    def __init__(self, config: Any) -> None:
        super().__init__(config)
        self.channels, self.size, self.image_size = image_spec(config.dataset)
        if self.conditional:
            spec = label_spec(config.dataset)
            self.label_keys = list(config.attributes or spec)
            bad = [k for k in self.label_keys if k not in spec]
            if bad:
                raise DreamlabError(f"attributes={','.join(config.attributes)}: {bad[0]!r} is not a label of "
                                    f"{config.dataset} ({', '.join(spec)})")
            self.label_sizes = [len(spec[k]) for k in self.label_keys]

    # ---- images in and out -------------------------------------------------------------------
    def to_net(self, x: torch.Tensor) -> torch.Tensor:
        """[0, 1] images -> [-1, 1] at the network's size (28x28 is padded with background to 32x32)."""
        x = x.float() * 2 - 1
        p = (self.size - self.image_size) // 2
        return F.pad(x, (p, p, p, p), value=-1.0) if p else x

    def from_net(self, y: torch.Tensor) -> torch.Tensor:
        p = (self.size - self.image_size) // 2
        if p:
            y = y[..., p:p + self.image_size, p:p + self.image_size]
        return ((y.float() + 1) / 2).clamp(0, 1)

    def batch_labels(self, batch: Batch) -> torch.Tensor:
        return torch.stack([batch[k] for k in self.label_keys], 1).long()

    # ---- the generator that samples ----------------------------------------------------------
    def sampler(self) -> nn.Module:
        """The weight average G_ema when the model keeps one (`ema_kimg` > 0), else the trained G."""
        ema = getattr(self, "G_ema", None)
        return self.G if ema is None else ema

    def _make_ema(self) -> None:
        if self.config.ema_kimg > 0:
            self.G_ema = copy.deepcopy(self.G).requires_grad_(False)

    def ema_step(self, step: int, batch: int) -> None:
        if getattr(self, "G_ema", None) is not None:
            ema_update(self.G_ema, self.G, ema_beta(batch, (step + 1) * batch, self.config.ema_kimg))

    # ---- to be given by each model -----------------------------------------------------------
    def latent(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        return randn((n, self.config.z_dim), generator=generator, device=self.device)

    def generate(self, z: torch.Tensor, labels: torch.Tensor | None = None, *,
                 generator: torch.Generator | None = None, **kw: Any) -> torch.Tensor:
        """Latents (and labels) -> images in [-1, 1] at the network size, from the sampling generator."""
        raise NotImplementedError

    #: keywords of `sample` besides labels (StyleGAN2: truncation, styles)
    sample_options: tuple[str, ...] = ()

    @torch.no_grad()
    def sample(self, n: int, *, generator: torch.Generator | None = None, labels: Any = None,
               **condition: Any) -> torch.Tensor:
        if labels is not None and not self.conditional:
            raise DreamlabError(f"{self.name} is unconditional; drop --label (cgan takes labels)")
        bad = [k for k in condition if k not in self.sample_options]
        if bad:
            takes = ", ".join(["labels"] * self.conditional + list(self.sample_options)) or "no condition"
            raise DreamlabError(f"{self.name} sample() does not take {bad[0]}= (it takes {takes})")
        z = self.latent(n, generator)
        lab = None
        if self.conditional:
            lab = parse_labels(labels, self.config.dataset, n, generator, tuple(self.label_keys)).to(self.device)
        return self.from_net(self.generate(z, lab, generator=generator, **condition))

    # ---- the trainer's hooks -----------------------------------------------------------------
    def configure_optimizers(self, tc: TrainConfig) -> list[torch.optim.Optimizer]:
        betas = tuple(tc.betas)
        return [torch.optim.Adam(self.G.parameters(), lr=tc.lr, betas=betas),
                torch.optim.Adam(self.D.parameters(), lr=tc.lr * self.config.d_lr_mult, betas=betas)]

    def _fixed(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The progress frames' latent batch (and labels): the same 16 every frame, from a private generator."""
        g = torch.Generator().manual_seed(1234)
        z = self.latent(16, g)
        lab = parse_labels(None, self.config.dataset, 16, g, tuple(self.label_keys)) if self.conditional else None
        return z, (lab.to(self.device) if lab is not None else None)

    @torch.no_grad()
    def render_fixed(self) -> torch.Tensor:
        was = self.training
        self.eval()
        z, lab = self._fixed()
        out = self.from_net(self.generate(z, lab, generator=torch.Generator().manual_seed(1234)))
        self.train(was)
        return out.cpu()

    def on_step_end(self, step: int, tc: TrainConfig, run_dir: Path) -> None:
        frames = self.config.snapshots
        if not frames:
            return
        every = max(1, tc.steps // frames)
        if step % every == 0 or step == tc.steps:
            from dreamlab.images import save_grid

            save_grid(self.render_fixed(), Path(run_dir) / "progress" / f"step_{step:07d}.png", nrow=4, scale=1)

    # ---- evaluation --------------------------------------------------------------------------
    def train_labels(self, n: int, seed: int) -> torch.Tensor:
        """(n, len(label_keys)) labels drawn like the train split's: uniform over the attribute combinations it holds
        (the procedural sets keep a few out of training), uniform over classes otherwise."""
        if self.config.dataset in procedural.ATTRIBUTES:
            import numpy as np

            lab = procedural.sample_labels(self.config.dataset, n, np.random.default_rng(seed), exclude_held_out=True)
            cols = [list(procedural.ATTRIBUTES[self.config.dataset]).index(k) for k in self.label_keys]
            return torch.from_numpy(lab[:, cols].copy())
        return parse_labels(None, self.config.dataset, n, torch.Generator().manual_seed(seed), tuple(self.label_keys))

    @torch.no_grad()
    def draw(self, n: int, seed: int = 0, labels: torch.Tensor | None = None,
             batch: int = 250) -> tuple[torch.Tensor, torch.Tensor | None]:
        """n samples in [0, 1] on the CPU, seeded; a conditional model draws them for `labels` (default: labels
        distributed like the train split's) and returns those too."""
        g = torch.Generator().manual_seed(seed)
        if self.conditional and labels is None:
            labels = self.train_labels(n, seed)
        xs = []
        for i in range(0, n, batch):
            k = min(batch, n - i)
            lab = labels[i:i + k].to(self.device) if labels is not None else None
            xs.append(self.from_net(self.generate(self.latent(k, g), lab, generator=g)).cpu())
        return torch.cat(xs), labels

    def _judged(self, x: torch.Tensor, lab: torch.Tensor, prefix: str) -> dict[str, float]:
        """Accuracy of the requested labels by the set's independent judge (generators.features)."""
        from generators import features

        pred = features.judge(self.config.dataset).predict(x)
        cols = [list(label_spec(self.config.dataset)).index(k) for k in self.label_keys]
        ok = pred[:, cols].cpu() == lab.cpu()
        res = {f"{prefix}_{'class' if k == 'y' else k}": float(ok[:, j].float().mean())
               for j, k in enumerate(self.label_keys)}
        res[prefix] = float(ok.float().mean())
        res[f"{prefix}_all"] = float(ok.all(1).float().mean())
        return res

    @torch.no_grad()
    def evaluate(self, split: str = "test", max_items: int | None = None) -> dict[str, float]:
        """`{split}_frechet`: Fréchet distance of `eval_samples` samples to the split on the set's own feature network
        (generators.features; not Inception FID). A conditional model draws them for labels distributed like the
        train split's, and adds the accuracy of those requested labels by the set's independent judge
        (`{split}_label_acc_<attribute>`, their mean, `_all`: every attribute right), and on a procedural set the
        same for the attribute combinations held out of training (`{split}_held_out_acc...`)."""
        from generators import features

        was = self.training
        self.eval()
        n = min(self.config.eval_samples, max_items or self.config.eval_samples)
        x, lab = self.draw(n)
        res = {f"{split}_frechet": float(features.frechet_distance(self.config.dataset, x, reference=split))}
        if lab is not None:
            res.update(self._judged(x, lab, f"{split}_label_acc"))
            ds = self.config.dataset
            if ds in procedural.HELD_OUT and len(self.label_keys) == len(label_spec(ds)):  # every attribute given
                held = torch.tensor([procedural.combo_indices(ds, c) for c in procedural.HELD_OUT[ds]])
                cols = [list(label_spec(ds)).index(k) for k in self.label_keys]
                hl = held.repeat_interleave(max(1, min(60, n // len(held))), 0)[:, cols]
                xh, _ = self.draw(len(hl), seed=1, labels=hl)
                res.update(self._judged(xh, hl, f"{split}_held_out_acc"))
        self.train(was)
        return res

    # ---- pictures ----------------------------------------------------------------------------
    def curve_keys(self) -> list[str]:
        return ["d_loss", "g_loss", "d_real", "d_fake", "wasserstein", "gp"]

    @torch.no_grad()
    def interpolations(self, rows: int = 6, steps: int = 10) -> torch.Tensor:
        g = torch.Generator().manual_seed(7)
        a, b = self.latent(rows, g), self.latent(rows, g)
        lab = None
        if self.conditional:
            lab = parse_labels(None, self.config.dataset, rows, g, tuple(self.label_keys)).to(self.device)
            lab = lab.repeat_interleave(steps, 0)
        t = torch.linspace(0, 1, steps, device=self.device)[None, :, None]
        z = slerp(a[:, None], b[:, None], t).flatten(0, 1)
        return self.from_net(self.generate(z, lab, generator=torch.Generator().manual_seed(7))).cpu()

    def write_artifacts(self, run_dir: Path) -> list[Path]:
        import numpy as np
        from PIL import Image

        from dreamlab.images import plot_curves, save_grid, save_video
        from generators.trainer import read_metrics

        run_dir = Path(run_dir)
        self.eval()
        out = [save_grid(self.sample(64, generator=torch.Generator().manual_seed(0)).cpu(), run_dir / "samples.png",
                         nrow=8)]
        out.append(save_grid(self.interpolations(), run_dir / "interpolation.png", nrow=10))
        real = self.train_data("test")["x"][:64]
        out.append(save_grid(real, run_dir / "real_test_images.png", nrow=8))
        frames = sorted((run_dir / "progress").glob("step_*.png"))
        if frames:
            imgs = [np.asarray(Image.open(f).convert("RGB")) for f in frames]
            # hold the last frame a while, so the loop shows where training ended
            out.append(save_video(np.stack(imgs + [imgs[-1]] * 4), run_dir / "progress.gif", fps=4))
        rows = read_metrics(run_dir)
        p = plot_curves(rows, self.curve_keys(), run_dir / "loss_curves.png", title=self.name)
        if p:
            out.append(p)
        return out + self.extra_artifacts(run_dir)

    def extra_artifacts(self, run_dir: Path) -> list[Path]:
        return []


# ----------------------------------------------------------------------------- the book's DCGAN nets


class DCGenerator(nn.Module):
    """z (as a 1x1 map) -> 4x4 -> ... -> size x size: transposed convs 4x4 stride 2, batch norm, LeakyReLU, tanh."""

    def __init__(self, z_in: int, width: int, channels: int, size: int) -> None:
        super().__init__()
        n = int(math.log2(size)) - 2
        chs = [width * 2 ** i for i in reversed(range(n))]  # size 64: 8w, 4w, 2w, w
        layers: list[nn.Module] = [nn.ConvTranspose2d(z_in, chs[0], 4, 1, 0, bias=False), nn.BatchNorm2d(chs[0]),
                                   nn.LeakyReLU(0.2)]
        for a, b in zip(chs[:-1], chs[1:]):
            layers += [nn.ConvTranspose2d(a, b, 4, 2, 1, bias=False), nn.BatchNorm2d(b), nn.LeakyReLU(0.2)]
        layers += [nn.ConvTranspose2d(chs[-1], channels, 4, 2, 1), nn.Tanh()]
        self.net = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z[:, :, None, None])


class DCCritic(nn.Module):
    """size x size -> ... -> 4x4 -> one logit/score: convs 4x4 stride 2, LeakyReLU, dropout, batch norm if `norm`
    (the DCGAN discriminator; WGAN-GP's critic has none, since the penalty is per sample)."""

    def __init__(self, cin: int, width: int, size: int, norm: bool, dropout: float) -> None:
        super().__init__()
        n = int(math.log2(size)) - 2
        chs = [width * 2 ** i for i in range(n)]  # size 64: w, 2w, 4w, 8w
        layers: list[nn.Module] = [nn.Conv2d(cin, chs[0], 4, 2, 1), nn.LeakyReLU(0.2)]
        if dropout:
            layers.append(nn.Dropout(dropout))
        for a, b in zip(chs[:-1], chs[1:]):
            layers += [nn.Conv2d(a, b, 4, 2, 1, bias=not norm)]
            layers += [nn.BatchNorm2d(b)] if norm else []
            layers += [nn.LeakyReLU(0.2)] + ([nn.Dropout(dropout)] if dropout else [])
        layers += [nn.Conv2d(chs[-1], 1, 4, 1, 0), nn.Flatten()]
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)[:, 0]


# ----------------------------------------------------------------------------- DCGAN


@dataclass
class DCGANConfig:
    dataset: str = "bricks"
    z_dim: int = 100            # the book's latent size
    width: int = 64             # channels of the critic's first conv (and the generator's last); the book's 64
    dropout: float = 0.3        # the book's discriminator dropout
    real_label: float = 0.9     # one-sided label smoothing: real targets 0.9, fake targets 0
    d_lr_mult: float = 1.0      # the critic's learning rate is lr x this
    #: half-life (thousands of images) of an exponential moving average of G's weights that samples instead of G
    #: (Karras et al.; smooths the last steps' oscillation); 0 = sample from G itself, as the book does
    ema_kimg: float = 0.0
    snapshots: int = 24         # progress frames over training (progress.gif); 0 = none
    eval_samples: int = 2000    # samples in the Fréchet distance

    def __post_init__(self) -> None:
        check_ranges(self, positive=("z_dim", "width", "eval_samples"), nonneg=("snapshots", "ema_kimg"),
                     fraction=("dropout", "real_label"))
        if not self.d_lr_mult > 0:
            raise DreamlabError(f"d_lr_mult={self.d_lr_mult} must be > 0")
        image_spec(self.dataset)


@register
class DCGAN(_GAN):
    """Deep convolutional GAN on procedural LEGO-like bricks (book ch. 4), with one-sided label smoothing."""

    name = "dcgan"
    config_class = DCGANConfig
    presets = {
        "tiny": {"width": 4, "z_dim": 8, "steps": 3, "batch_size": 8, "eval_samples": 64, "snapshots": 2,
                 "lr": 2e-4, "betas": (0.5, 0.999)},
        "quick": {"width": 16, "steps": 1800, "batch_size": 64, "lr": 2e-4, "betas": (0.5, 0.999), "log_every": 25,
                  "ckpt_every": 300},
        "full": {"width": 64, "steps": 30000, "batch_size": 128, "lr": 2e-4, "betas": (0.5, 0.999)},
    }

    def __init__(self, config: DCGANConfig) -> None:
        super().__init__(config)
        self.G = DCGenerator(config.z_dim, config.width, self.channels, self.size)
        self.D = DCCritic(self.channels, config.width, self.size, norm=True, dropout=config.dropout)
        self._make_ema()

    def generate(self, z: torch.Tensor, labels: torch.Tensor | None = None, **kw: Any) -> torch.Tensor:
        return self.sampler()(z)

    def curve_keys(self) -> list[str]:
        return ["d_loss", "g_loss", "d_real", "d_fake"]

    def train_step(self, batch: Batch, optimizers: list[torch.optim.Optimizer], step: int, tc: TrainConfig) -> Metrics:
        opt_g, opt_d = optimizers
        real = self.to_net(batch["x"])
        z = torch.randn(len(real), self.config.z_dim, device=real.device)
        with autocast(self.device, tc.amp):
            fake = self.G(z)
            d_real, d_fake = self.D(real).float(), self.D(fake.detach()).float()
            d_loss = (F.binary_cross_entropy_with_logits(d_real, torch.full_like(d_real, self.config.real_label))
                      + F.binary_cross_entropy_with_logits(d_fake, torch.zeros_like(d_fake)))
        opt_d.zero_grad(set_to_none=True)
        d_loss.backward()
        opt_d.step()
        requires_grad(self.D, False)
        with autocast(self.device, tc.amp):
            g_out = self.D(fake).float()
            g_loss = F.binary_cross_entropy_with_logits(g_out, torch.ones_like(g_out))
        opt_g.zero_grad(set_to_none=True)
        g_loss.backward()
        opt_g.step()
        requires_grad(self.D, True)
        self.ema_step(step, len(real))
        return {"d_loss": d_loss.detach(), "g_loss": g_loss.detach(), "d_real": torch.sigmoid(d_real).mean().detach(),
                "d_fake": torch.sigmoid(d_fake).mean().detach()}


# ----------------------------------------------------------------------------- WGAN-GP


@dataclass
class WGANGPConfig:
    dataset: str = "faces"
    z_dim: int = 128
    width: int = 64
    dropout: float = 0.3        # the book's critic keeps the DCGAN dropout
    n_critic: int = 3           # critic steps per generator step (the book: 3; the paper: 5)
    gp_weight: float = 10.0
    d_lr_mult: float = 1.0
    ema_kimg: float = 0.0       # as DCGANConfig.ema_kimg
    snapshots: int = 24
    eval_samples: int = 2000

    def __post_init__(self) -> None:
        check_ranges(self, positive=("z_dim", "width", "n_critic", "eval_samples"),
                     nonneg=("snapshots", "gp_weight", "ema_kimg"), fraction=("dropout",))
        if not self.d_lr_mult > 0:
            raise DreamlabError(f"d_lr_mult={self.d_lr_mult} must be > 0")
        image_spec(self.dataset)


@register
class WGANGP(_GAN):
    """Wasserstein GAN with gradient penalty on procedural faces (book ch. 4)."""

    name = "wgan_gp"
    config_class = WGANGPConfig
    presets = {
        "tiny": {"width": 4, "z_dim": 8, "n_critic": 2, "steps": 3, "batch_size": 8, "eval_samples": 64,
                 "snapshots": 2, "lr": 2e-4, "betas": (0.5, 0.9)},
        "quick": {"width": 16, "steps": 750, "batch_size": 64, "lr": 2e-4, "betas": (0.5, 0.9), "log_every": 25,
                  "ckpt_every": 250},
        "full": {"width": 64, "steps": 20000, "batch_size": 64, "lr": 2e-4, "betas": (0.5, 0.9)},
    }

    def __init__(self, config: WGANGPConfig) -> None:
        super().__init__(config)
        lab = sum(self.label_sizes) if self.conditional else 0
        self.G = DCGenerator(config.z_dim + lab, config.width, self.channels, self.size)
        self.D = DCCritic(self.channels + lab, config.width, self.size, norm=False, dropout=config.dropout)
        self._make_ema()

    # the critic and generator with labels (CGAN) or without
    def gen(self, z: torch.Tensor, labels: torch.Tensor | None, net: nn.Module | None = None) -> torch.Tensor:
        return (net or self.G)(z)

    def critic(self, x: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        return self.D(x)

    def generate(self, z: torch.Tensor, labels: torch.Tensor | None = None, **kw: Any) -> torch.Tensor:
        return self.gen(z, labels, self.sampler())

    def train_step(self, batch: Batch, optimizers: list[torch.optim.Optimizer], step: int, tc: TrainConfig) -> Metrics:
        opt_g, opt_d = optimizers
        real = self.to_net(batch["x"])
        lab = self.batch_labels(batch) if self.conditional else None
        b, zd = len(real), self.config.z_dim
        for _ in range(self.config.n_critic):  # the book's loop: the same real batch, fresh latents each time
            with autocast(self.device, tc.amp):
                with torch.no_grad():
                    fake = self.gen(torch.randn(b, zd, device=real.device), lab)
                d_real, d_fake = self.critic(real, lab).float(), self.critic(fake, lab).float()
                gp = gradient_penalty(lambda x: self.critic(x, lab), real, fake)
                w_est = d_real.mean() - d_fake.mean()
                d_loss = -w_est + self.config.gp_weight * gp
            opt_d.zero_grad(set_to_none=True)
            d_loss.backward()
            opt_d.step()
        requires_grad(self.D, False)
        with autocast(self.device, tc.amp):
            g_loss = -self.critic(self.gen(torch.randn(b, zd, device=real.device), lab), lab).float().mean()
        opt_g.zero_grad(set_to_none=True)
        g_loss.backward()
        opt_g.step()
        requires_grad(self.D, True)
        self.ema_step(step, b)
        return {"d_loss": d_loss.detach(), "g_loss": g_loss.detach(), "wasserstein": w_est.detach(), "gp": gp.detach()}


# ----------------------------------------------------------------------------- conditional GAN


@dataclass
class CGANConfig(WGANGPConfig):
    #: label keys to condition on; empty = every label of the set (faces: hair, skin, smiling, glasses; Fashion-MNIST:
    #: the class "y")
    attributes: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        super().__post_init__()
        spec = label_spec(self.dataset)
        bad = [a for a in self.attributes if a not in spec]
        if bad:
            raise DreamlabError(f"attributes={','.join(self.attributes)}: {bad[0]!r} is not a label of {self.dataset} "
                                f"(one of {', '.join(spec)})")


@register
class CGAN(WGANGP):
    """Conditional WGAN-GP (book ch. 4): faces by attribute or Fashion-MNIST by class; sample(n, labels=...)."""

    name = "cgan"
    config_class = CGANConfig
    conditional = True
    example_condition = {"labels": "hair=blonde"}
    presets = {
        "tiny": {**WGANGP.presets["tiny"]},
        "quick": {**WGANGP.presets["quick"], "steps": 500},  # the label maps make a step ~1.5x dearer
        "full": {**WGANGP.presets["full"]},
        "fmnist": {"dataset": "fashion_mnist", "width": 32, "steps": 1200, "batch_size": 64, "lr": 2e-4,
                   "betas": (0.5, 0.9), "log_every": 25, "ckpt_every": 300},
    }

    def _maps(self, labels: torch.Tensor) -> torch.Tensor:
        return one_hot(labels, self.label_sizes).to(self.device)

    def gen(self, z: torch.Tensor, labels: torch.Tensor | None, net: nn.Module | None = None) -> torch.Tensor:
        return (net or self.G)(torch.cat([z, self._maps(labels).to(z.dtype)], 1))

    def critic(self, x: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        m = self._maps(labels).to(x.dtype)[:, :, None, None].expand(-1, -1, *x.shape[-2:])
        return self.D(torch.cat([x, m], 1))

    def _label_names(self, key: str) -> tuple[str, ...]:
        return label_spec(self.config.dataset)[key]

    @torch.no_grad()
    def extra_artifacts(self, run_dir: Path) -> list[Path]:
        """labels.png: one row per value of the first label (hair colour / class), the same 10 latents in every row;
        then one grid per other attribute."""
        from dreamlab.images import save_grid

        out = []
        g = torch.Generator().manual_seed(3)
        z = self.latent(10, g)
        base = parse_labels(None, self.config.dataset, 10, g, tuple(self.label_keys)).to(self.device)
        for j, key in enumerate(self.label_keys):
            rows = []
            for v in range(self.label_sizes[j]):
                lab = base.clone()
                lab[:, j] = v
                rows.append(self.from_net(self.generate(z, lab)).cpu())
            name = "labels" if j == 0 else f"labels_{key}"
            out.append(save_grid(torch.cat(rows), Path(run_dir) / f"{name}.png", nrow=10))
        return out


__all__ = ["DCGAN", "WGANGP", "CGAN", "DCGANConfig", "WGANGPConfig", "CGANConfig", "gradient_penalty",
           "image_spec", "label_spec", "parse_labels", "slerp"]
