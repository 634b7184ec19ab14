"""Hostile inputs: every loader of a file dreamlab writes (episode files and their manifest, latents and theirs,
a model's safetensors weights, a world-model run's config.json, controller files, the CMA-ES state, fitness.jsonl, the
dataset cache) and the prompt checks, fed truncated, empty, wrong-shape, wrong-dtype, NaN/inf and pickle-bearing
input. Each is refused with a one-line DreamlabError naming the file (the cache, which is rebuilt, with a one-line
warning naming it), and nothing is ever unpickled: pickle and torch.load fail the test if anything calls them, and the
pickles carry a payload that would create a file if it ran."""
from __future__ import annotations

import json
import pickle
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from dreamlab.errors import DreamlabError
from dreamlab.io import cached_array, save_json, save_tensors

KINDS = ("truncated", "empty", "wrong_shape", "wrong_dtype", "nonfinite", "pickle")


class _Payload:
    """Unpickling this creates `marker`: the proof that something unpickled."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (Path.touch, (self.marker,))


def _pickle_bytes(marker: Path) -> bytes:
    return pickle.dumps({"theta": _Payload(marker)})


@pytest.fixture(autouse=True)
def _no_unpickling(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    def refuse(*a: object, **k: object) -> None:
        raise AssertionError("a loader unpickled its input")

    for mod, name in ((pickle, "load"), (pickle, "loads"), (torch, "load")):
        monkeypatch.setattr(mod, name, refuse)
    marker = tmp_path / "UNPICKLED"
    yield marker
    assert not marker.exists(), "a pickle payload ran"


def _refused(call: Callable[[], object], path: Path, needle: str = "") -> str:
    """call() raises a one-line DreamlabError that names `path` (and holds `needle`)."""
    with pytest.raises(DreamlabError) as e:
        call()
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg and needle in msg, msg
    return msg


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


# ----------------------------------------------------------------------------- episode files and their manifest


def _episode(steps: int = 4, **over: np.ndarray) -> dict[str, np.ndarray]:
    arrs = {"obs": np.zeros((steps + 1, 64, 64, 3), np.uint8), "actions": np.zeros((steps, 3), np.float32),
            "rewards": np.zeros(steps, np.float32), "terminated": np.zeros(steps, bool),
            "truncated": np.zeros(steps, bool)}
    return {**arrs, **over}


@pytest.mark.parametrize("kind", KINDS)
def test_episode_file(kind: str, tmp_path: Path, _no_unpickling: Path) -> None:
    from worlds.rollouts import load_episode

    p = tmp_path / "run" / "rollouts" / "ep_000000.npz"
    p.parent.mkdir(parents=True)
    np.savez_compressed(p, **_episode())
    load_episode(p)  # the untouched file loads
    if kind == "truncated":
        _truncate(p)
    elif kind == "empty":
        p.write_bytes(b"")
    elif kind == "wrong_shape":
        np.savez_compressed(p, **_episode(obs=np.zeros((4, 64, 64, 3), np.uint8)))
    elif kind == "wrong_dtype":
        np.savez_compressed(p, **_episode(actions=np.array([["a", "b", "c"]] * 4)))
    elif kind == "nonfinite":
        np.savez_compressed(p, **_episode(rewards=np.array([0, np.nan, 0, np.inf], np.float32)))
    else:
        np.savez(p, **_episode(actions=np.array([_Payload(_no_unpickling)] * 4, dtype=object)))
    msg = _refused(lambda: load_episode(p), p)
    assert f"dreamlab worldmodel collect {tmp_path / 'run'} --resume" in msg  # the fix, for this run


@pytest.mark.parametrize("kind", ["truncated", "empty", "wrong_shape", "wrong_dtype", "pickle"])
def test_rollout_manifest(kind: str, tmp_path: Path, _no_unpickling: Path) -> None:
    from worlds.rollouts import read_manifest

    folder = tmp_path / "rollouts"
    good = {"version": 1, "episodes": [{"index": 0, "file": "ep_000000.npz", "steps": 4}]}
    save_json(folder / "manifest.json", good)
    read_manifest(folder)
    p = folder / "manifest.json"
    bad = {"truncated": p.read_bytes()[:20], "empty": b"", "wrong_shape": b"[1, 2]",
           "wrong_dtype": json.dumps({"episodes": [{"index": "zero", "file": 3, "steps": 4}]}).encode(),
           "pickle": _pickle_bytes(_no_unpickling)}[kind]
    p.write_bytes(bad)
    _refused(lambda: read_manifest(folder), p)


# ----------------------------------------------------------------------------- latents


def _latents(n: int = 4, z: int = 8, **over: torch.Tensor) -> dict[str, torch.Tensor]:
    t = {"mu": torch.zeros(n + 1, z, dtype=torch.float16), "logvar": torch.zeros(n + 1, z, dtype=torch.float16),
         "action": torch.zeros(n, 3), "reward": torch.zeros(n), "done": torch.zeros(n, dtype=torch.uint8)}
    return {**t, **over}


@pytest.mark.parametrize("kind", KINDS)
def test_latent_file(kind: str, tmp_path: Path, _no_unpickling: Path) -> None:
    from worlds.encode import load_latents

    p = tmp_path / "run" / "latents" / "ep_000000.safetensors"
    save_tensors(p, _latents())
    load_latents(p)
    if kind == "truncated":
        _truncate(p)
    elif kind == "empty":
        p.write_bytes(b"")
    elif kind == "wrong_shape":
        save_tensors(p, _latents(mu=torch.zeros(3, 8)))
    elif kind == "wrong_dtype":
        save_tensors(p, _latents(mu=torch.zeros(5, 8, dtype=torch.int64)))
    elif kind == "nonfinite":
        save_tensors(p, _latents(logvar=torch.full((5, 8), float("inf"))))
    else:
        p.write_bytes(_pickle_bytes(_no_unpickling))
    msg = _refused(lambda: load_latents(p), p)
    assert f"dreamlab worldmodel encode {tmp_path / 'run'}" in msg


@pytest.mark.parametrize("kind", ["truncated", "empty", "wrong_shape", "pickle"])
def test_latents_manifest(kind: str, tmp_path: Path, _no_unpickling: Path) -> None:
    from worlds.encode import latent_files

    folder = tmp_path / "latents"
    save_json(folder / "manifest.json", {"vae": "x", "z_dim": 8, "episodes": [{"file": "ep_000000.safetensors"}]})
    p = folder / "manifest.json"
    bad = {"truncated": p.read_bytes()[:15], "empty": b"", "wrong_shape": b'{"episodes": {"file": 1}}',
           "pickle": _pickle_bytes(_no_unpickling)}[kind]
    p.write_bytes(bad)
    _refused(lambda: latent_files(folder), p)


# ----------------------------------------------------------------------------- a world model's weights and config


@pytest.fixture
def world_run(tmp_path: Path) -> Path:
    from worlds.dream import tiny_world_model, write_world_run

    vae, mdn, mu, lv = tiny_world_model(seed=0)
    return write_world_run(tmp_path / "wm", vae, mdn, mu, lv)


@pytest.mark.parametrize("kind", ["truncated", "empty", "nonfinite", "pickle"])
@pytest.mark.parametrize("part", ["vae", "mdn"])
def test_model_weights(kind: str, part: str, world_run: Path, _no_unpickling: Path) -> None:
    from dreamlab.io import load_tensors
    from worlds.dream import load_world_model

    load_world_model(world_run, "cpu")
    p = world_run / part / "model" / "model.safetensors"
    if kind == "truncated":
        _truncate(p)
    elif kind == "empty":
        p.write_bytes(b"")
    elif kind == "nonfinite":
        state = load_tensors(p)
        k = next(iter(state))
        state[k] = torch.full_like(state[k], float("nan"))
        save_tensors(p, state, metadata={"name": "x"})
    else:
        p.write_bytes(_pickle_bytes(_no_unpickling))
    _refused(lambda: load_world_model(world_run, "cpu"), p)


@pytest.mark.parametrize("kind", ["truncated", "empty", "list", "null", "nonfinite", "wrong_dtype", "pickle"])
def test_world_model_run_config(kind: str, tmp_path: Path, _no_unpickling: Path) -> None:
    from agents.wm_config import config_json, load_config, make_config

    run = tmp_path / "run"
    save_json(run / "config.json", config_json(make_config("tiny", {}), "tiny"))
    load_config(run)
    p = run / "config.json"
    good = json.loads(p.read_text())
    if kind == "nonfinite":
        good["config"]["vae"]["lr"] = float("nan")  # json writes NaN, json.loads reads it back
    if kind == "wrong_dtype":
        good["config"]["collect"]["episodes"] = "many"
    bad = {"truncated": p.read_bytes()[:40], "empty": b"", "list": b"[]", "null": b"null",
           "pickle": _pickle_bytes(_no_unpickling)}.get(kind, json.dumps(good).encode())
    p.write_bytes(bad)
    _refused(lambda: load_config(run), run)


# ----------------------------------------------------------------------------- controllers and the CMA-ES state


@pytest.mark.parametrize("kind", KINDS)
def test_controller_file(kind: str, tmp_path: Path, _no_unpickling: Path) -> None:
    from worlds.policies import load_controller, num_params, save_controller

    p = tmp_path / "run" / "controller" / "best.safetensors"
    n = num_params(8, 16)
    save_controller(p, np.zeros(n, np.float32), 8, 16)
    load_controller(p)
    if kind == "truncated":
        _truncate(p)
    elif kind == "empty":
        p.write_bytes(b"")
    elif kind == "wrong_shape":
        save_controller(p, np.zeros(n + 1, np.float32), 8, 16)
    elif kind == "wrong_dtype":  # the sizes in the metadata are not numbers
        save_tensors(p, {"theta": torch.zeros(n)}, metadata={"z_dim": "eight", "hidden": "16"})
    elif kind == "nonfinite":
        save_controller(p, np.full(n, np.inf, np.float32), 8, 16)
    else:
        p.write_bytes(_pickle_bytes(_no_unpickling))
    msg = _refused(lambda: load_controller(p), p)
    assert "train-controller" in msg


@pytest.mark.parametrize("kind", KINDS)
def test_cma_state(kind: str, tmp_path: Path, _no_unpickling: Path) -> None:
    from safetensors import safe_open
    from safetensors.torch import load_file

    from agents.cma_search import SearchConfig, load_cma_state, make_es, save_cma_state

    cfg = SearchConfig(popsize=6, sigma0=0.2)
    np.random.seed(0)
    es = make_es(10, cfg, seed=1)
    xs = es.ask()
    es.tell(xs, [float(np.sum(np.square(x))) for x in xs])
    save_cma_state(tmp_path, es, {"generation": 1})
    load_cma_state(tmp_path, 10, cfg, 1)
    p = tmp_path / "cma_state.safetensors"
    with safe_open(str(p), "pt") as fh:
        meta = json.loads(fh.metadata()["cma_state"])
    t = load_file(str(p))
    if kind == "truncated":
        _truncate(p)
    elif kind == "empty":
        p.write_bytes(b"")
    elif kind == "wrong_shape":
        t["C"] = torch.zeros(3, 3, dtype=torch.float64)
    elif kind == "wrong_dtype":
        meta["generation"] = "one"
    elif kind == "nonfinite":
        t["mean"] = torch.full_like(t["mean"], float("nan"))
    else:
        p.write_bytes(_pickle_bytes(_no_unpickling))
    if kind in ("wrong_shape", "wrong_dtype", "nonfinite"):
        save_tensors(p, t, metadata={"cma_state": json.dumps(meta)})
    _refused(lambda: load_cma_state(tmp_path, 10, cfg, 1), p)
    if kind == "nonfinite":  # an infinite step size too
        meta["plain"]["sigma"] = float("inf")
        t["mean"] = torch.zeros_like(t["mean"])
        save_tensors(p, t, metadata={"cma_state": json.dumps(meta)})
        _refused(lambda: load_cma_state(tmp_path, 10, cfg, 1), p, "sigma=inf")


def test_fitness_rows(tmp_path: Path) -> None:
    """A last line cut off by a kill is left out (the resume writes that generation again); damage before it is
    an error naming the file and line."""
    from agents.cmaes import read_fitness

    p = tmp_path / "fitness.jsonl"
    rows = [{"generation": g, "best": 1.0} for g in (1, 2, 3)]
    p.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"generation": 4, "be')
    assert [r["generation"] for r in read_fitness(tmp_path)] == [1, 2, 3]
    p.write_text(json.dumps(rows[0]) + "\n[1, 2]\n" + json.dumps(rows[2]) + "\n")
    _refused(lambda: read_fitness(tmp_path), p, "line 2")


# ----------------------------------------------------------------------------- the dataset cache


@pytest.mark.parametrize("kind", KINDS)
def test_dataset_cache_entry_is_rebuilt_with_a_warning(kind: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture[str], _no_unpickling: Path) -> None:
    monkeypatch.setenv("DREAMLAB_CACHE", str(tmp_path / "cache"))
    want = np.arange(24, dtype=np.float32).reshape(4, 6)
    builds = []

    def build() -> np.ndarray:
        builds.append(1)
        return want.copy()

    cached_array("split", build)
    assert np.array_equal(cached_array("split", build), want) and len(builds) == 1  # served from the cache
    p = tmp_path / "cache" / "split.npy"
    if kind == "truncated":
        _truncate(p)
    elif kind == "empty":
        p.write_bytes(b"")
    elif kind == "wrong_shape":
        np.save(p, want.reshape(6, 4))
    elif kind == "wrong_dtype":
        np.save(p, want.astype(np.float64))
    elif kind == "nonfinite":
        bad = want.copy()
        bad[0, 0] = np.nan
        np.save(p, bad)
    else:
        np.save(p, np.array([_Payload(_no_unpickling)], dtype=object), allow_pickle=True)
    capsys.readouterr()
    got = cached_array("split", build)
    assert np.array_equal(got, want) and got.dtype == want.dtype and len(builds) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("warning:") and "\n" not in err and str(p) in err, err
    assert np.array_equal(cached_array("split", build), want) and len(builds) == 2  # the rebuilt entry is trusted


# ----------------------------------------------------------------------------- prompts


@pytest.mark.parametrize("prompt, needle", [("", "empty"), ("   ", "empty"), ("x" * 100_000, "characters"),
                                            ("a dog\x00", "control character"), ("caf\udce9", "not UTF-8"),
                                            (b"a dog", "string"), (None, "string"), (float("nan"), "string"),
                                            (["a dog"], "string")])
def test_prompt(prompt: object, needle: str) -> None:
    pytest.importorskip("open_clip")
    from multimodal.clip import validate_prompt

    with pytest.raises(DreamlabError, match=needle) as e:
        validate_prompt(prompt)
    assert "\n" not in str(e.value)
