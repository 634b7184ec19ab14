"""Where parallel episodes run (dreamlab.parallel): the local pools and Ray give the same files, manifest, resume and
scores for the same seeds; a Ray worker killed mid-run does not stop the run; without Ray, `--backend ray` is a
one-line error. Also the collector's Ctrl-C and bad-env-id behaviour (one line, no worker tracebacks).

One embedded 2-CPU Ray instance (about 4 s and 760 MB to start on an idle machine) serves every test below that needs
Ray (`ray_here`); the CLI test that starts and stops its own instance runs before it, so two never run at once."""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("gymnasium")

from dreamlab.cli import main  # noqa: E402
from dreamlab.errors import DreamlabError  # noqa: E402
from dreamlab.parallel import Backend, ray_session  # noqa: E402
from envs import register_all  # noqa: E402
from worlds.collect import CollectConfig, collect  # noqa: E402
from worlds.rollouts import load_episode, read_manifest  # noqa: E402

FAST = "dreamlab/CarRacing64-v3"
ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "SDL_VIDEODRIVER": "dummy", "RAY_AUTH_MODE": "disabled"}
has_ray = pytest.mark.skipif(not __import__("importlib").util.find_spec("ray"), reason="ray is not installed")


def _episodes(folder: Path) -> dict[int, tuple[np.ndarray, ...]]:
    m = read_manifest(folder)
    out = {}
    for e in m["episodes"]:
        ep = load_episode(folder / e["file"])
        assert ep.steps == e["steps"]
        out[e["index"]] = (ep.obs, ep.actions, ep.rewards, ep.terminated, ep.truncated)
    return out


def _same_episodes(a: Path, b: Path) -> None:
    ea, eb = _episodes(a), _episodes(b)
    assert sorted(ea) == sorted(eb)
    for i in ea:
        for x, y in zip(ea[i], eb[i]):
            assert np.array_equal(x, y), f"episode {i} differs"


def _manifest_without_timings(folder: Path) -> dict:
    m = read_manifest(folder)
    m["episodes"] = [{k: v for k, v in e.items() if k != "seconds"} for e in m["episodes"]]
    return m


# ----------------------------------------------------------------------------- settings and a missing Ray


def test_backend_settings_are_checked() -> None:
    from agents.wm_config import apply_settings, make_config

    assert Backend("ray", "auto").is_ray and Backend("ray", "10.0.0.1:6379").address == "10.0.0.1:6379"
    for kind, address, needle in (("spark", "", "backend='spark'"), ("local", "auto", "--backend ray"),
                                  ("ray", "nowhere", "HOST:PORT")):
        with pytest.raises(DreamlabError, match=needle):
            Backend(kind, address)
    cfg = make_config("tiny", {"backend": "ray", "ray_address": "auto"})
    assert cfg.parallel("RUN") == Backend("ray", "auto", str(Path("RUN") / "ray"))
    from agents.worldmodel_cli import _backend_flags  # `--backend local` on a run saved with a cluster address

    back = apply_settings(cfg, _backend_flags(argparse.Namespace(backend="local", ray_address=None)))
    assert back.parallel("RUN") == Backend("local", "", str(Path("RUN") / "ray"))
    with pytest.raises(DreamlabError, match="backend"):
        make_config("tiny", {"backend": "dask"})


def test_backend_ray_without_ray_is_a_one_line_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError, as where it is not installed
    run = tmp_path / "run"
    assert main(["worldmodel", "collect", str(run), "--preset", "tiny", "--env-id", FAST, "--backend", "ray",
                 "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "pip install 'dreamlab[scale]'" in err and len(err.splitlines()) == 1
    assert not (run / "rollouts").exists()  # refused before anything was collected


# ----------------------------------------------------------------------------- the collector's two defects


def test_bad_env_id_is_one_line_not_a_traceback_per_worker(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    """Before: each of the 2 workers died with a traceback, was restarted 8 times: 20 tracebacks in 19 s (the
    workers' stderr is this process's file descriptor 2, which capfd reads)."""
    assert main(["worldmodel", "collect", str(tmp_path / "run"), "--preset", "tiny", "--workers", "2", "--env-id",
                 "NoSuchEnv-v0", "--no-progress"]) == 2
    err = capfd.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err[-3000:]
    assert "NoSuchEnv-v0" in err and err.startswith("error:")
    assert not (tmp_path / "run" / "rollouts").exists()  # nothing recorded: a corrected rerun is not refused


def test_ctrl_c_during_collect_prints_one_line_not_a_traceback_per_worker(tmp_path: Path) -> None:
    """Ctrl-C reaches the terminal's whole process group; before, each worker printed a KeyboardInterrupt traceback."""
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "dreamlab", "worldmodel", "collect", str(run), "--preset", "tiny", "--episodes", "40",
           "--max-steps", "150", "--workers", "2", "--env-id", FAST, "--no-progress"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    man = run / "rollouts" / "manifest.json"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:  # interrupt mid-run: the workers are driving episodes
        if man.exists() and read_manifest(man.parent)["episodes"]:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "collector ended before it could be interrupted"
    os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C does
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err[-3000:]
    assert err.strip().splitlines() == [err.strip()] and err.startswith("interrupted")
    n = len(_episodes(run / "rollouts"))  # whatever was listed is complete; --resume continues
    assert 1 <= n < 40


# ----------------------------------------------------------------------------- Ray: an embedded instance via the CLI


@has_ray
def test_cli_collect_with_an_embedded_ray_matches_local(tmp_path: Path) -> None:
    """`--backend ray` with no address: dreamlab starts Ray with its temp dir in RUN/ray and stops it; the episodes
    equal a local collection's and the run folder remembers the backend."""
    run = tmp_path / "run"
    r = subprocess.run([sys.executable, "-m", "dreamlab", "worldmodel", "collect", str(run), "--preset", "tiny",
                        "--episodes", "3", "--max-steps", "40", "--workers", "2", "--env-id", FAST, "--backend", "ray"],
                       cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads(r.stdout)["episodes"] == 3
    assert "ray: 2 CPUs on 1 node (embedded; temp dir" in r.stderr and "step/s" in r.stderr  # the progress bar
    sessions = [p for p in (run / "ray").glob("session_*") if p.is_dir() and not p.is_symlink()]
    assert len(sessions) == 1 and (sessions[0] / "logs").is_dir()
    assert json.loads((run / "config.json").read_text())["config"]["backend"] == "ray"
    local = tmp_path / "local"
    collect(CollectConfig(env_id=FAST, episodes=3, max_steps=40, policy="brownian"), local, workers=1,
            progress=False, inprocess=True, env_setup=register_all)
    _same_episodes(run / "rollouts", local)
    assert _manifest_without_timings(run / "rollouts") == _manifest_without_timings(local)


# ----------------------------------------------------------------------------- Ray: one shared instance


@pytest.fixture(scope="module")
def ray_here():
    pytest.importorskip("ray")
    tmp = tempfile.mkdtemp(prefix="dlray-test-")
    with ray_session(Backend("ray", temp_dir=tmp), num_cpus=2) as ray:
        yield ray
    import shutil

    shutil.rmtree(tmp, ignore_errors=True)


@has_ray
def test_ray_collect_and_resume_equal_the_local_pool(tmp_path: Path, ray_here) -> None:
    cfg = CollectConfig(env_id=FAST, episodes=4, max_steps=40, policy="mixed")  # brownian + random controllers
    local, far = tmp_path / "local", tmp_path / "ray"
    collect(cfg, local, seed=3, workers=2, progress=False, env_setup=register_all)  # the local worker pool
    half = CollectConfig(env_id=FAST, episodes=2, max_steps=40, policy="mixed")
    collect(half, far, seed=3, workers=2, progress=False, env_setup=register_all, backend=Backend("ray"))
    with pytest.raises(DreamlabError, match="--resume"):
        collect(cfg, far, seed=3, workers=2, progress=False, env_setup=register_all, backend=Backend("ray"))
    res = collect(cfg, far, seed=3, workers=2, progress=False, env_setup=register_all, resume=True,
                  backend=Backend("ray"))
    assert res["new_episodes"] == 2 and res["episodes"] == 4
    assert {n["NodeManagerAddress"] for n in ray_here.nodes()} == {"127.0.0.1"}  # embedded: on loopback only
    _same_episodes(local, far)
    assert _manifest_without_timings(local) == _manifest_without_timings(far)


def _our_ray_workers(title: str) -> list[int]:
    """Pids of this process's descendants whose title is `title` (Ray names a worker after the task it runs)."""
    parent: dict[int, int] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                parent[int(d.name)] = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    me, out = os.getpid(), []
    for pid in parent:
        p, seen = pid, 0
        while p in parent and p != me and seen < 50:
            p, seen = parent[p], seen + 1
        if p == me and pid != me and _cmdline(pid).startswith(title):
            out.append(pid)
    return out


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


class _Killer:
    """SIGKILLs one Ray worker of this process while it runs the task `title`, once `ready()` says the run is under
    way (a thread; `killed` holds the pid and the title the process had just before)."""

    def __init__(self, title: str, ready) -> None:
        self.title, self.ready, self.killed = title, ready, []
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.done.is_set() and not self.killed:
            if self.ready():
                for pid in _our_ray_workers(self.title):
                    title = _cmdline(pid)
                    if title.startswith(self.title):  # still running the task, not idle
                        os.kill(pid, signal.SIGKILL)
                        self.killed.append((pid, title))
                        break
            time.sleep(0.01)

    def __enter__(self) -> _Killer:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.done.set()
        self.thread.join(5)


@has_ray
def test_a_ray_worker_killed_mid_run_does_not_stop_the_collection(tmp_path: Path, ray_here) -> None:
    cfg = CollectConfig(env_id=FAST, episodes=6, max_steps=120, policy="brownian")
    out = tmp_path / "ray"

    def under_way() -> bool:  # an episode is listed: the run is past its start, the workers are driving
        return (out / "manifest.json").exists() and bool(read_manifest(out)["episodes"])

    with _Killer("ray::collect_episode", under_way) as k:
        res = collect(cfg, out, seed=5, workers=2, progress=False, env_setup=register_all, backend=Backend("ray"))
    assert k.killed, "no Ray worker was caught driving an episode"
    assert res["episodes"] == 6
    ref = tmp_path / "ref"
    collect(cfg, ref, seed=5, progress=False, inprocess=True, env_setup=register_all)
    _same_episodes(out, ref)  # the episode whose worker died was re-run from its seed: the same episode


def _tiny_run(run: Path, controller: bool = True) -> None:
    """A world-model run folder with untrained V and M (and a random controller): enough to drive real episodes."""
    from agents.wm_config import config_json, make_config
    from dreamlab.io import save_json
    from worlds.dream import tiny_world_model, write_world_run
    from worlds.policies import num_params, save_controller

    write_world_run(run, *tiny_world_model(seed=0))
    save_json(run / "config.json", config_json(make_config("tiny", {"collect.env_id": FAST}), "tiny"))
    if controller:
        theta = np.random.default_rng(0).normal(0, 0.5, num_params(8, 16))
        save_controller(run / "controller" / "best.safetensors", theta, 8, 16)


@has_ray
def test_cli_evaluate_with_ray_gives_the_local_scores(tmp_path: Path, ray_here,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    _tiny_run(run)
    name = "controller_seed4_n3_dreamlab-CarRacing64-v3_steps40.json"
    args = ["worldmodel", "evaluate", str(run), "--episodes", "3", "--seed", "4", "--max-steps", "40", "--env-id",
            FAST, "--no-video", "--no-progress"]
    assert main([*args, "--backend", "local", "--workers", "1"]) == 0
    local = json.loads((run / "eval" / name).read_text())
    rnd_local = json.loads((run / "eval" / name.replace("controller", "random")).read_text())
    assert main([*args, "--backend", "ray", "--workers", "2"]) == 0
    far = json.loads((run / "eval" / name).read_text())
    rnd_far = json.loads((run / "eval" / name.replace("controller", "random")).read_text())
    assert far["scores"] == local["scores"] and far["steps"] == local["steps"] and far["seeds"] == [4, 5, 6]
    assert rnd_far["scores"] == rnd_local["scores"]
    assert len(set(local["scores"])) > 1  # three different tracks: a real comparison, not one number thrice
    assert "backend" not in json.loads((run / "config.json").read_text())["config"] or \
        json.loads((run / "config.json").read_text())["config"]["backend"] == "local"  # evaluate changes no setting


@has_ray
def test_real_evaluator_on_ray_survives_a_killed_worker_and_reports_task_errors(ray_here) -> None:
    from agents.evaluate import RealEvaluator

    tasks = [("random", None, s, False) for s in (9, 3, 7, 1, 5, 2)]
    with RealEvaluator(None, FAST, workers=1, max_steps=60) as ev:
        ref = ev.run(tasks, progress=False)
    with RealEvaluator(None, FAST, workers=2, max_steps=60, backend=Backend("ray")) as ev:
        with _Killer("ray::real_episode", lambda: True) as k:
            got = ev.run(tasks, progress=False)
        assert k.killed, "no Ray worker was caught driving an episode"
        assert [r["seed"] for r in got] == [9, 3, 7, 1, 5, 2]  # in task order
        assert [(r["return"], r["steps"]) for r in got] == [(r["return"], r["steps"]) for r in ref]
        with pytest.raises(DreamlabError, match="world model"):  # a controller task with no V and M: the task's error
            ev.run([("controller", np.zeros(3, np.float32), 0, False)], progress=False)


@has_ray
def test_cmaes_with_real_fitness_and_checks_on_ray_repeats_the_local_search(tmp_path: Path, ray_here,
                                                                            capsys: pytest.CaptureFixture[str]) -> None:
    """`train-controller --fitness real --backend ray`: every candidate's real episodes and the periodic real checks
    run as Ray tasks; the seeded search gives the same generations and the same kept controller as locally."""
    from worlds.policies import controller_metadata, load_controller

    rows = {}
    for backend, workers in (("local", "1"), ("ray", "2")):
        run = tmp_path / backend
        _tiny_run(run, controller=False)
        assert main(["worldmodel", "train-controller", str(run), "--fitness", "real", "--generations", "2",
                     "--popsize", "4", "--rollouts", "2", "--eval-every", "1", "--set", "dream.horizon=25",
                     "--set", "selection.check_episodes=2", "--set", f"workers={workers}", "--backend", backend,
                     "--no-progress"]) == 0
        fit = [json.loads(x) for x in (run / "controller" / "fitness.jsonl").read_text().splitlines()]
        best = run / "controller" / "best.safetensors"
        rows[backend] = ([{k: v for k, v in r.items() if k != "seconds"} for r in fit],
                         load_controller(best)[0].tolist(), controller_metadata(best))
        assert json.loads((run / "config.json").read_text())["config"]["backend"] == backend  # remembered
    assert len(rows["ray"][0]) == 2 and "real_mean" in rows["ray"][0][-1]
    assert rows["ray"] == rows["local"]
