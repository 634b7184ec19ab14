"""Autoencoders and variational autoencoders (book ch. 3, and V of World Models in ch. 12).

* `Autoencoder` ("autoencoder"): the book's Fashion-MNIST AE with a 2-d latent space. Sampling draws
  points uniformly from the box the training codes occupy, as the book does, to show why that fails.
* `VAE` ("vae"): the same network with a Gaussian encoder. `log_prob` is the ELBO (or, with k > 1, the
  importance-weighted bound): a *lower bound* on the Bernoulli log-likelihood of the [0, 1] intensities
  (the book's binary cross-entropy), in nats per image.
* `ConvVAE` ("conv_vae"): World Models' V for 64x64 RGB frames, z=32, KL floored at 0.5 nats per dim.

All three share `encode`, `decode`, and the latent-space tools of ch. 3 (`interpolate` for morphing,
`attribute_vector` for latent arithmetic).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dreamlab.config import check_ranges
from dreamlab.data import FMNIST_CLASSES
from dreamlab.device import rand, randn
from generators.base import Batch, Generator, Metrics, register

# ----------------------------------------------------------------------------- shared latent tools


class _LatentModel(Generator):
    """Shared by AE / VAE / ConvVAE: reconstruct, morph, latent arithmetic, run-folder pictures."""

    image_shape: tuple[int, int, int]

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        raise NotImplementedError

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        mu, _ = self.encode(x.to(self.device))
        return self.decode(mu)

    @torch.no_grad()
    def interpolate(self, x_a: torch.Tensor, x_b: torch.Tensor, steps: int = 8) -> torch.Tensor:
        """Morph between two images along the straight line between their codes (ch. 3, 'Morphing')."""
        za, _ = self.encode(x_a[None].to(self.device))
        zb, _ = self.encode(x_b[None].to(self.device))
        t = torch.linspace(0, 1, steps, device=self.device)[:, None]
        return self.decode((1 - t) * za + t * zb)

    @torch.no_grad()
    def attribute_vector(self, x: torch.Tensor, has_attribute: torch.Tensor) -> torch.Tensor:
        """Mean code of images with an attribute minus mean code of those without (ch. 3, 'Latent arithmetic')."""
        z = torch.cat([self.encode(b.to(self.device))[0] for b in x.split(256)])
        m = has_attribute.to(self.device).bool()
        return z[m].mean(0) - z[~m].mean(0)

    @torch.no_grad()
    def add_attribute(
        self, x: torch.Tensor, vector: torch.Tensor, scales: tuple[float, ...] = (-2, -1, 0, 1, 2, 3)
    ) -> torch.Tensor:
        """Decode z + s·vector for each scale s: one row per image."""
        z, _ = self.encode(x.to(self.device))
        out = [self.decode(z + s * vector) for s in scales]
        return torch.stack(out, 1).flatten(0, 1)

    def _codes(self, split: str = "test", max_items: int = 5000) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        d = self.train_data(split)
        x = d["x"][:max_items]
        y = d.get("y", torch.zeros(len(x), dtype=torch.long))[:max_items]
        with torch.no_grad():
            z = torch.cat([self.encode(self._prep(b.to(self.device)))[0].float().cpu() for b in x.split(500)])
        return x, y, z

    def _prep(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def _shown(self, x: torch.Tensor, n: int = 16) -> torch.Tensor:
        """The test items shown in reconstructions.png: the first n (shuffled datasets vary enough)."""
        return x[:n]

    @torch.no_grad()
    def evaluate(self, split: str = "test", max_items: int | None = None) -> dict[str, float]:
        res = super().evaluate(split, max_items)
        if split == "test" and getattr(self.config, "dataset", "") == "fashion_mnist":
            from generators.classifiers import FEATURE_NET_DIR, extra_eval_any

            if (FEATURE_NET_DIR / "model.safetensors").exists():  # fid_fmnist needs the shipped feature net
                res.update(extra_eval_any(self, n=min(5000, max_items or 5000)))
        return res

    def write_artifacts(self, run_dir: Path) -> list[Path]:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        from dreamlab.images import plot_curves, save_figure, save_grid
        from generators.trainer import read_metrics

        run_dir = Path(run_dir)
        self.eval()
        out: list[Path] = []
        x, y, z = self._codes("test")
        xs = self._prep(self._shown(x).to(self.device))
        rec = self.reconstruct(xs)
        out.append(save_grid(torch.cat([xs, rec]).cpu(), run_dir / "reconstructions.png", nrow=16))
        g = torch.Generator(device=self.device).manual_seed(0)
        out.append(save_grid(self.sample(64, generator=g).cpu(), run_dir / "samples.png", nrow=8))
        # latent scatter coloured by class (PCA to 2-d when z has more dimensions)
        z2 = z if z.shape[1] == 2 else _pca2(z)
        fig, ax = plt.subplots(figsize=(6, 5))
        sc = ax.scatter(z2[:, 0], z2[:, 1], c=y.numpy(), cmap="tab10", s=3, alpha=0.7)
        if int(y.max()) < 10 and getattr(self.config, "dataset", "") == "fashion_mnist":
            handles = [
                plt.Line2D([], [], marker="o", ls="", color=sc.cmap(sc.norm(i)), label=c)
                for i, c in enumerate(FMNIST_CLASSES)
            ]
            ax.legend(handles=handles, fontsize=6, loc="best")
        ax.set_title(f"{self.name}: test codes" + ("" if z.shape[1] == 2 else " (PCA)"))
        out.append(save_figure(fig, run_dir / "latent_scatter.png"))
        if z.shape[1] == 2:  # decoded latent plane: a grid over the region the codes occupy
            lo, hi = z.quantile(0.01, 0).tolist(), z.quantile(0.99, 0).tolist()
            n = 15
            gx, gy = torch.meshgrid(torch.linspace(lo[0], hi[0], n), torch.linspace(hi[1], lo[1], n), indexing="xy")
            plane = torch.stack([gx.flatten(), gy.flatten()], 1).to(self.device)
            with torch.no_grad():
                out.append(save_grid(self.decode(plane).cpu(), run_dir / "latent_plane.png", nrow=n))
        rows = read_metrics(run_dir)
        keys = [k for k in ("loss", "recon", "kl") if any(k in r for r in rows)]
        p = plot_curves(rows, keys, run_dir / "loss_curves.png", title=self.name)
        if p:
            out.append(p)
        return out


def _pca2(z: torch.Tensor) -> torch.Tensor:
    zc = z - z.mean(0)
    _, _, v = torch.linalg.svd(zc, full_matrices=False)
    return zc @ v[:2].T


# ----------------------------------------------------------------------------- Fashion-MNIST AE / VAE (book ch. 3)


@dataclass
class AEConfig:
    dataset: str = "fashion_mnist"
    z_dim: int = 2
    channels: tuple[int, ...] = (32, 64, 128)

    def __post_init__(self) -> None:
        check_ranges(self, positive=("z_dim", "channels"))


class _FMNISTCoder(nn.Module):
    """The book's encoder/decoder: 32x32 input (28x28 padded by 2), three stride-2 convs, a dense code."""

    def __init__(self, z_out: int, z_in: int, ch: tuple[int, ...]) -> None:
        super().__init__()
        c1, c2, c3 = ch
        self.enc = nn.Sequential(
            nn.Conv2d(1, c1, 3, 2, 1), nn.ReLU(), nn.Conv2d(c1, c2, 3, 2, 1), nn.ReLU(),
            nn.Conv2d(c2, c3, 3, 2, 1), nn.ReLU(), nn.Flatten(), nn.Linear(c3 * 16, z_out),
        )
        self.fc = nn.Linear(z_in, c3 * 16)
        self.dec = nn.Sequential(
            nn.ConvTranspose2d(c3, c3, 3, 2, 1, output_padding=1), nn.ReLU(),
            nn.ConvTranspose2d(c3, c2, 3, 2, 1, output_padding=1), nn.ReLU(),
            nn.ConvTranspose2d(c2, c1, 3, 2, 1, output_padding=1), nn.ReLU(),
            nn.Conv2d(c1, 1, 3, 1, 1),
        )
        self.c3 = c3

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.enc(F.pad(x, (2, 2, 2, 2)))

    def decode_logits(self, z: torch.Tensor) -> torch.Tensor:
        h = self.fc(z).view(-1, self.c3, 4, 4)
        return self.dec(h)[:, :, 2:30, 2:30]


@register
class Autoencoder(_LatentModel):
    """Fashion-MNIST autoencoder with a 2-d latent space (book ch. 3)."""

    name = "autoencoder"
    config_class = AEConfig
    presets = {
        "tiny": {"channels": (4, 8, 8), "steps": 3, "batch_size": 16, "eval_items": 200},
        "quick": {"steps": 1500, "batch_size": 128, "lr": 1e-3},
        "full": {"steps": 9000, "batch_size": 100, "lr": 1e-3},
    }
    image_shape = (1, 28, 28)

    def __init__(self, config: AEConfig) -> None:
        super().__init__(config)
        self.net = _FMNISTCoder(config.z_dim, config.z_dim, tuple(config.channels))
        # the box the training codes occupy, kept up to date during training; sampling draws from it
        self.register_buffer("z_min", -torch.ones(config.z_dim))
        self.register_buffer("z_max", torch.ones(config.z_dim))

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, None]:
        return self.net.encode(x), None

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.net.decode_logits(z).float())

    def loss(self, batch: Batch) -> tuple[torch.Tensor, Metrics]:
        x = batch["x"]
        z = self.net.encode(x)
        if self.training:
            with torch.no_grad():  # exponential moving box of the codes
                self.z_min.lerp_(z.detach().float().min(0).values, 0.05)
                self.z_max.lerp_(z.detach().float().max(0).values, 0.05)
        logits = self.net.decode_logits(z).float()
        rec = F.binary_cross_entropy_with_logits(logits, x.float(), reduction="none").flatten(1).sum(1).mean()
        return rec, {"recon": rec.detach()}

    @torch.no_grad()
    def sample(self, n: int, *, generator: torch.Generator | None = None, **condition: Any) -> torch.Tensor:
        u = rand((n, self.config.z_dim), generator=generator, device=self.device)
        return self.decode(self.z_min + u * (self.z_max - self.z_min))


@dataclass
class VAEConfig:
    dataset: str = "fashion_mnist"
    z_dim: int = 2
    channels: tuple[int, ...] = (32, 64, 128)
    beta: float = 1.0  # weight of the KL term; 1 gives the true ELBO

    def __post_init__(self) -> None:
        check_ranges(self, positive=("z_dim", "channels"), nonneg=("beta",))


@register
class VAE(_LatentModel):
    """Fashion-MNIST variational autoencoder (book ch. 3); log_prob is the ELBO / IWAE bound."""

    name = "vae"
    config_class = VAEConfig
    log_prob_kind = "bound"
    presets = {
        "tiny": {"channels": (4, 8, 8), "steps": 3, "batch_size": 16, "eval_items": 200},
        "quick": {"steps": 3000, "batch_size": 128, "lr": 1e-3},
        "full": {"steps": 15000, "batch_size": 100, "lr": 1e-3, "z_dim": 2},
    }
    image_shape = (1, 28, 28)

    def __init__(self, config: VAEConfig) -> None:
        super().__init__(config)
        self.net = _FMNISTCoder(2 * config.z_dim, config.z_dim, tuple(config.channels))

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mu, logvar = self.net.encode(x).float().chunk(2, dim=1)
        return mu, logvar.clamp(-12, 8)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.net.decode_logits(z).float())

    def _terms(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mu, logvar = self.encode(x)
        z = mu + torch.randn_like(mu) * (0.5 * logvar).exp()
        logits = self.net.decode_logits(z).float()
        rec = F.binary_cross_entropy_with_logits(logits, x.float(), reduction="none").flatten(1).sum(1)
        kl = 0.5 * (mu.pow(2) + logvar.exp() - 1 - logvar).sum(1)
        return rec, kl

    def loss(self, batch: Batch) -> tuple[torch.Tensor, Metrics]:
        rec, kl = self._terms(batch["x"])
        loss = (rec + self.config.beta * kl).mean()
        return loss, {"recon": rec.mean().detach(), "kl": kl.mean().detach(), "neg_elbo": (rec + kl).mean().detach()}

    @torch.no_grad()
    def sample(self, n: int, *, generator: torch.Generator | None = None, **condition: Any) -> torch.Tensor:
        z = randn((n, self.config.z_dim), generator=generator, device=self.device)
        return self.decode(z)

    @torch.no_grad()
    def log_prob(self, x: torch.Tensor, k: int = 1) -> torch.Tensor:
        """ELBO (k=1) or the k-sample importance-weighted bound, in nats per image: a lower bound."""
        x = x.to(self.device).float()
        mu, logvar = self.encode(x)
        std = (0.5 * logvar).exp()
        terms = []
        for _ in range(k):
            eps = torch.randn_like(mu)
            z = mu + eps * std
            logits = self.net.decode_logits(z).float()
            log_px = -F.binary_cross_entropy_with_logits(logits, x, reduction="none").flatten(1).sum(1)
            log_pz = -0.5 * (z.pow(2) + math.log(2 * math.pi)).sum(1)
            log_qz = -0.5 * (eps.pow(2) + math.log(2 * math.pi) + logvar).sum(1)
            terms.append(log_px + log_pz - log_qz)
        return torch.logsumexp(torch.stack(terms), 0) - math.log(k)

    @torch.no_grad()
    def evaluate(self, split: str = "test", max_items: int | None = None) -> dict[str, float]:
        res = super().evaluate(split, max_items)
        x = self.train_data(split)["x"][: max_items or 10000]
        elbo = torch.cat([self.log_prob(b) for b in x.split(500)])
        res[f"{split}_elbo"] = float(elbo.mean())
        return res


# ----------------------------------------------------------------------------- World Models' ConvVAE


@dataclass
class ConvVAEConfig:
    dataset: str = "fashion_mnist"  # any registered image dataset; images are resized to 64x64 RGB
    z_dim: int = 32
    channels: int = 3
    kl_tolerance: float = 0.5  # KL floored at kl_tolerance * z_dim nats (World Models)
    width: int = 32  # channels of the first conv; the paper's 32/64/128/256 is width=32

    def __post_init__(self) -> None:
        check_ranges(self, positive=("z_dim", "channels", "width"), nonneg=("kl_tolerance",))


@register
class ConvVAE(_LatentModel):
    """World Models' ConvVAE for 64x64 frames: 4 stride-2 convs, z=32, sum-MSE + floored KL."""

    name = "conv_vae"
    config_class = ConvVAEConfig
    presets = {
        "tiny": {"width": 4, "z_dim": 4, "steps": 3, "batch_size": 8, "eval_items": 200},
        "quick": {"steps": 1000, "batch_size": 64, "lr": 1e-3},
        "full": {"steps": 20000, "batch_size": 100, "lr": 1e-4},
    }

    def __init__(self, config: ConvVAEConfig) -> None:
        super().__init__(config)
        w, c, z = config.width, config.channels, config.z_dim
        self.image_shape = (c, 64, 64)
        self.encoder = nn.Sequential(
            nn.Conv2d(c, w, 4, 2), nn.ReLU(), nn.Conv2d(w, 2 * w, 4, 2), nn.ReLU(),
            nn.Conv2d(2 * w, 4 * w, 4, 2), nn.ReLU(), nn.Conv2d(4 * w, 8 * w, 4, 2), nn.ReLU(), nn.Flatten(),
        )
        self.mu = nn.Linear(8 * w * 4, z)
        self.logvar = nn.Linear(8 * w * 4, z)
        self.fc = nn.Linear(z, 32 * w)
        self.decoder = nn.Sequential(
            nn.ConvTranspose2d(32 * w, 4 * w, 5, 2), nn.ReLU(), nn.ConvTranspose2d(4 * w, 2 * w, 5, 2), nn.ReLU(),
            nn.ConvTranspose2d(2 * w, w, 6, 2), nn.ReLU(), nn.ConvTranspose2d(w, c, 6, 2), nn.Sigmoid(),
        )

    def _prep(self, x: torch.Tensor) -> torch.Tensor:
        """Bring any dataset's images to (B, channels, 64, 64); channels-last on CUDA."""
        if x.shape[-1] != 64 or x.shape[-2] != 64:
            x = F.interpolate(x, size=(64, 64), mode="bilinear", align_corners=False)
        if x.shape[1] != self.config.channels:
            x = x.expand(-1, self.config.channels, -1, -1) if x.shape[1] == 1 else x[:, : self.config.channels]
        return self._channels_last(x)

    def _channels_last(self, x: torch.Tensor) -> torch.Tensor:
        """On CUDA, activations and conv weights in channels-last layout: cuDNN's NHWC kernels (the World
        Models reference benchmark trains this way). Saved weights are unaffected (save_tensors makes them
        contiguous); on CPU nothing changes."""
        if not x.is_cuda:
            return x
        if not getattr(self, "_nhwc", False):
            self.to(memory_format=torch.channels_last)
            self._nhwc = True
        return x.contiguous(memory_format=torch.channels_last)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.encoder(x)
        return self.mu(h).float(), self.logvar(h).float().clamp(-12, 8)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.fc(z)[:, :, None, None]).float()

    def loss(self, batch: Batch) -> tuple[torch.Tensor, Metrics]:
        x = self._prep(batch["x"])
        mu, logvar = self.encode(x)
        z = mu + torch.randn_like(mu) * (0.5 * logvar).exp()
        rec = F.mse_loss(self.decode(z), x.float(), reduction="none").flatten(1).sum(1)
        kl = 0.5 * (mu.pow(2) + logvar.exp() - 1 - logvar).sum(1)
        kl_floored = kl.clamp(min=self.config.kl_tolerance * self.config.z_dim)
        loss = (rec + kl_floored).mean()
        return loss, {"recon": rec.mean().detach(), "kl": kl.mean().detach()}

    @torch.no_grad()
    def sample(self, n: int, *, generator: torch.Generator | None = None, **condition: Any) -> torch.Tensor:
        z = randn((n, self.config.z_dim), generator=generator, device=self.device)
        return self.decode(z)


# ----------------------------------------------------------------------------- ch. 3 "Exploring latent space" on faces


@dataclass
class FacesVAEConfig(ConvVAEConfig):
    dataset: str = "faces"  # the procedural CelebA-like faces (dreamlab.procedural)
    z_dim: int = 64
    kl_tolerance: float = 0.0  # a plain ELBO-style VAE here, not World Models' floored KL
    #: attributes shown in latent arithmetic: "name" (binary) or "name=value"
    arithmetic: tuple[str, ...] = ("smiling", "glasses", "hair=blonde")


@register
class FacesVAE(ConvVAE):
    """VAE on procedural 64x64 faces (book ch. 3): latent arithmetic and morphing between faces."""

    name = "vae_faces"
    config_class = FacesVAEConfig
    presets = {
        "tiny": {"width": 4, "z_dim": 4, "steps": 3, "batch_size": 8, "eval_items": 200},
        "quick": {"steps": 1500, "batch_size": 64, "lr": 1e-3, "width": 16},
        "full": {"steps": 20000, "batch_size": 128, "lr": 5e-4},
    }

    def _attribute_mask(self, data: dict[str, torch.Tensor], spec: str) -> torch.Tensor:
        from dreamlab.errors import DreamlabError
        from dreamlab.procedural import ATTRIBUTES

        attrs = ATTRIBUTES[self.config.dataset]
        name, _, value = spec.partition("=")
        if name not in attrs:
            raise DreamlabError(f"arithmetic attribute {name!r} is not one of {', '.join(attrs)}")
        values = [str(v) for v in attrs[name]]
        target = values.index(value) if value else values.index("True") if "True" in values else -1
        if target < 0:
            raise DreamlabError(f"arithmetic attribute {spec!r}: give a value, one of {name}={'|'.join(values)}")
        return data[name] == target

    def write_artifacts(self, run_dir: Path) -> list[Path]:
        from dreamlab.images import save_grid

        out = super().write_artifacts(run_dir)
        if self.config.dataset not in ("faces", "flowers", "bricks"):
            return out
        d = self.train_data("test")
        x = d["x"][:2000]
        # morphing: 4 pairs of test faces, 10 steps each
        rows = [self.interpolate(x[2 * i], x[2 * i + 1], steps=10) for i in range(4)]
        out.append(save_grid(torch.cat(rows).cpu(), Path(run_dir) / "morphing.png", nrow=10))
        # latent arithmetic: faces without the attribute, plus s * (mean z with - mean z without)
        for spec in self.config.arithmetic:
            mask = self._attribute_mask({k: v[:2000] for k, v in d.items()}, spec)
            if mask.all() or not mask.any():
                continue
            vec = self.attribute_vector(x, mask)
            base = x[~mask][:6]
            grid = self.add_attribute(base, vec, scales=(-1, 0, 1, 2, 3, 4))
            out.append(save_grid(grid.cpu(), Path(run_dir) / f"arithmetic_{spec.replace('=', '_')}.png", nrow=6))
        return out


__all__ = ["Autoencoder", "VAE", "ConvVAE", "FacesVAE", "AEConfig", "VAEConfig", "ConvVAEConfig", "FacesVAEConfig"]
