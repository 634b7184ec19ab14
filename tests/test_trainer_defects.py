"""Defects of the shared trainer and the generator CLI found by using them as a new user would (issue 62, item 7).
Each test failed before its fix (checked against main at the time)."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from test_trainer import NaNMLP, TinyMLP, _tc, _vae

from dreamlab.cli import main
from dreamlab.errors import DreamlabError
from dreamlab.io import load_tensors, save_json
from generators.base import Model, TrainConfig, make_model
from generators.classifiers import MLPConfig
from generators.trainer import load_run, read_metrics, train


def _cli(capsys, *argv: str) -> tuple[int, str]:
    rc = main(list(argv))
    err = capsys.readouterr().err.strip()
    return rc, err


def _steps(run: Path) -> list[int]:
    return [r["step"] for r in read_metrics(run) if "loss" in r]


# ----------------------------------------------------------------------------- --resume reads the run's own settings


def test_resume_uses_the_runs_config_and_refuses_conflicting_flags(tmp_path: Path, capsys) -> None:
    run = tmp_path / "run"
    rc, err = _cli(capsys, "train", "vae", "--preset", "tiny", "--set", "steps=2", "--set", "threads=1",
                   "--out", str(run), "--no-progress")
    assert rc == 0, err
    before = json.loads((run / "config.json").read_text())
    # the README's form, no --preset: continues the tiny run (not the quick preset's 3,000 steps of batch 128)
    rc, err = _cli(capsys, "train", "vae", "--out", str(run), "--resume", "--set", "steps=3", "--no-progress")
    assert rc == 0, err
    after = json.loads((run / "config.json").read_text())
    assert after["preset"] == "tiny" and after["config"] == before["config"]
    assert after["train"]["batch_size"] == before["train"]["batch_size"] == 16
    assert after["train"]["steps"] == 3 and json.loads((run / "eval.json").read_text())["step"] == 3
    # a conflicting preset or setting is an error naming both values; nothing is rewritten
    rc, err = _cli(capsys, "train", "vae", "--preset", "quick", "--out", str(run), "--resume", "--no-progress")
    assert rc == 2 and "--preset quick" in err and "preset tiny" in err and "\n" not in err
    rc, err = _cli(capsys, "train", "vae", "--out", str(run), "--resume", "--set", "batch_size=64", "--no-progress")
    assert rc == 2 and "batch_size=64" in err and "batch_size=16" in err
    rc, err = _cli(capsys, "train", "vae", "--out", str(run), "--resume", "--set", "z_dim=7", "--no-progress")
    assert rc == 2 and "z_dim=7" in err and "z_dim=2" in err
    # fewer steps than the checkpoint holds: an error, not a half-trained run marked finished
    rc, err = _cli(capsys, "train", "vae", "--out", str(run), "--resume", "--set", "steps=1", "--no-progress")
    assert rc == 2 and "steps=1" in err and "step 3" in err
    assert json.loads((run / "config.json").read_text()) == after


# ----------------------------------------------------------------------------- metrics and checkpoints after a kill


def test_rerun_after_a_kill_before_the_first_checkpoint_starts_fresh_logs(tmp_path: Path) -> None:
    run = tmp_path / "r"
    # what a run killed at step 3, before its first checkpoint, leaves behind
    run.mkdir()
    (run / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 9.0}) + "\n" for s in (1, 2, 3)))
    torch.manual_seed(0)
    train(TinyMLP(MLPConfig(hidden=(8,))), _tc(steps=4, threads=1), run, progress=False)
    assert _steps(run) == [1, 2, 3, 4]  # once each, in order: not the killed run's 1, 2, 3 followed by 1..4
    assert all(r.get("loss") != 9.0 for r in read_metrics(run))


def test_half_written_last_metrics_line_does_not_break_resume(tmp_path: Path, capsys) -> None:
    run = tmp_path / "r"
    full = _vae()
    train(full, _tc(steps=4, threads=1), tmp_path / "ref", progress=False)
    train(_vae(), _tc(steps=2, threads=1), run, progress=False)
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "loss": 12')  # the kill came in the middle of this write
    resumed = _vae()
    train(resumed, _tc(steps=4, threads=1), run, resume=True, progress=False)
    assert "dropped 1 unreadable line" in capsys.readouterr().err
    assert _steps(run) == [1, 2, 3, 4]
    assert all(torch.equal(v, resumed.state_dict()[k]) for k, v in full.state_dict().items())


@pytest.mark.parametrize("left", ["old", "old+tmp"])
def test_kill_between_the_two_renames_of_a_checkpoint_swap_resumes(tmp_path: Path, left: str) -> None:
    """`replace_dir` renames checkpoint -> checkpoint.old, then checkpoint.tmp -> checkpoint: a kill between the two
    leaves no `checkpoint/` (and, killed a moment later, no checkpoint.tmp either)."""
    full = _vae()
    train(full, _tc(steps=4, threads=1), tmp_path / "ref", progress=False)
    run = tmp_path / "r"
    train(_vae(), _tc(steps=2, threads=1), run, progress=False)
    (run / "checkpoint").rename(run / "checkpoint.old")
    if left == "old+tmp":  # the newer checkpoint (step 3) fully written in checkpoint.tmp
        train(_vae(), _tc(steps=3, threads=1), tmp_path / "s3", progress=False)
        (tmp_path / "s3" / "checkpoint").rename(run / "checkpoint.tmp")
        (run / "metrics.jsonl").write_text((tmp_path / "s3" / "metrics.jsonl").read_text())
    resumed = _vae()
    res = train(resumed, _tc(steps=4, threads=1), run, resume=True, progress=False)
    assert res["status"] == "finished" and res["step"] == 4
    assert all(torch.equal(v, resumed.state_dict()[k]) for k, v in full.state_dict().items())
    assert not any((run / n).exists() for n in ("checkpoint.old", "checkpoint.tmp"))
    assert _steps(run) == [1, 2, 3, 4]


# ----------------------------------------------------------------------------- one-line errors instead of tracebacks


def test_out_that_is_a_file_or_cannot_be_created(tmp_path: Path, capsys) -> None:
    f = tmp_path / "file.txt"
    f.write_text("not a folder")
    for out in (f, f / "run"):
        rc, err = _cli(capsys, "train", "vae", "--preset", "tiny", "--out", str(out), "--no-progress")
        assert rc == 2 and str(f) in err and "is a file" in err and "\n" not in err
    assert f.read_text() == "not a folder"
    if Path("/proc/self").exists():  # a folder no one can create in (root included)
        rc, err = _cli(capsys, "train", "vae", "--preset", "tiny", "--out", "/proc/dreamlab-run", "--no-progress")
        assert rc == 2 and "/proc/dreamlab-run" in err and "\n" not in err


@pytest.mark.parametrize("content", [[1, 2], None, {"name": "vae"}, {"name": "vae", "config": {"z_dim": 5}}])
def test_config_json_of_the_wrong_structure(tmp_path: Path, content) -> None:
    model = make_model("vae", channels=(4, 8, 8))
    model.save_pretrained(tmp_path / "m")
    save_json(tmp_path / "m" / "config.json", content)
    with pytest.raises(DreamlabError, match=r"config\.json") as e:
        Model.from_pretrained(tmp_path / "m")
    assert "\n" not in str(e.value) and str(tmp_path / "m") in str(e.value)
    # the same through a run folder (checkpoint path) and the CLI
    run = tmp_path / "run"
    train(_vae(), _tc(steps=2, threads=1), run, progress=False)
    save_json(run / "config.json", content)
    (run / "model" / "config.json").unlink()
    with pytest.raises(DreamlabError, match=re.escape(str(run))) as e:
        load_run(run)
    assert "\n" not in str(e.value)


def test_sample_needs_a_positive_whole_number() -> None:
    model = make_model("vae", channels=(4, 8, 8))
    for n in (-1, 0, 2.5, True):
        with pytest.raises(DreamlabError, match=r"vae\.sample\(n="):
            model.sample(n)
    assert model.sample(2).shape[0] == 2


def test_huge_sizes_are_refused_before_allocating(capsys) -> None:
    with pytest.raises(DreamlabError, match=r"z_dim=100000000.*GiB.*lower those sizes"):
        make_model("vae", z_dim=100_000_000)
    rc, err = _cli(capsys, "train", "vae", "--set", "z_dim=1e8", "--out", "/nonexistent/never", "--no-progress")
    assert rc == 2 and "z_dim=100000000" in err and "\n" not in err


def test_non_finite_trainer_settings_are_refused() -> None:
    for key in ("lr", "grad_clip", "weight_decay"):
        for bad in (float("inf"), float("nan")):
            with pytest.raises(DreamlabError, match=f"{key}={bad}.*finite"):
                TrainConfig(**{key: bad})


def test_nan_before_the_first_checkpoint_does_not_point_to_a_missing_checkpoint(tmp_path: Path) -> None:
    torch.manual_seed(0)
    with pytest.raises(DreamlabError) as e:
        train(NaNMLP(MLPConfig(hidden=(8,))), _tc(steps=10, ckpt_every=100), tmp_path / "r", progress=False)
    msg = str(e.value)
    assert "before the first checkpoint" in msg and "without --resume" in msg
    assert not (tmp_path / "r" / "checkpoint").exists()


def test_nan_hint_lower_lr_and_resume_works(tmp_path: Path) -> None:
    """The NaN error says: lower lr and --resume. Resume accepts the new lr, and the optimiser uses it (the
    checkpoint's param_groups used to bring back the old rate)."""
    run = tmp_path / "r"
    torch.manual_seed(0)
    with pytest.raises(DreamlabError, match=r"checkpoint is in .*checkpoint.*--resume"):
        train(NaNMLP(MLPConfig(hidden=(8,))), _tc(steps=10, ckpt_every=2), run, progress=False)
    torch.manual_seed(0)
    m = TinyMLP(MLPConfig(hidden=(8,)))
    res = train(m, _tc(steps=4, ckpt_every=2, lr=1e-5), run, resume=True, progress=False)
    assert res["status"] == "finished"
    state = json.loads((run / "checkpoint" / "state.json").read_text())
    assert state["optim"][0]["param_groups"][0]["lr"] == 1e-5
    assert load_tensors(run / "model" / "model.safetensors")
