"""Kill tests: the collector, CMA-ES and the encode stage are SIGKILLed at >= 10 seeded moments each, then resumed.

A moment is a file write: the child process (a fork of this one, so no import time) SIGKILLs itself just before or
just after its k-th `os.replace` (every atomic write of dreamlab.io ends in one; a kill before it leaves the written
temp file behind, a kill after it the new file without whatever the code writes next). The moments are drawn with a
fixed seed from the writes an uninterrupted run makes. After each kill: whatever the folder lists loads, nothing that
was finished before the kill is lost beyond the one item in flight, and a resume completes to the same files as the
uninterrupted run (episodes, latents: bit for bit; CMA-ES: the same fitness rows and the same best controller).
"""
from __future__ import annotations

import os
import random
import signal
import traceback
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("gymnasium")
pytest.importorskip("cma")

from agents.cma_search import SearchConfig, cma_state_info  # noqa: E402
from agents.cmaes import read_fitness, train_controller  # noqa: E402
from agents.selection import SelectionConfig  # noqa: E402
from envs import register_all  # noqa: E402
from worlds.collect import CollectConfig, collect  # noqa: E402
from worlds.dream import DreamConfig, tiny_world_model, write_world_run  # noqa: E402
from worlds.encode import encode_rollouts, latent_files, load_latents  # noqa: E402
from worlds.policies import controller_metadata, load_controller  # noqa: E402
from worlds.rollouts import load_episode, read_manifest  # noqa: E402

pytestmark = pytest.mark.usefixtures("torch_one_thread")

FAST = "dreamlab/CarRacing64-v3"
MOMENTS = 10


def _moments(writes: int, seed: int) -> list[tuple[int, bool]]:
    """MOMENTS distinct (k-th write, after it?) pairs out of an uninterrupted run's `writes`."""
    every = [(k, after) for k in range(1, writes + 1) for after in (False, True)]
    assert len(every) >= MOMENTS, f"only {writes} writes: too few moments to kill at"
    return sorted(random.Random(seed).sample(every, MOMENTS))


def _count_writes(fn: Callable[[], object], monkeypatch: pytest.MonkeyPatch) -> int:
    n = [0]
    real = os.replace

    def counting(*a: object, **k: object) -> None:
        n[0] += 1
        real(*a, **k)

    with monkeypatch.context() as m:
        m.setattr(os, "replace", counting)
        fn()
    return n[0]


def _run_killed(fn: Callable[[], object], k: int, after: bool) -> None:
    """fn() in a forked child that SIGKILLs itself before/after its k-th os.replace; asserts it died of SIGKILL."""
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        try:
            torch.set_num_threads(1)
            real, n = os.replace, [0]

            def replace(*a: object, **kw: object) -> None:
                n[0] += 1
                if n[0] == k and not after:
                    os.kill(os.getpid(), signal.SIGKILL)
                real(*a, **kw)
                if n[0] == k and after:
                    os.kill(os.getpid(), signal.SIGKILL)

            os.replace = replace
            fn()
            os._exit(0)  # finished before the k-th write: the test fails below
        except BaseException:  # noqa: BLE001
            traceback.print_exc()
            os._exit(3)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, (k, after, status)


# ----------------------------------------------------------------------------- the collector


def _collect(out: Path, resume: bool = False) -> dict:
    return collect(CollectConfig(episodes=5, max_steps=12, env_id=FAST), out, seed=3, progress=False, inprocess=True,
                   env_setup=register_all, resume=resume)


def _episodes(folder: Path) -> dict[int, object]:
    """Every listed episode, loaded (a listed file that does not load fails the test)."""
    return {e["index"]: load_episode(folder / e["file"]) for e in read_manifest(folder)["episodes"]}


def test_collector_killed_at_seeded_moments_resumes_to_the_same_episodes(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    ref = tmp_path / "ref"
    writes = _count_writes(lambda: _collect(ref), monkeypatch)
    want = _episodes(ref)
    assert sorted(want) == list(range(5))
    for i, (k, after) in enumerate(_moments(writes, seed=62)):
        out = tmp_path / f"kill{i}"
        _run_killed(lambda out=out: _collect(out), k, after)
        # an episode file and then the manifest are written per episode: the listed ones are every finished episode
        # but the one in flight (its file may be on disk, unlisted)
        listed = _episodes(out) if (out / "manifest.json").exists() else {}
        on_disk = {int(p.stem[3:]) for p in out.glob("ep_*.npz")}
        assert set(listed) <= on_disk and len(on_disk - set(listed)) <= 1, (k, after, listed.keys(), on_disk)
        assert sorted(listed) == list(range(len(listed)))
        _collect(out, resume=True)
        got = _episodes(out)
        assert sorted(got) == list(range(5)), (k, after)
        assert not list(out.glob(".*.tmp")), "a killed write's temp file was left behind"
        for idx, ep in want.items():
            assert np.array_equal(got[idx].obs, ep.obs) and np.array_equal(got[idx].actions, ep.actions), (k, idx)


# ----------------------------------------------------------------------------- CMA-ES


def _controller(path: Path) -> tuple[list[float], dict[str, str]]:
    return load_controller(path)[0].tolist(), controller_metadata(path)


def _train(run: Path, out: Path, resume: bool = False) -> dict:
    return train_controller(run, SearchConfig(generations=6, popsize=4, rollouts=1, sigma0=0.2),
                            SelectionConfig(check_every=0), DreamConfig(horizon=6), seed=1, workers=1, env_id=FAST,
                            device="cpu", progress=False, out=out, resume=resume)


def test_cmaes_killed_at_seeded_moments_resumes_to_the_same_search(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    vae, mdn, mu, lv = tiny_world_model(seed=0)
    run = write_world_run(tmp_path / "wm", vae, mdn, mu, lv)
    ref = tmp_path / "ref"
    writes = _count_writes(lambda: _train(run, ref), monkeypatch)
    want_rows = read_fitness(ref)
    want_best = _controller(ref / "best.safetensors")
    assert [r["generation"] for r in want_rows] == list(range(1, 7))
    keys = ("best", "mean", "worst", "mean_candidate", "sigma")
    for i, (k, after) in enumerate(_moments(writes, seed=62)):
        out = tmp_path / f"kill{i}"
        _run_killed(lambda out=out: _train(run, out), k, after)
        state = out / "cma_state.safetensors"
        if state.exists():  # the search checkpoints every generation: at most the one in flight is lost
            saved = int(cma_state_info(out)["generation"])
            rows = read_fitness(out)  # appended before the state is saved: the generation in flight may be there
            assert saved >= 1 and len(rows) - saved in (0, 1), (k, after, saved, len(rows))
        _train(run, out, resume=state.exists())
        rows = read_fitness(out)
        assert [r["generation"] for r in rows] == list(range(1, 7)), (k, after)
        for a, b in zip(want_rows, rows):
            assert {x: a[x] for x in keys} == {x: b[x] for x in keys}, (k, after, a, b)
        assert _controller(out / "best.safetensors") == want_best, (k, after)
        assert not list(out.glob(".*.tmp")) and not list(out.glob("*.tmp")), "a killed write's temp was left behind"


# ----------------------------------------------------------------------------- the encode stage


def test_encode_killed_at_seeded_moments_resumes_to_the_same_latents(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    rollouts = tmp_path / "rollouts"
    collect(CollectConfig(episodes=6, max_steps=10, env_id=FAST), rollouts, seed=5, progress=False, inprocess=True,
            env_setup=register_all)
    vae = tiny_world_model(seed=0)[0]

    def encode(out: Path) -> dict:
        return encode_rollouts(vae, rollouts, out, progress=False, vae_id="v1")

    ref = tmp_path / "ref"
    writes = _count_writes(lambda: encode(ref), monkeypatch)
    want = {f.name: load_latents(f) for f in latent_files(ref)}
    assert len(want) == 6
    for i, (k, after) in enumerate(_moments(writes, seed=62)):
        out = tmp_path / f"kill{i}"
        _run_killed(lambda out=out: encode(out), k, after)
        # a latent file and then the manifest are written per episode
        listed = [f.name for f in latent_files(out)] if (out / "manifest.json").exists() else []
        for name in listed:
            load_latents(out / name)
        on_disk = {p.name for p in out.glob("ep_*.safetensors")}
        assert set(listed) <= on_disk and len(on_disk - set(listed)) <= 1, (k, after, listed, on_disk)
        assert len(set(listed)) == len(listed)
        res = encode(out)
        # only what the kill did not finish is encoded again
        assert res["encoded_frames"] <= sum(len(want[n]["mu"]) for n in want if n not in listed), (k, after)
        got = [f.name for f in latent_files(out)]
        assert got == sorted(want), (k, after, got)
        for name in got:
            t = load_latents(out / name)
            assert all(torch.equal(t[x], want[name][x]) for x in t), (k, after, name)
        assert not list(out.glob(".*.tmp"))
