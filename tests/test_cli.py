"""Smoke tests through the real `dreamlab` entry point."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from dreamlab.cli import main

ROOT = Path(__file__).resolve().parents[1]


def test_help_runs_as_a_program() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "dreamlab", "--help"], capture_output=True, text=True, cwd=ROOT, timeout=120
    )
    assert out.returncode == 0
    for cmd in ("generators", "train", "sample", "eval", "data"):
        assert cmd in out.stdout


def test_generators_list(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["generators", "list"]) == 0
    out = capsys.readouterr().out
    assert "vae" in out and "bound" in out and "classifier" in out


def test_train_sample_eval_resume(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    assert (
        main(
            [
                "train",
                "vae",
                "--preset",
                "tiny",
                "--out",
                str(run),
                "--no-progress",
                "--set",
                "batch_size=8",
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    assert json.loads((run / "config.json").read_text())["train"]["batch_size"] == 8
    assert main(["sample", str(run), "-n", "5", "--out", str(tmp_path / "g.png"), "--device", "cpu"]) == 0
    from PIL import Image

    assert Image.open(tmp_path / "g.png").size[0] > 28
    assert main(["sample", str(run), "-n", "3", "--out", str(tmp_path / "s.safetensors"), "--device", "cpu"]) == 0
    from dreamlab.io import load_tensors

    assert load_tensors(tmp_path / "s.safetensors")["samples"].shape == (3, 1, 28, 28)
    assert main(["sample", str(run), "--out", str(tmp_path / "s.jpg")]) == 2
    assert "vae writes samples as .png, .safetensors" in capsys.readouterr().err
    assert not (tmp_path / "s.jpg").exists()
    assert main(["eval", str(run), "--device", "cpu", "--max-items", "100"]) == 0
    assert "test_elbo" in json.loads((run / "eval_test.json").read_text())
    assert main(["train", "vae", "--out", str(run), "--resume", "--set", "steps=5", "--no-progress"]) == 0
    assert json.loads((run / "checkpoint" / "state.json").read_text())["step"] == 5


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["train", "gann"], "unknown model 'gann'; registered:"),
        (["train", "vae", "--preset", "huge"], "unknown preset 'huge' for vae; choose one of"),
        (["train", "vae", "--set", "nope=1"], "unknown key 'nope' for vae; model keys:"),
        (["train", "vae", "--set", "steps=ten"], "steps='ten' is not a valid int"),
        (["train", "vae", "--set", "steps"], "must look like key=value"),
        (["train", "vae", "--set", "steps=-1"], "steps=-1 must be at least 1"),
        (["train", "mlp", "--set", "batch_size=0"], "batch_size=0 must be at least 1"),
        (["train", "vae", "--set", "lr=-1"], "lr=-1.0 must be > 0"),
        (["train", "cnn", "--set", "betas=0.9"], "betas=(0.9,) must be two numbers"),
        (["train", "vae", "--set", "z_dim=0"], "z_dim=0 must be at least 1"),
        (["train", "mlp", "--set", "hidden=0,5"], "hidden=0,5 must be one or more sizes"),
        (["train", "cnn", "--set", "dropout=1.5"], "dropout=1.5 must be in [0, 1]"),
        (["train", "mlp", "--set", "dataset=foo"], "unknown dataset 'foo'"),   # fails after the run folder was made
        (["sample", "/nonexistent/run"], "is not a run folder"),
        (["sample", "/nonexistent/run", "--out", "x.jpg"], "is not a run folder"),
        (["data", "prepare", "imagenet"], "unknown dataset 'imagenet'"),
    ],
)
def test_bad_input_gives_one_line_error(
    argv: list[str], needle: str, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    if argv[0] == "train":
        argv = [*argv, "--out", str(tmp_path / "r")]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and needle in err and "\n" not in err, err
    assert not (tmp_path / "r").exists()  # nothing written for a run that cannot start


def test_argparse_rejects_bad_choice(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main(["eval", "x", "--split", "dev"])
    assert e.value.code == 2
    assert "invalid choice: 'dev'" in capsys.readouterr().err
