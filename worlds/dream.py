"""The dream: M (the MDN-RNN) stepped as an environment, batched over P controller candidates x R rollouts.

Every rollout starts from a real initial state (z drawn from V's (mu, sigma) of an episode's first frame,
h = c = 0). Each step is the paper's:

    a = C([z, h]);  (h, c) = LSTM([z, a]);  the head gives r_t, P(done) and the mixture over z_{t+1},
    sampled at temperature tau.

Rewards accumulate until M's done probability crosses `DONE_THRESHOLD` or the horizon ends. Frames are decoded
only on request (`decode_frames`).

On CPU, a seeded `rollout` is exactly reproducible (one torch.Generator drives every draw). On CUDA the
step is captured once into a CUDA graph (static buffers, Gumbel-max component choice, no host syncs) and
replayed T times; the graph is cached per (P, R) and re-used across CMA-ES generations.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import torch

from dreamlab.config import check_ranges
from dreamlab.device import resolve_device
from dreamlab.errors import DreamlabError
from dreamlab.io import check_finite_weights, save_json, save_tensors
from generators.trainer import load_run
from worlds.encode import initial_latents
from worlds.models import MDNRNN, MDNRNNConfig, WorldVAE, WorldVAEConfig
from worlds.policies import ACTION_DIM, map_action, num_params, unflatten

DONE_THRESHOLD = 0.5  # a dream ends when M's P(done) exceeds this


@dataclass
class DreamConfig:
    """The dream C is trained in (the `dream` stage of a world-model run)."""

    temperature: float = 1.15  # tau: M's mixture is sampled at logits / tau, sigma * sqrt(tau); the paper's dreams used
                               # tau > 1, so that C cannot rely on M's most likely (and most exploitable) futures
    horizon: int = 1000        # steps of each dream rollout, and of each real-env check of a dream-trained controller

    def __post_init__(self) -> None:
        check_ranges(self, positive=("horizon",))
        if not self.temperature > 0:
            raise DreamlabError(f"temperature={self.temperature} must be > 0")


def load_world_model(run_dir: str | Path, device: str | torch.device = "auto",
                     mdn_dir: str | Path | None = None) -> tuple[WorldVAE, MDNRNN]:
    """V and M from a world-model run folder (`vae/` and `mdn/` written by the shared trainer); `mdn_dir`
    replaces M by another one (the snapshot a controller was trained with, `worlds.policies.controller_mdn`)."""
    run_dir = Path(run_dir)
    for part, cmd in (("vae", "train-vae"), ("mdn", "train-mdn")):
        if not (run_dir / part).is_dir() and not (part == "mdn" and mdn_dir):
            raise DreamlabError(f"{run_dir} has no {part}/ folder; it is not a world-model run: "
                                f"train it with dreamlab worldmodel {cmd} {run_dir}")
    vae = load_run(run_dir / "vae", device=device)
    mdn = load_run(Path(mdn_dir) if mdn_dir else run_dir / "mdn", device=device)
    for model, d in ((vae, run_dir / "vae"), (mdn, Path(mdn_dir) if mdn_dir else run_dir / "mdn")):
        check_finite_weights(model, next((p for p in (d / "model" / "model.safetensors", d / "model.safetensors")
                                          if p.is_file()), d / "checkpoint" / "model.safetensors"))
    if not isinstance(vae, WorldVAE) or not isinstance(mdn, MDNRNN):
        raise DreamlabError(f"{run_dir}: vae/ must hold a wm_vae and mdn/ an mdn_rnn (found {vae.name}, {mdn.name})")
    if vae.config.z_dim != mdn.config.z_dim:
        raise DreamlabError(f"{run_dir}: V has z_dim={vae.config.z_dim} but M has z_dim={mdn.config.z_dim}; "
                            "retrain M on V's latents")
    return vae, mdn


class DreamSimulator:
    """Batched dreams in M from the real initial states `init_mu`/`init_logvar` (N, Z).

    `cuda_graph` and `amp` (bf16 autocast) apply on CUDA only; the benchmark turns them off to measure them."""

    def __init__(self, mdn: MDNRNN, init_mu: torch.Tensor, init_logvar: torch.Tensor, cfg: DreamConfig | None = None,
                 *, cuda_graph: bool = True, amp: bool = True) -> None:
        self.mdn = mdn.eval()
        self.cfg = cfg or DreamConfig()
        self.device = mdn.device
        self.cuda_graph, self.amp = cuda_graph, amp
        if init_mu.ndim != 2 or init_mu.shape[1] != mdn.config.z_dim or init_logvar.shape != init_mu.shape:
            raise DreamlabError(f"initial states have shape {tuple(init_mu.shape)}, expected (N, {mdn.config.z_dim})")
        self.init_mu = init_mu.float().to(self.device)
        self.init_std = (0.5 * init_logvar.float().to(self.device)).exp()
        self.z_dim, self.hidden = mdn.config.z_dim, mdn.config.hidden
        self.n_params = num_params(self.z_dim, self.hidden)
        self._graphs: dict[tuple[int, int], _GraphDream] = {}

    # ---- shared pieces ---------------------------------------------------------------------
    def _initial(self, p: int, r: int, g: torch.Generator | None) -> torch.Tensor:
        """z0 (P*R, Z): rollout j of every candidate starts from the same real state (common random numbers)."""
        idx = torch.randint(0, len(self.init_mu), (r,), generator=g, device=self.device)
        eps = torch.randn(r, self.z_dim, generator=g, device=self.device)
        return (self.init_mu[idx] + self.init_std[idx] * eps).repeat(p, 1)

    def _weights(self, thetas: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        thetas = torch.as_tensor(thetas, dtype=torch.float32, device=self.device)
        if thetas.ndim != 2 or thetas.shape[1] != self.n_params:
            raise DreamlabError(
                f"controller parameters have shape {tuple(thetas.shape)}, expected (P, {self.n_params})"
            )
        if not torch.isfinite(thetas).all():
            raise DreamlabError("controller parameters contain NaN/inf; lower sigma0 or restart CMA-ES")
        w, b = unflatten(thetas, self.z_dim, self.hidden)
        return w, b[:, None, :]

    # ---- rollouts ----------------------------------------------------------------------------
    @torch.no_grad()
    def rollout(self, thetas: torch.Tensor, rollouts: int, *, seed: int = 0, horizon: int | None = None,
                record: bool = False) -> dict[str, torch.Tensor]:
        """Dream `rollouts` episodes for each of the P controllers in `thetas` (P, n_params).

        Returns returns (P, R), steps (P, R), and with `record` the latents z (T+1, P*R, Z) and actions (T, P*R, A).
        """
        w, b = self._weights(thetas)
        p, r, t_max = w.shape[0], int(rollouts), int(horizon or self.cfg.horizon)
        if r < 1 or t_max < 1:
            raise DreamlabError(f"rollouts={r} and horizon={t_max} must be at least 1")
        if self.device.type == "cuda" and self.cuda_graph and not record:
            key = (p, r)
            if key not in self._graphs:
                self._graphs[key] = _GraphDream(self, p, r)
            return self._graphs[key].run(w, b, seed, t_max)
        g = torch.Generator(device=self.device).manual_seed(int(seed))
        bsz = p * r
        z = self._initial(p, r, g)
        h = torch.zeros(bsz, self.hidden, device=self.device)
        c = torch.zeros_like(h)
        alive = torch.ones(bsz, device=self.device)
        ret = torch.zeros(bsz, device=self.device)
        steps = torch.zeros(bsz, device=self.device)
        zs, acts = ([z], []) if record else (None, None)
        for _ in range(t_max):
            z, h, c, a, rew, done = self._step(z, h, c, w, b, p, r, g)
            ret += rew * alive
            steps += alive
            alive = alive * (1.0 - done)
            if record:
                zs.append(z)
                acts.append(a)
            elif not bool(alive.any()):
                break
        out = {"returns": ret.view(p, r), "steps": steps.view(p, r)}
        if record:
            out["z"] = torch.stack(zs)
            out["actions"] = torch.stack(acts)
        return out

    def _step(self, z: torch.Tensor, h: torch.Tensor, c: torch.Tensor, w: torch.Tensor, b: torch.Tensor, p: int, r: int,
              g: torch.Generator | None, noise: tuple[torch.Tensor, torch.Tensor] | None = None
              ) -> tuple[torch.Tensor, ...]:
        """One dream step of all P x R rollouts. `noise`: the CUDA graph's static draws (drawn from `g` when None)."""
        # bf16 on CUDA; the autocast weight cache is off so the step can be captured in a CUDA graph
        ctx = (torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False)
               if self.device.type == "cuda" and self.amp else contextlib.nullcontext())
        with ctx:
            zh = torch.cat([z, h], 1).view(p, r, -1)
            a = map_action(torch.baddbmm(b, zh, w).view(p * r, ACTION_DIM).float())
            h, c, out = self.mdn.step(z, a, h, c)
        h, c = h.float(), c.float()
        logpi, mu, ls, rew, dlogit = self.mdn.split_head(out)
        done = (torch.sigmoid(dlogit) > DONE_THRESHOLD).float()
        z = self.mdn.sample_mixture(logpi, mu, ls, self.cfg.temperature, g, noise)
        return z, h, c, a, rew, done

    def fitness(self, thetas: torch.Tensor, rollouts: int, seed: int = 0) -> torch.Tensor:
        """Dream fitness per candidate (P,): the mean return of its rollouts."""
        return self.rollout(thetas, rollouts, seed=seed)["returns"].mean(-1)


class _GraphDream:
    """One dream step captured as a CUDA graph over static buffers; replayed `horizon` times."""

    def __init__(self, sim: DreamSimulator, p: int, r: int) -> None:
        dev, bsz = sim.device, p * r
        self.sim, self.p, self.r = sim, p, r
        k, zd = sim.mdn.config.mixtures, sim.z_dim
        self.w = torch.zeros(p, zd + sim.hidden, ACTION_DIM, device=dev)
        self.b = torch.zeros(p, 1, ACTION_DIM, device=dev)
        self.z = torch.zeros(bsz, zd, device=dev)
        self.h = torch.zeros(bsz, sim.hidden, device=dev)
        self.c = torch.zeros_like(self.h)
        self.alive = torch.ones(bsz, device=dev)
        self.ret = torch.zeros(bsz, device=dev)
        self.steps = torch.zeros(bsz, device=dev)
        self.u = torch.rand(bsz, k, device=dev)
        self.eps = torch.randn(bsz, zd, device=dev)

        def one() -> None:
            self.u.uniform_()  # in-place draws from the default CUDA generator: graph-safe (philox offsets)
            self.eps.normal_()
            z, h, c, _, rew, done = sim._step(self.z, self.h, self.c, self.w, self.b, p, r, None, (self.u, self.eps))
            self.ret.add_(rew * self.alive)
            self.steps.add_(self.alive)
            self.alive.mul_(1.0 - done)
            self.z.copy_(z)
            self.h.copy_(h)
            self.c.copy_(c)

        with torch.no_grad():
            s = torch.cuda.Stream(device=dev)
            s.wait_stream(torch.cuda.current_stream(dev))
            with torch.cuda.stream(s):
                for _ in range(3):
                    one()
            torch.cuda.current_stream(dev).wait_stream(s)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                one()

    @torch.no_grad()
    def run(self, w: torch.Tensor, b: torch.Tensor, seed: int, horizon: int) -> dict[str, torch.Tensor]:
        torch.cuda.manual_seed(int(seed))
        g = torch.Generator(device=self.sim.device).manual_seed(int(seed))
        self.w.copy_(w)
        self.b.copy_(b)
        self.z.copy_(self.sim._initial(self.p, self.r, g))
        self.h.zero_()
        self.c.zero_()
        self.alive.fill_(1.0)
        self.ret.zero_()
        self.steps.zero_()
        for _ in range(horizon):
            self.graph.replay()
        return {"returns": self.ret.view(self.p, self.r).clone(), "steps": self.steps.view(self.p, self.r).clone()}


@torch.no_grad()
def decode_frames(vae: WorldVAE, z: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Decode latents (T, Z) to uint8 frames (T, 64, 64, 3), on request only."""
    outs = []
    for zb in z.to(vae.device).float().split(batch_size):
        x = vae.decode(zb).clamp(0, 1)
        outs.append((x * 255 + 0.5).to(torch.uint8).permute(0, 2, 3, 1).cpu())
    return torch.cat(outs)


def load_dream(run_dir: str | Path, device: str | torch.device = "auto", cfg: DreamConfig | None = None,
               mdn_dir: str | Path | None = None) -> tuple[WorldVAE, MDNRNN, DreamSimulator]:
    """V, M (or the M in `mdn_dir`) and a DreamSimulator with the run's real initial states (`latents/`)."""
    run_dir = Path(run_dir)
    vae, mdn = load_world_model(run_dir, resolve_device(device), mdn_dir)
    mu, lv = initial_latents(run_dir / "latents")
    return vae, mdn, DreamSimulator(mdn, mu, lv, cfg)


def tiny_world_model(seed: int = 0, z_dim: int = 8, hidden: int = 16, mixtures: int = 2,
                     n_init: int = 8) -> tuple[WorldVAE, MDNRNN, torch.Tensor, torch.Tensor]:
    """A tiny random-weight V and M with random initial states, seeded: for tests and env checks only."""
    torch.manual_seed(seed)
    vae = WorldVAE(WorldVAEConfig(z_dim=z_dim, width=4)).eval()
    mdn = MDNRNN(MDNRNNConfig(z_dim=z_dim, hidden=hidden, mixtures=mixtures)).eval()
    g = torch.Generator().manual_seed(seed + 1)
    return vae, mdn, torch.randn(n_init, z_dim, generator=g), torch.full((n_init, z_dim), -2.0)


def write_world_run(run_dir: str | Path, vae: WorldVAE, mdn: MDNRNN, init_mu: torch.Tensor,
                    init_logvar: torch.Tensor) -> Path:
    """Write V, M and initial latents in the run-folder layout `load_dream` reads (for tests and tools)."""
    run_dir = Path(run_dir)
    vae.save_pretrained(run_dir / "vae" / "model")
    mdn.save_pretrained(run_dir / "mdn" / "model")
    entries = []
    for i in range(len(init_mu)):
        name = f"ep_{i:06d}.safetensors"
        save_tensors(run_dir / "latents" / name, {"mu": init_mu[i:i + 1].half(), "logvar": init_logvar[i:i + 1].half(),
                                                  "action": torch.zeros(0, ACTION_DIM), "reward": torch.zeros(0),
                                                  "done": torch.zeros(0)})
        entries.append({"file": name, "source": "synthetic", "steps": 0})
    save_json(run_dir / "latents" / "manifest.json",
              {"vae": "synthetic", "z_dim": int(init_mu.shape[1]), "episodes": entries})
    return run_dir
