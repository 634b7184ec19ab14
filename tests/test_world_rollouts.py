"""Collector (kill-and-resume, worker restart), episode files (corrupt-file errors) and V's streaming loader."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("gymnasium")

from dreamlab.errors import DreamlabError  # noqa: E402
from envs import register_all  # noqa: E402
from worlds.collect import CollectConfig, collect  # noqa: E402
from worlds.rollouts import episode_files, load_episode, read_manifest  # noqa: E402

FAST = "dreamlab/CarRacing64-v3"  # same physics as gymnasium's CarRacing-v3, rendered straight at 64x64
ROOT = Path(__file__).resolve().parents[1]


def _listed_ok(folder: Path) -> list[int]:
    m = read_manifest(folder)
    for e in m["episodes"]:
        ep = load_episode(folder / e["file"])
        assert ep.steps == e["steps"]
        assert ep.obs.shape == (e["steps"] + 1, 64, 64, 3)
    return sorted(e["index"] for e in m["episodes"])


def test_collector_kill_and_resume(tmp_path: Path) -> None:
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "dreamlab", "worldmodel", "collect", str(run), "--preset", "tiny", "--episodes", "8",
           "--max-steps", "30", "--workers", "2", "--env-id", FAST, "--no-progress"]
    env = {**os.environ, "SDL_VIDEODRIVER": "dummy"}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    man = run / "rollouts" / "manifest.json"
    deadline = time.time() + 180
    listed = 0
    while time.time() < deadline and proc.poll() is None:
        if man.exists():
            listed = len(json.loads(man.read_text())["episodes"])  # atomic writes: never a half-written file
            if listed >= 2:
                break
        time.sleep(0.05)
    assert proc.poll() is None, f"collector ended before it could be killed: {proc.stdout.read().decode()[-2000:]}"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    before = _listed_ok(run / "rollouts")
    assert 2 <= len(before) < 8
    # resume to the requested count
    out = subprocess.run(cmd + ["--resume"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert _listed_ok(run / "rollouts") == list(range(8))
    # an episode depends only on (seed, index): the resumed run equals a fresh in-process collection
    fresh = tmp_path / "fresh"
    collect(CollectConfig(episodes=2, max_steps=30, env_id=FAST, policy="brownian"), fresh, seed=0, progress=False,
            inprocess=True, env_setup=register_all)
    for i in (0, 1):
        a, b = load_episode(run / "rollouts" / f"ep_{i:06d}.npz"), load_episode(fresh / f"ep_{i:06d}.npz")
        assert (
            np.array_equal(a.obs, b.obs)
            and np.array_equal(a.actions, b.actions)
            and np.array_equal(a.rewards, b.rewards)
        )


def test_crashed_worker_is_restarted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DREAMLAB_COLLECT_CRASH_ONCE", "1")
    out = tmp_path / "r"
    res = collect(CollectConfig(episodes=3, max_steps=20, env_id=FAST), out, workers=2, progress=False,
                  env_setup=register_all)
    assert res["restarts"] >= 1
    assert (out / ".crashed_1").exists()
    assert _listed_ok(out) == [0, 1, 2]


def test_corrupt_episode_error_names_file(tmp_path: Path) -> None:
    out = tmp_path / "run" / "rollouts"
    collect(CollectConfig(episodes=2, max_steps=15, env_id=FAST), out, progress=False, inprocess=True,
            env_setup=register_all)
    bad = out / "ep_000001.npz"
    data = bad.read_bytes()
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(DreamlabError, match="ep_000001.npz"):
        load_episode(bad)
    # through the real CLI: the streaming V loader hits the file and the error names it (exit code 2)
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "dreamlab",
            "worldmodel",
            "train-vae",
            str(tmp_path / "run"),
            "--preset",
            "tiny",
            "--no-progress",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 2
    assert "ep_000001.npz" in r.stderr and r.stderr.strip().startswith("error:")
    # wrong shapes inside a well-formed file are caught too
    np.savez_compressed(
        bad,
        obs=np.zeros((3, 64, 64, 3), np.uint8),
        actions=np.zeros((5, 3), np.float32),
        rewards=np.zeros(5, np.float32),
        terminated=np.zeros(5, bool),
        truncated=np.zeros(5, bool),
    )
    with pytest.raises(DreamlabError, match="ep_000001.npz.*frames"):
        load_episode(bad)


def test_streaming_loader_reads_few_episodes_at_a_time(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    import worlds.models as wm

    out = tmp_path / "r"
    collect(CollectConfig(episodes=4, max_steps=10, env_id=FAST), out, progress=False, inprocess=True,
            env_setup=register_all)
    files = episode_files(out)
    loads: list[Path] = []
    real = wm.load_episode

    def counting(p: Path):
        loads.append(Path(p))
        return real(p)

    monkeypatch.setattr(wm, "load_episode", counting)
    torch.manual_seed(0)
    stream = wm.FrameStream(files, shuffle=True, buffer_episodes=1)
    it = iter(stream)
    first = next(it)["x"]
    assert first.dtype == torch.uint8 and first.shape == (3, 64, 64)
    assert len(loads) == 1  # only one episode in memory before the first frame is served
    frames = [first] + [b["x"] for b in it]
    assert len(loads) == 4 and len(frames) == 4 * 11
    allf = np.concatenate([real(f).obs for f in files]).transpose(0, 3, 1, 2)
    got = torch.stack(frames).numpy()
    assert sorted(map(bytes, got)) == sorted(map(bytes, allf))  # every frame exactly once
    assert not np.array_equal(got, allf)  # shuffled


def test_pursuit_policy_drives_the_road_and_explore_cycles_policies(tmp_path: Path) -> None:
    """The track follower collects tile rewards (random policies rarely do); `explore` cycles three policies."""
    from worlds.collect import _Job, _make_policy
    from worlds.driving import BrownianPolicy, PursuitPolicy, make_env, run_episode

    env = make_env("dreamlab/CarRacing64-v3", 150)
    rets = [run_episode(env, PursuitPolicy(np.random.default_rng(s), burst_p=0.0), 1000 + s).ret for s in range(2)]
    env.close()
    assert min(rets) > 20.0, rets  # 150 steps of -0.1 each = -15 without a single tile
    job = _Job(CollectConfig(policy="explore"), tmp_path, 0)
    kinds = [type(_make_policy(job, np.random.default_rng(i), {}, i)).__name__ for i in range(3)]
    assert kinds == [BrownianPolicy.__name__, "ModelPolicy", PursuitPolicy.__name__]


def test_pursuit_policy_needs_a_track() -> None:
    from worlds.driving import PursuitPolicy

    class NoTrack:
        unwrapped = object()

    with pytest.raises(DreamlabError, match="pursuit.*track"):
        PursuitPolicy(np.random.default_rng(0)).bind(NoTrack())


def test_real_evaluator_reruns_the_episodes_of_a_dead_worker(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from agents.evaluate import RealEvaluator

    tasks = [("random", None, s, False) for s in range(5)]
    with RealEvaluator(None, FAST, workers=1, max_steps=20) as ev:
        ref = ev.run(tasks, progress=False)
    monkeypatch.setenv("DREAMLAB_EVAL_CRASH_ONCE", f"{tmp_path}:2")  # the worker running env seed 2 dies once
    with RealEvaluator(None, FAST, workers=2, max_steps=20) as ev:
        got = ev.run(tasks, progress=False)
    assert (tmp_path / ".crashed_2").exists()
    assert [(r["seed"], r["return"], r["steps"]) for r in got] == [(r["seed"], r["return"], r["steps"]) for r in ref]
