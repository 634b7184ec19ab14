"""Progressive growing of GANs (Karras et al. 2018; book ch. 10): 8x8 -> 16x16 -> 32x32 -> 64x64.

Training starts with a generator and critic that work at 8x8; every `phase_steps` steps a new resolution is faded
in (its output blended with the upsampled output of the previous one, weight `alpha` rising from 0 to 1, and the
real images blended the same way), then trained alone for another `phase_steps`. The paper's other pieces are
here too: equalised learning rate (weights drawn from N(0, 1) and scaled by He's constant at run time, so Adam's
per-parameter step is the same for every layer), pixel-wise feature normalisation in the generator, a minibatch
standard-deviation channel in the critic (a cheap way for it to see a batch's lack of variety), the WGAN-GP loss
with the small drift term that keeps critic scores near 0, and an exponential moving average of the generator's
weights for sampling.

The schedule is a function of the step alone, so a resumed run repeats an uninterrupted one; the level and fade
weight reached are buffers (`level`, `alpha`), so a saved model samples at the resolution it was trained to (images
are returned at the set's full size, upsampled by pixel repetition when training stopped at a lower level).
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

from dreamlab.config import check_ranges
from dreamlab.device import autocast
from dreamlab.errors import DreamlabError
from generators.base import Batch, Metrics, TrainConfig, register
from generators.gan import _GAN, ema_beta, ema_update, gradient_penalty, image_spec, requires_grad

# ----------------------------------------------------------------------------- equalised layers (also StyleGAN2's)


class EqLinear(nn.Module):
    """Linear layer with equalised learning rate: w ~ N(0, 1/lr_mul^2), used as w * lr_mul * gain / sqrt(fan_in)."""

    def __init__(self, cin: int, cout: int, *, bias: bool = True, bias_init: float = 0.0, lr_mul: float = 1.0,
                 gain: float = 1.0) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(cout, cin) / lr_mul)
        self.bias = nn.Parameter(torch.full((cout,), float(bias_init) / lr_mul)) if bias else None
        self.w_scale = lr_mul * gain / math.sqrt(cin)
        self.lr_mul = lr_mul

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = self.bias * self.lr_mul if self.bias is not None else None
        return F.linear(x, self.weight * self.w_scale, b)


class EqConv2d(nn.Module):
    """Conv with equalised learning rate (He's constant applied at run time, weights drawn from N(0, 1))."""

    def __init__(self, cin: int, cout: int, k: int, *, bias: bool = True, padding: int | None = None,
                 gain: float = math.sqrt(2)) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(cout, cin, k, k))
        self.bias = nn.Parameter(torch.zeros(cout)) if bias else None
        self.w_scale = gain / math.sqrt(cin * k * k)
        self.padding = k // 2 if padding is None else padding

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight * self.w_scale, self.bias, padding=self.padding)


def pixel_norm(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Each pixel's feature vector scaled to unit root-mean-square (ProGAN's replacement for batch norm in G)."""
    return x * torch.rsqrt(x.pow(2).mean(1, keepdim=True) + eps)


def minibatch_std(x: torch.Tensor, group: int = 4) -> torch.Tensor:
    """Append one channel: the standard deviation of each feature over a group of samples, averaged, so the critic
    can tell a batch of near-identical fakes from a varied real one."""
    b, c, h, w = x.shape
    g = max(d for d in range(1, min(group, b) + 1) if b % d == 0)
    y = x.float().view(g, -1, c, h, w)
    y = (y - y.mean(0)).pow(2).mean(0).add(1e-8).sqrt().mean([1, 2, 3])  # (b / g,)
    y = y.view(1, -1, 1, 1, 1).expand(g, -1, 1, h, w).reshape(b, 1, h, w)
    return torch.cat([x, y.to(x.dtype)], 1)


def _act(x: torch.Tensor) -> torch.Tensor:
    return F.leaky_relu(x, 0.2)


# ----------------------------------------------------------------------------- the growing networks


class ProGenerator(nn.Module):
    """z -> 8x8 base block -> one (upsample, conv3, conv3) block per doubling; a 1x1 to-RGB per resolution."""

    def __init__(self, z_dim: int, widths: list[int], channels: int) -> None:
        super().__init__()
        c0 = widths[0]
        self.c0 = c0
        self.fc = EqLinear(z_dim, c0 * 16, gain=math.sqrt(2) / 4)  # the paper's 4x4 "dense" start
        self.base = nn.ModuleList([EqConv2d(c0, c0, 3), EqConv2d(c0, c0, 3), EqConv2d(c0, c0, 3)])
        self.blocks = nn.ModuleList([nn.ModuleList([EqConv2d(a, b, 3), EqConv2d(b, b, 3)])
                                     for a, b in zip(widths[:-1], widths[1:])])
        self.to_rgb = nn.ModuleList([EqConv2d(c, channels, 1, gain=1.0) for c in widths])

    def forward(self, z: torch.Tensor, level: int, alpha: float) -> torch.Tensor:
        x = pixel_norm(_act(self.fc(pixel_norm(z)).view(-1, self.c0, 4, 4)))
        x = pixel_norm(_act(self.base[0](x)))
        x = F.interpolate(x, scale_factor=2, mode="nearest")
        for conv in self.base[1:]:
            x = pixel_norm(_act(conv(x)))
        prev = x
        for i in range(1, level + 1):
            prev = x
            x = F.interpolate(x, scale_factor=2, mode="nearest")
            for conv in self.blocks[i - 1]:
                x = pixel_norm(_act(conv(x)))
        rgb = self.to_rgb[level](x)
        if level > 0 and alpha < 1:  # fade-in: the new block's output blended with the old one's, upsampled
            old = F.interpolate(self.to_rgb[level - 1](prev), scale_factor=2, mode="nearest")
            rgb = torch.lerp(old, rgb, alpha)
        return rgb


class ProCritic(nn.Module):
    """A 1x1 from-RGB per resolution, one (conv3, conv3, avgpool) block per halving, then at 8x8 the minibatch
    standard deviation, conv3, avgpool to 4x4, a 4x4 conv and a linear score."""

    def __init__(self, widths: list[int], channels: int) -> None:
        super().__init__()
        c0 = widths[0]
        self.from_rgb = nn.ModuleList([EqConv2d(channels, c, 1) for c in widths])
        self.blocks = nn.ModuleList([nn.ModuleList([EqConv2d(b, b, 3), EqConv2d(b, a, 3)])
                                     for a, b in zip(widths[:-1], widths[1:])])
        self.final = nn.ModuleList([EqConv2d(c0 + 1, c0, 3), EqConv2d(c0, c0, 4, padding=0)])
        self.out = EqLinear(c0, 1)

    def _block(self, i: int, h: torch.Tensor) -> torch.Tensor:
        for conv in self.blocks[i - 1]:
            h = _act(conv(h))
        return F.avg_pool2d(h, 2)

    def forward(self, x: torch.Tensor, level: int, alpha: float) -> torch.Tensor:
        h = _act(self.from_rgb[level](x))
        if level > 0:
            h = self._block(level, h)
            if alpha < 1:  # fade-in: the new block blended with the old from-RGB on the downsampled image
                h = torch.lerp(_act(self.from_rgb[level - 1](F.avg_pool2d(x, 2))), h, alpha)
        for i in range(level - 1, 0, -1):
            h = self._block(i, h)
        h = _act(self.final[0](minibatch_std(h)))
        h = _act(self.final[1](F.avg_pool2d(h, 2)))
        return self.out(h.flatten(1))[:, 0]


# ----------------------------------------------------------------------------- the model


@dataclass
class ProGANConfig:
    dataset: str = "faces"
    z_dim: int = 128
    #: channels at 8x8, 16x16, 32x32, 64x64 (sets of 32x32 images use the first three)
    widths: tuple[int, ...] = (128, 128, 64, 32)
    phase_steps: int = 1000      # steps of each fade-in and of each stable phase (7 phases to reach 64x64)
    n_critic: int = 1            # the paper's one critic step per generator step
    gp_weight: float = 10.0
    drift: float = 0.001         # epsilon_drift * D(real)^2 keeps the critic's scores from drifting away from 0
    ema_kimg: float = 10.0       # half-life of the sampling generator's weight average, in thousands of images
    d_lr_mult: float = 1.0
    snapshots: int = 24
    eval_samples: int = 2000

    def __post_init__(self) -> None:
        check_ranges(self, positive=("z_dim", "widths", "phase_steps", "n_critic", "eval_samples"),
                     nonneg=("gp_weight", "drift", "ema_kimg", "snapshots"))
        if not self.d_lr_mult > 0:
            raise DreamlabError(f"d_lr_mult={self.d_lr_mult} must be > 0")
        _, size, _ = image_spec(self.dataset)
        need = int(math.log2(size)) - 2  # 8 -> size
        if len(self.widths) < need:
            raise DreamlabError(f"widths={','.join(map(str, self.widths))} needs {need} sizes (8x8 .. {size}x{size}) "
                                f"for {self.dataset}")


@register
class ProGAN(_GAN):
    """Progressive growing GAN on procedural faces (book ch. 10): 8->16->32->64 with fade-in, equalised lr."""

    name = "progan"
    config_class = ProGANConfig
    presets = {
        "tiny": {"widths": (8, 8, 4, 4), "z_dim": 8, "phase_steps": 1, "steps": 3, "batch_size": 8,
                 "eval_samples": 64, "snapshots": 2, "lr": 1e-3, "betas": (0.0, 0.99)},
        "quick": {"widths": (64, 32, 16, 8), "phase_steps": 250, "steps": 1750, "batch_size": 32, "lr": 1e-3,
                  "betas": (0.0, 0.99), "log_every": 25, "ckpt_every": 250},
        "full": {"widths": (256, 256, 128, 64), "z_dim": 256, "phase_steps": 6000, "steps": 42000, "batch_size": 64,
                 "lr": 1e-3, "betas": (0.0, 0.99)},
    }

    def __init__(self, config: ProGANConfig) -> None:
        super().__init__(config)
        self.levels = int(math.log2(self.size)) - 2
        widths = list(config.widths[: self.levels])
        self.G = ProGenerator(config.z_dim, widths, self.channels)
        self.D = ProCritic(widths, self.channels)
        self.G_ema = copy.deepcopy(self.G).requires_grad_(False)
        # where training has got to: sampling uses the same level and fade weight (saved with the weights)
        self.register_buffer("level", torch.zeros((), dtype=torch.long))
        self.register_buffer("alpha", torch.ones(()))

    def schedule(self, step: int) -> tuple[int, float]:
        """(level, alpha) at a step: stable 8x8, then per doubling a fade-in phase and a stable phase."""
        p, within = divmod(step, self.config.phase_steps)
        last = self.levels - 1
        if p >= 2 * last:
            return last, 1.0
        level = (p + 1) // 2
        return level, ((within + 1) / self.config.phase_steps if p % 2 else 1.0)

    def resolution(self, level: int | None = None) -> int:
        return 8 * 2 ** (int(self.level) if level is None else level)

    def generate(self, z: torch.Tensor, labels: torch.Tensor | None = None, *, level: int | None = None,
                 alpha: float | None = None, **kw: Any) -> torch.Tensor:
        """Images at the set's size from the averaged generator (lower levels upsampled by pixel repetition)."""
        lv = int(self.level) if level is None else level
        a = float(self.alpha) if alpha is None else alpha
        x = self.G_ema(z, lv, a)
        return F.interpolate(x, size=(self.size, self.size), mode="nearest") if x.shape[-1] != self.size else x

    def _reals(self, x: torch.Tensor, level: int, alpha: float) -> torch.Tensor:
        """Real images at the level's size, blended like the generator's output during a fade-in."""
        res = self.resolution(level)
        if res != x.shape[-1]:
            x = F.avg_pool2d(x, x.shape[-1] // res)
        if alpha < 1:
            x = torch.lerp(F.interpolate(F.avg_pool2d(x, 2), scale_factor=2, mode="nearest"), x, alpha)
        return x

    def train_step(self, batch: Batch, optimizers: list[torch.optim.Optimizer], step: int, tc: TrainConfig) -> Metrics:
        opt_g, opt_d = optimizers
        level, alpha = self.schedule(step)
        self.level.fill_(level)
        self.alpha.fill_(alpha)
        real = self._reals(self.to_net(batch["x"]), level, alpha)
        b, zd = len(real), self.config.z_dim
        for _ in range(self.config.n_critic):
            with autocast(self.device, tc.amp):
                with torch.no_grad():
                    fake = self.G(torch.randn(b, zd, device=real.device), level, alpha)
                d_real = self.D(real, level, alpha).float()
                d_fake = self.D(fake, level, alpha).float()
                gp = gradient_penalty(lambda x: self.D(x, level, alpha), real, fake)
                w_est = d_real.mean() - d_fake.mean()
                d_loss = -w_est + self.config.gp_weight * gp + self.config.drift * d_real.pow(2).mean()
            opt_d.zero_grad(set_to_none=True)
            d_loss.backward()
            opt_d.step()
        requires_grad(self.D, False)
        with autocast(self.device, tc.amp):
            g_loss = -self.D(self.G(torch.randn(b, zd, device=real.device), level, alpha), level, alpha).float().mean()
        opt_g.zero_grad(set_to_none=True)
        g_loss.backward()
        opt_g.step()
        requires_grad(self.D, True)
        ema_update(self.G_ema, self.G, ema_beta(b, (step + 1) * b, self.config.ema_kimg))
        return {"d_loss": d_loss.detach(), "g_loss": g_loss.detach(), "wasserstein": w_est.detach(), "gp": gp.detach(),
                "resolution": float(self.resolution(level)), "alpha": alpha}

    def curve_keys(self) -> list[str]:
        return ["d_loss", "g_loss", "wasserstein", "gp", "resolution", "alpha"]

    def on_step_end(self, step: int, tc: TrainConfig, run_dir: Path) -> None:
        super().on_step_end(step, tc, run_dir)
        # samples at every resolution: the fixed batch when a level's stable phase ends (and when training ends)
        level, _ = self.schedule(step - 1)
        ends_stable = step % self.config.phase_steps == 0 and self.schedule(step)[0] != level
        if ends_stable or step == tc.steps:
            from dreamlab.images import save_grid

            z, _ = self._fixed()
            was = self.training
            self.eval()
            with torch.no_grad():
                x = self.from_net(self.generate(z, level=level)).cpu()
            self.train(was)
            r = self.resolution(level)
            save_grid(x, Path(run_dir) / f"resolution_{r:02d}x{r:02d}.png", nrow=8)


__all__ = ["ProGAN", "ProGANConfig", "EqLinear", "EqConv2d", "pixel_norm", "minibatch_std"]
