"""Steps per second of gymnasium's CarRacing-v3 and dreamlab's fast CarRacing, side by side in one run.

    python bench/envs_bench.py                      # single process, 5 repetitions, + AsyncVectorEnv with 2 workers
    python bench/envs_bench.py --reps 7 --steps 300 --workers 4 --ids dreamlab/CarRacing-v3 dreamlab/CarRacing64-v3

Single process: every repetition runs gymnasium's env and then each fast id on the same seed and the
same actions (random, biased to gas so the car moves), and the ratio fast/gymnasium is taken within the
repetition, so load from other processes hits both sides alike; the table shows medians. OpenCV is
limited to one thread so "per core" is honest. With N workers both are run through gymnasium's
`AsyncVectorEnv` (N processes) and total steps/s are reported.
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

import numpy as np  # noqa: E402

GYM_ID = "CarRacing-v3"


def _actions(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    a = rng.uniform([-1.0, 0.0, 0.0], [1.0, 1.0, 0.3], size=(n, 3))
    return a.astype(np.float32)


def steps_per_second(env_id: str, steps: int, seed: int) -> float:
    """Wall-clock steps/s of one env over `steps` steps (reset included), resetting on episode end."""
    import gymnasium as gym

    env = gym.make(env_id)
    acts = _actions(steps, seed)
    t0 = time.perf_counter()
    env.reset(seed=seed)
    for a in acts:
        _, _, term, trunc, _ = env.step(a)
        if term or trunc:
            env.reset()
    dt = time.perf_counter() - t0
    env.close()
    return steps / dt


def vector_steps_per_second(env_id: str, workers: int, steps: int, seed: int) -> float:
    """Total steps/s of `workers` copies in gymnasium's AsyncVectorEnv (one process each)."""
    import gymnasium as gym

    env = gym.vector.AsyncVectorEnv([lambda: gym.make(env_id) for _ in range(workers)])
    acts = _actions(steps, seed)
    env.reset(seed=seed)
    env.step(np.repeat(acts[:1], workers, axis=0))  # warm up the workers
    t0 = time.perf_counter()
    for a in acts:
        env.step(np.repeat(a[None], workers, axis=0))  # autoreset handles episode ends
    dt = time.perf_counter() - t0
    env.close()
    return steps * workers / dt


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ids", nargs="+", default=["dreamlab/CarRacing-v3", "dreamlab/CarRacing64-v3"],
                   help="fast ids to compare with gymnasium's CarRacing-v3")
    p.add_argument("--reps", type=int, default=5, help="single-process repetitions (median reported)")
    p.add_argument("--steps", type=int, default=300, help="steps per repetition for gymnasium's env")
    p.add_argument("--workers", type=int, default=2, help="AsyncVectorEnv workers (0 = skip)")
    p.add_argument("--vec-steps", type=int, default=200, help="vector steps (each of the N envs steps this often)")
    p.add_argument("--vec-reps", type=int, default=3, help="AsyncVectorEnv repetitions (median reported)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    import cv2
    import gymnasium as gym

    import envs  # noqa: F401  (registers the dreamlab/ ids)

    cv2.setNumThreads(1)
    for env_id in args.ids:
        if env_id not in gym.registry:
            allowed = ", ".join(sorted(k for k in gym.registry if k.startswith("dreamlab/")))
            print(f"error: unknown env id {env_id!r}; choose from {allowed}", file=sys.stderr)
            return 2
    print(f"cpu cores: {os.cpu_count()}  load average: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"single process: {args.reps} repetitions of {args.steps} steps from reset (same seed and actions for all)")
    base: list[float] = []
    fast: dict[str, list[float]] = {i: [] for i in args.ids}
    ratios: dict[str, list[float]] = {i: [] for i in args.ids}
    for rep in range(args.reps):
        seed = args.seed + rep
        g = steps_per_second(GYM_ID, args.steps, seed)
        base.append(g)
        for env_id in args.ids:
            f = steps_per_second(env_id, args.steps, seed)
            fast[env_id].append(f)
            ratios[env_id].append(f / g)
        print(f"  rep {rep}: gymnasium {g:7.1f}/s  " + "  ".join(f"{i} {fast[i][-1]:8.1f}/s" for i in args.ids),
              flush=True)
    table = [["env", "steps/s, 1 process (median)", "ratio (median)"]]
    table.append([f"gymnasium {GYM_ID}", f"{statistics.median(base):.1f}", "1.0x"])
    for i in args.ids:
        table.append([i, f"{statistics.median(fast[i]):.1f}", f"{statistics.median(ratios[i]):.1f}x"])
    if args.workers > 0:
        print(f"{args.workers} workers (AsyncVectorEnv): {args.vec_reps} repetitions of {args.vec_steps} vector steps")
        vbase: list[float] = []
        vfast: dict[str, list[float]] = {i: [] for i in args.ids}
        for rep in range(args.vec_reps):
            seed = args.seed + rep
            vbase.append(vector_steps_per_second(GYM_ID, args.workers, args.vec_steps, seed))
            for i in args.ids:
                vfast[i].append(vector_steps_per_second(i, args.workers, args.vec_steps, seed))
            print(f"  rep {rep}: gymnasium {vbase[-1]:7.1f}/s  "
                  + "  ".join(f"{i} {vfast[i][-1]:8.1f}/s" for i in args.ids), flush=True)
        table[0] += [f"steps/s, {args.workers} workers (median)", f"ratio, {args.workers} workers (median)"]
        table[1] += [f"{statistics.median(vbase):.1f}", "1.0x"]
        for row, i in zip(table[2:], args.ids):
            r = statistics.median(f / g for f, g in zip(vfast[i], vbase))
            row += [f"{statistics.median(vfast[i]):.1f}", f"{r:.1f}x"]
    widths = [max(len(r[c]) for r in table) for c in range(len(table[0]))]
    print()
    for n, row in enumerate(table):
        print("| " + " | ".join(v.ljust(w) if c == 0 else v.rjust(w) for c, (v, w) in enumerate(zip(row, widths))) + " |")
        if n == 0:
            print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return 0


if __name__ == "__main__":
    sys.exit(main())
