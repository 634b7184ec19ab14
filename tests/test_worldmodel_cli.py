"""A tiny end-to-end World Models run through the real CLI: 2 episodes x 50 steps, one epoch of V and of M,
2 CMA-ES generations, real-env evaluation, videos; then the stage commands and bad input."""
from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest

pytest.importorskip("gymnasium")
pytest.importorskip("cma")

from dreamlab.cli import main  # noqa: E402
from dreamlab.errors import DreamlabError  # noqa: E402


def test_tiny_end_to_end_through_the_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "wm"
    assert main(["worldmodel", "run", "--preset", "tiny", "--out", str(run), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "controller:" in printed and "random policy:" in printed
    assert "plan: 2 episodes x 50 steps of CarRacing-v3 (brownian)" in printed and "warning" not in printed
    man = json.loads((run / "rollouts" / "manifest.json").read_text())
    assert [e["steps"] for e in man["episodes"]] == [50, 50]
    assert (run / "vae" / "model" / "model.safetensors").exists() and (run / "vae" / "reconstructions.png").exists()
    vae_metrics = [json.loads(x) for x in (run / "vae" / "metrics.jsonl").read_text().splitlines()]
    assert max(r["step"] for r in vae_metrics) == 3  # 51 training frames / batch 16: one epoch
    lat = json.loads((run / "latents" / "manifest.json").read_text())
    assert len(lat["episodes"]) == 2 and lat["z_dim"] == 8
    ev = json.loads((run / "mdn" / "eval.json").read_text())
    assert ev["step"] == 1 and "test_nll_per_step" in ev
    fit = (run / "controller" / "fitness.jsonl").read_text().splitlines()
    assert len(fit) == 2 and (run / "controller" / "best.safetensors").exists()
    # the tiny preset's final evaluation runs 50-step episodes: the length is part of the file names
    scores = json.loads((run / "eval" / "controller_seed1000_n1_steps50.json").read_text())
    assert scores["episodes"] == 1 and len(scores["scores"]) == 1 and scores["seeds"] == [1000]
    assert scores["env_id"] == "CarRacing-v3" and scores["max_steps"] == 50
    assert any((run / "eval").glob("side_by_side_seed1000_steps50.*")) and any(run.glob("dream.*"))
    summary = json.loads((run / "summary.json").read_text())
    assert summary["pipeline"]["controller"]["mean"] == pytest.approx(scores["mean"])
    # report.md: the score beside the random policy's, every stage, and only links to files that exist
    report = (run / "report.md").read_text()
    assert (
        f"**{scores['mean']:,.1f} ± {scores['std']:,.1f}**" in report
        and "controller_seed1000_n1_steps50.json" in report
    )
    rnd = json.loads((run / "eval" / "random_seed1000_n1_steps50.json").read_text())
    assert f"{rnd['mean']:,.1f} ± {rnd['std']:,.1f}" in report
    for stage in ("| collect |", "| V (ConvVAE) |", "| M (MDN-RNN) |", "| C (CMA-ES in the dream) |", "| evaluate |"):
        assert stage in report
    links = re.findall(r"\]\(([^)]+)\)", report)
    assert "vae/reconstructions.png" in links and "controller/fitness.png" in links
    assert all((run / link).is_file() for link in links), [x for x in links if not (run / x).is_file()]

    # stage commands on the same run folder
    assert (
        main(
            [
                "worldmodel",
                "evaluate",
                str(run),
                "--episodes",
                "2",
                "--seed",
                "7",
                "--max-steps",
                "30",
                "--no-video",
                "--no-baseline",
                "--no-progress",
            ]
        )
        == 0
    )
    s2 = json.loads((run / "eval" / "controller_seed7_n2_steps30.json").read_text())
    assert s2["seeds"] == [7, 8] and len(s2["scores"]) == 2 and s2["max_steps"] == 30
    # another controller file on the same episodes gets its own score file: nothing earlier is overwritten
    earlier = (run / "eval" / "controller_seed7_n2_steps30.json").read_bytes()
    assert (
        main(
            [
                "worldmodel",
                "evaluate",
                str(run),
                "--episodes",
                "2",
                "--seed",
                "7",
                "--max-steps",
                "30",
                "--no-video",
                "--no-baseline",
                "--no-progress",
                "--controller",
                str(run / "controller" / "best_dream.safetensors"),
            ]
        )
        == 0
    )
    s3 = json.loads((run / "eval" / "controller_seed7_n2_steps30_best_dream.json").read_text())
    assert s3["controller"].endswith("best_dream.safetensors") and s3["seeds"] == [7, 8]
    assert (run / "eval" / "controller_seed7_n2_steps30.json").read_bytes() == earlier
    report = (run / "report.md").read_text()  # refreshed by evaluate: all three evaluations listed
    assert all(n in report for n in ("controller_seed1000_n1_steps50.json", "controller_seed7_n2_steps30.json",
                                     "controller_seed7_n2_steps30_best_dream.json"))
    assert main(["worldmodel", "dream-video", str(run), "--steps", "10", "--out", str(tmp_path / "d.gif")]) == 0
    assert (tmp_path / "d.gif").stat().st_size > 0
    assert main(["worldmodel", "train-controller", str(run), "--generations", "3", "--resume", "--no-progress"]) == 0
    assert len((run / "controller" / "fitness.jsonl").read_text().splitlines()) == 3
    # iterative training: two more rounds collect with the controllers, continue M and C
    # (rounds.collect=both: one new episode driven by the kept controller, one by the dream-best one); the old flat
    # names still work for this release, with a deprecation notice
    assert main(["worldmodel", "iterate", str(run), "--rounds", "3", "--set", "rounds.episodes=2",
                 "--set", "round_restart=true", "--set", "rounds.check_episodes=2", "--set", "search.restart_every=1",
                 "--no-progress"]) == 0
    assert "deprecated: --set round_restart=... is now --set rounds.restart=..." in capsys.readouterr().err
    state = json.loads((run / "rounds.json").read_text())
    rounds, first = state["rounds"], state["round_1"]
    assert [r["episodes_total"] for r in rounds] == [4, 6]
    # round 1's controller got the same full-length check before round 2 and competes for best.safetensors
    assert first["round"] == 1 and first["episodes_total"] == 2 and first["real_seeds"] == [1500, 1501]
    assert all(r["real_seeds"] == [1500, 1501] for r in rounds)  # rounds.check_episodes, not check_episodes (1)
    assert (run / "controller" / "round_1_best.safetensors").is_file()
    man = json.loads((run / "rollouts" / "manifest.json").read_text())
    # config: the folder's own collection (what a plain `collect --resume` continues); rounds: the controllers'
    assert len(man["episodes"]) == 6 and man["config"]["policy"] == "brownian" and man["config"]["episodes"] == 2
    assert [Path(r["controller"]).name for r in man["rounds"]] == ["best.safetensors", "best_dream.safetensors"] * 2
    drivers = [Path(e.get("controller", e["policy"])).name for e in sorted(man["episodes"], key=lambda e: e["index"])]
    assert drivers == ["brownian", "brownian"] + ["best.safetensors", "best_dream.safetensors"] * 2
    assert len((run / "controller" / "fitness.jsonl").read_text().splitlines()) == 5
    # summary.json keeps the first collection and encoding; each round records its own under round_k
    summary = json.loads((run / "summary.json").read_text())
    assert summary["collect"]["episodes"] == 2 and summary["encode"]["episodes"] == 2
    assert [c["controller"] for c in summary["round_3"]["collect"]] == ["best.safetensors", "best_dream.safetensors"]
    assert all(c["new_episodes"] == 1 and c["steps"] > 0 for c in summary["round_3"]["collect"])
    assert json.loads((run / "mdn" / "eval.json").read_text())["step"] == 3
    saved = json.loads((run / "config.json").read_text())["config"]
    assert saved["rounds"]["restart"] is True and saved["search"]["restart_every"] == 1  # --set is kept in the run
    assert json.loads((run / "controller" / "config.json").read_text())["search"]["restart_every"] == 1
    # best.safetensors is the round controller with the best full-length round check
    top = max([first, *rounds], key=lambda r: r["real_mean"])
    assert rounds[-1]["kept_round"] == top["round"]
    assert (run / "controller" / "best.safetensors").read_bytes() == (
        run / "controller" / top["controller"]
    ).read_bytes()
    from worlds.policies import controller_mdn

    for f in (run / "controller").glob("*best*.safetensors"):
        assert controller_mdn(f) is not None  # every kept controller still has its own M
    # the report, rebuilt, shows the rounds and which one was kept
    assert main(["worldmodel", "report", str(run)]) == 0
    report = (run / "report.md").read_text()
    assert "## Iterative rounds" in report and "| C (CMA-ES in the dream, round 1) |" in report
    kept_row = next(x for x in report.splitlines() if x.endswith("**kept** |"))
    assert kept_row.startswith(f"| {top['round']} |") and f"{top['real_mean']:,.1f} ±" in kept_row
    # a removed experiment option is refused, naming where its results went; at its neutral value it is accepted
    assert main(["worldmodel", "train-mdn", str(run), "--set", "mdn_ensemble=2", "--no-progress"]) == 2
    assert "docs/experiments/" in capsys.readouterr().err


def test_ctrl_c_in_a_training_stage_stops_the_pipeline(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    # the trainer answers Ctrl-C by saving a checkpoint and returning "interrupted"; encoding must not run on that V
    import agents.pipeline as pipeline

    monkeypatch.setattr(pipeline, "stage_train_vae", lambda *a, **k: {"status": "interrupted", "step": 1})
    run = tmp_path / "wm"
    assert main(["worldmodel", "run", "--preset", "tiny", "--out", str(run), "--no-progress"]) == 130
    err = capsys.readouterr().err.strip()
    assert err.startswith("interrupted") and "--resume" in err and len(err.splitlines()) == 1
    assert (run / "rollouts" / "manifest.json").is_file() and not (run / "latents").exists()


def test_cli_bad_input_is_one_line_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["worldmodel", "evaluate", str(tmp_path / "nope"), "--episodes", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "train-controller" in err and len(err.splitlines()) == 1
    assert main(["worldmodel", "train-mdn", str(tmp_path / "nope2"), "--preset", "tiny"]) == 2
    assert "encode" in capsys.readouterr().err
    assert main(["worldmodel", "run", "--preset", "tiny", "--out", str(tmp_path / "x"), "--set", "episodes=zero"]) == 2
    assert "episodes" in capsys.readouterr().err
    # a bad M setting fails before any collection starts; so does an unknown stage or field
    assert main(["worldmodel", "run", "--preset", "tiny", "--out", str(tmp_path / "y"), "--set", "mdn.hidden=0"]) == 2
    assert "hidden=0" in capsys.readouterr().err and not (tmp_path / "y").exists()
    assert main(["worldmodel", "run", "--preset", "tiny", "--out", str(tmp_path / "y"), "--set", "vea.steps=3"]) == 2
    assert "unknown stage 'vea'" in capsys.readouterr().err and not (tmp_path / "y").exists()
    assert main(["worldmodel", "run", "--preset", "tiny", "--out", str(tmp_path / "y"), "--set", "vae.stpes=3"]) == 2
    assert "'stpes'" in capsys.readouterr().err and not (tmp_path / "y").exists()


@pytest.mark.parametrize("stage, needle", [(["train-vae"], "dreamlab worldmodel collect {run}"),
                                           (["encode"], "dreamlab worldmodel train-vae {run}"),
                                           (["train-mdn"], "dreamlab worldmodel encode {run}"),
                                           (["train-controller"], "dreamlab worldmodel train-vae {run}"),
                                           (["iterate", "--rounds", "2"], "dreamlab worldmodel collect {run}"),
                                           (["collect", "--workers", "-1"], "workers=-1 must be >= 0")])
def test_stage_on_missing_run_names_the_step_before_and_writes_nothing(stage: list[str], needle: str, tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "nowhere" / "run"
    assert main(["worldmodel", stage[0], str(run), "--preset", "tiny", *stage[1:]]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and needle.format(run=run) in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "nowhere").exists()


@pytest.mark.parametrize("setting", ["search.rollouts=-3", "search.popsize=1", "search.generations=0",
                                     "dream.temperature=0", "search.sigma0=-0.1", "workers=-2", "evaluation.episodes=0",
                                     "selection.playoff_episodes=-1", "mdn.hidden=0", "rounds.count=0",
                                     "popsize=1"])  # (a flat name of the earlier releases)
def test_bad_later_stage_setting_fails_before_collection(setting: str, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    # a C or evaluation setting used only after collection, V and M must not cost those stages (hours in paper)
    out = tmp_path / "run"
    assert main(["worldmodel", "run", "--preset", "tiny", "--out", str(out), "--set", setting]) == 2
    err = capsys.readouterr().err.strip()
    key = setting.split("=")[0].split(".")[-1]
    lines = [x for x in err.splitlines() if not x.startswith("deprecated:")]
    assert lines[0].startswith("error:") and f"{key}=" in err and len(lines) == 1, err
    assert not out.exists()


def test_paper_preset_has_the_paper_sizes_and_selects_by_real_checks() -> None:
    from agents.wm_config import make_config

    c = make_config("paper")
    assert (c.collect.episodes, c.collect.max_steps, c.vae.z_dim, c.vae.width, c.mdn.hidden, c.mdn.mixtures,
            c.search.popsize, c.search.rollouts, c.dream.horizon) == (10_000, 1000, 32, 32, 256, 5, 64, 16, 1000)
    assert c.collect.policy == "random_controller" and c.collect.env_id == "CarRacing-v3"
    assert c.selection.by_real and c.selection.check_every == 25 and c.selection.check_episodes == 8
    from agents.worldmodel_cli import _plan

    plan = _plan(dataclasses.replace(c, device="cpu"), Path("runs/x"))
    assert "10000 episodes x 1000 steps" in plan and "expect days on a CPU" in plan


def test_cli_offers_every_preset_and_medium_uses_full_length_episodes() -> None:
    from agents.wm_config import PRESETS, make_config
    from agents.worldmodel_cli import PRESET_NAMES

    assert PRESET_NAMES == list(PRESETS)
    c = make_config("medium")
    # medium's point: whole 1000-step episodes in the data, the dream and the real checks, the paper's LSTM
    assert (c.collect.max_steps, c.dream.horizon, c.evaluation.max_steps, c.mdn.hidden, c.evaluation.episodes) == \
        (1000, 1000, 1000, 256, 100)
    assert (
        c.selection.by_real and c.collect.env_id == "dreamlab/CarRacing64-v3" and c.evaluation.env_id == "CarRacing-v3"
    )
    # the best 3 checks of each search are re-scored on 16 episodes; rounds are compared on 16 episodes
    assert (c.selection.playoff_top, c.selection.playoff_episodes, c.rounds.check_episodes) == (3, 16, 16)


def test_a_run_folder_of_the_earlier_flat_layout_still_loads(tmp_path: Path) -> None:
    """config.json written by an earlier release (flat names, removed options at their neutral values) loads."""
    from agents.wm_config import load_config, make_config

    flat = {"env_id": "dreamlab/CarRacing64-v3", "episodes": 160, "vae_steps": 1000, "popsize": 32, "eval_every": 5,
            "select_by_real": True, "rounds": 1, "mdn_ensemble": 1, "steer_penalty": 0.0, "state_stride": 16,
            "features": "zh", "threads": 1}
    (tmp_path / "config.json").write_text(json.dumps({"preset": "quick", "config": flat}))
    c = load_config(tmp_path)
    assert (c.collect.episodes, c.vae.steps, c.search.popsize, c.selection.check_every, c.threads) == (
        160,
        1000,
        32,
        5,
        1,
    )
    assert c.selection.by_real and c.rounds.count == 1
    assert c.collect.env_id == make_config("quick").collect.env_id and c.collect.policy == "random_controller"
    (tmp_path / "config.json").write_text(json.dumps({"preset": "quick", "config": {**flat, "steer_penalty": 0.5}}))
    with pytest.raises(DreamlabError, match="steer_penalty=0.5 is an experiment option"):
        load_config(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"name": "vae", "config": {"z_dim": 2}}))
    with pytest.raises(DreamlabError, match="a 'vae' model's run folder"):
        load_config(tmp_path)


def test_random_baseline_episodes_are_measured_once_and_cached(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from agents.evaluate import random_baseline

    monkeypatch.setenv("DREAMLAB_CACHE", str(tmp_path))

    class CountingEvaluator:  # stands in for RealEvaluator: records which env seeds really ran
        def __init__(self) -> None:
            self.ran: list[int] = []

        def run(self, tasks, desc, progress):
            self.ran += [t[2] for t in tasks]
            return [{"seed": t[2], "return": -30.0 - t[2], "steps": 1000} for t in tasks]

    ev = CountingEvaluator()
    random_baseline(ev, "CarRacing-v3", 1000, [1, 2, 3], progress=False)
    again = random_baseline(ev, "CarRacing-v3", 1000, [2, 3, 4], progress=False)
    assert ev.ran == [1, 2, 3, 4]
    assert [(r["seed"], r["return"], r["steps"]) for r in again] == [
        (2, -32.0, 1000),
        (3, -33.0, 1000),
        (4, -34.0, 1000),
    ]
    # another episode length, our own envs (their code changes with the repo) and --fresh-baseline always run
    random_baseline(ev, "CarRacing-v3", 500, [1], progress=False)
    random_baseline(ev, "dreamlab/CarRacing-v3", 1000, [1], progress=False)
    random_baseline(ev, "CarRacing-v3", 1000, [1], use_cache=False, progress=False)
    assert ev.ran == [1, 2, 3, 4, 1, 1, 1]
    # a damaged cache is rebuilt, never trusted
    (tmp_path / "random_baseline.json").write_text("{not json")
    random_baseline(ev, "CarRacing-v3", 1000, [1], progress=False)
    assert ev.ran[-1] == 1 and len(json.loads((tmp_path / "random_baseline.json").read_text())) == 1


def test_report_of_a_half_finished_run(tmp_path: Path) -> None:
    """report.md is a view: a run stopped after collection, or with a damaged summary, still gets a page."""
    from agents.report import render_report, write_report
    from dreamlab.errors import DreamlabError

    run = tmp_path / "half"
    run.mkdir()
    (run / "config.json").write_text(
        json.dumps(
            {
                "preset": "quick",
                "config": {"episodes": 4, "max_steps": 50, "env_id": "CarRacing-v3", "policy": "brownian", "seed": 3},
            }
        )
    )
    (run / "summary.json").write_text(
        json.dumps({"collect": {"episodes": 4, "steps": 200, "env_steps_per_s": 123.4, "seconds": 1.6}})
    )
    page = render_report(run)
    assert "No evaluation yet" in page and "| collect | 1.6 | 4 episodes, 200 env steps, 123 env-steps/s |" in page
    assert "4 episodes × 50 steps of `CarRacing-v3`" in page and "## Iterative rounds" not in page
    (run / "summary.json").write_text('{"collect": {"episo')  # truncated: the stages table is left out, not fatal
    assert "## Stages" not in render_report(run)
    assert write_report(run).read_text().startswith("# World-model run `half`")
    with pytest.raises(DreamlabError, match="does not exist"):
        render_report(tmp_path / "missing")


def test_a_seeded_pipeline_repeats_on_cpu(tmp_path: Path) -> None:
    """Two tiny runs with the same seed in one process (the second starts from another global RNG state): the same
    V, M and controller weights and the same real-env score; another seed gives other weights."""
    import torch

    from agents.pipeline import run_pipeline
    from agents.wm_config import make_config
    from dreamlab.io import load_tensors

    res = [run_pipeline(tmp_path / f"r{k}", make_config("tiny", {"seed": s}), preset="tiny", progress=False)
           for k, s in enumerate((0, 0, 1))]
    for f in ("vae/model/model.safetensors", "mdn/model/model.safetensors", "controller/best.safetensors"):
        a, b, c = (load_tensors(tmp_path / f"r{k}" / f) for k in range(3))
        assert all(torch.equal(a[n], b[n]) for n in a), f
        assert not all(torch.equal(a[n], c[n]) for n in a), f
    assert res[0]["controller"]["mean"] == res[1]["controller"]["mean"]
