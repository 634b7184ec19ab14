"""Real-env evaluation of controllers (and the random-policy baseline), in parallel worker processes.

Env seeds are `seed + i` for episode i, so a score file says exactly which tracks were driven.
`evaluate_run` writes `RUN/eval/<policy>_seed<S>_n<N>.json` (per-episode scores, mean, std), a CSV beside
it, and a side-by-side video (real frame | V reconstruction | dream driven by the same actions). Evaluations
in another env, at another episode length or of another controller file than RUN/controller/best.safetensors
add that to the name (`_dreamlab-CarRacing64-v3`, `_steps500`, `_gen_00120`), so they never overwrite each other.
With a Ray backend (dreamlab.parallel) the episodes are Ray tasks; V and M travel to them from this process.
"""
from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import signal
import time
from collections import deque
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dreamlab.errors import DreamlabError
from dreamlab.io import atomic_write_text, load_json, save_json
from dreamlab.parallel import Backend

_G: dict[str, Any] = {}
MAX_EPISODES = 1_000_000  # an evaluation lists every episode's task and score


def _make_env(env_id: str, max_steps: int) -> Any:
    os.environ.setdefault("SDL_VIDEODRIVER", "dummy")
    from envs import register_all
    from worlds.driving import make_env

    register_all()
    return make_env(env_id, max_steps)


def _load_wm(world_model: str, mdn_dir: str) -> Any:
    from worlds.dream import load_world_model

    return load_world_model(world_model, device="cpu", mdn_dir=mdn_dir or None) if world_model else None


def _setup(world_model: str, env_id: str, max_steps: int, mdn_dir: str = "") -> None:
    torch.set_num_threads(1)
    _G["env"] = _make_env(env_id, max_steps)
    _G["wm"] = _load_wm(world_model, mdn_dir)


def _init_worker(world_model: str, env_id: str, max_steps: int, mdn_dir: str = "") -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C: the parent stops the pool; no traceback per worker
    _setup(world_model, env_id, max_steps, mdn_dir)


def real_episode(setup: list[Any], task: tuple[str, np.ndarray | None, int, bool]) -> dict[str, Any]:
    """One episode as a Ray task; `setup[0]` is the ObjectRef of (env id, max steps, V and M or None), fetched and
    its env made once per worker process and evaluator."""
    key = setup[0].hex()
    if _G.get("key") != key:
        import ray

        env_id, max_steps, wm = ray.get(setup[0])
        torch.set_num_threads(1)
        if "env" in _G:
            _G["env"].close()
        _G.update(key=key, env=_make_env(env_id, max_steps), wm=wm)
    return _episode(task)


class _RandomPolicy:
    def __init__(self, space: Any, seed: int) -> None:
        self.space = space
        space.seed(seed)

    def reset(self) -> None:
        pass

    def __call__(self, frame: np.ndarray) -> np.ndarray:
        return np.asarray(self.space.sample(), np.float32)


def _crash_hook(seed: int) -> None:
    """Fault injection for the worker-death test: DREAMLAB_EVAL_CRASH_ONCE=DIR:SEED kills the worker once at that env
    seed."""
    want = os.environ.get("DREAMLAB_EVAL_CRASH_ONCE")
    if want:
        folder, s = want.rsplit(":", 1)
        marker = Path(folder) / f".crashed_{s}"
        if int(s) == seed and not marker.exists():
            marker.touch()
            os._exit(17)


def _episode(task: tuple[str, np.ndarray | None, int, bool]) -> dict[str, Any]:
    from worlds.collect import ModelPolicy
    from worlds.driving import run_episode

    kind, theta, seed, record = task
    _crash_hook(seed)
    env = _G["env"]
    if kind == "random":
        policy: Any = _RandomPolicy(env.action_space, seed)
    else:
        if _G["wm"] is None:
            raise DreamlabError("a controller needs a world model (V and M) to act")
        vae, mdn = _G["wm"]
        policy = ModelPolicy(vae, mdn, torch.as_tensor(theta, dtype=torch.float32))
    t0 = time.perf_counter()
    ep = run_episode(env, policy, seed)
    out = {"seed": seed, "return": ep.ret, "steps": ep.steps, "seconds": time.perf_counter() - t0}
    if record:
        out["obs"], out["actions"] = ep.obs, ep.actions
    return out


class RealEvaluator:
    """Runs episodes of controllers (or the random policy) in `workers` processes (1 = in this process).
    Controllers act with V and M of `world_model`, or with the M in `mdn_dir` (the one they were trained with).
    A worker that dies (killed, out of memory) restarts the workers and re-runs the unfinished episodes, which are
    exact repeats (an episode depends only on its task); multiprocessing.Pool would have waited forever for them.
    With a Ray `backend` the episodes are Ray tasks (`workers` at once; 0 = every CPU of the cluster), which Ray
    re-runs when their worker or node dies."""

    max_restarts = 3

    def __init__(
        self,
        world_model: str | Path | None,
        env_id: str = "CarRacing-v3",
        workers: int = 0,
        max_steps: int = 1000,
        mdn_dir: str | Path | None = None,
        backend: Backend | None = None,
    ) -> None:
        self.args = (str(world_model or ""), env_id, int(max_steps), str(mdn_dir or ""))
        self.backend = backend or Backend()
        self.requested = workers
        self.workers = max(1, workers or os.cpu_count() or 1)
        self.pool = None
        self.ray: Any = None  # the Ray session: (contextlib.ExitStack, remote function, setup ref, tasks in flight)

    def __enter__(self) -> RealEvaluator:
        if self.backend.is_ray:
            self._start_ray()
        elif self.workers > 1:
            _make_env(self.args[1], self.args[2]).close()  # a bad env id fails here, once, not in every worker
            self._start()
        else:
            _setup(*self.args)
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop()
        if self.ray is not None:
            stack, self.ray = self.ray[0], None
            stack.close()

    def _start_ray(self) -> None:
        from dreamlab.parallel import cluster_cpus, import_ray, ray_session, remote

        import_ray()  # without Ray: the one-line error with the pip command, first
        world_model, env_id, max_steps, mdn_dir = self.args
        _make_env(env_id, max_steps).close()  # a bad env id fails here, before Ray starts
        wm = _load_wm(world_model, mdn_dir)   # V and M go to the tasks from here: the nodes need no run folder
        with contextlib.ExitStack() as stack:
            ray = stack.enter_context(ray_session(self.backend, self.workers))
            in_flight = self.requested or 2 * cluster_cpus(ray)  # 0 workers: every CPU, a task queued behind each
            self.ray = (stack.pop_all(), remote(real_episode), [ray.put((env_id, max_steps, wm))], in_flight)

    def _start(self) -> None:
        self.pool = ProcessPoolExecutor(
            self.workers, mp_context=mp.get_context("spawn"), initializer=_init_worker, initargs=self.args
        )

    def _stop(self) -> None:
        if self.pool is None:
            return
        procs = list((getattr(self.pool, "_processes", None) or {}).values())
        self.pool.shutdown(wait=False, cancel_futures=True)
        for p in procs:  # shutdown() alone lets running episodes finish: stop them now (Ctrl-C, errors)
            if p.is_alive():
                p.terminate()
        for p in procs:
            p.join(5)
        self.pool = None

    def run(
        self, tasks: list[tuple[str, np.ndarray | None, int, bool]], desc: str = "real env", progress: bool = True
    ) -> list[dict[str, Any]]:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(tasks), desc=desc, unit="ep", disable=not progress, dynamic_ncols=True)
        t0, steps = time.perf_counter(), 0
        results: list[dict[str, Any]] = [None] * len(tasks)  # type: ignore[list-item]
        todo, restarts = set(range(len(tasks))), 0
        if self.ray is not None:
            from dreamlab.parallel import TASK_RETRIES, Failed, ray_unordered

            _, fn, setup, in_flight = self.ray
            for i, r in ray_unordered(fn, deque((i, (setup, tasks[i])) for i in range(len(tasks))), in_flight):
                if i is None:
                    bar.refresh()
                    continue
                if isinstance(r, Failed):
                    bar.close()
                    if r.lost:
                        raise DreamlabError(f"a real-env episode of {self.args[1]} (env seed {tasks[i][2]}) was lost "
                                            f"with its Ray worker or node {TASK_RETRIES + 1} times ({r.message()}); "
                                            "check the nodes (memory, `ray status`)")
                    raise r.error
                results[i] = r
                steps += r["steps"]
                bar.update(1)
                bar.set_postfix(env_steps_per_s=f"{steps / max(time.perf_counter() - t0, 1e-9):.0f}",
                                ret=f"{r['return']:.1f}")
            todo.clear()
        while todo:
            if self.pool is None:
                it: Any = ((i, _episode(tasks[i])) for i in sorted(todo))
            else:
                futs = {self.pool.submit(_episode, tasks[i]): i for i in sorted(todo)}
                it = ((futs[f], f.result()) for f in as_completed(futs))
            try:
                for i, r in it:
                    results[i] = r
                    todo.discard(i)
                    steps += r["steps"]
                    bar.update(1)
                    bar.set_postfix(
                        env_steps_per_s=f"{steps / max(time.perf_counter() - t0, 1e-9):.0f}", ret=f"{r['return']:.1f}"
                    )
            except BrokenProcessPool as e:
                restarts += 1
                if restarts > self.max_restarts:
                    bar.close()
                    raise DreamlabError(
                        f"real-env workers of {self.args[1]} died {restarts} times ({e}); check memory "
                        "(fewer --workers) and the messages above"
                    ) from e
                bar.write(
                    f"a real-env worker died; restarting {self.workers} workers and re-running {len(todo)} episodes"
                )
                self._stop()
                self._start()
        bar.close()
        return results

    def returns(self, thetas: list[np.ndarray], seeds: list[int], progress: bool = False) -> list[float]:
        return [
            r["return"]
            for r in self.run([("controller", t, s, False) for t, s in zip(thetas, seeds)], progress=progress)
        ]


def summarize(results: list[dict[str, Any]]) -> dict[str, Any]:
    r = np.array([x["return"] for x in results], np.float64)
    return {
        "episodes": len(r),
        "mean": float(r.mean()),
        "std": float(r.std()),
        "min": float(r.min()),
        "max": float(r.max()),
        "seeds": [x["seed"] for x in results],
        "scores": [round(float(v), 3) for v in r],
        "steps": [int(x["steps"]) for x in results],
    }


def eval_name(policy: str, seed: int, episodes: int | None, env_id: str = "CarRacing-v3", max_steps: int = 1000,
              controller: str = "") -> str:
    """`controller_seed1000_n10`, plus what differs from the defaults (env, episode length, controller file stem)."""
    parts = [f"{policy}_seed{seed}" + (f"_n{episodes}" if episodes is not None else "")]
    if env_id != "CarRacing-v3":
        parts.append(env_id.replace("/", "-"))
    if max_steps != 1000:
        parts.append(f"steps{max_steps}")
    if controller:
        parts.append(controller)
    return "_".join(parts)


def write_scores(out: Path, name: str, summ: dict[str, Any], meta: dict[str, Any]) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    save_json(out / f"{name}.json", {**meta, **summ})
    csv = "episode,seed,return,steps\n" + "".join(
        f"{i},{s},{r},{n}\n" for i, (s, r, n) in enumerate(zip(summ["seeds"], summ["scores"], summ["steps"]))
    )
    atomic_write_text(out / f"{name}.csv", csv)
    return out / f"{name}.json"


# ----------------------------------------------------------------------------- random-policy baseline cache
#
# The random policy's return on a gymnasium env depends only on (env id, max steps, env seed) and the versions
# of gymnasium, Box2D and numpy (its actions come from the action space seeded with the env seed), so each
# episode is measured once and kept in $DREAMLAB_CACHE/random_baseline.json: 100 baseline episodes cost about
# 10 minutes on 2 cores. Our own `dreamlab/` envs are never cached (their code changes with this repo).


def _baseline_versions() -> str:
    from importlib.metadata import PackageNotFoundError, version

    vers = []
    for pkg in ("gymnasium", "box2d", "numpy"):
        try:
            vers.append(f"{pkg} {version(pkg)}")
        except PackageNotFoundError:
            vers.append(f"{pkg} -")
    return "|".join(vers)


def _baseline_cache_path() -> Path:
    from dreamlab.data import cache_dir

    return cache_dir() / "random_baseline.json"


def _read_baseline_cache() -> dict[str, Any]:
    path = _baseline_cache_path()
    if not path.exists():
        return {}
    try:
        d = load_json(path)
        return d if isinstance(d, dict) else {}
    except (OSError, ValueError, DreamlabError):  # a damaged cache is rebuilt, never trusted
        return {}


def random_baseline(ev: RealEvaluator, env_id: str, max_steps: int, seeds: list[int], *, use_cache: bool = True,
                    progress: bool = True) -> list[dict[str, Any]]:
    """The random policy's episodes on `seeds`: measured ones from the cache, the rest run (and cached)."""
    cacheable = use_cache and not env_id.startswith("dreamlab/")
    versions = _baseline_versions() if cacheable else ""
    keys = [f"{env_id}|{max_steps}|{s}|{versions}" if cacheable else None for s in seeds]
    cache = _read_baseline_cache() if any(keys) else {}
    todo = [s for s, k in zip(seeds, keys) if k is None or k not in cache]
    ran = {r["seed"]: r for r in ev.run([("random", None, s, False) for s in todo], desc="evaluate random policy",
                                        progress=progress)} if todo else {}
    if len(todo) < len(seeds):
        print(f"random policy: {len(seeds) - len(todo)} of {len(seeds)} episodes from {_baseline_cache_path()} "
              "(measured earlier with the same env, seeds and package versions)", flush=True)
    if any(keys) and ran:
        cache = _read_baseline_cache()  # re-read: another run may have added episodes meanwhile
        cache.update({k: {"return": float(ran[s]["return"]), "steps": int(ran[s]["steps"])}
                      for s, k in zip(seeds, keys) if k is not None and s in ran})
        save_json(_baseline_cache_path(), cache)
    return [ran[s] if s in ran else {"seed": s, **cache[k]} for s, k in zip(seeds, keys)]


def evaluate_run(
    run_dir: str | Path,
    *,
    episodes: int = 100,
    seed: int = 0,
    workers: int = 0,
    controller: str | Path | None = None,
    env_id: str = "CarRacing-v3",
    max_steps: int = 1000,
    baseline: bool = True,
    video: bool = True,
    video_frames: int = 300,
    temperature: float = 1.0,
    progress: bool = True,
    baseline_cache: bool = True,
    backend: Backend | None = None,
) -> dict[str, Any]:
    from worlds.policies import controller_mdn, load_controller

    run_dir = Path(run_dir)
    if not 1 <= episodes <= MAX_EPISODES:
        raise DreamlabError(f"--episodes {episodes} must be from 1 to {MAX_EPISODES:,}")
    if seed < 0:  # gymnasium refused it deep in a worker, with a traceback
        raise DreamlabError(f"--seed {seed} must be >= 0 (episode i drives env seed SEED + i; env seeds are >= 0)")
    if max_steps < 0 or workers < 0:
        raise DreamlabError(f"--max-steps {max_steps} and --workers {workers} must be >= 0")
    ctrl = Path(controller) if controller else run_dir / "controller" / "best.safetensors"
    if not ctrl.exists():
        raise DreamlabError(
            f"{ctrl} does not exist; train a controller first: dreamlab worldmodel train-controller {run_dir}"
        )
    theta, _, _ = load_controller(ctrl)
    mdn_dir = controller_mdn(ctrl)
    out_dir = run_dir / "eval"
    meta = {
        "env_id": env_id,
        "max_steps": max_steps,
        "env_seeds": f"{seed}..{seed + episodes - 1}",
        "controller": str(ctrl),
        "mdn": str(mdn_dir or run_dir / "mdn"),
    }
    res: dict[str, Any] = {"files": []}
    seeds = [seed + i for i in range(episodes)]
    default_ctrl = ctrl.resolve() == (run_dir / "controller" / "best.safetensors").resolve()
    tag = "" if default_ctrl else ctrl.stem
    with RealEvaluator(run_dir, env_id, workers, max_steps, mdn_dir, backend) as ev:
        rc = ev.run(
            [("controller", theta.numpy(), s, video and i == 0) for i, s in enumerate(seeds)],
            desc="evaluate controller",
            progress=progress,
        )
        res["controller"] = summarize(rc)
        res["files"].append(
            str(
                write_scores(
                    out_dir, eval_name("controller", seed, episodes, env_id, max_steps, tag), res["controller"], meta
                )
            )
        )
        if baseline:
            rr = random_baseline(ev, env_id, max_steps, seeds, use_cache=baseline_cache, progress=progress)
            res["random"] = summarize(rr)
            res["files"].append(
                str(
                    write_scores(
                        out_dir,
                        eval_name("random", seed, episodes, env_id, max_steps),
                        res["random"],
                        {**meta, "controller": "uniform random actions"},
                    )
                )
            )
    if video and "obs" in rc[0]:
        name = eval_name("side_by_side", seed, None, env_id, max_steps, tag)
        res["video"] = str(
            side_by_side_video(
                run_dir,
                rc[0]["obs"][: video_frames + 1],
                rc[0]["actions"][:video_frames],
                out_dir / f"{name}.mp4",
                temperature=temperature,
                seed=seed,
                mdn_dir=mdn_dir,
            )
        )
    return res


@torch.no_grad()
def side_by_side_video(
    run_dir: Path,
    obs: np.ndarray,
    actions: np.ndarray,
    path: Path,
    temperature: float = 1.0,
    seed: int = 0,
    mdn_dir: Path | None = None,
) -> Path:
    """Real frame | V reconstruction | dream (M from the first real z, driven open-loop by the real actions)."""
    from dreamlab.images import save_video
    from worlds.dream import decode_frames, load_world_model

    vae, mdn = load_world_model(run_dir, device="cpu", mdn_dir=mdn_dir)
    mu, _ = vae.encode_frames(obs)
    recon = decode_frames(vae, mu).numpy()
    g = torch.Generator().manual_seed(seed)
    z_seq = mdn.sample(1, generator=g, actions=torch.from_numpy(actions)[None], z0=mu[:1], temperature=temperature)[
        0, :, : mdn.config.z_dim
    ]
    dream = decode_frames(vae, z_seq).numpy()
    n = min(len(obs), len(recon), len(dream))
    frames = np.concatenate([obs[:n], recon[:n], dream[:n]], axis=2)
    frames = frames.repeat(2, 1).repeat(2, 2)
    return save_video(frames, path, fps=30)
