"""MuseGAN (ch. 11): four-voice Bach chorale bars from four kinds of noise, trained as a WGAN-GP.

The book's model (after Dong et al. 2018), in PyTorch:

- four latent inputs: *chords* (one z for the whole piece, shared by the tracks, varying over bars), *style* (one z,
  shared by tracks and bars), *melody* (one z per track, varying over bars) and *groove* (one z per track, the same
  in every bar);
- *temporal networks* turn the chords z and each track's melody z into one vector per bar (transposed convolutions
  over the bar axis);
- a *bar generator* per track maps [chords_bar, style, melody_bar, groove] to one bar: (16 steps, 84 pitches), by
  a dense layer then transposed convolutions that grow time (x2 x2 x2) and then pitch (x7, x12), tanh at the end;
- the *critic* is a 3-D convolutional net over (bars, steps, pitches) with the tracks as channels, no batch norm,
  trained with the gradient penalty at points between real and generated pieces. The interpolation weight is drawn
  uniformly from [0, 1] per piece (the WGAN-GP paper; the book draws it from a normal distribution) and the
  gradient norm has an epsilon under its square root.

Data (`dreamlab.music.roll_windows`): the chorales' four voices, two bars of 4/4 on a sixteenth-note grid, 84 pitches
from C1, one-hot (scaled to -1/+1 for the critic). A sample is binarised as in the book: each track plays its
likeliest pitch at each step, or rests when no output is positive. `evaluate` computes the paper's metrics with
muspy (empty bars, used pitch classes, polyphony, in-scale rate) and the tonal distance between voices, for samples
beside the train and held-out windows.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from dreamlab import music as M
from dreamlab.config import check_ranges
from dreamlab.device import rand, randn
from dreamlab.io import save_tensors
from generators.base import Generator, Metrics, TrainConfig, register

T, B, S, P = M.ROLL_TRACKS, M.ROLL_BARS, M.ROLL_STEPS, M.ROLL_PITCHES


@dataclasses.dataclass
class MuseGANConfig:
    max_pieces: int = 0        # chorales to read (whole corpus files; 0 = all); windows come from the 4-voice 4/4 ones
    z_dim: int = 32
    temporal_width: int = 1024  # channels of the temporal networks (book: 1024)
    gen_width: int = 256       # bar generator: dense 4w -> (2w, 2 steps) -> 2w, w, w, w channels (book: w = 256)
    critic_width: int = 128    # critic channels c, ..., 2c, 4c (book: 128)
    critic_dense: int = 1024   # critic's last hidden layer (book: 1024)
    n_critic: int = 5          # critic steps per generator step (book: 5)
    gp_weight: float = 10.0
    eval_samples: int = 256    # pieces generated (and real windows drawn) for the metrics

    def __post_init__(self) -> None:
        check_ranges(self, positive=("z_dim", "temporal_width", "gen_width", "critic_width", "critic_dense",
                                     "n_critic"), nonneg=("max_pieces", "eval_samples", "gp_weight"))


class TemporalNetwork(nn.Module):
    """z -> (n_bars, z): one vector per bar (book: Conv2DTranspose 1024 (2, 1), then z_dim (n_bars - 1, 1))."""

    def __init__(self, z: int, width: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.ConvTranspose2d(z, width, (2, 1)), nn.BatchNorm2d(width, momentum=0.1), nn.ReLU(),
            nn.ConvTranspose2d(width, z, (B - 1, 1)), nn.BatchNorm2d(z, momentum=0.1), nn.ReLU(),
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z[:, :, None, None])[..., 0].transpose(1, 2)  # (N, bars, z)


class BarGenerator(nn.Module):
    """[chords, style, melody, groove] (4 z) -> one bar of one track, (16 steps, 84 pitches) in [-1, 1]."""

    def __init__(self, z: int, w: int) -> None:
        super().__init__()
        self.w = w
        self.dense = nn.Sequential(nn.Linear(4 * z, 4 * w), nn.BatchNorm1d(4 * w, momentum=0.1), nn.ReLU())

        def up(cin: int, cout: int, k: tuple[int, int]) -> list[nn.Module]:
            return [nn.ConvTranspose2d(cin, cout, k, stride=k), nn.BatchNorm2d(cout, momentum=0.1), nn.ReLU()]

        self.conv = nn.Sequential(
            *up(2 * w, 2 * w, (2, 1)), *up(2 * w, w, (2, 1)), *up(w, w, (2, 1)),  # time: 2 -> 16 steps
            *up(w, w, (1, 7)),                                                    # pitch: 1 -> 7
            nn.ConvTranspose2d(w, 1, (1, 12), stride=(1, 12)), nn.Tanh(),         # pitch: 7 -> 84
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.dense(x).view(-1, 2 * self.w, 2, 1)
        return self.conv(h)[:, 0]  # (N, 16, 84)


class MuseGenerator(nn.Module):
    def __init__(self, c: MuseGANConfig) -> None:
        super().__init__()
        self.chords_net = TemporalNetwork(c.z_dim, c.temporal_width)
        self.melody_nets = nn.ModuleList(TemporalNetwork(c.z_dim, c.temporal_width) for _ in range(T))
        self.bar_gens = nn.ModuleList(BarGenerator(c.z_dim, c.gen_width) for _ in range(T))

    def forward(self, chords: torch.Tensor, style: torch.Tensor, melody: torch.Tensor,
                groove: torch.Tensor) -> torch.Tensor:
        """chords, style (N, z); melody, groove (N, tracks, z) -> (N, tracks, bars, steps, pitches) in [-1, 1]."""
        c = self.chords_net(chords)                                                   # (N, bars, z)
        m = torch.stack([net(melody[:, t]) for t, net in enumerate(self.melody_nets)], 1)  # (N, tracks, bars, z)
        tracks = []
        for t, gen in enumerate(self.bar_gens):
            bars = [gen(torch.cat([c[:, b], style, m[:, t, b], groove[:, t]], 1)) for b in range(B)]
            tracks.append(torch.stack(bars, 1))                                       # (N, bars, steps, pitches)
        return torch.stack(tracks, 1)


class Critic(nn.Module):
    """(N, tracks, bars, steps, pitches) -> a score; the book's Conv3D stack with the tracks as channels."""

    def __init__(self, c: int, dense: int) -> None:
        super().__init__()

        def conv(cin: int, cout: int, k: tuple[int, int, int], s: tuple[int, int, int],
                 p: tuple[int, int, int] = (0, 0, 0)) -> list[nn.Module]:
            return [nn.Conv3d(cin, cout, k, stride=s, padding=p), nn.LeakyReLU(0.2)]

        self.net = nn.Sequential(
            *conv(T, c, (2, 1, 1), (1, 1, 1)),            # bars 2 -> 1
            *conv(c, c, (B - 1, 1, 1), (1, 1, 1)),
            *conv(c, c, (1, 1, 12), (1, 1, 12)),          # pitches 84 -> 7
            *conv(c, c, (1, 1, 7), (1, 1, 7)),            # 7 -> 1
            *conv(c, c, (1, 2, 1), (1, 2, 1)),            # steps 16 -> 8
            *conv(c, c, (1, 2, 1), (1, 2, 1)),            # 8 -> 4
            *conv(c, 2 * c, (1, 4, 1), (1, 2, 1), (0, 1, 0)),  # 4 -> 2
            *conv(2 * c, 4 * c, (1, 3, 1), (1, 2, 1), (0, 1, 0)),  # 2 -> 1
            nn.Flatten(), nn.Linear(4 * c, dense), nn.LeakyReLU(0.2), nn.Linear(dense, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)[:, 0]


def binarize(x: torch.Tensor) -> torch.Tensor:
    """Generator output in [-1, 1] -> one-hot rolls in {0, 1}: each track's likeliest pitch per step, a rest when no
    output is above 0 (the book takes the argmax; a rest is how the data writes a silent voice)."""
    top = x.argmax(-1, keepdim=True)
    hot = torch.zeros_like(x).scatter_(-1, top, 1.0)
    return hot * (x.amax(-1, keepdim=True) > 0).float()


@register
class MuseGAN(Generator):
    """MuseGAN (ch. 11): chords/style/melody/groove noise, temporal nets, bar generators, WGAN-GP critic."""

    name = "musegan"
    config_class = MuseGANConfig
    sample_formats = (".mid", ".wav", ".png", ".safetensors")
    presets = {
        "tiny": {"max_pieces": 4, "z_dim": 8, "temporal_width": 16, "gen_width": 8, "critic_width": 8,
                 "critic_dense": 16, "n_critic": 1, "eval_samples": 4, "steps": 2, "batch_size": 8, "log_every": 1,
                 "ckpt_every": 100, "betas": (0.5, 0.9)},
        "quick": {"z_dim": 32, "temporal_width": 256, "gen_width": 64, "critic_width": 32, "critic_dense": 256,
                  "n_critic": 5, "steps": 500, "batch_size": 32, "lr": 1e-3, "betas": (0.5, 0.9), "log_every": 25,
                  "ckpt_every": 250},
        "full": {"steps": 30000, "batch_size": 64, "lr": 1e-3, "betas": (0.5, 0.9), "log_every": 100,
                 "ckpt_every": 2000, "eval_samples": 1000},
    }

    def __init__(self, config: MuseGANConfig) -> None:
        super().__init__(config)
        self.generator = MuseGenerator(config)
        self.critic = Critic(config.critic_width, config.critic_dense)

    # ---- data -----------------------------------------------------------------------------
    def windows(self, split: str) -> np.ndarray:
        return M.load_rolls(split, self.config.max_pieces)

    def train_data(self, split: str) -> dict[str, torch.Tensor]:
        """{"x": (N, 4, 2, 16, 84) int8 one-hot}: two-bar windows of the four chorale voices."""
        return {"x": torch.from_numpy(M.roll_onehot(self.windows(split)))}

    # ---- noise ----------------------------------------------------------------------------
    def noise(self, n: int, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        z, dev = self.config.z_dim, self.device
        return {"chords": randn((n, z), generator=generator, device=dev),
                "style": randn((n, z), generator=generator, device=dev),
                "melody": randn((n, T, z), generator=generator, device=dev),
                "groove": randn((n, T, z), generator=generator, device=dev)}

    # ---- training -------------------------------------------------------------------------
    def configure_optimizers(self, tc: TrainConfig) -> list[torch.optim.Optimizer]:
        betas = tuple(tc.betas)
        return [torch.optim.Adam(self.generator.parameters(), lr=tc.lr, betas=betas),
                torch.optim.Adam(self.critic.parameters(), lr=tc.lr, betas=betas)]

    def gradient_penalty(self, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
        a = rand((len(real), 1, 1, 1, 1), device=real.device)  # uniform per piece (WGAN-GP paper)
        x = (a * real + (1 - a) * fake).requires_grad_(True)
        (g,) = torch.autograd.grad(self.critic(x).sum(), x, create_graph=True)
        norm = torch.sqrt(g.pow(2).flatten(1).sum(1) + 1e-12)
        return ((norm - 1) ** 2).mean()

    def train_step(self, batch: dict[str, torch.Tensor], optimizers: list[torch.optim.Optimizer], step: int,
                   tc: TrainConfig) -> Metrics:
        g_opt, c_opt = optimizers
        real = batch["x"].float() * 2 - 1
        n = len(real)
        for _ in range(self.config.n_critic):
            with torch.no_grad():
                fake = self.generator(**self.noise(n))
            wass = self.critic(real).mean() - self.critic(fake).mean()
            gp = self.gradient_penalty(real, fake)
            c_loss = -wass + self.config.gp_weight * gp
            c_opt.zero_grad(set_to_none=True)
            c_loss.backward()
            c_opt.step()
        for p in self.critic.parameters():
            p.requires_grad_(False)
        g_loss = -self.critic(self.generator(**self.noise(n))).mean()
        g_opt.zero_grad(set_to_none=True)
        g_loss.backward()
        g_opt.step()
        for p in self.critic.parameters():
            p.requires_grad_(True)
        return {"c_loss": c_loss.detach(), "c_wass": wass.detach(), "c_gp": gp.detach(), "g_loss": g_loss.detach()}

    # ---- sampling -------------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, n: int, *, generator: torch.Generator | None = None, **_: Any) -> torch.Tensor:
        """n binary rolls (n, 4 tracks, 2 bars, 16 steps, 84 pitches) in {0, 1} (float32)."""
        was = self.training
        self.eval()
        x = binarize(self.generator(**self.noise(n, generator)))
        self.train(was)
        return x.float()

    def save_samples(self, samples: torch.Tensor, path: str | Path) -> list[Path]:
        """MIDI (one track per voice) + WAV + piano-roll PNG of rolls (or .safetensors of the raw rolls)."""
        from dreamlab.music_io import write_music

        path = Path(path)
        if path.suffix == ".safetensors":
            return [save_tensors(path, {"samples": samples})]
        pieces = [M.roll_to_piece(r) for r in samples.cpu().numpy()]
        return write_music(pieces, path, tracks_by_voice=True)

    # ---- evaluation -----------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, split: str = "test", max_items: int | None = None) -> dict[str, float]:
        """MuseGAN's metrics of `eval_samples` samples beside the same number of train windows and all `split`
        windows (up to `max_items`), and the critic's Wasserstein estimate on `split` (real minus generated)."""
        was = self.training
        self.eval()
        n = self.config.eval_samples or 64
        gen = self.sample(n, generator=torch.Generator().manual_seed(0)).cpu().numpy()
        train = self.windows("train")
        rng = np.random.default_rng(0)
        train = train[rng.choice(len(train), min(n, len(train)), replace=False)]
        held = self.windows(split)[:max_items or n]
        res: dict[str, float] = {}
        for tag, rolls in (("samples", gen), ("train", M.roll_onehot(train)), (split, M.roll_onehot(held))):
            if len(rolls):  # a tiny subset may have no 4/4 window in a split
                res.update({f"{tag}_{k}": v for k, v in M.roll_metrics(rolls).items() if v == v})
        if len(held):
            real = torch.from_numpy(M.roll_onehot(held)).float().to(self.device) * 2 - 1
            fake = self.generator(**self.noise(len(real), torch.Generator().manual_seed(1)))
            res[f"{split}_critic_wasserstein"] = float(self.critic(real).mean() - self.critic(fake).mean())
        self.train(was)
        return res

    def write_artifacts(self, run_dir: Path) -> list[Path]:
        from dreamlab.images import plot_curves
        from dreamlab.music_io import write_music
        from generators.trainer import read_metrics

        run_dir = Path(run_dir)
        files = []
        p = plot_curves(read_metrics(run_dir), ["c_wass", "c_gp", "g_loss"], run_dir / "curves.png", title="MuseGAN")
        files += [p] if p else []
        files += self.save_samples(self.sample(4, generator=torch.Generator().manual_seed(0)), run_dir / "samples.mid")
        real = self.windows("test")[:4]
        if len(real):
            files += write_music([M.roll_to_piece(r) for r in M.roll_onehot(real)], run_dir / "heldout_windows.mid",
                                 tracks_by_voice=True)
        return files
