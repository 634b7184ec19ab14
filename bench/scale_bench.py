"""Rollout collection throughput, local worker processes vs Ray, per worker count, measured interleaved in one run.

    python bench/scale_bench.py                          # 1 and 2 workers, 3 repetitions, 3 episodes per worker
    python bench/scale_bench.py --workers 1 2 4 8 --reps 5 --ray-address auto   # on a cluster (docs/scale.md)

The work is the paper preset's collection (`dreamlab worldmodel run --preset paper`: random-weight V, M and C drive
each episode, `random_controller`) on the fast env `dreamlab/CarRacing64-v3`, 1000-step episodes. Each repetition
runs every worker count with the local backend (a spawn pool, as `dreamlab worldmodel collect`) and then with Ray
(one embedded instance with as many CPUs as the largest worker count, started once; its start-up is reported apart),
so both see the same load at nearly the same time; the table shows medians and the Ray/local ratio per repetition.

Throughput is measured in the steady state, as for a 10,000-episode run: from the moment the first W episodes (one per
worker: they include the worker's start, imports and first env) have landed to the moment the last one lands, the
env steps of the episodes that landed in between, per second. `cold s` is the whole call's wall time (pool spawn or
Ray tasks' first start included). The 1-minute load average before each measurement is in the `load` column: on a
shared machine it, not the backend, decides most of the absolute numbers; the ratios are what to compare.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("SDL_VIDEODRIVER", "dummy")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import worlds.collect as C  # noqa: E402
from dreamlab.parallel import Backend, ray_session  # noqa: E402
from envs import register_all  # noqa: E402

FAST = "dreamlab/CarRacing64-v3"


def measure(backend: Backend, workers: int, episodes: int, max_steps: int, policy: str, seed: int) -> dict:
    """One collection into a fresh folder: steady-state env-steps/s (see the module doc), cold wall seconds."""
    landed: list[tuple[float, int]] = []  # (time, steps) of each episode as the manifest lists it
    record = C.write_manifest

    seen: set[int] = set()

    def timed_write(folder, manifest):  # episodes land in the manifest: the time of the write is their landing time
        now = time.perf_counter()
        for e in manifest["episodes"]:
            if e["index"] not in seen:
                seen.add(e["index"])
                landed.append((now, int(e["steps"])))
        return record(folder, manifest)

    out = Path(tempfile.mkdtemp(prefix="dl-scale-"))
    C.write_manifest = timed_write
    try:
        t0 = time.perf_counter()
        res = C.collect(C.CollectConfig(env_id=FAST, episodes=episodes, max_steps=max_steps, policy=policy), out,
                        seed=seed, workers=workers, progress=False, env_setup=register_all, backend=backend)
        cold = time.perf_counter() - t0
    finally:
        C.write_manifest = record
        shutil.rmtree(out, ignore_errors=True)
    steady = landed[workers:]
    if not steady:
        raise SystemExit(f"need more than {workers} episodes to measure a steady state; raise --episodes-per-worker")
    rate = sum(s for _, s in steady) / max(steady[-1][0] - landed[workers - 1][0], 1e-9)
    return {"rate": rate, "cold": cold, "steps": res["steps"], "episodes": res["new_episodes"]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--episodes-per-worker", type=int, default=3, help="at least 2 (the first is the warm-up)")
    ap.add_argument("--max-steps", type=int, default=1000)
    ap.add_argument("--policy", default="random_controller", help="the paper's; brownian needs no torch")
    ap.add_argument("--ray-address", default="", help="empty: an embedded instance; auto or HOST:PORT: a cluster")
    ap.add_argument("--paper-episodes", type=int, default=10_000, help="the collection extrapolated to")
    args = ap.parse_args(argv)
    import importlib.util

    if importlib.util.find_spec("ray") is None:
        print("scale: skipped, Ray is not installed (pip install 'dreamlab[scale]')")
        return 0

    rows: dict[tuple[str, int], list[dict]] = {}
    ratios: dict[int, list[float]] = {w: [] for w in args.workers}
    loads: list[float] = []
    tmp = tempfile.mkdtemp(prefix="dlray-bench-")
    t0 = time.perf_counter()
    with ray_session(Backend("ray", args.ray_address, tmp), num_cpus=max(args.workers)) as ray:
        ray_start = time.perf_counter() - t0
        nodes = sum(1 for n in ray.nodes() if n.get("Alive"))
        cpus = int(ray.cluster_resources().get("CPU", 0))
        for rep in range(args.reps):
            for w in args.workers:
                got = {}
                for name, backend in (("local", Backend()), ("ray", Backend("ray", args.ray_address, tmp))):
                    loads.append(os.getloadavg()[0])
                    got[name] = measure(backend, w, w * args.episodes_per_worker, args.max_steps, args.policy,
                                        seed=1000 * rep + w)
                    got[name]["load"] = loads[-1]
                    rows.setdefault((name, w), []).append(got[name])
                    print(f"rep {rep} workers {w} {name}: {got[name]['rate']:.0f} env-steps/s steady, "
                          f"{got[name]['cold']:.1f} s cold, load {loads[-1]:.1f}", file=sys.stderr, flush=True)
                ratios[w].append(got["ray"]["rate"] / got["local"]["rate"])
    shutil.rmtree(tmp, ignore_errors=True)

    med = statistics.median
    print(f"\nRollout collection, {args.policy} on {FAST}, {args.max_steps}-step episodes, "
          f"{args.episodes_per_worker} episodes per worker, {args.reps} repetitions (medians); "
          f"{os.cpu_count()} cores here; Ray: {cpus} CPUs on {nodes} node(s) "
          f"({'cluster at ' + args.ray_address if args.ray_address else 'embedded'}), start-up {ray_start:.1f} s; "
          f"1-min load average during the runs {min(loads):.1f}-{max(loads):.1f}\n")
    print("| workers | backend | env-steps/s (steady) | per worker | cold s | ray / local | load |")
    print("|---:|---|---:|---:|---:|---:|---:|")
    for w in args.workers:
        for name in ("local", "ray"):
            r = rows[(name, w)]
            rate = med(x["rate"] for x in r)
            ratio = f"{med(ratios[w]):.2f}" if name == "ray" else ""
            print(f"| {w} | {name} | {rate:.0f} | {rate / w:.0f} | {med(x['cold'] for x in r):.1f} | {ratio} | "
                  f"{med(x['load'] for x in r):.1f} |")
    steps = med(x["steps"] / x["episodes"] for r in rows.values() for x in r)
    print(f"\nmean episode length {steps:.0f} steps; the paper's {args.paper_episodes:,} episodes = "
          f"{args.paper_episodes * steps / 1e6:.1f} M env steps:")
    for w in args.workers:
        for name in ("local", "ray"):
            rate = med(x["rate"] for x in rows[(name, w)])
            print(f"- {name}, {w} worker{'s' if w > 1 else ''}: {args.paper_episodes * steps / rate / 3600:.1f} h "
                  "at the measured rate")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
