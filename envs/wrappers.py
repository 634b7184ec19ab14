"""Gymnasium wrappers for the world-model pipeline: crop the HUD, resize to 64x64, repeat actions.

They work on gymnasium's own `CarRacing-v3` as well as on the `dreamlab/` ids:

    env = ActionRepeat(Resize(CropHUD(gym.make("CarRacing-v3"))), repeat=2)   # (64, 64, 3) observations

`CropHUD` + `Resize` is exactly what `dreamlab/CarRacing64-v3` draws directly (there without the 96x96
intermediate). `world_model_env` builds that stack for any CarRacing id.
"""
from __future__ import annotations

from typing import Any, SupportsFloat

import cv2
import gymnasium as gym
import numpy as np
from gymnasium import spaces

from dreamlab.errors import DreamlabError

#: rows of CarRacing's 96x96 observation above the HUD (the HUD is the bottom 12 rows)
HUD_FREE_ROWS = 84

_INTERPOLATIONS = {"area": cv2.INTER_AREA, "bilinear": cv2.INTER_LINEAR, "bicubic": cv2.INTER_CUBIC,
                   "nearest": cv2.INTER_NEAREST}


def _image_space(space: gym.Space, who: str) -> spaces.Box:
    if not (isinstance(space, spaces.Box) and space.dtype == np.uint8 and len(space.shape) in (2, 3)):
        raise DreamlabError(f"{who} needs uint8 image observations (H, W[, C]); got {space}")
    return space


class CropHUD(gym.ObservationWrapper):
    """Drop CarRacing's bottom HUD rows: keep the top `keep` fraction (84/96 by default, as World Models does)."""

    def __init__(self, env: gym.Env, keep: float = HUD_FREE_ROWS / 96) -> None:
        super().__init__(env)
        space = _image_space(env.observation_space, "CropHUD")
        if not 0.0 < keep <= 1.0:
            raise DreamlabError(f"CropHUD keep={keep!r} must be in (0, 1]")
        self.rows = max(1, int(round(space.shape[0] * keep)))
        shape = (self.rows, *space.shape[1:])
        self.observation_space = spaces.Box(0, 255, shape=shape, dtype=np.uint8)

    def observation(self, observation: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(observation[: self.rows])


class Resize(gym.ObservationWrapper):
    """Resize image observations to `size` (int or (height, width)); box filter ("area") by default."""

    def __init__(self, env: gym.Env, size: int | tuple[int, int] = 64, interpolation: str = "area") -> None:
        super().__init__(env)
        space = _image_space(env.observation_space, "Resize")
        hw = (size, size) if isinstance(size, int) else tuple(size)
        if len(hw) != 2 or min(hw) < 1:
            raise DreamlabError(f"Resize size={size!r} must be a positive int or (height, width)")
        if interpolation not in _INTERPOLATIONS:
            raise DreamlabError(f"Resize interpolation={interpolation!r} is not known; choose one of "
                                f"{', '.join(_INTERPOLATIONS)}")
        self.size = (int(hw[0]), int(hw[1]))
        self.interpolation = _INTERPOLATIONS[interpolation]
        self.observation_space = spaces.Box(0, 255, shape=(*self.size, *space.shape[2:]), dtype=np.uint8)

    def observation(self, observation: np.ndarray) -> np.ndarray:
        if observation.shape[:2] == self.size:
            return observation
        out = cv2.resize(observation, (self.size[1], self.size[0]), interpolation=self.interpolation)
        return out.reshape(self.observation_space.shape)


class Resize64(Resize):
    """`Resize` to 64x64 with a box filter (the world-model V input)."""

    def __init__(self, env: gym.Env, interpolation: str = "area") -> None:
        super().__init__(env, 64, interpolation)


class ActionRepeat(gym.Wrapper):
    """Repeat each action `repeat` times, summing rewards and stopping early at the end of an episode."""

    def __init__(self, env: gym.Env, repeat: int = 2) -> None:
        super().__init__(env)
        if not isinstance(repeat, (int, np.integer)) or repeat < 1:
            raise DreamlabError(f"ActionRepeat repeat={repeat!r} must be an int >= 1")
        self.repeat = int(repeat)

    def step(self, action: Any) -> tuple[Any, SupportsFloat, bool, bool, dict[str, Any]]:
        total = 0.0
        obs, terminated, truncated, info = None, False, False, {}
        for _ in range(self.repeat):
            obs, reward, terminated, truncated, info = self.env.step(action)
            total += float(reward)
            if terminated or truncated:
                break
        return obs, total, terminated, truncated, info


def world_model_env(env_id: str = "CarRacing-v3", repeat: int = 1, **kwargs: Any) -> gym.Env:
    """A CarRacing env emitting World Models' 64x64x3 observations (HUD cropped), with optional action repeat.

    `dreamlab/CarRacing64-v3` already draws that observation; any other id gets `CropHUD` + `Resize64`.
    """
    from envs import make

    env = make(env_id, **kwargs)
    if env.observation_space.shape != (64, 64, 3):
        env = Resize64(CropHUD(env))
    return ActionRepeat(env, repeat) if repeat > 1 else env
