"""Defects found by trying the world-model and multimodal commands as a new user would (issue 62, item 7); each test
failed before its fix."""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("gymnasium")
pytest.importorskip("cma")

from dreamlab.cli import main  # noqa: E402
from dreamlab.errors import DreamlabError  # noqa: E402
from worlds.rollouts import load_episode, read_manifest  # noqa: E402

FAST = "dreamlab/CarRacing64-v3"


def _error(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and len(err.splitlines()) == 1, err
    return err


def _collect(run: Path, *flags: str) -> int:
    return main(["worldmodel", "collect", str(run), "--preset", "tiny", "--workers", "1", "--no-progress", *flags])


# ----------------------------------------------------------------------------- collect --resume


def test_collect_resume_keeps_the_collections_own_settings(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--episodes/--max-steps/--policy/--seed were not recorded: a plain --resume continued with the preset's (2
    episodes x 50 steps, brownian, seed 0) and mixed both in one manifest."""
    run = tmp_path / "run"
    first = ["--episodes", "3", "--max-steps", "9", "--policy", "pursuit", "--seed", "4", "--env-id", FAST]
    assert _collect(run, *first) == 0
    folder = run / "rollouts"
    want = {e["index"]: load_episode(folder / e["file"]) for e in read_manifest(folder)["episodes"]}
    # a kill took the last episode (its file and listing)
    m = json.loads((folder / "manifest.json").read_text())
    m["episodes"] = [e for e in m["episodes"] if e["index"] != 2]
    (folder / "manifest.json").write_text(json.dumps(m))
    (folder / "ep_000002.npz").unlink()
    capsys.readouterr()
    assert _collect(run, "--resume") == 0
    m = read_manifest(folder)
    assert sorted(e["index"] for e in m["episodes"]) == [0, 1, 2]
    assert all(e["steps"] == 9 for e in m["episodes"])
    assert {k: m["config"][k] for k in ("episodes", "max_steps", "policy", "seed", "env_id")} == {
        "episodes": 3, "max_steps": 9, "policy": "pursuit", "seed": 4, "env_id": FAST}
    again = load_episode(folder / "ep_000002.npz")
    assert np.array_equal(again.obs, want[2].obs) and np.array_equal(again.actions, want[2].actions)
    # a resume that asks for other settings is refused, naming both values
    capsys.readouterr()
    assert _collect(run, "--resume", "--max-steps", "20") == 2
    err = _error(capsys)
    assert "max_steps=9" in err and "max_steps=20" in err
    assert _collect(run, "--resume", "--policy", "brownian") == 2
    err = _error(capsys)
    assert "'pursuit'" in err and "'brownian'" in err
    # more episodes of the same collection are fine
    assert _collect(run, "--resume", "--episodes", "4") == 0
    assert sorted(e["index"] for e in read_manifest(folder)["episodes"]) == [0, 1, 2, 3]


def test_absurd_episode_count_is_refused_at_once(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """episodes=1e12 built a list of every index (7.5 GB in 21 s, no output)."""
    t0 = time.perf_counter()
    assert _collect(tmp_path / "run", "--set", "collect.episodes=1000000000000") == 2
    assert "episodes=1000000000000" in _error(capsys) and time.perf_counter() - t0 < 10
    assert _collect(tmp_path / "run", "--episodes", "1000000000000") == 2
    assert "at most 1,000,000" in _error(capsys)
    assert main(["worldmodel", "run", "--preset", "tiny", "--out", str(tmp_path / "r2"), "--set",
                 "evaluation.episodes=1e12"]) == 2
    _error(capsys)
    assert not (tmp_path / "r2").exists()


# ----------------------------------------------------------------------------- NaN / inf / negative numbers


@pytest.mark.parametrize("flag", [["--temperature", "nan"], ["--temperature", "-1"], ["--temperature", "inf"],
                                  ["--sigma0", "nan"], ["--sigma0", "inf"]])
def test_train_controller_refuses_nan_inf_negative_flags(flag: list[str], tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    """--temperature nan wrote NaN into fitness.jsonl (invalid JSON) and no best.safetensors; -1 exited 0."""
    with pytest.raises(SystemExit) as e:
        main(["worldmodel", "train-controller", str(tmp_path / "run"), *flag])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"{flag[0]} " in err and ("finite" in err or "must be >" in err), err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("setting", ["search.sigma0=inf", "search.sigma0=nan", "vae.lr=inf", "mdn.lr=nan",
                                     "dream.temperature=nan"])
def test_world_model_settings_refuse_nan_inf_before_collecting(setting: str, tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    """sigma0=inf failed only after collect, V and M (hours at the paper's sizes); lr=inf trained to NaN."""
    out = tmp_path / "run"
    assert main(["worldmodel", "run", "--preset", "tiny", "--out", str(out), "--set", setting]) == 2
    assert setting.split("=")[0].split(".")[-1] in _error(capsys) and not out.exists()


@pytest.mark.parametrize("cls, field", [("generators.base:TrainConfig", "lr"),
                                        ("generators.base:TrainConfig", "weight_decay"),
                                        ("generators.base:TrainConfig", "grad_clip"),
                                        ("generators.vae:VAEConfig", "beta"),
                                        ("worlds.models:MDNRNNConfig", "temperature")])
@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_model_and_trainer_settings_refuse_nan_and_inf(cls: str, field: str, value: float) -> None:
    """beta=nan and weight_decay=nan were accepted (NaN passes every `< 0` check); lr=inf trained to NaN."""
    import importlib

    from dreamlab.config import from_dict

    mod, name = cls.split(":")
    klass = getattr(importlib.import_module(mod), name)
    with pytest.raises(DreamlabError, match=f"{field}=(nan|inf).*finite"):
        from_dict(klass, {field: value})


@pytest.mark.parametrize("flag", ["nan", "inf", "-1"])
def test_text2img_refuses_nan_guidance(flag: str, capsys: pytest.CaptureFixture[str]) -> None:
    """--guidance-scale nan wrote black images with exit 0."""
    for opt in ("--guidance-scale", "--clip-guidance-scale"):
        with pytest.raises(SystemExit) as e:
            main(["text2img", "a dog", "--run", "/nonexistent", opt, flag])
        assert e.value.code == 2 and opt in capsys.readouterr().err


def test_text2img_sample_refuses_nan_guidance() -> None:
    pytest.importorskip("diffusers")
    from multimodal.text2img import Text2ImgPipeline

    # the check runs before the model is touched: the unbound call needs no trained pipeline
    class _Stub:
        config = type("C", (), {"num_inference_steps": 2, "guidance_scale": 3.0, "clip_guidance_scale": 0.0})()

    for gs in (math.nan, math.inf):
        with pytest.raises(DreamlabError, match="finite"):
            Text2ImgPipeline._generate(_Stub(), ["a dog"], 1, None, gs, None, None, False)


# ----------------------------------------------------------------------------- fixes that looped


def test_truncated_episode_fix_is_followed_to_the_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The error said "delete it and re-collect with --resume", but the manifest still listed it: the resume added
    nothing and the next stage said "missing; re-collect"."""
    run = tmp_path / "run"
    assert _collect(run, "--episodes", "2", "--max-steps", "8", "--env-id", FAST) == 0
    bad = run / "rollouts" / "ep_000001.npz"
    want = load_episode(bad)
    bad.write_bytes(bad.read_bytes()[:300])
    with pytest.raises(DreamlabError) as e:
        load_episode(bad)
    fix = f"dreamlab worldmodel collect {run} --resume"
    assert fix in str(e.value)
    bad.unlink()  # as the message says
    capsys.readouterr()
    assert main(fix.split()[1:] + ["--workers", "1", "--no-progress"]) == 0
    again = load_episode(bad)
    assert np.array_equal(again.obs, want.obs)
    # a truncated file the user did not delete is re-collected too
    bad.write_bytes(bad.read_bytes()[:300])
    assert main(fix.split()[1:] + ["--workers", "1", "--no-progress"]) == 0
    assert np.array_equal(load_episode(bad).obs, want.obs)
    assert "damaged" in capsys.readouterr().err


def test_unknown_env_id_then_the_fix_it_names(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """An unknown --env-id said "rerun with --resume", and the resume was refused because the bad id was recorded."""
    run = tmp_path / "run"
    assert _collect(run, "--episodes", "1", "--max-steps", "6", "--env-id", "NoSuchEnv-v0") == 2
    err = _error(capsys)
    assert "NoSuchEnv-v0" in err and "--env-id" in err
    assert not (run / "rollouts" / "manifest.json").exists() or not read_manifest(run / "rollouts")["episodes"]
    # what the message asks for: the command again with a good id (with or without --resume)
    assert _collect(run, "--episodes", "1", "--max-steps", "6", "--env-id", FAST, "--resume") == 0
    assert [e["steps"] for e in read_manifest(run / "rollouts")["episodes"]] == [6]


# ----------------------------------------------------------------------------- other kinds of run, bad arguments


@pytest.fixture
def vae_run(tmp_path: Path) -> Path:
    """A `dreamlab train` run folder (not a world-model run) with its own report.md."""
    from dreamlab.io import atomic_write_text, save_json

    run = tmp_path / "vae-run"
    save_json(run / "config.json", {"name": "vae", "config": {"z_dim": 2}, "train": {"steps": 10}})
    atomic_write_text(run / "report.md", "# my VAE\n\nresults\n")
    return run


def test_report_on_another_kind_of_run_leaves_its_report(vae_run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`worldmodel report RUN` overwrote another kind of run's report.md with an empty page, exit 0."""
    assert main(["worldmodel", "report", str(vae_run)]) == 2
    assert "'vae' model's run folder" in _error(capsys)
    assert (vae_run / "report.md").read_text() == "# my VAE\n\nresults\n"
    empty = vae_run.parent / "empty"
    empty.mkdir()
    assert main(["worldmodel", "report", str(empty)]) == 2
    assert "empty" in _error(capsys) and not (empty / "report.md").exists()


@pytest.mark.parametrize("stage", [["collect"], ["train-vae"], ["encode"], ["train-mdn"], ["train-controller"],
                                   ["evaluate"], ["iterate", "--rounds", "2"], ["dream-video"]])
def test_stages_on_another_kind_of_run_say_what_it_is(stage: list[str], vae_run: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    """World-model stages on a non-world-model run said "unknown config.json key" instead of what the folder is."""
    before = {p: p.read_bytes() for p in vae_run.rglob("*") if p.is_file()}
    assert main(["worldmodel", stage[0], str(vae_run), *stage[1:]]) == 2
    err = _error(capsys)
    assert "'vae' model's run folder" in err and "not a world-model run" in err and "unknown" not in err
    assert {p: p.read_bytes() for p in vae_run.rglob("*") if p.is_file()} == before


def test_run_pipeline_refuses_a_folder_of_other_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "photos"
    out.mkdir()
    (out / "holiday.jpg").write_bytes(b"x")
    assert main(["worldmodel", "run", "--preset", "tiny", "--out", str(out)]) == 2
    assert "holiday.jpg" in _error(capsys) and sorted(p.name for p in out.iterdir()) == ["holiday.jpg"]


def test_evaluate_negative_seed_is_a_one_line_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`evaluate --seed -1` ended in a gymnasium traceback from a worker."""
    from agents.evaluate import evaluate_run

    with pytest.raises(DreamlabError, match="--seed -1 must be >= 0"):
        evaluate_run(tmp_path, seed=-1)
    with pytest.raises(DreamlabError, match="--episodes"):
        evaluate_run(tmp_path, episodes=10**12)


def test_iterate_on_a_missing_run_fails(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`worldmodel iterate` on a missing run exited 0."""
    run = tmp_path / "missing"
    assert main(["worldmodel", "iterate", str(run), "--rounds", "3"]) == 2
    assert str(run) in _error(capsys) and not run.exists()
