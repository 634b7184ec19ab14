"""dreamlab envs layer: gymnasium environments and wrappers.

`import envs` registers the ids below with gymnasium, after which plain gymnasium code can use them:

    import gymnasium as gym
    import envs  # noqa: F401  (registers the dreamlab/ ids)
    env = gym.make("dreamlab/CarRacing-v3")

or, without the import, `gym.make("envs:dreamlab/CarRacing-v3")` (gymnasium imports the module first).
Gymnasium 1.x has no plugin entry points any more, so one of the two is needed.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from dreamlab.errors import DreamlabError

try:  # the `rl` extra; without it the ids are simply not registered
    import gymnasium as gym
except ImportError:  # pragma: no cover - exercised only in installs without gymnasium
    gym = None  # type: ignore[assignment]


@dataclass(frozen=True)
class EnvInfo:
    id: str
    entry_point: str
    description: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    max_episode_steps: int | None = None
    reward_threshold: float | None = None


_CARRACING = "envs.carracing:FastCarRacing"

ENVS: tuple[EnvInfo, ...] = (
    EnvInfo("dreamlab/CarRacing-v3", _CARRACING,
            "drop-in for gymnasium's CarRacing-v3 (same physics, tracks, rewards, 96x96x3 obs with HUD), ~10x+ faster",
            {}, 1000, 900),
    EnvInfo("dreamlab/CarRacing64-v3", _CARRACING,
            "World Models observation: HUD cropped (gymnasium's obs[:84]) and drawn directly at 64x64x3",
            {"obs_size": 64, "crop_hud": True}, 1000, 900),
    EnvInfo("dreamlab/CarRacing64HUD-v3", _CARRACING,
            "the whole 96x96 frame (HUD kept) drawn directly at 64x64x3, as rl-zoo's 64x64 resize sees it",
            {"obs_size": 64}, 1000, 900),
    EnvInfo("dreamlab/Dream-v0", "envs.dream_env:DreamEnv",
            "CarRacing dreamed by a world model (V+M); DreamEnv() alone builds a tiny random-weight model",
            {}, 1000, None),
)


def register_all() -> None:
    """Register every dreamlab/ id with gymnasium (idempotent)."""
    if gym is None:
        return
    for info in ENVS:
        if info.id in gym.registry:
            continue
        gym.register(id=info.id, entry_point=info.entry_point, kwargs=dict(info.kwargs),
                     max_episode_steps=info.max_episode_steps, reward_threshold=info.reward_threshold)


def env_ids() -> list[str]:
    return [info.id for info in ENVS]


def get_info(env_id: str) -> EnvInfo:
    """The EnvInfo of a dreamlab id, or a one-line error naming the allowed ids."""
    for info in ENVS:
        if info.id == env_id:
            return info
    raise DreamlabError(f"unknown env id {env_id!r}; choose one of {', '.join(env_ids())}")


def make(env_id: str, **kwargs: Any) -> Any:
    """`gym.make` for a dreamlab id (or gymnasium's own CarRacing-v3), with a one-line error for bad ids."""
    if gym is None:
        raise DreamlabError("gymnasium is not installed; install the rl extra: pip install -e '.[rl]'")
    register_all()
    if env_id not in gym.registry or not (env_id.startswith("dreamlab/") or env_id == "CarRacing-v3"):
        raise DreamlabError(f"unknown env id {env_id!r}; choose one of {', '.join(env_ids())} (or CarRacing-v3)")
    return gym.make(env_id, **kwargs)


register_all()
