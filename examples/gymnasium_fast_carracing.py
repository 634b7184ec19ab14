"""Plain gymnasium code on dreamlab's fast CarRacing ids.

    python examples/gymnasium_fast_carracing.py

`import envs` registers the `dreamlab/` ids (alternatively `gym.make("envs:dreamlab/CarRacing-v3")`
imports the module for you). Everything else is ordinary gymnasium: make, reset(seed=...), step,
wrappers, vector envs.
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
os.environ.setdefault("SDL_VIDEODRIVER", "dummy")

import gymnasium as gym  # noqa: E402
import numpy as np  # noqa: E402

import envs  # noqa: E402,F401  (registers dreamlab/CarRacing-v3, dreamlab/CarRacing64-v3, ...)


def drive(env_id: str, steps: int = 300, seed: int = 0) -> None:
    env = gym.make(env_id)
    obs, info = env.reset(seed=seed)
    rng = np.random.default_rng(seed)
    total, t0 = 0.0, time.perf_counter()
    for _ in range(steps):
        action = rng.uniform([-1.0, 0.0, 0.0], [1.0, 1.0, 0.2]).astype(np.float32)
        obs, reward, terminated, truncated, info = env.step(action)
        total += float(reward)
        if terminated or truncated:
            obs, info = env.reset()
    rate = steps / (time.perf_counter() - t0)
    print(f"{env_id:<26} obs {obs.shape}  return {total:7.1f}  {rate:7.0f} steps/s")
    env.close()


if __name__ == "__main__":
    # the same seed and actions give the same rewards on gymnasium's env and the drop-in (only faster)
    drive("CarRacing-v3", steps=100)
    drive("dreamlab/CarRacing-v3", steps=100)
    # World Models' 64x64 observation (HUD cropped), drawn directly at that size
    drive("dreamlab/CarRacing64-v3")
    # discrete actions, domain randomisation and reset options work as in gymnasium
    env = gym.make("dreamlab/CarRacing-v3", continuous=False, domain_randomize=True)
    obs, _ = env.reset(seed=1, options={"randomize": False})
    obs, reward, *_ = env.step(3)  # gas
    print("discrete + domain_randomize:", obs.shape, env.action_space)
    # 4 copies in worker processes through gymnasium's AsyncVectorEnv
    vec = gym.vector.AsyncVectorEnv([lambda: gym.make("dreamlab/CarRacing64-v3") for _ in range(4)])
    obs, _ = vec.reset(seed=0)
    obs, rewards, *_ = vec.step(np.tile(np.array([[0.0, 0.5, 0.0]], np.float32), (4, 1)))
    print("AsyncVectorEnv:", obs.shape, rewards.round(2))
    vec.close()
