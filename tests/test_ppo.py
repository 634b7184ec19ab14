"""PPO baseline smoke test through the real CLI: trains a few hundred steps, evaluates, reloads the weights."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from dreamlab.cli import main

TINY = ["--timesteps", "128", "--n-envs", "2", "--n-steps", "64", "--batch-size", "32", "--n-epochs", "1",
        "--eval-max-steps", "40", "--device", "cpu", "--no-progress"]


def test_ppo_trains_evaluates_and_reloads(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "ppo"
    assert main(["agents", "ppo", "--env", "dreamlab/CarRacing64HUD-v3", "--eval-episodes", "2", "--out", str(out),
                 *TINY]) == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["kind"] == "sb3-ppo" and cfg["frame_skip"] == 2 and cfg["frame_stack"] == 2 and cfg["size"] == 64
    train = json.loads((out / "train.json").read_text())
    assert train["timesteps"] >= 128 and train["env_steps"] == 2 * train["timesteps"]
    scores = json.loads((out / "eval" / "ppo_seed1000_n2.json").read_text())
    assert len(scores["scores"]) == 2 and scores["env_steps"] == [40, 40]
    assert scores["mean"] == pytest.approx(np.mean(scores["scores"]))
    assert scores["std"] == pytest.approx(np.std(scores["scores"]))
    assert (out / "eval" / "ppo_seed1000_episode0.mp4").stat().st_size > 0
    assert (out / "policy.safetensors").exists()
    assert "eval (deterministic):" in capsys.readouterr().out

    # the saved weights reload into a fresh PPO: same deterministic scores on the same seeds
    assert main(["agents", "ppo-eval", str(out), "--episodes", "2", "--no-video", "--no-progress"]) == 0
    again = json.loads((out / "eval" / "ppo_seed1000_n2.json").read_text())
    assert again["scores"] == pytest.approx(scores["scores"])

    # sampled actions as in training (gSDE noise redrawn), reproducible from the seed
    runs = []
    for _ in range(2):
        assert main(["agents", "ppo-eval", str(out), "--episodes", "1", "--stochastic", "--no-video",
                     "--no-progress"]) == 0
        runs.append(json.loads((out / "eval" / "ppo-stochastic_seed1000_n1.json").read_text()))
    assert runs[0]["deterministic"] is False and runs[0]["scores"] == runs[1]["scores"]


def test_ppo_bad_env_is_a_one_line_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["agents", "ppo", "--env", "Pong-v5", "--out", str(tmp_path / "x"), *TINY]) == 2
    err = capsys.readouterr().err
    assert "--env 'Pong-v5' is not a CarRacing id; choose one of dreamlab/CarRacing-v3" in err


def test_linear_schedule_never_goes_negative() -> None:
    """sb3 overshoots total_timesteps by up to one rollout; the lr must then be 0, not negative."""
    from agents.ppo import linear_schedule

    lr = linear_schedule(1e-4)
    assert lr(1.0) == pytest.approx(1e-4) and lr(0.25) == pytest.approx(2.5e-5)
    assert lr(0.0) == 0.0 and lr(-0.024) == 0.0
