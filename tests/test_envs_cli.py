"""`dreamlab env list | bench | play` through the real CLI entry point."""
from __future__ import annotations

from pathlib import Path

import imageio.v3 as iio
import pytest

from dreamlab.cli import main


def test_env_list_shows_every_id(capsys: pytest.CaptureFixture[str]) -> None:
    import envs

    assert main(["env", "list"]) == 0
    out = capsys.readouterr().out
    for env_id in envs.env_ids():
        assert env_id in out
    assert "96x96x3" in out and "64x64x3" in out


def test_env_bench_prints_steps_per_second(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["env", "bench", "dreamlab/CarRacing64-v3", "--steps", "30", "--reps", "2"]) == 0
    out = capsys.readouterr().out
    assert "dreamlab/CarRacing64-v3: median" in out and "steps/s" in out


def test_env_play_without_display_saves_a_scripted_video(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SDL_VIDEODRIVER", "dummy")
    out = tmp_path / "play.mp4"
    assert main(["env", "play", "dreamlab/CarRacing-v3", "--steps", "120", "--out", str(out)]) == 0
    frames = iio.imread(out)
    assert frames.shape[0] == 120 and frames.shape[1:] == (400, 600, 3)
    msg = capsys.readouterr().out
    ret = float(msg.split("return ")[1].split(";")[0])
    assert ret > 0, "the track follower must collect tiles (reward > 0) within 120 steps"


@pytest.mark.parametrize("argv, needle", [
    (["env", "bench", "dreamlab/Nope-v1"], "unknown env id 'dreamlab/Nope-v1'; choose one of dreamlab/CarRacing-v3"),
    (["env", "play", "CarRacing-v9", "--scripted"], "unknown env id 'CarRacing-v9'"),
    (["env", "play", "dreamlab/CarRacing-v3", "--scripted", "--out", "x.avi"], "--out x.avi must end in .mp4 or .gif"),
    (["env", "bench", "dreamlab/CarRacing-v3", "--steps", "0"], "--steps 0"),
])
def test_bad_cli_values_are_one_line_errors(argv: list[str], needle: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and needle in err and "\n" not in err
