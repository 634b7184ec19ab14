"""Multiprocess rollout collector.

N worker processes (default: all cores) each run their own env and write one compressed file per episode
(`worlds.rollouts`); the main process keeps the manifest, shows a progress bar in env-steps/s, restarts
a worker that dies (its episode is re-run) and can `resume` a killed run up to the requested count.
Episode i is seeded from (seed, i) alone, so which worker runs it does not change it.
With `backend=Backend("ray", ...)` (dreamlab.parallel) the episodes are Ray tasks instead, on an embedded instance or
a cluster: each returns its compressed file to this process, which writes it (the nodes never see the run folder),
and Ray re-runs a task whose worker or node died. The same seeds give the same files and manifest either way.

Policies (brownian and pursuit are described in `worlds.driving`):
  brownian           random-walk actions
  random_controller  the paper's random rollouts: a random-weight linear controller on the features of
                     a random-weight V and M (weights redrawn each episode)
  mixed              even episodes brownian, odd episodes random_controller
  pursuit            a noisy track follower
  explore            episodes cycle brownian, random_controller, pursuit
  controller         a trained C with its V and M (`world_model` run folder, `controller` file): iterative training

dreamlab's own env ids (dreamlab/...) are registered by the envs package, a layer above: the caller passes
`env_setup=envs.register_all`, which every worker process runs before it makes its env.
"""
from __future__ import annotations

import dataclasses
import os
import queue
import signal
import sys
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from dreamlab.config import check_ranges
from dreamlab.errors import DreamlabError
from dreamlab.io import atomic_write_bytes, remove_stale_temps
from dreamlab.parallel import Backend
from worlds.driving import BrownianPolicy, PursuitPolicy, episode_seed, make_env, policy_kind, run_episode
from worlds.rollouts import (
    episode_bytes,
    episode_file_intact,
    episode_name,
    read_manifest,
    save_episode,
    write_manifest,
)

Policy = Literal["brownian", "random_controller", "mixed", "pursuit", "explore", "controller"]
EnvSetup = Callable[[], None]


BROWNIAN_SIGMA = 0.25  # std of the brownian policy's action steps
FRAME_SIZE = 64        # episodes store frames at 64x64 (World Models' V input)
MAX_RESTARTS = 8       # crashed workers restarted before the collector gives up
# sizes past these fill the memory (the manifest lists every episode; one step holds a 12 KB frame) long before any
# output: `episodes=1000000000000` used to build a list of every index (7.5 GB in 21 s). The paper collected 10,000.
MAX_EPISODES = 1_000_000
MAX_STEPS = 100_000


@dataclass
class CollectConfig:
    """What to collect (the `collect` stage of a world-model run); `collect` takes where to, the seed and the
    workers."""

    env_id: str = "CarRacing-v3"     # any gymnasium id; dreamlab/CarRacing64-v3 is the same physics drawn ~10x faster
    episodes: int = 16
    max_steps: int = 1000            # per episode; 0 = the env's own limit
    policy: Policy = "brownian"

    def __post_init__(self) -> None:
        check_ranges(self, positive=("episodes",), nonneg=("max_steps",),
                     at_most={"episodes": MAX_EPISODES, "max_steps": MAX_STEPS})


@dataclass
class _Job:
    """Everything a worker process needs (pickled to it)."""

    cfg: CollectConfig
    out: Path
    seed: int
    world_model: str = ""            # run folder holding vae/ and mdn/ (policy=controller)
    controller: str = ""             # controller .safetensors (policy=controller)


# ----------------------------------------------------------------------------- policies that act through V and M


class ModelPolicy:
    """a = C([z, h]) with z = V's mean code of the frame and h the MDN-RNN state after (z, a) steps.

    The mean, not a draw from V's posterior as in the paper's code: the dream-trained controllers drive 117 points
    worse on average with a sampled z (docs/experiments/test-time.md)."""

    def __init__(self, vae: Any, mdn: Any, theta: Any) -> None:
        import torch

        self.torch = torch
        self.vae, self.mdn, self.theta = vae.eval(), mdn.eval(), theta.float()
        self.reset()

    def reset(self) -> None:
        t = self.torch
        self.h = t.zeros(1, self.mdn.config.hidden)
        self.c = t.zeros_like(self.h)

    def __call__(self, frame: np.ndarray) -> np.ndarray:
        from worlds.policies import act

        t = self.torch
        with t.no_grad():
            mu, _ = self.vae.encode_frames(frame[None])
            a = act(self.theta, mu, self.h)
            self.h, self.c, _ = self.mdn.step(mu, a, self.h, self.c)
        return a[0].numpy().astype(np.float32)


def load_model_policy(world_model: str, controller: str) -> ModelPolicy:
    from worlds.dream import load_world_model
    from worlds.policies import controller_mdn, load_controller

    theta, z_dim, hidden = load_controller(controller)
    vae, mdn = load_world_model(world_model, device="cpu", mdn_dir=controller_mdn(controller))
    if (z_dim, hidden) != (mdn.config.z_dim, mdn.config.hidden):
        raise DreamlabError(
            f"controller {controller} expects z_dim={z_dim}, hidden={hidden} but {world_model} has "
            f"z_dim={mdn.config.z_dim}, hidden={mdn.config.hidden}: train the controller on this world model"
        )
    return ModelPolicy(vae, mdn, theta)


def random_model_policy(rng: np.random.Generator) -> ModelPolicy:
    import torch

    from worlds.models import MDNRNN, MDNRNNConfig, WorldVAE, WorldVAEConfig
    from worlds.policies import num_params

    torch.manual_seed(int(rng.integers(2**31)))
    vae, mdn = WorldVAE(WorldVAEConfig()), MDNRNN(MDNRNNConfig())
    stdev = float(rng.uniform(0.0, 0.5))
    theta = torch.from_numpy(rng.normal(0, stdev, num_params(32, mdn.config.hidden)).astype(np.float32))
    return ModelPolicy(vae, mdn, theta)


def _make_policy(job: _Job, rng: np.random.Generator, cached: dict[str, Any], index: int = 0) -> Any:
    kind = policy_kind(job.cfg.policy, index)
    if kind == "brownian":
        return BrownianPolicy(rng, BROWNIAN_SIGMA)
    if kind == "random_controller":
        return random_model_policy(rng)
    if kind == "pursuit":
        return PursuitPolicy(rng)
    if "model" not in cached:
        cached["model"] = load_model_policy(job.world_model, job.controller)
    return cached["model"]


def _crash_hook(out: Path, index: int) -> None:
    """Fault injection for the restart test: DREAMLAB_COLLECT_CRASH_ONCE=i kills the worker once at episode i."""
    want = os.environ.get("DREAMLAB_COLLECT_CRASH_ONCE")
    if want is not None and int(want) == index:
        marker = out / f".crashed_{index}"
        if not marker.exists():
            marker.touch()
            os._exit(17)


def _setup_worker(cfg: CollectConfig, env_setup: EnvSetup | None) -> Any:
    """A worker's env (local pool or Ray task), after torch's threads are set to one for the model policies."""
    if any(policy_kind(cfg.policy, i) in ("random_controller", "controller") for i in range(3)):
        import torch  # only the model policies need it: env-only policies skip the ~1.3 s import

        torch.set_num_threads(1)  # one worker per core: torch's own threads would oversubscribe
    if env_setup is not None:
        env_setup()
    return make_env(cfg.env_id, cfg.max_steps)


def _worker(wid: int, job: _Job, tasks: Any, results: Any, parent: int, env_setup: EnvSetup | None) -> None:
    """Run the episodes the parent hands over `tasks`; report on `results`, this worker's own pipe (send is
    synchronous and shares no lock with other workers, so a worker that dies mid-message breaks only its pipe)."""
    # Ctrl-C reaches every process of the terminal's group: the parent stops the workers, who print nothing
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    cfg, out = job.cfg, job.out
    try:
        env = _setup_worker(cfg, env_setup)
    except Exception as e:  # reported as one line by the parent, not as a traceback per worker and restart
        results.send(("fatal", wid, f"{type(e).__name__}: {e}"))
        return
    cached: dict[str, Any] = {}
    while True:
        if os.getppid() != parent:
            return  # the collector was killed: stop, leaving nothing half-written (files are atomic)
        try:
            idx = tasks.get(timeout=1.0)
        except queue.Empty:
            continue
        if idx is None:
            return
        t0 = time.perf_counter()
        seed = episode_seed(job.seed, idx)
        policy = _make_policy(job, np.random.default_rng(seed), cached, idx)

        def on_steps(n: int) -> None:
            if os.getppid() != parent:
                os._exit(0)
            results.send(("steps", wid, n))

        try:
            ep = run_episode(env, policy, seed, FRAME_SIZE, on_steps)
            _crash_hook(out, idx)
            save_episode(out / episode_name(idx), ep)
        except Exception as e:  # reported to the main process, which decides whether to retry
            results.send(("error", wid, idx, f"{type(e).__name__}: {e}"))
            env = make_env(cfg.env_id, cfg.max_steps)
            continue
        results.send(("done", wid, idx, {"steps": ep.steps, "return": ep.ret, "terminated": bool(ep.terminated[-1]),
                                       "seed": seed, "seconds": round(time.perf_counter() - t0, 3)}))


# ----------------------------------------------------------------------------- Ray tasks

_RAY_WORKER: dict[str, Any] = {}  # in a Ray worker process: the env (and model policy) of the collection `token`


def collect_episode(job: _Job, idx: int, token: str, shared: list[Any], env_setup: EnvSetup | None
                    ) -> tuple[dict[str, Any], bytes]:
    """Episode `idx` as a Ray task: its manifest info and its file's bytes (the driver writes the file). The env is
    made once per worker process and collection; `shared[0]` is the ObjectRef of the controller policy (or None)."""
    st = _RAY_WORKER
    if st.get("token") != token:
        if "env" in st:
            st["env"].close()
        st.clear()
        env = _setup_worker(job.cfg, env_setup)
        cached: dict[str, Any] = {}
        if shared[0] is not None:
            import ray

            cached["model"] = ray.get(shared[0])
        st.update(token=token, env=env, cached=cached)
    t0 = time.perf_counter()
    seed = episode_seed(job.seed, idx)
    policy = _make_policy(job, np.random.default_rng(seed), st["cached"], idx)
    try:
        ep = run_episode(st["env"], policy, seed, FRAME_SIZE)
    except Exception:
        st["env"] = make_env(job.cfg.env_id, job.cfg.max_steps)  # the next try starts from a fresh env, as locally
        raise
    data = episode_bytes(ep, f"episode {idx}")
    return {"steps": ep.steps, "return": ep.ret, "terminated": bool(ep.terminated[-1]), "seed": seed,
            "seconds": round(time.perf_counter() - t0, 3)}, data


def _run_ray(job: _Job, workers: int, todo: list[int], record: Any, flush: Any, bar: Any, backend: Backend,
             env_setup: EnvSetup | None, model: Any) -> float:
    """The episodes as Ray tasks, at most `workers` at once (0: every CPU of the cluster); files written here, and the
    manifest once per batch of episodes that landed together (`flush`): rewriting a manifest of 10,000 episodes takes
    about 0.5 s, so a large cluster's episodes would otherwise queue behind it. Returns Ray's start-up seconds."""
    from dreamlab.parallel import cluster_cpus, describe, ray_session, ray_unordered, remote

    t0 = time.perf_counter()
    with ray_session(backend, workers or os.cpu_count() or 1) as ray:
        started = round(time.perf_counter() - t0, 2)
        if not bar.disable:
            bar.write(describe(ray, backend), file=sys.stderr)
        bar.reset(total=bar.total)  # the rate counts from here, not from Ray's start-up
        in_flight = workers or 2 * cluster_cpus(ray)  # 0 workers: every CPU busy, with a task queued behind each
        fn = remote(collect_episode)
        token, shared = uuid.uuid4().hex, [ray.put(model) if model is not None else None]
        args = {i: (job, i, token, shared, env_setup) for i in todo}
        tasks = deque((i, args[i]) for i in todo)
        errors: dict[int, int] = {}
        unlisted = 0  # episodes written and recorded, not yet in the manifest file
        try:
            for idx, res in ray_unordered(fn, tasks, in_flight):
                if idx is None:  # the end of a batch (or a quiet moment)
                    if unlisted:
                        flush()
                        unlisted = 0
                    bar.refresh()  # keeps the rate current
                    continue
                unlisted += _ray_result(job, idx, res, tasks, args, errors, record, bar)
        finally:
            if unlisted:  # an error or Ctrl-C: what landed is listed
                flush()
    return started


def _ray_result(job: _Job, idx: int, res: Any, tasks: deque, args: dict[int, tuple], errors: dict[int, int],
                record: Any, bar: Any) -> int:
    """One finished task: its file written and recorded (1), or a retry queued (0); an error when it keeps failing."""
    from dreamlab.parallel import TASK_RETRIES, Failed

    if isinstance(res, Failed) and res.lost:
        raise DreamlabError(f"episode {idx} was lost with its Ray worker or node {TASK_RETRIES + 1} times "
                            f"({res.message()}); check the nodes (memory, `ray status`), then rerun with --resume")
    if isinstance(res, Failed):
        errors[idx] = errors.get(idx, 0) + 1
        if errors[idx] > 2:
            raise DreamlabError(f"episode {idx} failed 3 times in {job.cfg.env_id}: {res.message()}")
        tasks.append((idx, args[idx]))
        return 0
    info, data = res
    atomic_write_bytes(job.out / episode_name(idx), data)
    bar.update(info["steps"])
    record(idx, info, write=False)
    return 1


# ----------------------------------------------------------------------------- the collector


def collect(cfg: CollectConfig, out: str | Path, *, seed: int = 0, workers: int = 0, world_model: str = "",
            controller: str = "", resume: bool = False, progress: bool = True, inprocess: bool = False,
            env_setup: EnvSetup | None = None, backend: Backend | None = None) -> dict[str, Any]:
    """Collect `cfg.episodes` episodes into `out` with `workers` processes (0 = all cores); episode i is seeded from
    (seed, i) alone. `policy="controller"` drives the controller file `controller` with the V and M of the run folder
    `world_model`. `env_setup` (a module-level function, e.g. `envs.register_all`) runs in every process before it
    makes an env. `backend` (default: local worker processes) may run the episodes on Ray instead (`workers` = Ray
    tasks at once, 0 = every CPU). Returns a summary (episodes, steps, env-steps/s, restarts)."""
    from tqdm.auto import tqdm

    backend = backend or Backend()
    if backend.is_ray and not inprocess:
        from dreamlab.parallel import import_ray

        import_ray()  # without Ray installed: the one-line error with the pip command, before anything is written
    if env_setup is not None:
        env_setup()
    make_env(cfg.env_id, cfg.max_steps).close()  # a bad env id fails here, once, before any worker starts
    model = None
    if cfg.policy == "controller":
        if not (world_model and controller):
            raise DreamlabError("policy=controller needs --world-model RUN (with vae/ and mdn/) and "
                                "--controller FILE.safetensors")
        model = load_model_policy(world_model, controller)  # a missing or mismatched V, M or C fails here, once
    out = Path(out)
    job = _Job(cfg, out, seed, world_model, controller)
    manifest = read_manifest(out, must_exist=False)
    if manifest["episodes"] and not resume:
        raise DreamlabError(f"{out} already holds {len(manifest['episodes'])} episodes; pass --resume to continue, "
                            "or choose another --out")
    record_settings(out, manifest, cfg, seed, controller)  # a conflicting resume fails here, naming both values
    out.mkdir(parents=True, exist_ok=True)
    _drop_damaged(out, manifest)
    remove_stale_temps(out)  # what a killed atomic write left behind
    manifest.setdefault("version", 1)
    done = {e["index"] for e in manifest["episodes"]}
    # controller episodes never take an index of the folder's own collection (a plain --resume re-collects those)
    own = manifest["config"]
    first = int(own.get("episodes", 0)) if cfg.policy == "controller" and own.get("policy") != "controller" else 0
    todo = [i for i in range(min(first, cfg.episodes), cfg.episodes) if i not in done]
    write_manifest(out, manifest)
    summary = {
        "episodes": len(done),
        "new_episodes": 0,
        "steps": 0,
        "restarts": 0,
        "seconds": 0.0,
        "env_steps_per_s": 0.0,
    }
    if not todo:
        return summary
    bar = tqdm(total=len(todo) * (cfg.max_steps or 1000), desc=f"collect {cfg.policy}", unit="step", unit_scale=True,
               disable=not progress, dynamic_ncols=True)
    t0 = time.perf_counter()

    def record(idx: int, info: dict[str, Any], write: bool = True) -> None:
        """List episode idx (its file is written); `write=False` leaves writing the manifest to a later record()
        or flush (the Ray driver writes once per batch of episodes that landed together)."""
        manifest["episodes"] = [e for e in manifest["episodes"] if e["index"] != idx]
        who = {
            "policy": policy_kind(cfg.policy, idx),
            **({"controller": controller} if cfg.policy == "controller" else {}),
        }
        manifest["episodes"].append({"index": idx, "file": episode_name(idx), **info, **who})
        if write:
            write_manifest(out, manifest)
        summary["new_episodes"] += 1
        summary["steps"] += info["steps"]
        bar.set_postfix(episodes=f"{len(manifest['episodes'])}/{cfg.episodes}", ret=f"{info['return']:.1f}")

    try:
        if inprocess:
            env = make_env(cfg.env_id, cfg.max_steps)
            cached: dict[str, Any] = {}
            for idx in todo:
                ep_seed = episode_seed(seed, idx)
                policy = _make_policy(job, np.random.default_rng(ep_seed), cached, idx)
                ep = run_episode(env, policy, ep_seed, FRAME_SIZE, bar.update)
                save_episode(out / episode_name(idx), ep)
                record(idx, {"steps": ep.steps, "return": ep.ret, "terminated": bool(ep.terminated[-1]),
                             "seed": ep_seed})
            env.close()
        elif backend.is_ray:
            summary["ray_start_seconds"] = _run_ray(job, workers, todo, record, lambda: write_manifest(out, manifest),
                                                    bar, backend, env_setup, model)
        else:
            _run_pool(job, workers, todo, record, bar, summary, env_setup)
    finally:
        bar.close()
    summary["episodes"] = len(manifest["episodes"])
    summary["seconds"] = round(time.perf_counter() - t0, 2)
    busy = summary["seconds"] - summary.get("ray_start_seconds", 0.0)  # the rate of collection, not of Ray's start
    summary["env_steps_per_s"] = round(summary["steps"] / max(busy, 1e-9), 1)
    return summary


# the settings every episode of a rollout folder shares, and the flags that set them
SHARED = {"env_id": "--env-id", "max_steps": "--max-steps", "frame_size": ""}
BASE = {"policy": "--policy", "seed": "--seed"}  # shared by the collection's own episodes (not the rounds')


def record_settings(out: Path, manifest: dict[str, Any], cfg: CollectConfig, seed: int, controller: str = "") -> None:
    """Check this collection against the folder's recorded settings and record it in `manifest`.

    `config` holds the folder's own collection (env_id, episodes asked for, max_steps, policy, seed, frame size);
    controller episodes (iterative rounds: policy=controller, a seed per round) are appended under `rounds`. Every
    episode shares env_id, max_steps and frame size; the collection's own episodes also share policy and seed
    (episode i is seeded from (seed, i)). A resume that asks for another value is an error naming both: before, it
    silently mixed episodes of different lengths and policies in one manifest."""
    new = {**dataclasses.asdict(cfg), "seed": seed, "frame_size": FRAME_SIZE}
    old = manifest.get("config")
    if not isinstance(old, dict):
        old = None
    legacy = old is not None and old.get("policy") == "controller"  # an earlier release recorded the last round here
    keys = dict(SHARED) if cfg.policy == "controller" or legacy else {**SHARED, **BASE}
    for k, flag in (keys.items() if old and manifest["episodes"] else ()):
        if k in old and old[k] != new[k]:
            setting = "seed" if k == "seed" else f"collect.{k}"
            how = f"{flag} {old[k]} (or --set {setting}={old[k]})" if flag else "the dreamlab release that made it"
            raise DreamlabError(f"{out} holds episodes collected with {k}={old[k]!r}, not {k}={new[k]!r}; resume with "
                                f"{how}, or collect into another folder")
    if cfg.policy == "controller":
        rounds = manifest.setdefault("rounds", [])
        this = {"controller": controller, "seed": seed, "episodes": cfg.episodes}
        if rounds and (rounds[-1]["controller"], rounds[-1]["seed"]) == (controller, seed):
            rounds[-1] = this
        else:
            rounds.append(this)
        manifest.setdefault("config", new)
    else:
        if old and not legacy and manifest["episodes"]:
            new["episodes"] = max(int(old.get("episodes", 0)), cfg.episodes)
        manifest["config"] = new


def collected_settings(out: str | Path) -> dict[str, Any]:
    """The settings a rollout folder's own collection was made with ({} if none are recorded): a resume continues
    with them unless the command gives others."""
    p = Path(out) / "manifest.json"
    old = read_manifest(out).get("config") if p.exists() else None
    return {} if not isinstance(old, dict) or old.get("policy") == "controller" else old


def _drop_damaged(out: Path, manifest: dict[str, Any]) -> None:
    """Unlist episodes whose file is missing or no whole zip (deleted as an error message advised, or truncated by a
    crash of the disk): a resume collects them again (the same seed gives the same episode) instead of the next
    stage failing on them."""
    bad = [e for e in manifest["episodes"] if not episode_file_intact(out / e["file"])]
    if not bad:
        return
    manifest["episodes"] = [e for e in manifest["episodes"] if e not in bad]
    names = ", ".join(e["file"] for e in bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
    print(f"{out}: {len(bad)} listed episode file(s) missing or damaged ({names}): unlisted; a resume of the "
          "collection that made them collects them again", file=sys.stderr, flush=True)


def _run_pool(job: _Job, workers: int, todo: list[int], record: Any, bar: Any, summary: dict[str, Any],
              env_setup: EnvSetup | None) -> None:
    """Run episodes on worker processes. The parent hands each worker one episode at a time through the
    worker's own queue, so it always knows what a worker was doing: when a worker dies (even before any of
    its messages got out), its episode is handed to the restarted worker. Each worker reports on its own pipe:
    with one queue shared by all workers, a worker killed while writing to it left the queue's lock held and
    the other workers blocked forever on their next message (the run hung instead of restarting it)."""
    import multiprocessing as mp
    from multiprocessing.connection import wait

    ctx = mp.get_context("spawn")
    cfg = job.cfg
    n = workers or os.cpu_count() or 1
    n = max(1, min(n, len(todo)))
    conns: dict[int, Any] = {}  # wid -> the read end of the worker's pipe (None once it hit EOF)
    parent = os.getpid()
    pending = list(reversed(todo))  # popped from the end: episodes in order
    remaining = set(todo)
    assigned: dict[int, int | None] = dict.fromkeys(range(n))
    queues: dict[int, Any] = {}
    errors: dict[int, int] = {}

    def spawn(wid: int) -> Any:
        queues[wid] = ctx.Queue()
        recv, send = ctx.Pipe(duplex=False)
        p = ctx.Process(target=_worker, args=(wid, job, queues[wid], send, parent, env_setup), daemon=True,
                        name=f"collect-{wid}")
        p.start()
        send.close()  # the worker holds the only write end: its death reads as EOF here
        conns[wid] = recv
        return p

    def receive(wid: int) -> bool:
        """Handle one message of worker wid; False (and the pipe closed) at EOF or a message cut off mid-way."""
        try:
            msg = conns[wid].recv()
        except (EOFError, OSError):
            conns[wid].close()
            conns[wid] = None
            return False
        handle(msg)
        return True

    def assign(wid: int) -> None:
        while pending and pending[-1] not in remaining:
            pending.pop()
        assigned[wid] = pending.pop() if pending else None
        if assigned[wid] is not None:
            queues[wid].put(assigned[wid])

    def handle(msg: tuple) -> None:
        kind, wid = msg[0], msg[1]
        if kind == "steps":
            bar.update(msg[2])
            return
        if kind == "fatal":
            raise DreamlabError(f"a collector worker could not start: {msg[2]}")
        idx = msg[2]
        if assigned.get(wid) != idx:
            return  # a stale message from a worker that has since been replaced
        if kind == "done":
            if idx in remaining:
                remaining.discard(idx)
                record(idx, msg[3])
        elif kind == "error":
            errors[idx] = errors.get(idx, 0) + 1
            if errors[idx] > 2:
                raise DreamlabError(f"episode {idx} failed 3 times in {cfg.env_id}: {msg[3]}")
            pending.append(idx)
        assign(wid)

    procs = {w: spawn(w) for w in range(n)}
    for w in procs:
        assign(w)
    try:
        while remaining:
            # wakes on a message or on a worker's exit (its process sentinel), whichever comes first
            live = {c: w for w, c in conns.items() if c is not None}
            for c in wait([*live, *(p.sentinel for p in procs.values())], timeout=0.5):
                if c in live:
                    receive(live[c])
            for wid, p in list(procs.items()):
                if p.is_alive():
                    continue
                while conns[wid] is not None and receive(
                    wid
                ):  # messages it sent before dying (it may have finished its episode)
                    pass
                summary["restarts"] += 1
                if summary["restarts"] > MAX_RESTARTS:
                    raise DreamlabError(
                        f"collector workers crashed {summary['restarts']} times (last exit code {p.exitcode}); "
                        "see the messages above, fix the env, then rerun with --resume"
                    )
                lost = assigned.get(wid)
                bar.write(f"worker {wid} died (exit code {p.exitcode}); restarted it"
                          + (f", re-running episode {lost}" if lost is not None and lost in remaining else ""))
                procs[wid] = spawn(wid)
                if lost is not None and lost in remaining:
                    queues[wid].put(lost)
                else:
                    assign(wid)
    finally:
        for w in procs:
            queues[w].put(None)
        deadline = time.time() + 5
        for p in procs.values():
            p.join(timeout=max(0.1, deadline - time.time()))
            if p.is_alive():
                p.terminate()
                p.join(1)
        for c in conns.values():
            if c is not None:
                c.close()
