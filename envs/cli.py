"""`dreamlab env list | bench ID | play ID`: the gymnasium environments from the command line.

Only the standard library is imported at module level; gymnasium, numpy and the envs come in the handlers.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any


def _env_list(args: argparse.Namespace) -> int:
    import gymnasium as gym

    from envs import ENVS

    rows = []
    for info in ENVS:
        try:
            env = gym.make(info.id)
            shape = "x".join(map(str, env.observation_space.shape))
            act = str(env.action_space)
            env.close()
        except ImportError as e:  # an entry-point module that is not present in this checkout
            shape, act = "unavailable", f"({e.name or e} missing)"
        rows.append((info.id, shape, act, info.description))
    w = max(len(r[0]) for r in rows)
    print(f"{'id':<{w}}  {'observation':<12} {'actions':<44} description")
    for r in rows:
        print(f"{r[0]:<{w}}  {r[1]:<12} {r[2]:<44} {r[3]}")
    return 0


def _time_env(env_id: str, steps: int, seed: int) -> float:
    import numpy as np

    from envs import make

    env = make(env_id)
    rng = np.random.default_rng(seed)
    t0 = time.perf_counter()
    env.reset(seed=seed)
    for _ in range(steps):
        _, _, term, trunc, _ = env.step(_random_action(env, rng))
        if term or trunc:
            env.reset()
    dt = time.perf_counter() - t0
    env.close()
    return steps / dt


def _random_action(env: Any, rng: Any) -> Any:
    import numpy as np
    from gymnasium import spaces

    space = env.action_space
    if isinstance(space, spaces.Box) and space.shape == (3,):  # CarRacing: gas-biased so the car moves
        return rng.uniform([-1.0, 0.0, 0.0], [1.0, 1.0, 0.3]).astype(np.float32)
    return space.sample()


def _env_bench(args: argparse.Namespace) -> int:
    import statistics

    import cv2

    from dreamlab.errors import DreamlabError
    from envs import get_info

    if args.env_id != "CarRacing-v3":
        get_info(args.env_id)
    if args.steps < 1 or args.reps < 1:
        raise DreamlabError(f"--steps {args.steps} and --reps {args.reps} must be at least 1")
    cv2.setNumThreads(1)
    ours, theirs = [], []
    for rep in range(args.reps):
        ours.append(_time_env(args.env_id, args.steps, args.seed + rep))
        line = f"rep {rep}: {args.env_id} {ours[-1]:.1f} steps/s"
        if args.compare:
            theirs.append(_time_env("CarRacing-v3", args.steps, args.seed + rep))
            line += f"  gymnasium CarRacing-v3 {theirs[-1]:.1f} steps/s  ratio {ours[-1] / theirs[-1]:.1f}x"
        print(line, flush=True)
    msg = f"{args.env_id}: median {statistics.median(ours):.1f} steps/s over {args.reps} x {args.steps} steps"
    if args.compare:
        ratio = statistics.median(o / t for o, t in zip(ours, theirs))
        msg += f"; gymnasium CarRacing-v3 median {statistics.median(theirs):.1f} steps/s; median ratio {ratio:.1f}x"
    print(msg)
    return 0


def follow_track(env: Any) -> Any:
    """A scripted driver for CarRacing ids: steer towards the track point a few tiles ahead, keep ~35 speed."""
    import math

    import numpy as np

    u = env.unwrapped
    car = u.car
    pts = getattr(u, "_dl_track_xy", None)
    if pts is None or len(pts) != len(u.track):
        pts = np.array([(t[2], t[3]) for t in u.track])
        u._dl_track_xy = pts
    x, y = car.hull.position
    i = int(np.argmin(((pts - (x, y)) ** 2).sum(1)))
    tx, ty = pts[(i + 5) % len(pts)]
    heading = car.hull.angle + math.pi / 2  # the car's nose points along its body +y axis
    err = (math.atan2(ty - y, tx - x) - heading + math.pi) % (2 * math.pi) - math.pi
    vx, vy = car.hull.linearVelocity
    speed = math.hypot(vx, vy)
    steer = float(np.clip(-2.5 * err, -1.0, 1.0))
    gas = 0.4 if speed < 35 and abs(err) < 0.4 else 0.0
    brake = 0.3 if speed > 25 and abs(err) > 0.6 else 0.0
    return np.array([steer, gas, brake], np.float32)


def _has_display() -> bool:
    if os.environ.get("SDL_VIDEODRIVER", "") in ("dummy", "offscreen"):
        return False
    return bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")) or sys.platform in ("darwin", "win32")


def _play_keyboard(env_id: str, seed: int) -> int:
    import numpy as np
    import pygame

    from envs import make

    env = make(env_id, render_mode="human")
    a = np.zeros(3, np.float32)
    print("arrows steer / gas / brake, Enter restarts, Esc quits")
    quit_, episode = False, 0
    while not quit_:
        env.reset(seed=seed + episode)
        total, restart = 0.0, False
        while True:
            for event in pygame.event.get():
                if event.type == pygame.KEYDOWN:
                    if event.key == pygame.K_LEFT:
                        a[0] = -1.0
                    if event.key == pygame.K_RIGHT:
                        a[0] = +1.0
                    if event.key == pygame.K_UP:
                        a[1] = +1.0
                    if event.key == pygame.K_DOWN:
                        a[2] = +0.8
                    if event.key == pygame.K_RETURN:
                        restart = True
                    if event.key == pygame.K_ESCAPE:
                        quit_ = True
                if event.type == pygame.KEYUP:
                    if event.key in (pygame.K_LEFT, pygame.K_RIGHT):
                        a[0] = 0
                    if event.key == pygame.K_UP:
                        a[1] = 0
                    if event.key == pygame.K_DOWN:
                        a[2] = 0
                if event.type == pygame.QUIT:
                    quit_ = True
            _, r, term, trunc, _ = env.step(a)
            total += float(r)
            if term or trunc or restart or quit_:
                break
        print(f"episode {episode}: return {total:.1f}")
        episode += 1
    env.close()
    return 0


def _env_play(args: argparse.Namespace) -> int:
    import numpy as np
    from tqdm import tqdm

    from dreamlab.errors import DreamlabError
    from dreamlab.images import save_video
    from envs import get_info, make

    get_info(args.env_id)
    if args.steps < 1:
        raise DreamlabError(f"--steps {args.steps} must be at least 1")
    if not args.scripted and _has_display():
        return _play_keyboard(args.env_id, args.seed)
    out = Path(args.out)
    if out.suffix.lower() not in (".mp4", ".gif"):
        raise DreamlabError(f"--out {out} must end in .mp4 or .gif")
    env = make(args.env_id, render_mode="rgb_array")
    has_frames = "rgb_array" in (env.metadata.get("render_modes") or [])
    obs, _ = env.reset(seed=args.seed)
    is_car = hasattr(env.unwrapped, "track") and hasattr(env.unwrapped, "car")
    policy = args.policy if is_car else "random"
    rng = np.random.default_rng(args.seed)
    frames, total, steps = [], 0.0, 0
    for _ in tqdm(range(args.steps), desc=f"play {args.env_id}", unit="step"):
        a = follow_track(env) if policy == "follow" else _random_action(env, rng)
        obs, r, term, trunc, _ = env.step(a)
        total += float(r)
        steps += 1
        frame = env.render() if has_frames else obs
        frames.append(np.asarray(frame, np.uint8))
        if term or trunc:
            break
    env.close()
    save_video(np.stack(frames), out, fps=int(env.metadata.get("render_fps") or 50))
    print(f"{'no display: ' if not args.scripted else ''}scripted rollout ({policy} policy, seed {args.seed}): "
          f"{steps} steps, return {total:.1f}; video: {out}")
    return 0


def register_cli(sub: argparse._SubParsersAction) -> None:
    e = sub.add_parser("env", help="gymnasium environments: list, benchmark, play")
    es = e.add_subparsers(dest="sub", required=True, metavar="SUB")
    es.add_parser("list", help="list the dreamlab/ env ids").set_defaults(func=_env_list)

    b = es.add_parser("bench", help="steps/s of an env id (optionally against gymnasium's CarRacing-v3)")
    b.add_argument("env_id", help="a dreamlab/ id (see: dreamlab env list) or CarRacing-v3")
    b.add_argument("--steps", type=int, default=500, help="steps per repetition (default 500)")
    b.add_argument("--reps", type=int, default=3, help="repetitions; the median is reported (default 3)")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--compare", action="store_true", help="also time gymnasium's CarRacing-v3 and print the ratio")
    b.set_defaults(func=_env_bench)

    p = es.add_parser("play", help="drive with the keyboard (with a display), else save a scripted rollout video")
    p.add_argument("env_id", help="a dreamlab/ id (see: dreamlab env list)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=1000, help="scripted rollout length (default 1000)")
    p.add_argument("--policy", choices=["follow", "random"], default="follow",
                   help="scripted driver: follow the track (default) or random actions")
    p.add_argument("--out", default="play.mp4", help="video of the scripted rollout (.mp4 or .gif)")
    p.add_argument("--scripted", action="store_true", help="scripted rollout even when a display exists")
    p.set_defaults(func=_env_play)
