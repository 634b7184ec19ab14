"""A small StyleGAN2 (Karras et al. 2020; book ch. 10) for 64x64 (or 32x32) images.

* **Mapping network**: z (normalised) -> `mapping_layers` equalised linear layers at 1/100 of the learning rate -> w.
* **Synthesis** from a learned 4x4 constant: per resolution two 3x3 *modulated* convolutions (the first upsamples),
  each scaling its input channels by a style `s = A(w)` and then *demodulating* (dividing each output channel by the
  norm its weights would give a unit-variance input, so activations keep unit variance without StyleGAN's AdaIN and
  its blob artefacts), per-pixel noise with a learned strength, and a to-RGB whose outputs are summed over
  resolutions (the "skip" generator). There are 2 log2(size) - 2 style inputs (10 at 64x64): coarse (4x4-8x8),
  middle (16x16-32x32) and fine (64x64) styles.
* **Style mixing** regularisation: for 90 % of a batch the w's after a random layer come from a second z.
* **Truncation trick**: w = w_avg + psi (w - w_avg), with w_avg a running mean of the mapping's outputs.
* **Critic**: residual blocks, minibatch standard deviation, the non-saturating logistic loss, and lazy R1
  regularisation (gamma/2 E||grad D(real)||^2, every `r1_every` steps, scaled by that interval; Adam's betas and
  learning rate adjusted as in the paper).
* Samples come from an exponential moving average of the generator's weights (half-life `ema_kimg` thousand images).

Upsampling is bilinear, not the paper's FIR filter, and there is no path-length regulariser: a small one.
`sample(n, truncation=0.7)`, `sample(n, styles=w)` with w of shape (n, w_dim) or (n, num_ws, w_dim).
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
from dreamlab.device import autocast, randn
from dreamlab.errors import DreamlabError
from generators.base import Batch, Metrics, TrainConfig, register
from generators.gan import _GAN, ema_beta, ema_update, image_spec, requires_grad
from generators.progan import EqConv2d, EqLinear, minibatch_std

SQRT2 = math.sqrt(2)


def _lrelu(x: torch.Tensor) -> torch.Tensor:
    """LeakyReLU with StyleGAN's gain sqrt(2), which keeps activations' second moment near 1."""
    return F.leaky_relu(x, 0.2) * SQRT2


class ModulatedConv2d(nn.Module):
    """3x3 (or 1x1) convolution whose input channels are scaled per sample by the style s = A(w); with `demodulate`,
    each output channel is divided by sqrt(sum_{in,k} (w s)^2), the standard deviation it would have for i.i.d.
    unit-variance inputs. Written unfused (scale inputs, one ordinary conv, scale outputs): the same result as the
    paper's grouped convolution, and a plain batched conv on any device."""

    def __init__(self, cin: int, cout: int, k: int, w_dim: int, *, demodulate: bool = True, up: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(cout, cin, k, k))
        self.affine = EqLinear(w_dim, cin, bias_init=1.0)  # styles start at 1: the conv starts unmodulated
        self.w_scale = 1 / math.sqrt(cin * k * k)
        self.demodulate, self.up, self.k = demodulate, up, k

    def forward(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        s = self.affine(w)  # (B, cin)
        weight = self.weight * self.w_scale
        if self.up:
            x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
        x = F.conv2d(x * s[:, :, None, None].to(x.dtype), weight.to(x.dtype), padding=self.k // 2)
        if self.demodulate:
            d = torch.rsqrt(s.float().pow(2) @ weight.float().pow(2).sum([2, 3]).t() + 1e-8)  # (B, cout)
            x = x * d[:, :, None, None].to(x.dtype)
        return x


class SynthesisLayer(nn.Module):
    """Modulated conv, + learned-strength per-pixel noise, + bias, LeakyReLU."""

    def __init__(self, cin: int, cout: int, w_dim: int, res: int, up: bool = False) -> None:
        super().__init__()
        self.conv = ModulatedConv2d(cin, cout, 3, w_dim, up=up)
        self.noise_strength = nn.Parameter(torch.zeros(()))
        self.bias = nn.Parameter(torch.zeros(cout))
        self.res = res

    def forward(self, x: torch.Tensor, w: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        x = self.conv(x, w)
        noise = randn((x.shape[0], 1, self.res, self.res), generator=generator, device=x.device).to(x.dtype)
        return _lrelu(x + noise * self.noise_strength.to(x.dtype) + self.bias[None, :, None, None].to(x.dtype))


class ToRGB(nn.Module):
    def __init__(self, cin: int, channels: int, w_dim: int) -> None:
        super().__init__()
        self.conv = ModulatedConv2d(cin, channels, 1, w_dim, demodulate=False)
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return self.conv(x, w) + self.bias[None, :, None, None].to(x.dtype)


class MappingNetwork(nn.Module):
    def __init__(self, z_dim: int, w_dim: int, layers: int, lr_mul: float) -> None:
        super().__init__()
        dims = [z_dim] + [w_dim] * layers
        self.fcs = nn.ModuleList([EqLinear(a, b, lr_mul=lr_mul) for a, b in zip(dims[:-1], dims[1:])])

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = z * torch.rsqrt(z.pow(2).mean(1, keepdim=True) + 1e-8)
        for fc in self.fcs:
            x = _lrelu(fc(x))
        return x


class StyleGenerator(nn.Module):
    """Mapping network + skip-architecture synthesis network; `w_avg` tracks the mean w for truncation."""

    def __init__(self, z_dim: int, w_dim: int, mapping_layers: int, lr_mul: float, chans: list[int],
                 channels: int) -> None:
        super().__init__()
        self.mapping = MappingNetwork(z_dim, w_dim, mapping_layers, lr_mul)
        self.const = nn.Parameter(torch.randn(chans[0], 4, 4))
        self.conv4 = SynthesisLayer(chans[0], chans[0], w_dim, 4)
        self.rgb4 = ToRGB(chans[0], channels, w_dim)
        self.blocks = nn.ModuleList()
        for i, (a, b) in enumerate(zip(chans[:-1], chans[1:])):
            res = 8 * 2 ** i
            self.blocks.append(nn.ModuleList([SynthesisLayer(a, b, w_dim, res, up=True),
                                              SynthesisLayer(b, b, w_dim, res), ToRGB(b, channels, w_dim)]))
        self.num_ws = 2 + 2 * len(self.blocks)
        self.register_buffer("w_avg", torch.zeros(w_dim))

    def synthesize(self, ws: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """(B, num_ws, w_dim) -> images: style i drives layer i (a to-RGB shares its index with the next conv)."""
        x = self.const[None].expand(ws.shape[0], -1, -1, -1).to(ws.dtype)
        x = self.conv4(x, ws[:, 0], generator)
        img = self.rgb4(x, ws[:, 1])
        for i, (up, conv, rgb) in enumerate(self.blocks):
            j = 1 + 2 * i
            x = up(x, ws[:, j], generator)
            x = conv(x, ws[:, j + 1], generator)
            img = F.interpolate(img, scale_factor=2, mode="bilinear", align_corners=False) + rgb(x, ws[:, j + 2])
        return img

    def truncate(self, w: torch.Tensor, psi: float | None) -> torch.Tensor:
        return w if psi is None or psi == 1 else torch.lerp(self.w_avg.to(w.dtype), w, psi)


def _conv(cin: int, cout: int, k: int, **kw: Any) -> EqConv2d:
    """An equalised conv whose weights carry no gain: StyleGAN2 puts sqrt(2) into the activation (`_lrelu`), where
    ProGAN puts it into the weights; both at once would double every layer's output scale."""
    return EqConv2d(cin, cout, k, gain=1.0, **kw)


class ResBlock(nn.Module):
    """conv3, conv3 + 2x average-pool, with a pooled 1x1 skip; the sum scaled by 1/sqrt(2)."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv0, self.conv1 = _conv(cin, cin, 3), _conv(cin, cout, 3)
        self.skip = _conv(cin, cout, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.avg_pool2d(_lrelu(self.conv1(_lrelu(self.conv0(x)))), 2)
        return (y + self.skip(F.avg_pool2d(x, 2))) / SQRT2


class StyleCritic(nn.Module):
    def __init__(self, chans: list[int], channels: int) -> None:
        super().__init__()
        rev = chans[::-1]  # from the image's size down to 4x4
        self.from_rgb = _conv(channels, rev[0], 1)
        self.blocks = nn.ModuleList([ResBlock(a, b) for a, b in zip(rev[:-1], rev[1:])])
        c = rev[-1]
        self.conv = _conv(c + 1, c, 3)
        self.fc = EqLinear(c * 16, c, gain=SQRT2)
        self.out = EqLinear(c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = _lrelu(self.from_rgb(x))
        for blk in self.blocks:
            h = blk(h)
        h = _lrelu(self.conv(minibatch_std(h)))
        return self.out(F.leaky_relu(self.fc(h.flatten(1)), 0.2))[:, 0]


# ----------------------------------------------------------------------------- the model


@dataclass
class StyleGAN2Config:
    dataset: str = "faces"
    z_dim: int = 128
    w_dim: int = 128
    mapping_layers: int = 4      # the paper's 8, halved for a small model
    mapping_lr_mult: float = 0.01
    #: channels at 4x4, 8x8, ..., the set's size (64x64: five sizes; 32x32 sets use the first four)
    channels: tuple[int, ...] = (256, 256, 128, 64, 32)
    style_mixing: float = 0.9    # fraction of a batch trained with two w's
    r1_gamma: float = 0.1        # R1 weight (the paper's formula for 64x64 and batch 32 gives ~0.03-0.1)
    r1_every: int = 16           # lazy regularisation interval (steps)
    w_avg_beta: float = 0.995    # running mean of w for the truncation trick
    ema_kimg: float = 10.0
    d_lr_mult: float = 1.0
    snapshots: int = 24
    eval_samples: int = 2000

    def __post_init__(self) -> None:
        check_ranges(self, positive=("z_dim", "w_dim", "mapping_layers", "channels", "r1_every", "eval_samples"),
                     nonneg=("r1_gamma", "ema_kimg", "snapshots"), fraction=("style_mixing", "w_avg_beta"))
        for k in ("mapping_lr_mult", "d_lr_mult"):
            if not getattr(self, k) > 0:
                raise DreamlabError(f"{k}={getattr(self, k)} must be > 0")
        _, size, _ = image_spec(self.dataset)
        need = int(math.log2(size)) - 1  # 4x4 .. size
        if len(self.channels) < need:
            raise DreamlabError(f"channels={','.join(map(str, self.channels))} needs {need} sizes (4x4 .. "
                                f"{size}x{size}) for {self.dataset}")


@register
class StyleGAN2(_GAN):
    """A small StyleGAN2 on procedural faces (book ch. 10): mapping net, modulated convs, mixing, truncation, R1."""

    name = "stylegan2"
    config_class = StyleGAN2Config
    sample_options = ("truncation", "styles")
    example_condition = {"truncation": 0.7}
    presets = {
        "tiny": {"channels": (8, 8, 8, 4, 4), "z_dim": 8, "w_dim": 8, "mapping_layers": 2, "steps": 3,
                 "batch_size": 8, "eval_samples": 64, "snapshots": 2, "r1_every": 2, "lr": 2e-3,
                 "betas": (0.0, 0.99)},
        "quick": {"channels": (64, 64, 32, 16, 8), "steps": 1050, "batch_size": 32, "lr": 2e-3,
                  "betas": (0.0, 0.99), "log_every": 25, "ckpt_every": 350},
        "full": {"channels": (512, 512, 256, 128, 64), "z_dim": 512, "w_dim": 512, "mapping_layers": 8,
                 "steps": 40000, "batch_size": 64, "lr": 2e-3, "betas": (0.0, 0.99), "r1_gamma": 0.2},
    }

    def __init__(self, config: StyleGAN2Config) -> None:
        super().__init__(config)
        chans = list(config.channels[: int(math.log2(self.size)) - 1])
        self.G = StyleGenerator(config.z_dim, config.w_dim, config.mapping_layers, config.mapping_lr_mult, chans,
                                self.channels)
        self.D = StyleCritic(chans, self.channels)
        self.G_ema = copy.deepcopy(self.G).requires_grad_(False)
        self.num_ws = self.G.num_ws

    # ---- style space -------------------------------------------------------------------------
    def styles(self, z: torch.Tensor, truncation: float | None = None,
               net: StyleGenerator | None = None) -> torch.Tensor:
        """z -> w (B, w_dim) through the averaged generator's mapping, truncated towards w_avg by psi."""
        net = net or self.G_ema
        return net.truncate(net.mapping(z), truncation)

    def synthesize(self, ws: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """w (B, w_dim) or per-layer ws (B, num_ws, w_dim) -> images in [-1, 1]."""
        if ws.ndim == 2:
            ws = ws[:, None].expand(-1, self.num_ws, -1)
        return self.G_ema.synthesize(ws, generator)

    def generate(self, z: torch.Tensor, labels: torch.Tensor | None = None, *, generator: torch.Generator | None = None,
                 truncation: float | None = None, styles: torch.Tensor | None = None, **kw: Any) -> torch.Tensor:
        if styles is None:
            styles = self.styles(z, truncation)
        return self.synthesize(styles, generator)

    @torch.no_grad()
    def sample(self, n: int, *, generator: torch.Generator | None = None, labels: Any = None,
               truncation: float | None = None, styles: torch.Tensor | None = None, **condition: Any) -> torch.Tensor:
        """n images; `truncation` psi (1 = none, 0.5-0.7 = typical, more faithful, less varied); `styles`: given w's
        (n, w_dim) or (n, num_ws, w_dim) instead of mapped latents."""
        if truncation is not None and not -2 <= float(truncation) <= 2:
            raise DreamlabError(f"truncation={truncation} should be in [-2, 2] (1 = none, 0.7 = typical)")
        if styles is not None:
            styles = torch.as_tensor(styles, dtype=torch.float32, device=self.device)
            if styles.shape[0] != n or styles.shape[-1] != self.config.w_dim or styles.ndim not in (2, 3) or (
                    styles.ndim == 3 and styles.shape[1] != self.num_ws):
                raise DreamlabError(f"styles of shape {tuple(styles.shape)} must be ({n}, {self.config.w_dim}) or "
                                    f"({n}, {self.num_ws}, {self.config.w_dim})")
            styles = self.G_ema.truncate(styles, truncation) if truncation is not None else styles
            truncation = None
        return super().sample(n, generator=generator, labels=labels, truncation=truncation, styles=styles,
                              **condition)

    # ---- training ----------------------------------------------------------------------------
    def configure_optimizers(self, tc: TrainConfig) -> list[torch.optim.Optimizer]:
        # lazy R1: the critic's lr and betas shrink by c = k / (k + 1), as the paper's lazy regularisation does
        c = self.config.r1_every / (self.config.r1_every + 1)
        b1, b2 = tc.betas
        return [torch.optim.Adam(self.G.parameters(), lr=tc.lr, betas=(b1, b2)),
                torch.optim.Adam(self.D.parameters(), lr=tc.lr * self.config.d_lr_mult * c,
                                 betas=(b1 ** c, b2 ** c))]

    def _mixed_ws(self, b: int, device: torch.device) -> torch.Tensor:
        """Training ws: one w per sample, and for `style_mixing` of them a second w from a random layer on."""
        w = self.G.mapping(torch.randn(b, self.config.z_dim, device=device))
        ws = w[:, None].expand(-1, self.num_ws, -1)
        if self.config.style_mixing > 0:
            w2 = self.G.mapping(torch.randn(b, self.config.z_dim, device=device))
            cut = torch.randint(1, self.num_ws, (b, 1), device=device)
            cut = torch.where(torch.rand(b, 1, device=device) < self.config.style_mixing, cut,
                              torch.full_like(cut, self.num_ws))
            layer = torch.arange(self.num_ws, device=device)[None]
            ws = torch.where((layer < cut)[:, :, None], ws, w2[:, None])
        if self.training:  # the running mean of w for truncation
            with torch.no_grad():
                self.G.w_avg.lerp_(w.detach().float().mean(0), 1 - self.config.w_avg_beta)
        return ws

    def train_step(self, batch: Batch, optimizers: list[torch.optim.Optimizer], step: int, tc: TrainConfig) -> Metrics:
        opt_g, opt_d = optimizers
        real = self.to_net(batch["x"])
        b = len(real)
        # critic: softplus(D(fake)) + softplus(-D(real))
        with autocast(self.device, tc.amp):
            with torch.no_grad():
                fake = self.G.synthesize(self._mixed_ws(b, real.device))
            d_real, d_fake = self.D(real).float(), self.D(fake).float()
            d_loss = F.softplus(d_fake).mean() + F.softplus(-d_real).mean()
        opt_d.zero_grad(set_to_none=True)
        d_loss.backward()
        out: Metrics = {"d_loss": d_loss.detach(), "d_real": torch.sigmoid(d_real).mean().detach(),
                        "d_fake": torch.sigmoid(d_fake).mean().detach()}
        if self.config.r1_gamma > 0 and step % self.config.r1_every == 0:
            # lazy R1 on the reals: gamma/2 E ||grad_x D(x)||^2, times the interval it stands for
            x = real.detach().requires_grad_(True)
            with autocast(self.device, tc.amp):
                (g,) = torch.autograd.grad(self.D(x).float().sum(), x, create_graph=True)
            r1 = g.float().flatten(1).pow(2).sum(1).mean()
            (r1 * (self.config.r1_gamma / 2) * self.config.r1_every).backward()
            out["r1"] = r1.detach()
        opt_d.step()
        # generator: softplus(-D(G(z)))
        requires_grad(self.D, False)
        with autocast(self.device, tc.amp):
            g_loss = F.softplus(-self.D(self.G.synthesize(self._mixed_ws(b, real.device))).float()).mean()
        opt_g.zero_grad(set_to_none=True)
        g_loss.backward()
        opt_g.step()
        requires_grad(self.D, True)
        ema_update(self.G_ema, self.G, ema_beta(b, (step + 1) * b, self.config.ema_kimg))
        out["g_loss"] = g_loss.detach()
        return out

    def curve_keys(self) -> list[str]:
        return ["d_loss", "g_loss", "d_real", "d_fake", "r1"]

    # ---- pictures ----------------------------------------------------------------------------
    @torch.no_grad()
    def interpolations(self, rows: int = 6, steps: int = 10) -> torch.Tensor:
        """Straight lines in w (the mapping makes w-space closer to linear than z-space)."""
        g = torch.Generator().manual_seed(7)
        wa, wb = self.styles(self.latent(rows, g)), self.styles(self.latent(rows, g))
        t = torch.linspace(0, 1, steps, device=self.device)[None, :, None]
        w = torch.lerp(wa[:, None], wb[:, None], t).flatten(0, 1)
        return self.from_net(self.synthesize(w, torch.Generator().manual_seed(7))).cpu()

    def style_groups(self) -> dict[str, range]:
        """Which style inputs are coarse (4x4-8x8), middle (16x16-32x32) and fine (the rest)."""
        return {"coarse": range(0, 4), "middle": range(4, min(8, self.num_ws)), "fine": range(8, self.num_ws)}

    @torch.no_grad()
    def style_mixing_grid(self, n_src: int = 5, n_dst: int = 3) -> torch.Tensor:
        """Top row: 'B' sources; each block of rows: an 'A' image (left) with B's coarse, middle or fine styles."""
        g = torch.Generator().manual_seed(11)
        wa, wb = self.styles(self.latent(n_dst, g), 0.8), self.styles(self.latent(n_src, g), 0.8)

        def img(ws: torch.Tensor) -> torch.Tensor:
            return self.from_net(self.synthesize(ws, torch.Generator().manual_seed(11))).cpu()

        blank = torch.ones(1, self.channels, self.image_size, self.image_size)
        tiles = [blank, img(wb)]
        for layers in self.style_groups().values():
            if not len(layers):
                continue
            for i in range(n_dst):
                ws = wa[i:i + 1, None].expand(n_src, self.num_ws, -1).clone()
                ws[:, list(layers)] = wb[:, None]
                tiles += [img(wa[i:i + 1]), img(ws)]
        return torch.cat(tiles)

    @torch.no_grad()
    def truncation_sweep(self, rows: int = 6, psis: tuple[float, ...] = (-0.5, 0.0, 0.3, 0.5, 0.7, 0.85, 1.0)):
        g = torch.Generator().manual_seed(5)
        z = self.latent(rows, g)
        w = self.G_ema.mapping(z)
        imgs = [self.from_net(self.synthesize(self.G_ema.truncate(w, p), torch.Generator().manual_seed(5))).cpu()
                for p in psis]
        return torch.stack(imgs, 1).flatten(0, 1)

    def extra_artifacts(self, run_dir: Path) -> list[Path]:
        from dreamlab.images import save_grid

        run_dir = Path(run_dir)
        out = [save_grid(self.style_mixing_grid(), run_dir / "style_mixing.png", nrow=6)]
        out.append(save_grid(self.truncation_sweep(), run_dir / "truncation_sweep.png", nrow=7))
        return out


__all__ = ["StyleGAN2", "StyleGAN2Config", "ModulatedConv2d", "StyleGenerator", "StyleCritic"]
