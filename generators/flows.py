"""Normalizing flows (book ch. 6): invertible networks with an exact likelihood by the change of variables.

log p(x) = log p_Z(f(x)) + log |det df/dx|, with f built from layers whose inverse and Jacobian determinant
are cheap. Each layer here has `forward` (data -> latent, returns the log-determinant) and `inverse`.

* `RealNVP` ("realnvp"): the book's model on two moons. Affine coupling layers with alternating masks: one
  coordinate passes through unchanged and sets the scale s (tanh output, as the book) and shift t (linear output)
  of the other, y = x * exp(s) + t, so log|det| = sum(s). Its run folder has the book's four panels (data ->
  latent, latent -> data) and the density contours beside the true density's. `moons_log_prob` is that true
  density (the generator of `make_moons`: a uniform angle on each half circle plus Gaussian noise), so the
  flow's test NLL can be put beside the best any model can do on the same points.
* `Glow` ("glow"): Kingma & Dhariwal 2018 on 28x28 Fashion-MNIST. Each step of flow is actnorm (a per-channel
  affine layer initialised from the first batch), an invertible 1x1 convolution (LU-parametrised: W = P L U, so
  log|det| = H W sum log|diag U| and the inverse comes from triangular solves) and an affine coupling whose
  network is a small CNN. Multi-scale: squeeze 2x2 -> 4 channels, K steps, factor half the channels out (their
  Gaussian prior conditioned on the rest), squeeze again, K steps. Data are dequantised with uniform noise:
  y = (x + u) / 256 - 1/2, and bits/dim = (-log p(y) + D log 256) / (D log 2), an upper bound on the discrete
  model's bits (Theis et al. 2016); `log_prob` is therefore a (stochastic) lower bound on log P(x).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dreamlab.config import check_ranges
from dreamlab.data import MOONS_NOISE, moons_standardisation
from dreamlab.device import rand, randn
from dreamlab.errors import DreamlabError
from generators.base import Batch, Generator, Metrics, TrainConfig, register

LN2 = math.log(2.0)
LOG2PI = math.log(2 * math.pi)


def _wide(t: torch.Tensor) -> torch.Tensor:
    """float32 for the likelihood when autocast made bf16; float64 stays float64 (the tests)."""
    return t.float() if t.dtype in (torch.bfloat16, torch.float16) else t


def gaussian_log_prob(z: torch.Tensor, mean: torch.Tensor | float = 0.0,
                      log_std: torch.Tensor | float = 0.0) -> torch.Tensor:
    """Sum over all but the first dimension of log N(z; mean, exp(log_std)^2)."""
    log_std = torch.as_tensor(log_std, dtype=z.dtype, device=z.device)
    lp = -0.5 * (LOG2PI + 2 * log_std + ((z - mean) * torch.exp(-log_std)) ** 2)
    return lp.flatten(1).sum(1)


def set_cosine_lr(optimizers: list[torch.optim.Optimizer], tc: TrainConfig, step: int, warmup: int = 0) -> None:
    """Learning rate for this step: linear warm-up over `warmup` steps, then a cosine from tc.lr down to 0 at
    tc.steps. Flows are trained to a likelihood target, and Adam's noise at a constant rate costs tenths of a nat."""
    if step < warmup:
        lr = tc.lr * (step + 1) / warmup
    else:
        lr = tc.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, tc.steps - warmup))))
    for opt in optimizers:
        for group in opt.param_groups:
            group["lr"] = lr


# ============================================================================= RealNVP on two moons


class Coupling(nn.Module):
    """The book's coupling layer: s and t are MLPs of the masked (kept) coordinates, applied to the others."""

    def __init__(self, dim: int, hidden: int, depth: int, mask: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mask", mask)

        def mlp() -> nn.Sequential:
            layers: list[nn.Module] = []
            for i in range(depth):
                layers += [nn.Linear(dim if i == 0 else hidden, hidden), nn.ReLU()]
            return nn.Sequential(*layers, nn.Linear(hidden, dim))

        self.s, self.t = mlp(), mlp()

    def _st(self, kept: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        free = 1 - self.mask
        return torch.tanh(self.s(kept)) * free, self.t(kept) * free  # tanh bounds a layer's scale to e^(+-1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        kept = x * self.mask
        s, t = self._st(kept)
        return kept + (1 - self.mask) * (x * torch.exp(s) + t), s.sum(1)

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        kept = y * self.mask
        s, t = self._st(kept)
        return kept + (1 - self.mask) * (y - t) * torch.exp(-s)


@dataclass
class RealNVPConfig:
    dataset: str = "moons"
    coupling_layers: int = 6   # alternating masks [0, 1], [1, 0], ... (the Keras example the book follows: 6)
    hidden: int = 256          # units of each dense layer (the book: 256)
    depth: int = 4             # dense layers in s and in t (the book: 4)
    l2: float = 0.0            # L2 penalty on the dense kernels; the book uses 0.01 (measured: costs nats, docs/)
    cosine_lr: bool = True     # decay the learning rate to 0 along a cosine (the book: constant)

    def __post_init__(self) -> None:
        check_ranges(self, positive=("coupling_layers", "hidden", "depth"), nonneg=("l2",))


@register
class RealNVP(Generator):
    """The book's RealNVP on two moons: affine coupling layers, exact log-likelihood in nats per point."""

    name = "realnvp"
    config_class = RealNVPConfig
    log_prob_kind = "exact"
    sample_range = None  # points in the plane, not images
    presets = {
        "tiny": {"coupling_layers": 2, "hidden": 8, "depth": 1, "steps": 3, "batch_size": 16, "eval_items": 100},
        "quick": {"coupling_layers": 8, "hidden": 128, "depth": 3, "steps": 4000, "batch_size": 256, "lr": 1e-3},
        "full": {"steps": 20000, "batch_size": 256, "lr": 1e-4},  # the book's network and learning rate
    }

    def __init__(self, config: RealNVPConfig) -> None:
        super().__init__(config)
        masks = [torch.tensor([0.0, 1.0] if i % 2 == 0 else [1.0, 0.0]) for i in range(config.coupling_layers)]
        self.layers = nn.ModuleList(Coupling(2, config.hidden, config.depth, m) for m in masks)

    def forward_flow(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Data -> latent z, and log|det dz/dx| per point."""
        logdet = torch.zeros(len(x), dtype=x.dtype, device=x.device)
        for layer in self.layers:
            x, ld = layer(x)
            logdet = logdet + ld
        return x, logdet

    def inverse(self, z: torch.Tensor) -> torch.Tensor:
        for layer in reversed(self.layers):
            z = layer.inverse(z)
        return z

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """Exact log p(x) in nats per point (in the dataset's standardised coordinates)."""
        z, logdet = self.forward_flow(x.to(self.device))
        return _wide(gaussian_log_prob(z) + logdet)

    def loss(self, batch: Batch) -> tuple[torch.Tensor, Metrics]:
        nll = -self.log_prob(batch["x"]).mean()
        loss = nll
        if self.config.l2 > 0:  # Keras' l2(0.01) on every Dense kernel, as the book
            kernels = [m.weight for m in self.modules() if isinstance(m, nn.Linear)]
            loss = loss + self.config.l2 * sum((w ** 2).sum() for w in kernels)
        return loss, {"nll": nll.detach()}

    def train_step(self, batch: Batch, optimizers: list[torch.optim.Optimizer], step: int, tc: TrainConfig) -> Metrics:
        if self.config.cosine_lr:
            set_cosine_lr(optimizers, tc, step)
        return super().train_step(batch, optimizers, step, tc)

    @torch.no_grad()
    def sample(self, n: int, *, generator: torch.Generator | None = None, temperature: float = 1.0,
               **condition: Any) -> torch.Tensor:
        """n points (n, 2): z ~ N(0, temperature^2 I) mapped back through the flow."""
        return _wide(self.inverse(randn((n, 2), generator=generator, device=self.device) * temperature))

    @torch.no_grad()
    def evaluate(self, split: str = "test", max_items: int | None = None) -> dict[str, float]:
        was = self.training
        self.eval()
        x = self.train_data(split)["x"][: max_items or None]
        nll = float(-self.log_prob(x).mean())
        true_nll = float(-moons_log_prob(x.double()).mean())
        self.train(was)
        return {f"{split}_nll": nll, f"{split}_true_nll": true_nll, f"{split}_nll_gap": nll - true_nll}

    def save_samples(self, samples: torch.Tensor, path: str | Path) -> list[Path]:
        """Points: a scatter plot (.png) or the raw tensor (.safetensors)."""
        path = Path(path)
        if path.suffix != ".png":
            return super().save_samples(samples, path)
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        from dreamlab.images import save_figure

        fig, ax = plt.subplots(figsize=(4.5, 4))
        ax.scatter(*samples.cpu().numpy().T, s=2, alpha=0.6)
        ax.set_title(f"{self.name}: {len(samples)} samples")
        ax.set_aspect("equal")
        return [save_figure(fig, path)]

    def write_artifacts(self, run_dir: Path) -> list[Path]:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        from dreamlab.images import plot_curves, save_figure
        from generators.trainer import read_metrics

        run_dir = Path(run_dir)
        self.eval()
        x = self.train_data("test")["x"]
        with torch.no_grad():
            fx = self.forward_flow(x.to(self.device))[0].cpu()
        g = torch.Generator().manual_seed(0)
        z = randn((len(x), 2), generator=g)
        gz = self.inverse(z.to(self.device)).detach().cpu()
        out = self.save_samples(gz, run_dir / "samples.png")
        # the book's figure: data space -> latent space (top), latent space -> data space (bottom)
        fig, axes = plt.subplots(2, 2, figsize=(8, 8))
        panels = ((x, "data space X (test)", "C0"), (fx, "latent space f(X)", "C0"),
                  (z, "latent space Z ~ N(0, I)", "C1"), (gz, "data space g(Z) (samples)", "C1"))
        for ax, (pts, title, col) in zip(axes.flat, panels):
            ax.scatter(*pts.numpy().T, s=2, alpha=0.5, c=col)
            ax.set_title(title)
            ax.set_xlim(-3, 3)
            ax.set_ylim(-3, 3)
            ax.set_aspect("equal")
        out.append(save_figure(fig, run_dir / "data_to_latent.png"))
        # density contours: the flow's beside the true density's, on the same grid and levels
        lin = torch.linspace(-2.6, 2.6, 200)
        gx, gy = torch.meshgrid(lin, lin, indexing="xy")
        grid = torch.stack([gx.flatten(), gy.flatten()], 1)
        with torch.no_grad():
            learned = self.log_prob(grid.to(self.device)).cpu().view(200, 200).exp()
        true = moons_log_prob(grid.double(), quadrature=1000).view(200, 200).exp().float()  # a picture: 1000 is plenty
        res = self.evaluate("test")
        fig, axes = plt.subplots(1, 2, figsize=(10, 4.4))
        vmax = float(true.max())
        for ax, dens, title in ((axes[0], learned, f"{self.name}: test NLL {res['test_nll']:.3f} nats"),
                                (axes[1], true, f"true density: {res['test_true_nll']:.3f} nats")):
            cs = ax.contourf(gx.numpy(), gy.numpy(), dens.numpy(), levels=np.linspace(0, vmax, 15), cmap="viridis",
                             extend="max")
            ax.scatter(*x[:300].numpy().T, s=1, c="white", alpha=0.5)
            ax.set_title(title)
            ax.set_aspect("equal")
        fig.colorbar(cs, ax=axes, shrink=0.8, label="density (standardised coordinates)")
        out.append(save_figure(fig, run_dir / "density.png"))
        p = plot_curves(read_metrics(run_dir), ["nll"], run_dir / "loss_curves.png",
                        title=f"{self.name}: train NLL (nats)")
        return out + ([p] if p else [])


def moons_log_prob(x: torch.Tensor, standardised: bool = True, quadrature: int = 4000) -> torch.Tensor:
    """log density of the process `make_moons(noise=0.05)` samples from, at points x (N, 2).

    Half the points lie at a uniform angle on the upper unit half circle, half on the lower one shifted to
    (1, 0.5); each gets isotropic Gaussian noise. The density is the noise kernel averaged over each arc
    (a `quadrature`-point midpoint rule: spacing pi/4000, far below the noise 0.05). With `standardised`, x is in
    the `moons` dataset's coordinates: x_raw = x * std + mean, and log p(x) = log p_raw(x_raw) + sum log std."""
    mean, std = (torch.as_tensor(v, dtype=torch.float64) for v in moons_standardisation())
    x = x.double()
    raw = x * std + mean if standardised else x
    th = (torch.arange(quadrature, dtype=torch.float64) + 0.5) * math.pi / quadrature
    arcs = torch.cat([torch.stack([th.cos(), th.sin()], 1), torch.stack([1 - th.cos(), 0.5 - th.sin()], 1)])
    log_norm = math.log(2 * math.pi * MOONS_NOISE ** 2) + math.log(2 * quadrature)  # equal weight on every arc point
    lp = torch.cat([torch.logsumexp(-torch.cdist(c, arcs) ** 2 / (2 * MOONS_NOISE ** 2), 1) - log_norm
                    for c in raw.split(2048)])  # in chunks: (2048, 2Q) distances at a time
    return lp + (torch.log(std).sum() if standardised else 0.0)


# ============================================================================= Glow on Fashion-MNIST


class ActNorm(nn.Module):
    """Per-channel y = (x + b) * exp(logs); b and logs set from the first training batch: y starts at mean 0, std 1."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.logs = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.register_buffer("initialized", torch.tensor(False))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.training and not bool(self.initialized):
            with torch.no_grad():
                self.bias.copy_(-x.mean((0, 2, 3), keepdim=True))
                self.logs.copy_(-torch.log(x.std((0, 2, 3), keepdim=True) + 1e-6))
                self.initialized.fill_(True)
        y = (x + self.bias) * torch.exp(self.logs)
        return y, (self.logs.sum() * x.shape[2] * x.shape[3]).expand(len(x))

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        return y * torch.exp(-self.logs) - self.bias


class InvConv1x1(nn.Module):
    """Invertible 1x1 convolution, LU-parametrised (Glow sec. 3.2): W = P L (U + diag(sign(s) exp(log|s|))).

    P is a fixed permutation, L unit lower-triangular, U strictly upper-triangular; starting from a random
    rotation (torch.linalg.qr, then torch.linalg.lu). log|det W| = sum log|s| per pixel, and W^-1 comes from two
    triangular solves (torch.linalg.solve_triangular) instead of a general inverse."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        w = torch.linalg.qr(torch.randn(channels, channels))[0]
        p, lower, upper = torch.linalg.lu(w)
        s = torch.diagonal(upper)
        self.register_buffer("perm", p)
        self.register_buffer("sign_s", torch.sign(s))
        self.register_buffer("tril", torch.tril(torch.ones(channels, channels), -1), persistent=False)
        self.lower = nn.Parameter(lower)
        self.upper = nn.Parameter(torch.triu(upper, 1))
        self.log_s = nn.Parameter(torch.log(s.abs()))

    def _factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        eye = torch.eye(len(self.log_s), dtype=self.log_s.dtype, device=self.log_s.device)
        lower = self.lower * self.tril + eye
        upper = self.upper * self.tril.T + torch.diag(self.sign_s * torch.exp(self.log_s))
        return lower, upper

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        lower, upper = self._factors()
        w = self.perm @ lower @ upper
        return F.conv2d(x, w[:, :, None, None]), (self.log_s.sum() * x.shape[2] * x.shape[3]).expand(len(x))

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        lower, upper = self._factors()
        # W^-1 = U^-1 L^-1 P^T
        l_inv_pt = torch.linalg.solve_triangular(lower, self.perm.T, upper=False, unitriangular=True)
        w_inv = torch.linalg.solve_triangular(upper, l_inv_pt, upper=True)
        return F.conv2d(y, w_inv[:, :, None, None])


class ZeroConv2d(nn.Module):
    """A 3x3 conv starting at zero, its output scaled by exp(3 logs) (Glow): each coupling starts as the identity."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, padding=1)
        nn.init.zeros_(self.conv.weight)
        nn.init.zeros_(self.conv.bias)
        self.logs = nn.Parameter(torch.zeros(1, cout, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x) * torch.exp(self.logs * 3)


class AffineCoupling(nn.Module):
    """The first half of the channels passes through and sets shift and scale of the second half; scale =
    sigmoid(raw + 2), Glow's choice (starts near 1, never 0)."""

    def __init__(self, channels: int, hidden: int) -> None:
        super().__init__()
        self.half = channels // 2
        self.net = nn.Sequential(nn.Conv2d(self.half, hidden, 3, padding=1), nn.ReLU(), nn.Conv2d(hidden, hidden, 1),
                                 nn.ReLU(), ZeroConv2d(hidden, 2 * (channels - self.half)))

    def _shift_scale(self, xa: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.net(xa)
        return h[:, 0::2], torch.sigmoid(h[:, 1::2] + 2.0)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        xa, xb = x[:, :self.half], x[:, self.half:]
        shift, scale = self._shift_scale(xa)
        return torch.cat([xa, (xb + shift) * scale], 1), torch.log(scale).flatten(1).sum(1)

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        ya, yb = y[:, :self.half], y[:, self.half:]
        shift, scale = self._shift_scale(ya)
        return torch.cat([ya, yb / scale - shift], 1)


class FlowStep(nn.Module):
    """One step of flow: actnorm, invertible 1x1 conv, affine coupling."""

    def __init__(self, channels: int, hidden: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList([ActNorm(channels), InvConv1x1(channels), AffineCoupling(channels, hidden)])

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logdet = torch.zeros(len(x), dtype=x.dtype, device=x.device)
        for layer in self.layers:
            x, ld = layer(x)
            logdet = logdet + ld
        return x, logdet

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        for layer in reversed(self.layers):
            y = layer.inverse(y)
        return y


def squeeze2(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, 4C, H/2, W/2): each 2x2 patch becomes 4 channels."""
    return F.pixel_unshuffle(x, 2)


def unsqueeze2(x: torch.Tensor) -> torch.Tensor:
    return F.pixel_shuffle(x, 2)


@dataclass
class GlowConfig:
    dataset: str = "fashion_mnist"
    image_size: int = 28   # sides of the (square) images
    channels: int = 1      # input image channels
    scales: int = 2        # multi-scale levels: 28 -> 14x14x4 -> 7x7x8 (28 halves only twice)
    depth: int = 16        # steps of flow per level (Glow: 32)
    hidden: int = 256      # channels of each coupling's CNN (Glow: 512)
    warmup: int = 100      # steps of linear learning-rate warm-up (Glow warms up too), then a cosine decay to 0

    def __post_init__(self) -> None:
        check_ranges(self, positive=("image_size", "channels", "scales", "depth", "hidden"), nonneg=("warmup",))
        if self.image_size % 2 ** self.scales:
            raise DreamlabError(f"scales={self.scales} squeezes {self.image_size}x{self.image_size} images "
                                f"{self.scales} times by 2, which needs sides divisible by {2 ** self.scales}; "
                                "lower --set scales=...")


@register
class Glow(Generator):
    """Glow (actnorm, invertible 1x1 conv, affine coupling, multi-scale) on dequantised 28x28 Fashion-MNIST."""

    name = "glow"
    config_class = GlowConfig
    log_prob_kind = "bound"  # the exact density of the dequantised image: a lower bound on the discrete log P(x)
    presets = {
        "tiny": {"depth": 1, "hidden": 8, "steps": 3, "batch_size": 8, "eval_items": 32},
        "quick": {"depth": 8, "hidden": 64, "steps": 2000, "batch_size": 64, "lr": 1e-3, "grad_clip": 50.0},
        "full": {"steps": 30000, "batch_size": 64, "lr": 1e-3, "grad_clip": 50.0},
    }

    def __init__(self, config: GlowConfig) -> None:
        super().__init__(config)
        c = config.channels
        self.levels = nn.ModuleList()
        self.split_priors = nn.ModuleList()
        for lvl in range(config.scales):
            c *= 4
            self.levels.append(nn.ModuleList(FlowStep(c, config.hidden) for _ in range(config.depth)))
            if lvl < config.scales - 1:
                self.split_priors.append(ZeroConv2d(c // 2, 2 * (c - c // 2)))  # mean, log-std of the factored half
                c //= 2
        self.top_shape = (c, config.image_size // 2 ** config.scales, config.image_size // 2 ** config.scales)
        self.top_prior = nn.Parameter(torch.zeros(1, 2 * c, 1, 1))  # learned per-channel mean and log-std of the top z

    # the bijection and the priors -------------------------------------------------------------------
    def encode(self, y: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor, list[torch.Tensor]]:
        """Continuous image y -> the latents (the half factored out at each scale, then the top z), log|det dz/dy|,
        and at each split the half kept (what that split's prior is conditioned on)."""
        logdet = torch.zeros(len(y), dtype=y.dtype, device=y.device)
        zs, kept = [], []
        h = y
        for lvl, steps in enumerate(self.levels):
            h = squeeze2(h)
            for step in steps:
                h, ld = step(h)
                logdet = logdet + ld
            if lvl < self.config.scales - 1:
                half = h.shape[1] // 2
                h, z = h[:, :half], h[:, half:]
                zs.append(z)
                kept.append(h)
        zs.append(h)
        return zs, logdet, kept

    def _split_prior(self, lvl: int, kept: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.split_priors[lvl](kept)
        return h[:, 0::2], h[:, 1::2]

    def decode(self, zs: list[torch.Tensor | None], *, temperature: float = 1.0,
               generator: torch.Generator | None = None) -> torch.Tensor:
        """Latents -> continuous image. A factored half given as None is drawn from its prior (conditioned on the
        half decoded so far) with its standard deviation times `temperature`."""
        h = zs[-1]
        for lvl in reversed(range(self.config.scales)):
            if lvl < self.config.scales - 1:
                z = zs[lvl]
                if z is None:
                    mean, log_std = self._split_prior(lvl, h)
                    eps = randn(tuple(mean.shape), generator=generator, device=self.device).to(mean.dtype)
                    z = mean + torch.exp(log_std) * temperature * eps
                h = torch.cat([h, z], 1)
            for step in reversed(self.levels[lvl]):
                h = step.inverse(h)
            h = unsqueeze2(h)
        return h

    def log_prob_continuous(self, y: torch.Tensor) -> torch.Tensor:
        """Exact log density (nats) of continuous images y in [-1/2, 1/2]^D: priors of every latent plus log|det|."""
        if tuple(y.shape[1:]) != (self.config.channels, self.config.image_size, self.config.image_size):
            c, s = self.config.channels, self.config.image_size
            raise DreamlabError(f"glow was built for {c}x{s}x{s} images, got {tuple(y.shape[1:])}")
        zs, logdet, kept = self.encode(y)
        lp = logdet + gaussian_log_prob(zs[-1], self.top_prior[:, 0::2], self.top_prior[:, 1::2])
        for lvl, h in enumerate(kept):
            lp = lp + gaussian_log_prob(zs[lvl], *self._split_prior(lvl, h))
        return lp

    # data and likelihood ----------------------------------------------------------------------------
    @staticmethod
    def to_bytes(x: torch.Tensor) -> torch.Tensor:
        """Images as byte values 0..255: float images in [0, 1] are rounded, integer ones range-checked."""
        if x.is_floating_point():
            return (x.clamp(0, 1) * 255).round()
        if int(x.min()) < 0 or int(x.max()) > 255:
            raise DreamlabError(f"integer images must hold byte values 0..255, got {int(x.min())}..{int(x.max())}")
        return x.float()

    def dequantise(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """y = (byte + u) / 256 - 1/2 with u ~ U[0, 1): a continuous image whose density bounds the discrete one."""
        b = self.to_bytes(x.to(self.device))
        dtype = self.top_prior.dtype
        return ((b + rand(tuple(b.shape), generator=generator, device=self.device)) / 256 - 0.5).to(dtype)

    def log_prob(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """log p(y) - D log 256 in nats per image, y the dequantised x: in expectation over the noise a lower bound on
        the discrete log P(x) (images as floats in [0, 1] or bytes)."""
        y = self.dequantise(x, generator)
        return _wide(self.log_prob_continuous(y)) - y[0].numel() * math.log(256)

    def loss(self, batch: Batch) -> tuple[torch.Tensor, Metrics]:
        x = batch["x"]
        bpd = -self.log_prob(x).mean() / (x[0].numel() * LN2)
        return bpd, {"bpd": bpd.detach()}

    def train_step(self, batch: Batch, optimizers: list[torch.optim.Optimizer], step: int, tc: TrainConfig) -> Metrics:
        set_cosine_lr(optimizers, tc, step, warmup=self.config.warmup)
        return super().train_step(batch, optimizers, step, tc)

    @torch.no_grad()
    def bits_per_dim(self, x: torch.Tensor, batch_size: int = 500, seed: int = 0) -> torch.Tensor:
        """Bits/dim of each image, with the dequantisation noise drawn from `seed` (a repeatable number)."""
        g = torch.Generator().manual_seed(seed)
        d = x[0].numel()
        return torch.cat([-self.log_prob(b, generator=g).float().cpu() / (d * LN2) for b in x.split(batch_size)])

    @torch.no_grad()
    def evaluate(self, split: str = "test", max_items: int | None = None) -> dict[str, float]:
        from generators.pixelcnn import independent_pixel_bpd, mnist_images

        was = self.training
        self.eval()
        x = self.train_data(split)["x"][: max_items or None]
        train = self.to_bytes(self.train_data("train")["x"]).long()
        base, _ = independent_pixel_bpd(train, self.to_bytes(x).long(), 256)
        res = {f"{split}_bpd": float(self.bits_per_dim(x).mean()), f"{split}_bpd_independent": base}
        if self.config.dataset == "fashion_mnist":  # the Nalisnick table: MNIST under a Fashion-MNIST model
            m = mnist_images(max_items)
            res["mnist_bpd"] = float(self.bits_per_dim(m).mean())
            res["mnist_bpd_independent"] = independent_pixel_bpd(train, self.to_bytes(m).long(), 256)[0]
        self.train(was)
        return res

    # sampling -------------------------------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, n: int, *, generator: torch.Generator | None = None, temperature: float = 0.7,
               **condition: Any) -> torch.Tensor:
        """n images in [0, 1]: every latent drawn from its prior with the standard deviation times `temperature`
        (Glow's reduced-temperature sampling; 1 samples the model as trained, lower is smoother)."""
        if temperature < 0:
            raise DreamlabError(f"temperature={temperature} must be >= 0")
        mean, log_std = self.top_prior[:, 0::2], self.top_prior[:, 1::2]
        eps = randn((n, *self.top_shape), generator=generator, device=self.device).to(mean.dtype)
        top = mean + torch.exp(log_std) * temperature * eps
        y = self.decode([None] * (self.config.scales - 1) + [top], temperature=temperature, generator=generator)
        return (_wide(y) + 0.5).clamp(0, 1)

    # the run folder -------------------------------------------------------------------------------------
    def write_artifacts(self, run_dir: Path) -> list[Path]:
        from dreamlab.images import plot_curves, save_grid
        from generators.trainer import read_metrics

        run_dir = Path(run_dir)
        self.eval()
        out: list[Path] = []
        g = torch.Generator().manual_seed(0)
        out.append(save_grid(self.sample(64, generator=g).cpu(), run_dir / "samples.png", nrow=8, scale=3))
        temps = (0.0, 0.5, 0.7, 0.85, 1.0)
        rows = [self.sample(10, generator=torch.Generator().manual_seed(1), temperature=t).cpu() for t in temps]
        out.append(save_grid(torch.cat(rows), run_dir / "samples_by_temperature_0_0.5_0.7_0.85_1.png", nrow=10,
                             scale=3))
        # reconstructions: encode test images and decode them again (the flow is invertible: they match)
        x = self.train_data("test")["x"][:16]
        with torch.no_grad():
            y = self.dequantise(x, torch.Generator().manual_seed(0))
            rec = (self.decode(self.encode(y)[0]) + 0.5).clamp(0, 1).cpu()  # type: ignore[arg-type]
        out.append(save_grid(torch.cat([x, rec]), run_dir / "reconstructions.png", nrow=16, scale=3))
        p = plot_curves(read_metrics(run_dir), ["bpd"], run_dir / "loss_curves.png",
                        title=f"{self.name}: train bits/dim")
        return out + ([p] if p else [])
