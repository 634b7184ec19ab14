"""Steps per second of gymnasium's CarRacing-v3 and dreamlab's fast CarRacing, side by side in one run.

    python bench/envs_bench.py                      # 1 process, 5 repetitions; AsyncVectorEnv with 2 workers
    python bench/envs_bench.py --reps 7 --steps 300 --workers 4 --fidelity 5

Single process: every repetition runs gymnasium's env and then each fast id for the same number of
steps from reset, with the same seed and actions (random, biased to gas so the car moves). Each run's
wall-clock time and CPU time (`time.thread_time`) are measured; steps per CPU-second is the per-core
rate and is not disturbed by other processes sharing the machine, while wall-clock rates are. Ratios
are taken within each repetition, and the table shows medians. OpenCV is held to one thread.

N workers: each env runs as gymnasium's `AsyncVectorEnv` with N worker processes. Reported are the total
wall-clock steps/s, and steps per CPU-second counting the CPU time of the workers (their whole loop:
pipes, shared memory, the env) plus the main process's time in `step`.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("SDL_VIDEODRIVER", "dummy")

import gymnasium as gym  # noqa: E402
import numpy as np  # noqa: E402

GYM_ID = "CarRacing-v3"


def _actions(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    a = rng.uniform([-1.0, 0.0, 0.0], [1.0, 1.0, 0.3], size=(n, 3))
    return a.astype(np.float32)


def single(env_id: str, steps: int, seed: int) -> tuple[float, float]:
    """(wall steps/s, steps per CPU-second) of one env over `steps` steps from reset."""
    env = gym.make(env_id)
    acts = _actions(steps, seed)
    t0, c0 = time.perf_counter(), time.thread_time()
    env.reset(seed=seed)
    for a in acts:
        _, _, term, trunc, _ = env.step(a)
        if term or trunc:
            env.reset()
    wall, cpu = time.perf_counter() - t0, time.thread_time() - c0
    env.close()
    return steps / wall, steps / cpu


class _WorkerClock(gym.Wrapper):
    """Reports the worker process's CPU seconds since `start_clock()` (read back with `get_attr`)."""

    def __init__(self, env: gym.Env) -> None:
        super().__init__(env)
        self._t0 = time.process_time()

    def start_clock(self) -> None:
        self._t0 = time.process_time()

    @property
    def cpu_seconds(self) -> float:
        return time.process_time() - self._t0


def vector(env_id: str, workers: int, steps: int, seed: int) -> tuple[float, float]:
    """(total wall steps/s, steps per CPU-second) of `workers` copies in gymnasium's AsyncVectorEnv."""
    vec = gym.vector.AsyncVectorEnv([lambda: _WorkerClock(gym.make(env_id)) for _ in range(workers)])
    acts = _actions(steps + 1, seed)
    vec.reset(seed=seed)
    vec.step(np.repeat(acts[:1], workers, axis=0))  # warm up the workers
    vec.call("start_clock")
    t0, c0 = time.perf_counter(), time.thread_time()
    for a in acts[1:]:
        vec.step(np.repeat(a[None], workers, axis=0))  # autoreset handles episode ends
    wall, main_cpu = time.perf_counter() - t0, time.thread_time() - c0
    worker_cpu = sum(vec.get_attr("cpu_seconds"))
    vec.close()
    return steps * workers / wall, steps * workers / (worker_cpu + main_cpu)


def fidelity(seeds: int, steps: int) -> list[tuple[int, float, float, int]]:
    """Per seed: mean |obs - gymnasium obs| at 64x64 (box filter) for the drop-in (HUD included) and for
    dreamlab/CarRacing64-v3 against gymnasium's obs[:84] resized, on the same random actions."""
    import cv2
    from gymnasium.envs.box2d.car_racing import CarRacing

    from envs.carracing import FastCarRacing

    def r64(x: np.ndarray) -> np.ndarray:
        return cv2.resize(x, (64, 64), interpolation=cv2.INTER_AREA).astype(np.float64)

    rows = []
    for seed in range(seeds):
        ref, fast, wm = CarRacing(), FastCarRacing(), FastCarRacing(obs_size=64, crop_hud=True)
        for e in (ref, fast, wm):
            e.reset(seed=seed)
        m, mw, n = [], [], 0
        for a in _actions(steps, 1000 + seed):
            o_ref, r_ref, term, _, _ = ref.step(a)
            o_fast, r_fast, *_ = fast.step(a)
            o_wm, *_ = wm.step(a)
            assert r_fast == r_ref, "rewards diverged"
            m.append(np.abs(r64(o_ref) - r64(o_fast)).mean())
            mw.append(np.abs(r64(o_ref[:84]) - o_wm).mean())
            n += 1
            if term:
                break
        rows.append((seed, float(np.mean(m)), float(np.mean(mw)), n))
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ids", nargs="+", default=["dreamlab/CarRacing-v3", "dreamlab/CarRacing64-v3"],
                   help="fast ids to compare with gymnasium's CarRacing-v3")
    p.add_argument("--reps", type=int, default=5, help="single-process repetitions (median reported)")
    p.add_argument("--steps", type=int, default=300, help="steps per repetition for gymnasium's env")
    p.add_argument("--workers", type=int, default=2, help="AsyncVectorEnv workers (0 = skip)")
    p.add_argument("--vec-steps", type=int, default=300, help="vector steps (each of the N envs steps this often)")
    p.add_argument("--vec-reps", type=int, default=3, help="AsyncVectorEnv repetitions (median reported)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fidelity", type=int, default=0, metavar="SEEDS",
                   help="also measure the observation MAE at 64x64 on this many seeds (0 = skip)")
    p.add_argument("--fidelity-steps", type=int, default=300)
    args = p.parse_args(argv)

    import cv2

    import envs  # noqa: F401  (registers the dreamlab/ ids)

    cv2.setNumThreads(1)
    for env_id in args.ids:
        if env_id not in gym.registry:
            allowed = ", ".join(sorted(k for k in gym.registry if k.startswith("dreamlab/")))
            print(f"error: unknown env id {env_id!r}; choose from {allowed}", file=sys.stderr)
            return 2
    print(f"cpu cores: {os.cpu_count()}  load average: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"single process: {args.reps} repetitions of {args.steps} steps from reset")
    ids = [GYM_ID, *args.ids]

    def ratio(xs: list[float], base: list[float]) -> str:
        return f"{statistics.median(x / b for x, b in zip(xs, base)):.1f}x"

    wall: dict[str, list[float]] = {i: [] for i in ids}
    cpu: dict[str, list[float]] = {i: [] for i in ids}
    for rep in range(args.reps):
        for i in ids:
            w, c = single(i, args.steps, args.seed + rep)
            wall[i].append(w)
            cpu[i].append(c)
        print(f"  rep {rep}: " + "  ".join(f"{i} {wall[i][-1]:.1f}/s (per CPU-s {cpu[i][-1]:.1f})" for i in ids),
              flush=True)
    table = [["env", "steps per CPU-second", "ratio", "steps/s wall", "ratio wall"]]
    for i in ids:
        name = f"gymnasium {i}" if i == GYM_ID else i
        table.append([name, f"{statistics.median(cpu[i]):.1f}", ratio(cpu[i], cpu[GYM_ID]),
                      f"{statistics.median(wall[i]):.1f}", ratio(wall[i], wall[GYM_ID])])
    if args.workers > 0:
        n = args.workers
        print(f"{n} workers (AsyncVectorEnv): {args.vec_reps} repetitions of {args.vec_steps} vector steps")
        vwall: dict[str, list[float]] = {i: [] for i in ids}
        vcpu: dict[str, list[float]] = {i: [] for i in ids}
        for rep in range(args.vec_reps):
            for i in ids:
                w, c = vector(i, n, args.vec_steps, args.seed + rep)
                vwall[i].append(w)
                vcpu[i].append(c)
            print(f"  rep {rep}: " + "  ".join(f"{i} {vwall[i][-1]:.1f}/s (per CPU-s {vcpu[i][-1]:.1f})"
                                                for i in ids), flush=True)
        table[0] += [f"{n} workers: per CPU-second", "ratio", f"{n} workers: steps/s wall", "ratio wall"]
        for row, i in zip(table[1:], ids):
            row += [f"{statistics.median(vcpu[i]):.1f}", ratio(vcpu[i], vcpu[GYM_ID]),
                    f"{statistics.median(vwall[i]):.1f}", ratio(vwall[i], vwall[GYM_ID])]
    widths = [max(len(r[c]) for r in table) for c in range(len(table[0]))]
    print(f"\n(medians over repetitions; ratios are medians of per-repetition ratios; load average "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())} on {os.cpu_count()} cores)")
    for k, row in enumerate(table):
        print(
            "| " + " | ".join(v.ljust(w) if c == 0 else v.rjust(w) for c, (v, w) in enumerate(zip(row, widths))) + " |"
        )
        if k == 0:
            print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    if args.fidelity > 0:
        print(f"\nobservation MAE at 64x64 vs gymnasium, random actions, {args.fidelity_steps} steps per seed (/255):")
        print("| seed | dreamlab/CarRacing-v3 (HUD incl.) | dreamlab/CarRacing64-v3 vs obs[:84] | steps |")
        print("|------|-----------------------------------|-------------------------------------|-------|")
        for seed, m, mw, n in fidelity(args.fidelity, args.fidelity_steps):
            print(f"| {seed:4d} | {m:33.3f} | {mw:35.3f} | {n:5d} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
