"""Stable-baselines3 PPO on the fast CarRacing, with rl-zoo's CarRacing recipe, evaluated like the world-model agent.

rl-zoo (hyperparams/ppo.yml, CarRacing): frame skip 2, 64x64 resize, grayscale (kept as one channel),
2 stacked frames, 8 envs, reward normalisation only, n_steps 512, batch 128, 10 epochs, linear lr from 1e-4,
gSDE (sample every 4 steps, log_std_init -2), GELU, separate 256-unit heads, no orthogonal init.
Its published scores on the old CarRacing at 4M steps: PPO 154 +- 75, PPO-LSTM 862 +- 97.

Evaluation matches `agents.evaluate`: episode i is driven on env seed `eval_seed + i` up to 1000 env steps,
with the deterministic policy; per-episode returns, mean and std go to `RUN/eval/ppo_seed<S>_n<N>.json`.
Weights are saved as safetensors (no pickle) and loaded back into a freshly built PPO.
"""
from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dreamlab.config import check_ranges, from_dict, to_dict
from dreamlab.errors import DreamlabError

# numpy, torch, gymnasium and sb3 are imported inside the functions: `dreamlab --help` builds its parser
# from PPOConfig and must stay fast.


@dataclasses.dataclass
class PPOConfig:
    """PPO baseline settings (defaults: rl-zoo's CarRacing hyper-parameters)."""

    env: str = "dreamlab/CarRacing64HUD-v3"
    timesteps: int = 4_000_000      # agent steps (each is `frame_skip` env steps), summed over envs
    n_envs: int = 8
    vec_env: str = "dummy"          # dummy (one process) or subproc (one process per env)
    frame_skip: int = 2
    frame_stack: int = 2
    size: int = 64                  # grayscale size x size observations
    seed: int = 0
    device: str = "auto"
    n_steps: int = 512
    batch_size: int = 128
    n_epochs: int = 10
    learning_rate: float = 1e-4
    linear_lr: bool = True          # decay the learning rate linearly to 0
    gamma: float = 0.99
    gae_lambda: float = 0.95
    clip_range: float = 0.2
    ent_coef: float = 0.0
    vf_coef: float = 0.5
    max_grad_norm: float = 0.5
    use_sde: bool = True
    sde_sample_freq: int = 4
    log_std_init: float = -2.0
    norm_reward: bool = True
    eval_episodes: int = 10
    eval_seed: int = 1000           # episode i is env seed eval_seed + i
    eval_max_steps: int = 1000      # env steps per evaluation episode (CarRacing's own limit is 1000)
    eval_deterministic: bool = True  # False: sample actions as in training (gSDE noise redrawn every sde_sample_freq)
    video: bool = True              # save a video of the first evaluation episode
    ckpt_every: int = 20_000        # agent steps between policy.safetensors checkpoints (0 = only at the end)


def validate(cfg: PPOConfig) -> PPOConfig:
    """Check every setting; a bad value raises a one-line error naming it and the allowed values."""
    import gymnasium as gym

    from envs import register_all

    register_all()
    allowed = [k for k in gym.registry if k.startswith("dreamlab/CarRacing")] + ["CarRacing-v3"]
    if cfg.env not in allowed:
        raise DreamlabError(f"--env {cfg.env!r} is not a CarRacing id; choose one of {', '.join(allowed)}")
    if cfg.ckpt_every < 0:
        raise DreamlabError(f"ckpt_every={cfg.ckpt_every} must be >= 0")
    for name in ("timesteps", "n_envs", "frame_skip", "frame_stack", "size", "n_steps", "batch_size", "n_epochs",
                 "eval_max_steps", "sde_sample_freq"):
        if getattr(cfg, name) < 1:
            raise DreamlabError(f"{name}={getattr(cfg, name)} must be at least 1")
    if cfg.eval_episodes < 0:
        raise DreamlabError(f"eval_episodes={cfg.eval_episodes} must be >= 0")
    if cfg.vec_env not in ("dummy", "subproc"):
        raise DreamlabError(f"vec_env={cfg.vec_env!r} is not allowed; choose one of dummy, subproc")
    check_ranges(cfg, above_zero=("learning_rate",))  # and every float setting finite (NaN passed `<= 0`)
    return cfg


def make_env(cfg: PPOConfig, render_mode: str | None = None) -> Any:
    """One preprocessed env: frame skip, size x size resize (box filter), grayscale with a channel axis."""
    from gymnasium.wrappers import GrayscaleObservation

    from envs import make
    from envs.wrappers import ActionRepeat, Resize

    env = make(cfg.env, render_mode=render_mode)
    if cfg.frame_skip > 1:
        env = ActionRepeat(env, cfg.frame_skip)
    env = Resize(env, cfg.size)
    return GrayscaleObservation(env, keep_dim=True)


def _vec_env(cfg: PPOConfig, n: int, seed: int, monitor: bool = True) -> Any:
    from stable_baselines3.common.env_util import make_vec_env
    from stable_baselines3.common.vec_env import DummyVecEnv, SubprocVecEnv, VecFrameStack

    cls = SubprocVecEnv if cfg.vec_env == "subproc" and n > 1 else DummyVecEnv
    venv = make_vec_env(lambda: make_env(cfg), n_envs=n, seed=seed, vec_env_cls=cls,
                        monitor_dir=None, wrapper_class=None) if monitor else cls([lambda: make_env(cfg)] * n)
    return VecFrameStack(venv, cfg.frame_stack)


def linear_schedule(lr0: float) -> Callable[[float], float]:
    """lr0 decaying linearly to 0, and 0 after that.

    sb3 finishes its last rollout past `total_timesteps` (rollouts are n_steps x n_envs long), where its
    progress_remaining goes negative: an unclamped schedule then gives a negative learning rate, and that
    last PPO update climbs the loss (PPO's clipping does not bound a change for the worse). A 100k-step run
    trained that way scored -61 on evaluation after training returns near 400; clamped, an 80k-step run
    scored 400.
    """

    def lr(progress_remaining: float) -> float:
        return max(progress_remaining, 0.0) * lr0

    return lr


def build_model(cfg: PPOConfig, venv: Any) -> Any:
    import torch.nn as nn
    from stable_baselines3 import PPO

    from dreamlab.device import resolve_device

    lr: float | Callable[[float], float] = linear_schedule(cfg.learning_rate) if cfg.linear_lr else cfg.learning_rate
    return PPO(
        "CnnPolicy", venv, learning_rate=lr, n_steps=cfg.n_steps, batch_size=cfg.batch_size,
        n_epochs=cfg.n_epochs, gamma=cfg.gamma, gae_lambda=cfg.gae_lambda, clip_range=cfg.clip_range,
        ent_coef=cfg.ent_coef, vf_coef=cfg.vf_coef, max_grad_norm=cfg.max_grad_norm, use_sde=cfg.use_sde,
        sde_sample_freq=cfg.sde_sample_freq, seed=cfg.seed, device=str(resolve_device(cfg.device)), verbose=0,
        policy_kwargs=dict(log_std_init=cfg.log_std_init, ortho_init=False, activation_fn=nn.GELU,
                           net_arch=dict(pi=[256], vf=[256])),
    )


def _save_policy(model: Any, path: Path) -> None:
    import torch

    from dreamlab.io import save_tensors

    save_tensors(path, {k: v for k, v in model.policy.state_dict().items() if isinstance(v, torch.Tensor)},
                 metadata={"timesteps": str(int(model.num_timesteps))})


class _EpisodeLog:
    """sb3 callback: one metrics.jsonl row per finished training episode (return from the Monitor), and a
    policy checkpoint every `ckpt_every` agent steps."""

    def __new__(cls, path: Path, ckpt: Path | None = None, ckpt_every: int = 0) -> Any:
        from stable_baselines3.common.callbacks import BaseCallback

        class EpisodeLog(BaseCallback):
            def __init__(self) -> None:
                super().__init__()
                self.rows: list[dict[str, Any]] = []
                self.t0 = time.perf_counter()
                self.last_ckpt = 0

            def _on_step(self) -> bool:
                for info in self.locals.get("infos", []):
                    ep = info.get("episode")
                    if ep is not None:
                        self.rows.append({"step": int(self.num_timesteps), "episode_return": float(ep["r"]),
                                          "episode_length": int(ep["l"]),
                                          "seconds": round(time.perf_counter() - self.t0, 1)})
                        if len(self.rows) % 8 == 0:
                            self.flush()
                if ckpt is not None and ckpt_every > 0 and self.num_timesteps - self.last_ckpt >= ckpt_every:
                    self.last_ckpt = self.num_timesteps
                    _save_policy(self.model, ckpt)
                return True

            def flush(self) -> None:
                from dreamlab.io import atomic_write_text

                atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in self.rows))

        return EpisodeLog()


def train(cfg: PPOConfig, out: str | Path, progress: bool = True) -> dict[str, Any]:
    """Train PPO into run folder `out` (config.json, metrics.jsonl, policy.safetensors), then evaluate."""
    import numpy as np

    from dreamlab.io import save_json

    cfg = validate(cfg)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_json(out / "config.json", {"kind": "sb3-ppo", **to_dict(cfg)})
    venv = _vec_env(cfg, cfg.n_envs, cfg.seed)
    if cfg.norm_reward:
        from stable_baselines3.common.vec_env import VecNormalize

        venv = VecNormalize(venv, norm_obs=False, norm_reward=True, gamma=cfg.gamma)
    model = build_model(cfg, venv)
    log = _EpisodeLog(out / "metrics.jsonl", out / "policy.safetensors", cfg.ckpt_every)
    t0 = time.perf_counter()
    model.learn(total_timesteps=cfg.timesteps, callback=log, progress_bar=progress)
    seconds = time.perf_counter() - t0
    log.flush()
    venv.close()
    _save_policy(model, out / "policy.safetensors")
    train_info = {"timesteps": int(model.num_timesteps), "env_steps": int(model.num_timesteps) * cfg.frame_skip,
                  "train_seconds": round(seconds, 1), "train_episodes": len(log.rows),
                  "last_20_train_returns_mean": float(np.mean([r["episode_return"] for r in log.rows[-20:]]))
                  if log.rows else None}
    save_json(out / "train.json", train_info)
    result = {"train": train_info}
    if cfg.eval_episodes > 0:
        result["eval"] = evaluate(model, cfg, out, cfg.eval_episodes, cfg.eval_seed, progress=progress)
    return result


def load_policy(run_dir: str | Path, device: str = "auto") -> tuple[Any, PPOConfig]:
    """Rebuild the PPO of a run folder and load its safetensors weights."""
    from dreamlab.io import load_json, load_tensors

    run_dir = Path(run_dir)
    raw = load_json(run_dir / "config.json")
    if raw.pop("kind", None) != "sb3-ppo":
        raise DreamlabError(f"{run_dir} is not a PPO run folder (config.json kind is not 'sb3-ppo')")
    cfg = from_dict(PPOConfig, {**raw, "device": device})
    venv = _vec_env(cfg, 1, cfg.seed, monitor=False)
    model = build_model(cfg, venv)
    state = load_tensors(run_dir / "policy.safetensors", device=model.device)
    model.policy.load_state_dict(state, strict=True)
    return model, cfg


def evaluate(model: Any, cfg: PPOConfig, out: str | Path, episodes: int, seed: int,
             progress: bool = True) -> dict[str, Any]:
    """Episodes on env seeds seed+i (<= eval_max_steps env steps); scores JSON + one video.

    The policy is deterministic (the mean action) unless `cfg.eval_deterministic` is False; then actions are
    sampled as in training, the gSDE noise matrix being redrawn every `sde_sample_freq` steps from a torch
    generator seeded with `seed`.
    """
    import numpy as np
    import torch
    from tqdm import tqdm

    from dreamlab.images import save_video
    from dreamlab.io import save_json

    if episodes < 1:
        raise DreamlabError(f"episodes={episodes} must be at least 1")
    out = Path(out)
    render = "rgb_array" if cfg.video else None
    env = make_env(cfg, render_mode=render)
    deterministic = cfg.eval_deterministic
    if not deterministic:
        torch.manual_seed(seed)
    name = "ppo" if deterministic else "ppo-stochastic"
    scores, lengths, frames = [], [], []
    for i in tqdm(range(episodes), desc="ppo eval", unit="ep", disable=not progress):
        obs, _ = env.reset(seed=seed + i)
        stack = [np.zeros_like(obs)] * (cfg.frame_stack - 1) + [obs]  # as VecFrameStack after a reset
        ret, steps, done, t = 0.0, 0, False, 0
        while not done and steps < cfg.eval_max_steps:
            x = np.concatenate(stack[-cfg.frame_stack:], axis=-1)[None]
            if not deterministic and cfg.use_sde and t % cfg.sde_sample_freq == 0:
                model.policy.reset_noise(1)
            t += 1
            action, _ = model.predict(x, deterministic=deterministic)
            obs, r, term, trunc, _ = env.step(action[0])
            ret += float(r)
            steps += cfg.frame_skip
            done = term or trunc
            stack.append(obs)
            if i == 0 and render:
                frames.append(env.render())
        scores.append(ret)
        lengths.append(steps)
    env.close()
    res = {"policy": name, "env": cfg.env, "deterministic": deterministic, "seed": seed, "episodes": episodes,
           "scores": scores, "env_steps": lengths, "mean": float(np.mean(scores)), "std": float(np.std(scores))}
    save_json(out / "eval" / f"{name}_seed{seed}_n{episodes}.json", res)
    if frames:
        save_video(np.stack(frames), out / "eval" / f"{name}_seed{seed}_episode0.mp4", fps=50 // cfg.frame_skip)
    return res
