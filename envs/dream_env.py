"""The dream as a gymnasium env: CarRacing as imagined by a trained world model (V + M).

    env = DreamEnv(run_dir="runs/worldmodel-quick")            # a trained world model
    env = gymnasium.make("dreamlab/Dream-v0", run_dir=...)     # the same, through the registry
    env = DreamEnv()                                           # tiny random-weight model: tests only

Observation: the controller's features [z, h] (float32 vector, default) or, with `obs="image"`, V's decoding
of z as a 64x64x3 uint8 frame. Actions: CarRacing's continuous Box([-1, 0, 0], [1, 1, 1]). Reward and
termination come from M's heads (done when P(done) > done_threshold); the episode is truncated after
`max_steps`. Everything random (the initial real state, the mixture draws) comes from the env's seeded
generator, so `reset(seed=s)` makes an episode reproducible.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import torch

from dreamlab.errors import DreamlabError
from worlds.policies import ACTION_HIGH, ACTION_LOW


class DreamEnv(gym.Env):
    metadata = {"render_modes": ["rgb_array"], "render_fps": 50}

    def __init__(
        self,
        run_dir: str | Path | None = None,
        obs: str = "vector",
        temperature: float = 1.0,
        max_steps: int = 1000,
        done_threshold: float = 0.5,
        render_mode: str | None = None,
        device: str = "cpu",
    ) -> None:
        from worlds.dream import decode_frames, load_world_model, tiny_world_model

        if obs not in ("vector", "image"):
            raise DreamlabError(
                f"obs={obs!r} is not an observation mode; choose 'vector' ([z, h]) or 'image' (decoded 64x64 frame)"
            )
        if render_mode not in (None, "rgb_array"):
            raise DreamlabError(f"render_mode={render_mode!r} is not supported; use 'rgb_array' or None")
        if run_dir is None:
            # tiny random-weight world model (seeded): lets env checkers and tests run without training anything
            self.vae, self.mdn, init_mu, init_lv = tiny_world_model(seed=0)
        else:
            from worlds.encode import initial_latents

            self.vae, self.mdn = load_world_model(run_dir, device=device)
            init_mu, init_lv = initial_latents(Path(run_dir) / "latents")
        self._decode = decode_frames
        self.dev = self.mdn.device
        self.init_mu, self.init_std = init_mu.float().to(self.dev), (0.5 * init_lv.float()).exp().to(self.dev)
        self.obs_mode, self.temperature, self.max_steps, self.done_threshold = (
            obs,
            float(temperature),
            int(max_steps),
            float(done_threshold),
        )
        self.render_mode = render_mode
        z, h = self.mdn.config.z_dim, self.mdn.config.hidden
        self.action_space = gym.spaces.Box(
            np.array(ACTION_LOW, np.float32), np.array(ACTION_HIGH, np.float32), dtype=np.float32
        )
        if obs == "vector":
            self.observation_space = gym.spaces.Box(-np.inf, np.inf, (z + h,), np.float32)
        else:
            self.observation_space = gym.spaces.Box(0, 255, (64, 64, 3), np.uint8)
        self._g = torch.Generator(device=self.dev)
        self._z = self._h = self._c = None
        self._t = 0

    def _obs(self) -> np.ndarray:
        if self.obs_mode == "vector":
            return torch.cat([self._z, self._h], -1)[0].float().cpu().numpy().astype(np.float32)
        return self._decode(self.vae, self._z)[0].numpy()

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[np.ndarray, dict[str, Any]]:
        super().reset(seed=seed)
        self._g.manual_seed(int(self.np_random.integers(2**63 - 1)))
        i = int(torch.randint(0, len(self.init_mu), (1,), generator=self._g, device=self.dev))
        eps = torch.randn(1, self.mdn.config.z_dim, generator=self._g, device=self.dev)
        self._z = self.init_mu[i:i + 1] + self.init_std[i:i + 1] * eps
        self._h = torch.zeros(1, self.mdn.config.hidden, device=self.dev)
        self._c = torch.zeros_like(self._h)
        self._t = 0
        return self._obs(), {}

    @torch.no_grad()
    def step(self, action: np.ndarray) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        if self._z is None:
            raise DreamlabError("DreamEnv.step called before reset(); call env.reset() first")
        a = np.asarray(action, np.float32).reshape(-1)
        if a.shape != (3,) or not np.isfinite(a).all():
            raise DreamlabError(f"action {action!r} must be 3 finite numbers (steer, gas, brake)")
        a = np.clip(a, self.action_space.low, self.action_space.high)
        at = torch.from_numpy(a)[None].to(self.dev)
        self._h, self._c, out = self.mdn.step(self._z, at, self._h, self._c)
        logpi, mu, ls, rew, dlogit = self.mdn.split_head(out)
        self._z = self.mdn.sample_mixture(logpi, mu, ls, self.temperature, self._g)
        self._t += 1
        terminated = bool(torch.sigmoid(dlogit)[0] > self.done_threshold)
        truncated = self._t >= self.max_steps
        return self._obs(), float(rew[0]), terminated, truncated, {"p_done": float(torch.sigmoid(dlogit)[0])}

    def render(self) -> np.ndarray | None:
        if self.render_mode != "rgb_array" or self._z is None:
            return None
        return self._decode(self.vae, self._z)[0].numpy()
