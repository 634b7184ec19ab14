"""Driving one episode: the env, the exploration policies that need no model, and the episode loop.

Policies (`policy_kind` says which one drives episode i of a mix):
  brownian           a_{t+1} = clip(a_t + N(0, sigma^2)), the usual CarRacing exploration noise
  pursuit            a noisy track follower (CarRacing only; it reads the track's centre line, privileged
                     information the agent never gets): random target speed, look-ahead and gain per episode,
                     correlated steering noise and bursts of random actions, so the data show driving along
                     the road at speed, skids, leaving the road and coming back, with tile rewards all along
The policies that act through a V and M (the paper's random controllers, a trained C) are in `worlds.collect`.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from dreamlab.errors import DreamlabError
from dreamlab.io import cache_dir
from worlds.rollouts import Episode, episode_name, preprocess_frame, read_manifest, save_episode, write_manifest


def episode_seed(seed: int, index: int) -> int:
    return int(np.random.SeedSequence([seed, index]).generate_state(1)[0])


def make_env(env_id: str, max_steps: int = 0) -> Any:
    """gymnasium.make, with errors that say the fix. dreamlab's own ids (dreamlab/...) are registered by the envs
    package, a layer above this one: its callers import it (or pass `envs.register_all` to `collect` as `env_setup`)."""
    os.environ.setdefault("SDL_VIDEODRIVER", "dummy")
    try:
        import gymnasium as gym
    except ImportError as e:
        raise DreamlabError(
            "collecting rollouts needs gymnasium; install it with: pip install 'gymnasium[box2d]'"
        ) from e
    if env_id.startswith("dreamlab/") and env_id not in gym.registry:
        raise DreamlabError(f"env id {env_id!r} is not registered in this process: `import envs` first (it registers "
                            "the dreamlab/ ids), or use gymnasium's own CarRacing-v3")
    kwargs = {"max_episode_steps": max_steps} if max_steps > 0 else {}
    try:
        return gym.make(env_id, **kwargs)
    except gym.error.Error as e:
        raise DreamlabError(f"env id {env_id!r} cannot be made ({e}); use e.g. --env-id CarRacing-v3") from e


# ----------------------------------------------------------------------------- policies


class BrownianPolicy:
    """Random walks for steer, gas and a latent brake in [-1, 1] (brake = max(0, latent)), so the car is
    off the brake about half the time and the data include high speeds, skids and grass, not only crawling."""

    def __init__(self, rng: np.random.Generator, sigma: float) -> None:
        self.rng, self.sigma = rng, sigma
        self.a = np.array([0.0, rng.uniform(0.3, 1.0), -0.5], np.float32)

    def reset(self) -> None:
        pass

    def __call__(self, frame: np.ndarray) -> np.ndarray:
        a = self.a.copy()
        a[2] = max(0.0, a[2])
        self.a = np.clip(
            self.a + self.rng.normal(0, self.sigma, 3).astype(np.float32), [-1.0, 0.0, -1.0], [1.0, 1.0, 1.0]
        ).astype(np.float32)
        return a


class PursuitPolicy:
    """Pure pursuit on CarRacing's track centre line, made deliberately imperfect.

    Per episode: target speed, look-ahead (tiles) and steering gain are drawn at random; each step adds
    autocorrelated steering noise, and with probability `burst_p` a burst of 5-30 uniformly random actions
    starts. The car therefore drives the road at many speeds, runs wide in corners, leaves the road and finds
    it again: the states a controller trained in the dream will visit. It needs the env (`bind`), since it
    reads `env.unwrapped.track` and the car's pose.
    """

    def __init__(self, rng: np.random.Generator, burst_p: float = 0.01) -> None:
        self.rng, self.burst_p = rng, burst_p
        self.speed = float(rng.uniform(25.0, 90.0))
        self.look = int(rng.integers(3, 11))
        self.gain = float(rng.uniform(1.0, 3.0))
        self.noise = float(rng.uniform(0.0, 0.3))
        self.env: Any = None
        self.eps, self.burst = 0.0, 0
        self.burst_a = np.zeros(3, np.float32)

    def bind(self, env: Any) -> None:
        u = env.unwrapped
        if not hasattr(u, "track") or not hasattr(u, "car"):
            raise DreamlabError(f"policy 'pursuit' follows a CarRacing track, but {u.__class__.__name__} has none; "
                                "use --policy brownian or random_controller for other envs")
        self.env = u
        self.centre = np.asarray([(t[2], t[3]) for t in u.track], np.float64)

    def reset(self) -> None:
        self.eps, self.burst = 0.0, 0

    def __call__(self, frame: np.ndarray) -> np.ndarray:
        if self.env is None:
            raise DreamlabError("PursuitPolicy.bind(env) must be called after env.reset()")
        if self.burst > 0:
            self.burst -= 1
            return self.burst_a.copy()
        if self.rng.random() < self.burst_p:
            self.burst = int(self.rng.integers(5, 31))
            self.burst_a = np.array(
                [self.rng.uniform(-1, 1), self.rng.uniform(0, 1), max(0.0, self.rng.uniform(-1, 1))], np.float32
            )
        hull = self.env.car.hull
        x, y = hull.position
        i = int(np.argmin(((self.centre - (x, y)) ** 2).sum(1)))
        tx, ty = self.centre[(i + self.look) % len(self.centre)]
        # the car's forward axis is its local +y, i.e. at angle hull.angle + pi/2; positive steer turns clockwise
        err = (math.atan2(ty - y, tx - x) - hull.angle - math.pi / 2 + math.pi) % (2 * math.pi) - math.pi
        self.eps = 0.9 * self.eps + float(self.rng.normal(0.0, self.noise))
        v = float(np.hypot(*hull.linearVelocity))
        steer = float(np.clip(-self.gain * err + self.eps, -1.0, 1.0))
        return np.array([steer, 0.5 if v < self.speed else 0.0, 0.3 if v > 1.2 * self.speed else 0.0], np.float32)


# ----------------------------------------------------------------------------- one episode


def run_episode(env: Any, policy: Any, seed: int, frame_size: int = 64, on_steps: Any = None) -> Episode:
    obs, _ = env.reset(seed=seed)
    policy.reset()
    if hasattr(policy, "bind"):
        policy.bind(env)
    frames = [preprocess_frame(obs, frame_size)]
    acts, rews, terms, truncs = [], [], [], []
    n_report = 0
    while True:
        a = np.asarray(policy(frames[-1]), np.float32)
        obs, r, term, trunc, _ = env.step(a)
        frames.append(preprocess_frame(obs, frame_size))
        acts.append(a)
        rews.append(r)
        terms.append(term)
        truncs.append(trunc)
        n_report += 1
        if on_steps is not None and n_report >= 50:
            on_steps(n_report)
            n_report = 0
        if term or trunc:
            break
    if on_steps is not None and n_report:
        on_steps(n_report)
    return Episode(
        np.stack(frames),
        np.stack(acts),
        np.asarray(rews, np.float32),
        np.asarray(terms, bool),
        np.asarray(truncs, bool),
    )


def policy_kind(policy: str, index: int) -> str:
    """The policy that drives episode `index` (the mixes alternate by episode index)."""
    if policy == "mixed":
        return ("brownian", "random_controller")[index % 2]
    if policy == "explore":
        return ("brownian", "random_controller", "pursuit")[index % 3]
    return policy


def demo_rollouts() -> Path:
    """A tiny cached CarRacing sample (4 brownian episodes x 40 steps, seed 0) for tests and demos: what
    `wm_vae` trains on when no rollout folder is given."""
    out = cache_dir() / "wm_demo_rollouts_v1"
    manifest = read_manifest(out, must_exist=False)
    if len(manifest["episodes"]) >= 4:
        return out
    env = make_env("CarRacing-v3", 40)
    entries = []
    for idx in range(4):
        seed = episode_seed(0, idx)
        ep = run_episode(env, BrownianPolicy(np.random.default_rng(seed), 0.25), seed)
        save_episode(out / episode_name(idx), ep)
        entries.append({"index": idx, "file": episode_name(idx), "steps": ep.steps, "return": ep.ret,
                        "terminated": bool(ep.terminated[-1]), "seed": seed, "policy": "brownian"})
    env.close()
    write_manifest(out, {"version": 1, "config": {"env_id": "CarRacing-v3", "frame_size": 64, "policy": "brownian",
                                                  "episodes": 4, "max_steps": 40, "seed": 0}, "episodes": entries})
    return out
