"""The dream: M (the MDN-RNN) stepped as an environment, batched over P controller candidates x R rollouts.

Every rollout starts from a real initial state (z drawn from V's (mu, sigma) of an episode's first frame,
h = c = 0); with `start_anywhere` = f > 0 a fraction f of the rollouts starts instead from a real frame taken
anywhere in an episode (the `states` pool, every `state_stride`-th frame), still with h = c = 0: M was trained on
64-step chunks from h = 0 at such offsets, so these starts are in its training distribution, and C meets the
mid-race states (fast on a bend, off the road) its real drives reach (MBPO-style branched starts).
Each step: a = C([z, h]); (h, c) = LSTM([z, a]); the head gives r_t, P(done) and the mixture over z_{t+1}, sampled at temperature tau. Rewards accumulate until M's done probability crosses
`done_threshold`, the horizon ends or (with `lost_steps` = N > 0) M's reward has stayed below `lost_reward` N steps in a row. Frames are decoded only on request (`decode_frames`).

An ensemble (`members`: more Ms trained on the same data from other seeds) makes the dream harder to exploit:
rollout j of every candidate runs in member j mod K (member 0 is M), which draws z_{t+1}, the reward and done.
C always reads M's hidden state, stepped on the same z and actions, exactly as when it drives the real env with
M; an error of one M that C learns to exploit pays only in that member's share of the rollouts.

On CPU, a seeded `rollout` is exactly reproducible (one torch.Generator drives every draw). On CUDA the
step is captured once into a CUDA graph (static buffers, Gumbel-max component choice, no host syncs) and
replayed T times; the graph is cached per (P, R) and re-used across CMA-ES generations.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dreamlab.device import autocast, rand, randn, resolve_device
from dreamlab.errors import DreamlabError
from worlds.models import MDNRNN, WorldVAE
from worlds.policies import ACTION_DIM, ACTION_HIGH, ACTION_LOW, map_action, num_params, unflatten


def load_world_model(run_dir: str | Path, device: str | torch.device = "auto", mdn_dir: str | Path | None = None) -> tuple[WorldVAE, MDNRNN]:
    """V and M from a world-model run folder (`vae/` and `mdn/` written by the shared trainer); `mdn_dir`
    replaces M by another one (the snapshot a controller was trained with, `worlds.policies.controller_mdn`)."""
    from generators.trainer import load_run

    run_dir = Path(run_dir)
    for part, cmd in (("vae", "train-vae"), ("mdn", "train-mdn")):
        if not (run_dir / part).is_dir() and not (part == "mdn" and mdn_dir):
            raise DreamlabError(f"{run_dir} has no {part}/ folder; it is not a world-model run: train it with dreamlab worldmodel {cmd} {run_dir}")
    vae, mdn = load_run(run_dir / "vae", device=device), load_run(Path(mdn_dir) if mdn_dir else run_dir / "mdn", device=device)
    if not isinstance(vae, WorldVAE) or not isinstance(mdn, MDNRNN):
        raise DreamlabError(f"{run_dir}: vae/ must hold a wm_vae and mdn/ an mdn_rnn (found {vae.name}, {mdn.name})")
    if vae.config.z_dim != mdn.config.z_dim:
        raise DreamlabError(f"{run_dir}: V has z_dim={vae.config.z_dim} but M has z_dim={mdn.config.z_dim}; retrain M on V's latents")
    return vae, mdn


@dataclass
class DreamConfig:
    horizon: int = 1000
    temperature: float = 1.0
    done_threshold: float = 0.5
    cuda_graph: bool = True
    amp: bool = True
    steer_penalty: float = 0.0  # subtracted from M's reward per step per unit |steer| (0 = the plain dream)
    start_anywhere: float = 0.0  # fraction of rollouts that start from a real frame anywhere in an episode, not its first
    state_stride: int = 16       # the pool of such frames: every N-th frame of each encoded episode
    lost_steps: int = 0          # end a rollout once M's reward (before steer_penalty) has stayed below `lost_reward` this many steps
    lost_reward: float = 0.0     # in a row: the car is lost off the road (0 = off; see `DreamSimulator._lost`)
    # common random numbers: rollout j of every candidate draws the same M noise at every step (as it already starts
    # from the same real state), so candidates are ranked on the same dreamed luck, not each on its own
    common_noise: bool = False
    # Gaussian noise (std, in action units) added to C's action before M sees it, clipped to the action space: a
    # candidate whose dream return rests on precise action sequences that M gets wrong pays for it (C still reads
    # M's h, which saw the noisy action, as a real car's state reflects what the car did). 0 = off
    action_noise: float = 0.0


class DreamSimulator:
    """Batched dreams in M. `init_mu`/`init_logvar` (N, Z): the real initial states to draw from; `states` (mu,
    logvar), each (S, Z): real frames from anywhere in the episodes, needed when `cfg.start_anywhere` > 0."""

    def __init__(self, mdn: MDNRNN, init_mu: torch.Tensor, init_logvar: torch.Tensor, cfg: DreamConfig | None = None,
                 members: Sequence[MDNRNN] = (), states: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
        self.mdn = mdn.eval()
        self.cfg = cfg or DreamConfig()
        self.device = mdn.device
        if init_mu.ndim != 2 or init_mu.shape[1] != mdn.config.z_dim or init_logvar.shape != init_mu.shape:
            raise DreamlabError(f"initial states have shape {tuple(init_mu.shape)}, expected (N, {mdn.config.z_dim})")
        for i, m in enumerate(members, 1):
            if m.config.z_dim != mdn.config.z_dim or m.config.mixtures != mdn.config.mixtures:
                raise DreamlabError(f"ensemble member {i} has z_dim={m.config.z_dim}, mixtures={m.config.mixtures}; "
                                    f"M has {mdn.config.z_dim}, {mdn.config.mixtures}: train every member on the same latents and sizes")
        self.members = [m.eval().to(self.device) for m in members]
        self.init_mu = init_mu.float().to(self.device)
        self.init_logvar = init_logvar.float().to(self.device)  # kept so another M can dream from the same states
        self.init_std = (0.5 * self.init_logvar).exp()
        if not self.cfg.action_noise >= 0:
            raise DreamlabError(f"action_noise={self.cfg.action_noise}: it is a standard deviation, >= 0 (0 = C's actions reach M unchanged)")
        if self.cfg.lost_steps < 0:
            raise DreamlabError(f"lost_steps={self.cfg.lost_steps}: it must be >= 0 (0 = dreams do not end for a lost car)")
        f = self.cfg.start_anywhere
        if not 0.0 <= f <= 1.0:
            raise DreamlabError(f"start_anywhere={f}: it is a fraction of the rollouts, in [0, 1] (0 = every dream starts at an episode's first frame)")
        self.states: tuple[torch.Tensor, torch.Tensor] | None = None  # (mu, logvar) of anywhere-starts, kept for other Ms
        if f > 0:
            if states is None or states[0].ndim != 2 or states[0].shape[1] != mdn.config.z_dim or states[1].shape != states[0].shape \
                    or len(states[0]) == 0:
                got = "none" if states is None else f"shape {tuple(states[0].shape)}"
                raise DreamlabError(f"start_anywhere={f} needs a pool of real states of shape (S, {mdn.config.z_dim}), got {got}; "
                                    "load the dream with worlds.dream.load_dream, which reads them from the run's latents/")
            self.states = (states[0].float().to(self.device), states[1].float().to(self.device))
            self._state_std = (0.5 * self.states[1]).exp()
        self.z_dim, self.hidden = mdn.config.z_dim, mdn.config.hidden
        self.n_params = num_params(self.z_dim, self.hidden)
        self._graphs: dict[tuple[int, int], _GraphDream] = {}
        self._act_lo, self._act_hi = (torch.tensor(v, device=self.device) for v in (ACTION_LOW, ACTION_HIGH))  # made here, not in a captured step
        self._member_idx: dict[tuple[int, int], list[torch.Tensor]] = {}

    @property
    def ensemble(self) -> int:
        """Ms in the dream (1 = M alone)."""
        return 1 + len(self.members)

    # ---- shared pieces ---------------------------------------------------------------------
    def _initial(self, p: int, r: int, g: torch.Generator | None) -> torch.Tensor:
        """z0 (P*R, Z): rollout j of every candidate starts from the same real state (common random numbers)."""
        idx = torch.randint(0, len(self.init_mu), (r,), generator=g, device=self.device)
        eps = torch.randn(r, self.z_dim, generator=g, device=self.device)
        z0 = self.init_mu[idx] + self.init_std[idx] * eps
        if self.states is not None:  # extra draws only here, so dreams without start_anywhere replay exactly as before
            mu = self.states[0]
            j = torch.randint(0, len(mu), (r,), generator=g, device=self.device)
            anywhere = torch.rand(r, generator=g, device=self.device) < self.cfg.start_anywhere
            z0 = torch.where(anywhere[:, None], mu[j] + self._state_std[j] * eps, z0)
        return z0.repeat(p, 1)

    def _weights(self, thetas: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        thetas = torch.as_tensor(thetas, dtype=torch.float32, device=self.device)
        if thetas.ndim != 2 or thetas.shape[1] != self.n_params:
            raise DreamlabError(f"controller parameters have shape {tuple(thetas.shape)}, expected (P, {self.n_params})")
        if not torch.isfinite(thetas).all():
            raise DreamlabError("controller parameters contain NaN/inf; lower sigma0 or restart CMA-ES")
        w, b = unflatten(thetas, self.z_dim, self.hidden)
        return w, b[:, None, :]

    def _members_init(self, p: int, r: int) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
        """Batch rows of each extra member (rollout j of every candidate runs in member j mod K) and their zero (h, c)."""
        key = (p, r)
        if key not in self._member_idx:
            j = torch.arange(p * r, device=self.device) % r
            self._member_idx[key] = [torch.nonzero(j % self.ensemble == k).squeeze(1) for k in range(1, self.ensemble)]
        idx = self._member_idx[key]
        hs = [torch.zeros(len(i), m.config.hidden, device=self.device) for i, m in zip(idx, self.members)]
        return idx, hs, [torch.zeros_like(h) for h in hs]

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
        if self.device.type == "cuda" and self.cfg.cuda_graph and not record:
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
        ens = self._members_init(p, r) if self.members else None
        lost = torch.zeros(bsz, device=self.device) if self.cfg.lost_steps else None
        zs, acts = ([z], []) if record else (None, None)
        for _ in range(t_max):
            z, h, c, a, rew, done = self._step(z, h, c, w, b, p, r, g, ens=ens, lost=lost)
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
              g: torch.Generator | None, noise: tuple[torch.Tensor, torch.Tensor] | None = None,
              ens: tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]] | None = None,
              lost: torch.Tensor | None = None, act_eps: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        """One dream step. `ens` = (rows, h, c) of the extra members and `lost` (the `lost_steps` count), updated in place;
        `act_eps`: the graph's standard normal draws for `action_noise`, (P*R, A) or with `common_noise` (R, A) (drawn
        from `g` when None)."""
        bsz = p * r
        if self.cfg.action_noise:  # drawn before M's noise; no draw at all when the option is off
            if act_eps is None:
                act_eps = randn((r if self.cfg.common_noise else bsz, ACTION_DIM), device=self.device, generator=g)
            if self.cfg.common_noise:  # rollout j of every candidate gets the same action noise too
                act_eps = act_eps.repeat(p, 1)
        # bf16 on CUDA; the autocast weight cache is off so the step can be captured in a CUDA graph
        ctx = (torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False) if self.device.type == "cuda" and self.cfg.amp
               else autocast(self.device, False))
        with ctx:
            zh = torch.cat([z, h], 1).view(p, r, -1)
            raw = torch.baddbmm(b, zh, w).view(bsz, ACTION_DIM).float()
            a = map_action(raw)
            if self.cfg.action_noise:
                a = torch.clamp(a + self.cfg.action_noise * act_eps, self._act_lo, self._act_hi)
            h, c, out = self.mdn.step(z, a, h, c)
            if ens is not None:  # the member's head replaces M's on its rows; C keeps reading M's h
                out = out.clone()
                for k, (m, rows) in enumerate(zip(self.members, ens[0])):
                    hk, ck, ok = m.step(z[rows], a[rows], ens[1][k], ens[2][k])
                    ens[1][k].copy_(hk)
                    ens[2][k].copy_(ck)
                    out[rows] = ok.to(out.dtype)
        h, c = h.float(), c.float()
        logpi, mu, ls, rew, dlogit = self.mdn.split_head(out)
        done = (torch.sigmoid(dlogit) > self.cfg.done_threshold).float()
        if lost is not None:  # on M's own reward, before any steer penalty
            done = self._lost(lost, rew, done)
        if self.cfg.steer_penalty:
            rew = rew - self.cfg.steer_penalty * a[:, 0].abs()
        if self.cfg.common_noise:  # (R, .) draws, given (the graph's buffers) or drawn, repeated for the P candidates:
            if noise is None:      # row i*R + j is rollout j of candidate i
                noise = (rand((r, logpi.shape[1]), device=self.device, generator=g), randn((r, self.z_dim), device=self.device, generator=g))
            noise = (noise[0].repeat(p, 1), noise[1].repeat(p, 1))
        z = self.mdn.sample_mixture(logpi, mu, ls, self.cfg.temperature, g, noise)
        return z, h, c, a, rew, done

    def _lost(self, lost: torch.Tensor, rew: torch.Tensor, done: torch.Tensor) -> torch.Tensor:
        """Count (in place) the steps in a row with M's reward below `lost_reward`; a rollout ends at `lost_steps`.

        Why: from a real off-road state, dream-trained controllers that stay lost in the real env find the road again
        in M's dream (docs/worldmodels.md, "Lost cars find the road in the dream"), so leaving the road costs little
        there. M's reward head reads about -0.1 off the road (no tiles), as the env pays, so a long run of it marks a
        lost car without any pixel rule. Off in every preset: it ranked checked controllers closer to their real scores,
        but four paired searches with it scored 24 points lower on average."""
        lost.add_(1.0).mul_((rew < self.cfg.lost_reward).to(lost.dtype))
        return torch.maximum(done, (lost >= self.cfg.lost_steps).to(done.dtype))

    def fitness(self, thetas: torch.Tensor, rollouts: int, seed: int = 0, worst_frac: float = 1.0) -> torch.Tensor:
        """Dream fitness per candidate (P,): the mean return of its rollouts, or of the worst `worst_frac` of them."""
        return worst_mean(self.rollout(thetas, rollouts, seed=seed)["returns"], worst_frac)


def worst_mean(returns: torch.Tensor, frac: float = 1.0) -> torch.Tensor:
    """Mean over the last axis of its lowest ceil(frac x R) values (CVaR at level frac; frac = 1 is the plain mean).

    A risk-averse fitness: a controller that scores well only in the dreams where M's noise is kind to it ranks lower.
    """
    if not 0.0 < frac <= 1.0:
        raise DreamlabError(f"worst_frac={frac} must be in (0, 1] (1 = the mean of all rollouts)")
    if frac >= 1.0:
        return returns.mean(-1)
    k = max(1, math.ceil(frac * returns.shape[-1] - 1e-9))
    return returns.sort(-1).values[..., :k].mean(-1)


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
        rows = r if sim.cfg.common_noise else bsz  # common_noise: R rows of draws, which `_step` repeats for the P candidates
        self.u = torch.rand(rows, k, device=dev)
        self.eps = torch.randn(rows, zd, device=dev)
        self.act_eps = torch.randn(rows, ACTION_DIM, device=dev) if sim.cfg.action_noise else None
        self.ens = sim._members_init(p, r) if sim.members else None  # static member rows and (h, c) buffers
        self.lost = torch.zeros(bsz, device=dev) if sim.cfg.lost_steps else None

        def one() -> None:
            self.u.uniform_()  # in-place draws from the default CUDA generator: graph-safe (philox offsets)
            self.eps.normal_()
            if self.act_eps is not None:
                self.act_eps.normal_()
            z, h, c, _, rew, done = sim._step(self.z, self.h, self.c, self.w, self.b, p, r, None, (self.u, self.eps), self.ens, self.lost,
                                              self.act_eps)
            self.ret.add_(rew * self.alive)
            self.steps.add_(self.alive)
            self.alive.mul_(1.0 - done)
            self.z.copy_(z)
            self.h.copy_(h)
            self.c.copy_(c)

        self.one = one
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
        for t in (*self.ens[1], *self.ens[2]) if self.ens else ():
            t.zero_()
        self.alive.fill_(1.0)
        if self.lost is not None:
            self.lost.zero_()
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


def mdn_dirs(run_dir: str | Path, ensemble: int = 1) -> list[Path]:
    """Trainer run folders of the K Ms of a dream ensemble: RUN/mdn (M itself), then RUN/mdn_1 .. RUN/mdn_{K-1}."""
    return [Path(run_dir) / ("mdn" if k == 0 else f"mdn_{k}") for k in range(ensemble)]


def load_members(run_dir: str | Path, ensemble: int, device: str | torch.device = "cpu") -> list[MDNRNN]:
    """The extra Ms of a K-member ensemble: RUN/mdn_1 .. RUN/mdn_{K-1}."""
    from generators.trainer import load_run

    if ensemble < 1:
        raise DreamlabError(f"ensemble={ensemble}: the dream needs at least M itself (ensemble=1)")
    out = []
    for d in mdn_dirs(run_dir, ensemble)[1:]:
        if not (d / "model").is_dir():
            raise DreamlabError(f"ensemble={ensemble} needs {d}/model; train the members with: "
                                f"dreamlab worldmodel train-mdn {run_dir} --set mdn_ensemble={ensemble}")
        m = load_run(d, device=device)
        if not isinstance(m, MDNRNN):
            raise DreamlabError(f"{d} holds a {m.name}, not an mdn_rnn")
        out.append(m)
    return out


def load_dream(run_dir: str | Path, device: str | torch.device = "auto", cfg: DreamConfig | None = None,
               mdn_dir: str | Path | None = None, ensemble: int = 1) -> tuple[WorldVAE, MDNRNN, DreamSimulator]:
    """V, M (or the M in `mdn_dir`) and a DreamSimulator with the run's real initial states (`latents/`); with
    `ensemble` K > 1 the dream also runs in the K - 1 members RUN/mdn_1 .. (see DreamSimulator)."""
    from worlds.encode import initial_latents, state_latents

    run_dir = Path(run_dir)
    dev = resolve_device(device)
    vae, mdn = load_world_model(run_dir, dev, mdn_dir)
    members = load_members(run_dir, ensemble, dev)
    states = None
    if cfg is not None and cfg.start_anywhere > 0:
        (mu, lv), states = state_latents(run_dir / "latents", cfg.state_stride)
    else:
        mu, lv = initial_latents(run_dir / "latents")
    return vae, mdn, DreamSimulator(mdn, mu, lv, cfg, members, states)


def dream_summary(sim: DreamSimulator, theta: torch.Tensor, rollouts: int = 16, seed: int = 0) -> dict[str, Any]:
    out = sim.rollout(theta[None], rollouts, seed=seed)
    r = out["returns"][0]
    return {"dream_mean": float(r.mean()), "dream_std": float(r.std()) if rollouts > 1 else 0.0, "dream_steps": float(out["steps"].mean())}


def tiny_world_model(seed: int = 0, z_dim: int = 8, hidden: int = 16, mixtures: int = 2, n_init: int = 8) -> tuple[WorldVAE, MDNRNN, torch.Tensor, torch.Tensor]:
    """A tiny random-weight V and M with random initial states, seeded: for tests and env checks only."""
    from worlds.models import MDNRNNConfig, WorldVAEConfig

    torch.manual_seed(seed)
    vae = WorldVAE(WorldVAEConfig(z_dim=z_dim, width=4)).eval()
    mdn = MDNRNN(MDNRNNConfig(z_dim=z_dim, hidden=hidden, mixtures=mixtures)).eval()
    g = torch.Generator().manual_seed(seed + 1)
    return vae, mdn, torch.randn(n_init, z_dim, generator=g), torch.full((n_init, z_dim), -2.0)


def write_world_run(run_dir: str | Path, vae: WorldVAE, mdn: MDNRNN, init_mu: torch.Tensor, init_logvar: torch.Tensor) -> Path:
    """Write V, M and initial latents in the run-folder layout `load_dream` reads (for tests and tools)."""
    from dreamlab.io import save_json, save_tensors

    run_dir = Path(run_dir)
    vae.save_pretrained(run_dir / "vae" / "model")
    mdn.save_pretrained(run_dir / "mdn" / "model")
    entries = []
    for i in range(len(init_mu)):
        name = f"ep_{i:06d}.safetensors"
        save_tensors(run_dir / "latents" / name, {"mu": init_mu[i:i + 1].half(), "logvar": init_logvar[i:i + 1].half(),
                                                  "action": torch.zeros(0, ACTION_DIM), "reward": torch.zeros(0), "done": torch.zeros(0)})
        entries.append({"file": name, "source": "synthetic", "steps": 0})
    save_json(run_dir / "latents" / "manifest.json", {"vae": "synthetic", "z_dim": int(init_mu.shape[1]), "episodes": entries})
    return run_dir
