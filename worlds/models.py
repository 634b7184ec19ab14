"""V and M of World Models, trained by the shared trainer.

* `WorldVAE` ("wm_vae"): the paper's ConvVAE (`generators.vae.ConvVAE`) fed by a *streaming* loader over
  a rollout folder: episode files are read a few at a time into a shuffle buffer, so 10M frames are never
  in memory at once. With no `rollouts` folder it trains on a tiny cached CarRacing sample (tests, demos).
* `MDNRNN` ("mdn_rnn"): an LSTM on [z_t, a_t] whose head gives a mixture of K diagonal Gaussians over
  z_{t+1}, the reward r_t and the probability that the episode ends. Its data items are sequences
  x = [z | a] (T+1, Z+A) (mu of V's code and the action taken, fp16) plus logvar, reward, done and a mask;
  training re-samples z from (mu, logvar) every batch; `sample` generates [z | a] sequences conditioned on
  actions at temperature tau, and `log_prob` is exact.
  Held-out NLL is reported in nats per step (`test_nll_per_step`). With no `latents` folder it trains on a
  small procedural latent-dynamics set (tests).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dreamlab.config import check_ranges
from dreamlab.device import rand, randn
from dreamlab.errors import DreamlabError
from generators.base import Batch, Generator, Metrics, register
from generators.vae import ConvVAE, ConvVAEConfig
from worlds.driving import demo_rollouts
from worlds.rollouts import episode_files, load_episode, split_files

LOG2PI = math.log(2 * math.pi)

# ----------------------------------------------------------------------------- V: streaming ConvVAE


class FrameStream(torch.utils.data.IterableDataset):
    """Frames of a list of episode files, streamed: `buffer_episodes` episodes at a time are loaded,
    their frames shuffled together and yielded as uint8 (3, 64, 64) tensors under "x".

    Shuffling is seeded from torch's RNG at each pass (so a seeded trainer sees a reproducible stream);
    DataLoader workers each take a disjoint share of the files.
    """

    def __init__(self, files: list[Path], shuffle: bool = True, buffer_episodes: int = 8, max_frames: int = 0) -> None:
        super().__init__()
        if not files:
            raise DreamlabError(
                "no episode files to stream frames from; collect rollouts first: dreamlab worldmodel collect"
            )
        self.files = list(files)
        self.shuffle = shuffle
        self.buffer_episodes = max(1, buffer_episodes)
        self.max_frames = max_frames

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        files = self.files
        if info is not None:
            files = files[info.id::info.num_workers]
            seed = info.seed
        else:
            seed = int(torch.randint(0, 2**31 - 1, (1,)).item()) if self.shuffle else 0
        rng = np.random.default_rng(seed)
        order = rng.permutation(len(files)) if self.shuffle else np.arange(len(files))
        sent = 0
        for i in range(0, len(order), self.buffer_episodes):
            frames = np.concatenate([load_episode(files[j]).obs for j in order[i:i + self.buffer_episodes]])
            idx = rng.permutation(len(frames)) if self.shuffle else np.arange(len(frames))
            for k in idx:
                yield {"x": torch.from_numpy(np.ascontiguousarray(frames[k].transpose(2, 0, 1)))}
                sent += 1
                if self.max_frames and sent >= self.max_frames:
                    return


@dataclass
class WorldVAEConfig(ConvVAEConfig):
    dataset: str = "rollouts"
    rollouts: str = ""          # rollout folder (manifest.json + ep_*.npz); "" = tiny cached CarRacing sample
    val_every: int = 10         # every val_every-th episode is held out
    buffer_episodes: int = 8    # episodes mixed in the shuffle buffer
    eval_frames: int = 5000     # frames used for held-out metrics

    def __post_init__(self) -> None:
        super().__post_init__()
        check_ranges(self, positive=("val_every", "buffer_episodes", "eval_frames"))


def to_float_frames(x: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 3, 64, 64) or (B, 64, 64, 3) -> float (B, 3, 64, 64) in [0, 1]; float passes through."""
    if x.dtype == torch.uint8:
        if x.shape[-1] == 3 and x.shape[1] != 3:
            x = x.permute(0, 3, 1, 2)
        return x.float().div_(255.0)
    return x


@register
class WorldVAE(ConvVAE):
    """World Models' V: ConvVAE z=32 on 64x64 CarRacing frames, streamed from a rollout folder."""

    name = "wm_vae"
    config_class = WorldVAEConfig
    presets = {
        "tiny": {"width": 4, "z_dim": 4, "steps": 3, "batch_size": 8, "eval_frames": 64},
        "quick": {"width": 16, "steps": 400, "batch_size": 64, "lr": 1e-3, "eval_frames": 1000},
        "full": {"steps": 100_000, "batch_size": 100, "lr": 1e-4, "num_workers": 4, "eval_frames": 20_000},
    }

    def _files(self, split: str) -> list[Path]:
        folder = self.config.rollouts
        if not folder:
            folder = str(demo_rollouts())
        files = episode_files(folder)
        return split_files(files, split, self.config.val_every)

    def train_data(self, split: str) -> FrameStream:
        if split == "train":
            return FrameStream(self._files(split), shuffle=True, buffer_episodes=self.config.buffer_episodes)
        return FrameStream(self._files(split), shuffle=False, max_frames=self.config.eval_frames)

    def loss(self, batch: Batch) -> tuple[torch.Tensor, Metrics]:
        return super().loss({"x": to_float_frames(batch["x"])})

    def _codes(self, split: str = "test", max_items: int = 2000) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        xs = []
        n = 0
        for item in FrameStream(self._files(split), shuffle=False, max_frames=max_items):
            xs.append(item["x"])
            n += 1
        x = to_float_frames(torch.stack(xs))
        with torch.no_grad():
            z = torch.cat([self.encode(b.to(self.device))[0].float().cpu() for b in x.split(500)])
        return x, torch.zeros(len(x), dtype=torch.long), z

    def _shown(self, x: torch.Tensor, n: int = 16) -> torch.Tensor:
        # frames spread over the held-out episodes: the first 16 of an episode are all CarRacing's zoom-in
        return x[torch.linspace(0, len(x) - 1, min(n, len(x))).round().long()]

    @torch.no_grad()
    def encode_frames(
        self, frames: np.ndarray | torch.Tensor, batch_size: int = 1000
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(T, 64, 64, 3) uint8 frames -> (mu, logvar), each (T, Z) float32 on the CPU."""
        x = torch.as_tensor(np.asarray(frames))
        if x.ndim != 4 or x.shape[1:] != (64, 64, 3):
            raise DreamlabError(f"frames have shape {tuple(x.shape)}, expected (T, 64, 64, 3) uint8")
        mus, lvs = [], []
        for b in x.split(batch_size):
            mu, lv = self.encode(to_float_frames(b.to(self.device)))
            mus.append(mu.float().cpu())
            lvs.append(lv.float().cpu())
        return torch.cat(mus), torch.cat(lvs)


# ----------------------------------------------------------------------------- M: MDN-RNN


@dataclass
class MDNRNNConfig:
    #: options of earlier versions, now fixed (docs/experiments/m-training.md): saved configs holding these values load
    REMOVED: ClassVar[dict[str, Any]] = {"chunk_stride": 0, "self_feed": 0.0}

    dataset: str = "latents"
    latents: str = ""           # latent folder written by `encode`; "" = procedural toy dynamics (tests)
    z_dim: int = 32
    action_dim: int = 3
    hidden: int = 256
    mixtures: int = 5
    seq_len: int = 32           # training chunk length (the paper trains on whole 1000-step episodes)
    val_every: int = 10
    reward_weight: float = 1.0
    done_weight: float = 1.0
    temperature: float = 1.0    # default tau for `sample`

    def __post_init__(self) -> None:
        check_ranges(self, positive=("z_dim", "action_dim", "hidden", "mixtures", "seq_len", "val_every"),
                     nonneg=("reward_weight", "done_weight"), above_zero=("temperature",))


@register
class MDNRNN(Generator):
    """World Models' M: LSTM + mixture-density head over z_{t+1}, with reward and done heads."""

    name = "mdn_rnn"
    config_class = MDNRNNConfig
    log_prob_kind = "exact"
    sample_range = None  # latent sequences are unbounded
    presets = {
        "tiny": {"z_dim": 4, "hidden": 16, "mixtures": 2, "seq_len": 8, "steps": 3, "batch_size": 4},
        "quick": {"hidden": 128, "seq_len": 32, "steps": 600, "batch_size": 32, "lr": 1e-3, "grad_clip": 1.0},
        "full": {"hidden": 256, "seq_len": 999, "steps": 20_000, "batch_size": 100, "lr": 1e-3, "grad_clip": 1.0},
    }

    def __init__(self, config: MDNRNNConfig) -> None:
        super().__init__(config)
        z, a, h, k = config.z_dim, config.action_dim, config.hidden, config.mixtures
        if min(z, a, h, k, config.seq_len) < 1:
            raise DreamlabError(f"mdn_rnn sizes must be positive (z_dim={z}, action_dim={a}, hidden={h}, mixtures={k}, "
                                f"seq_len={config.seq_len})")
        self.rnn = nn.LSTM(z + a, h, batch_first=True)
        self.head = nn.Linear(h, k * (2 * z + 1) + 2)

    # ---- the head -------------------------------------------------------------------------
    def split_head(
        self, out: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        k, z = self.config.mixtures, self.config.z_dim
        out = out.float() if out.dtype in (torch.float16, torch.bfloat16) else out
        logpi = F.log_softmax(out[..., :k], -1)
        mu = out[..., k:k + k * z].unflatten(-1, (k, z))
        logsig = out[..., k + k * z:k + 2 * k * z].unflatten(-1, (k, z)).clamp(-7.0, 5.0)
        return logpi, mu, logsig, out[..., -2], out[..., -1]

    def step(
        self, z: torch.Tensor, a: torch.Tensor, h: torch.Tensor, c: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One LSTM step with the same weights as `self.rnn` (usable inside CUDA graphs): returns h, c, head(h)."""
        # torch.lstm_cell is what nn.LSTMCell runs: on CUDA one fused kernel for the gates after the two
        # matmuls (the dream step is launch-bound, so fewer kernels is faster)
        x = torch.cat([z, a.to(z.dtype)], -1)
        h, c = torch.lstm_cell(
            x, (h, c), self.rnn.weight_ih_l0, self.rnn.weight_hh_l0, self.rnn.bias_ih_l0, self.rnn.bias_hh_l0
        )
        return h, c, self.head(h)

    @staticmethod
    def mixture_log_prob(
        target: torch.Tensor, logpi: torch.Tensor, mu: torch.Tensor, logsig: torch.Tensor
    ) -> torch.Tensor:
        """log p(target) under the mixture, summed over z dimensions: target (..., Z) -> (...)."""
        # the per-component constants (-sum log sigma - Z/2 log 2pi) are summed over Z before joining the
        # (..., K, Z) tensor: two fewer full-size elementwise passes (the loss is memory-bound on a GPU)
        t = target.unsqueeze(-2)
        sq = ((t - mu) * torch.exp(-logsig)).square().sum(-1)
        return torch.logsumexp(logpi - 0.5 * sq - logsig.sum(-1) - 0.5 * LOG2PI * mu.shape[-1], -1)

    @staticmethod
    def sample_mixture(
        logpi: torch.Tensor,
        mu: torch.Tensor,
        logsig: torch.Tensor,
        tau: float,
        generator: torch.Generator | None = None,
        noise: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Draw z from the mixture at temperature tau (logits / tau, sigma * sqrt(tau)).

        Component choice uses the Gumbel-max trick (no host sync, CUDA-graph safe). `noise` = (uniform (B, K),
        normal (B, Z)) may be passed in (static buffers for CUDA graphs)."""
        b, k, zd = mu.shape
        if noise is None:
            u = rand((b, k), device=mu.device, generator=generator)
            eps = randn((b, zd), device=mu.device, generator=generator)
        else:
            u, eps = noise
        tau = max(float(tau), 1e-6)
        gumbel = -torch.log(-torch.log(u.clamp(1e-20, 1.0 - 1e-7)))
        idx = torch.argmax(logpi / tau + gumbel, -1)
        sel = idx[:, None, None].expand(b, 1, zd)
        m = mu.gather(1, sel).squeeze(1)
        s = logsig.gather(1, sel).squeeze(1).exp()
        return m + s * math.sqrt(tau) * eps

    # ---- data -----------------------------------------------------------------------------
    def train_data(self, split: str) -> dict[str, torch.Tensor]:
        cfg = self.config
        if not cfg.latents:
            return toy_latent_sequences(cfg.z_dim, cfg.action_dim, cfg.seq_len, n=64 if split == "train" else 16,
                                        seed={"train": 0, "val": 1, "test": 2}.get(split, 3))
        from worlds.encode import latent_files, load_latents

        files = split_files(latent_files(cfg.latents), split, cfg.val_every)
        return chunk_sequences([load_latents(f) for f in files], cfg.seq_len, cfg.z_dim, cfg.action_dim,
                               where=cfg.latents)

    # ---- training -------------------------------------------------------------------------
    def forward_sequence(self, z: torch.Tensor, action: torch.Tensor, state: Any = None) -> tuple[tuple, Any]:
        out, state = self.rnn(torch.cat([z, action.to(z.dtype)], -1), state)
        return self.split_head(self.head(out)), state

    def _terms(self, batch: Batch, sample_z: bool = True) -> dict[str, torch.Tensor]:
        dt, zd = self.head.weight.dtype, self.config.z_dim
        x = batch["x"].to(dt)
        mu, action, logvar = x[..., :zd], x[:, :-1, zd:], batch["logvar"].to(dt)
        z = mu + torch.randn_like(mu) * (0.5 * logvar).exp() if sample_z else mu
        mask = batch["mask"].to(dt)
        (logpi, m, ls, r_hat, d_logit), _ = self.forward_sequence(z[:, :-1], action)
        logp = self.mixture_log_prob(z[:, 1:], logpi, m, ls)
        n = mask.sum().clamp(min=1.0)
        nll = -(logp * mask).sum() / n
        r_mse = (((r_hat - batch["reward"].to(dt)) ** 2) * mask).sum() / n
        done = batch["done"].to(dt)
        d_bce = (F.binary_cross_entropy_with_logits(d_logit, done, reduction="none") * mask).sum() / n
        return {"nll": nll, "reward_mse": r_mse, "done_bce": d_bce}

    def loss(self, batch: Batch) -> tuple[torch.Tensor, Metrics]:
        t = self._terms(batch)
        cfg = self.config
        loss = t["nll"] / cfg.z_dim + cfg.reward_weight * t["reward_mse"] + cfg.done_weight * t["done_bce"]
        nll = t["nll"].detach()  # metrics stay on the device: no host sync per step (the trainer averages them)
        return loss, {"nll_per_step": nll, "nll_per_dim": nll / cfg.z_dim,
                      "reward_mse": t["reward_mse"].detach(), "done_bce": t["done_bce"].detach()}

    @torch.no_grad()
    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """Exact log-density (nats) of the latents of sequences x = [z | a] (B, T+1, Z+A) given their actions
        (a_t in row t; the last row's action is padding), starting from h = 0."""
        zd, ad = self.config.z_dim, self.config.action_dim
        x = x.to(self.device).float()
        if x.ndim != 3 or x.shape[-1] != zd + ad:
            raise DreamlabError(
                f"mdn_rnn.log_prob takes [z | a] sequences of shape (B, T+1, {zd + ad}), got {tuple(x.shape)}"
            )
        (logpi, m, ls, _, _), _ = self.forward_sequence(x[:, :-1, :zd], x[:, :-1, zd:])
        return self.mixture_log_prob(x[:, 1:, :zd], logpi, m, ls).sum(1)

    # ---- sampling -------------------------------------------------------------------------
    @torch.no_grad()
    def sample(
        self,
        n: int,
        *,
        generator: torch.Generator | None = None,
        actions: torch.Tensor | None = None,
        z0: torch.Tensor | None = None,
        steps: int = 16,
        temperature: float | None = None,
        **condition: Any,
    ) -> torch.Tensor:
        """Sequences [z | a] (n, T+1, Z+A): latents conditioned on actions (n, T, A) (default: random
        CarRacing-like actions, appended with a zero last row), from z0 (n, Z) (default N(0, I)), at temperature tau."""
        cfg, dev = self.config, self.device
        tau = cfg.temperature if temperature is None else temperature
        if actions is None:
            a = rand((n, steps, cfg.action_dim), device=dev, generator=generator)
            actions = torch.cat([a[..., :1] * 2 - 1, a[..., 1:]], -1) if cfg.action_dim >= 2 else a * 2 - 1
        actions = actions.to(dev).float()
        if actions.ndim != 3 or actions.shape[0] != n or actions.shape[2] != cfg.action_dim:
            raise DreamlabError(f"actions have shape {tuple(actions.shape)}, expected ({n}, T, {cfg.action_dim})")
        z = z0.to(dev).float() if z0 is not None else randn((n, cfg.z_dim), device=dev, generator=generator)
        h = torch.zeros(n, cfg.hidden, device=dev)
        c = torch.zeros_like(h)
        out = [z]
        for t in range(actions.shape[1]):
            h, c, o = self.step(z, actions[:, t], h, c)
            logpi, m, ls, _, _ = self.split_head(o)
            z = self.sample_mixture(logpi, m, ls, tau, generator)
            out.append(z)
        return torch.cat([torch.stack(out, 1), F.pad(actions, (0, 0, 0, 1))], -1)

    def write_artifacts(self, run_dir: Path) -> list[Path]:
        from dreamlab.images import plot_curves
        from generators.trainer import read_metrics

        rows = read_metrics(run_dir)
        p = plot_curves(
            rows, ["loss", "nll_per_step", "reward_mse", "done_bce"], Path(run_dir) / "loss_curves.png", title=self.name
        )
        return [p] if p else []


def chunk_sequences(eps: list[dict[str, torch.Tensor]], seq_len: int, z_dim: int, action_dim: int,
                    where: str = "") -> dict[str, torch.Tensor]:
    """Cut episodes into consecutive chunks of seq_len transitions (seq_len + 1 latents), padding the last chunk of
    an episode with mask 0."""
    mus, lvs, acts, rews, dones, masks = [], [], [], [], [], []
    for e in eps:
        if e["mu"].shape[-1] != z_dim:
            raise DreamlabError(f"latents in {where} have z_dim {e['mu'].shape[-1]}, but the model has z_dim={z_dim}: "
                                "set z_dim to match the VAE or re-encode")
        if e["action"].shape[-1] != action_dim:
            raise DreamlabError(
                f"actions in {where} have {e['action'].shape[-1]} dims, expected action_dim={action_dim}"
            )
        t = len(e["action"])
        for s in range(0, t, seq_len):
            L = min(seq_len, t - s)
            pad = seq_len - L

            def p(x: torch.Tensor, pad: int = pad) -> torch.Tensor:
                return F.pad(x, (0, 0) * (x.ndim - 1) + (0, pad)) if pad else x

            mus.append(p(e["mu"][s:s + L + 1]))
            lvs.append(p(e["logvar"][s:s + L + 1]))
            acts.append(p(e["action"][s:s + L]))
            rews.append(p(e["reward"][s:s + L]))
            dones.append(p(e["done"][s:s + L].float()))
            masks.append(p(torch.ones(L)))
    if not mus:
        raise DreamlabError(f"no latent sequences found in {where}; run encode first: dreamlab worldmodel encode")
    mu, act = torch.stack(mus), torch.stack(acts)
    return {"x": torch.cat([mu, F.pad(act, (0, 0, 0, 1))], -1).half(), "logvar": torch.stack(lvs).half(),
            "reward": torch.stack(rews).float(), "done": torch.stack(dones).float(), "mask": torch.stack(masks).float()}


def toy_latent_sequences(z_dim: int, action_dim: int, seq_len: int, n: int, seed: int) -> dict[str, torch.Tensor]:
    """Procedural latent dynamics for tests: z rotates, is pushed by the action, reward = -|z|^2 / Z."""
    g = torch.Generator().manual_seed(seed)
    rot = torch.linalg.qr(torch.randn(z_dim, z_dim, generator=torch.Generator().manual_seed(99)))[0]
    push = torch.randn(action_dim, z_dim, generator=torch.Generator().manual_seed(98)) * 0.3
    z = torch.randn(n, z_dim, generator=g)
    a = torch.rand(n, seq_len, action_dim, generator=g) * 2 - 1
    zs, rs = [z], []
    for t in range(seq_len):
        z = 0.9 * z @ rot + a[:, t] @ push + 0.05 * torch.randn(n, z_dim, generator=g)
        zs.append(z)
        rs.append(-(z ** 2).mean(-1))
    mu = torch.stack(zs, 1)
    done = torch.zeros(n, seq_len)
    done[:, -1] = (torch.rand(n, generator=g) < 0.5).float()
    return {"x": torch.cat([mu, F.pad(a, (0, 0, 0, 1))], -1).half(), "logvar": torch.full_like(mu, -6.0).half(),
            "reward": torch.stack(rs, 1), "done": done, "mask": torch.ones(n, seq_len)}


__all__ = ["WorldVAE", "WorldVAEConfig", "MDNRNN", "MDNRNNConfig", "FrameStream", "chunk_sequences", "to_float_frames"]
