"""CMA-ES: the checkpointed state rebuilds the search exactly; train_controller resumes to the same result."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("cma")

from agents.cmaes import (  # noqa: E402
    _VAL_SEED,
    CMAConfig,
    _make_es,
    cma_state_info,
    load_cma_state,
    save_cma_state,
    train_controller,
)
from dreamlab.errors import DreamlabError  # noqa: E402
from worlds.dream import tiny_world_model, write_world_run  # noqa: E402
from worlds.policies import load_controller, num_params  # noqa: E402


@pytest.mark.parametrize("diagonal", [False, True])
@pytest.mark.parametrize("n", [12, 320])  # from 300 dimensions (every real controller) cma adapts sigma by TPA
def test_cma_state_round_trip_is_exact(tmp_path: Path, diagonal: bool, n: int) -> None:
    cfg = CMAConfig(popsize=8, sigma0=0.3, seed=3, diagonal=diagonal)

    def f(x: np.ndarray) -> float:
        return float(np.sum((np.asarray(x) - 1.0) ** 2) + 3 * np.asarray(x)[0] ** 2)

    np.random.seed(0)
    es = _make_es(n, cfg)
    for _ in range(5):
        xs = es.ask()
        es.tell(xs, [f(x) for x in xs])
    save_cma_state(tmp_path, es, {"generation": 5})
    assert not list(tmp_path.glob("*.pkl"))
    ref = []
    for _ in range(4):
        xs = es.ask()
        ref.append(np.array(xs))
        es.tell(xs, [f(x) for x in xs])
    np.random.seed(999)  # the saved RNG state must win over whatever happened since
    es2, meta = load_cma_state(tmp_path, n, cfg)
    assert meta["generation"] == 5 and cma_state_info(tmp_path)["generation"] == 5
    assert json.loads((tmp_path / "cma_state.json").read_text())["generation"] == 5  # the readable copy
    for r in ref:
        xs = es2.ask()
        np.testing.assert_array_equal(np.array(xs), r)
        es2.tell(xs, [f(x) for x in xs])
    assert es2.sigma == es.sigma
    assert type(es2.adapt_sigma).__name__ == ("CMAAdaptSigmaTPA" if n >= 300 else "CMAAdaptSigmaCSA")
    with pytest.raises(DreamlabError, match="parameters"):
        load_cma_state(tmp_path, n + 1, cfg)


def test_cma_state_bad_or_legacy_file(tmp_path: Path) -> None:
    """A truncated state names the file; a state from before the whole-state format still resumes, with a warning."""
    import torch

    from dreamlab.io import save_json, save_tensors

    cfg = CMAConfig(popsize=6, sigma0=0.2, seed=1)
    np.random.seed(0)
    es = _make_es(10, cfg)
    xs = es.ask()
    es.tell(xs, [float(np.sum(np.square(x))) for x in xs])
    save_cma_state(tmp_path, es, {"generation": 1})
    raw = (tmp_path / "cma_state.safetensors").read_bytes()
    (tmp_path / "cma_state.safetensors").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(DreamlabError, match="cma_state.safetensors"):
        load_cma_state(tmp_path, 10, cfg)
    legacy = tmp_path / "legacy"
    save_tensors(legacy / "cma_state.safetensors", {"mean": torch.from_numpy(es.mean.copy()), "pc": torch.from_numpy(es.pc.copy())})
    rng = np.random.get_state()
    save_json(legacy / "cma_state.json", {"sigma": 0.15, "countiter": 1, "countevals": 6, "sm": {}, "adapt_sigma": {}, "best_f": None,
                                          "best_evals": 0, "numpy_rng": [rng[0], rng[1].tolist(), int(rng[2]), int(rng[3]), float(rng[4])],
                                          "generation": 1})
    with pytest.warns(UserWarning, match="older, partial"):
        es3, meta = load_cma_state(legacy, 10, cfg)
    assert meta["generation"] == 1 and es3.sigma == 0.15 and np.array_equal(es3.mean, es.mean)


def test_train_controller_resume_equals_uninterrupted(tmp_path: Path) -> None:
    vae, mdn, mu, lv = tiny_world_model(seed=0)
    run = write_world_run(tmp_path / "wm", vae, mdn, mu, lv)
    cfg = CMAConfig(generations=4, popsize=6, rollouts=2, horizon=15, sigma0=0.2, eval_every=0, device="cpu", seed=1)
    full = train_controller(run, cfg, progress=False, out=tmp_path / "a")
    assert full["generations"] == 4
    import dataclasses

    train_controller(run, dataclasses.replace(cfg, generations=2), progress=False, out=tmp_path / "b")
    with pytest.raises(DreamlabError, match="--resume"):
        train_controller(run, cfg, progress=False, out=tmp_path / "b")
    train_controller(run, cfg, progress=False, out=tmp_path / "b", resume=True)
    rows_a = [json.loads(x) for x in (tmp_path / "a" / "fitness.jsonl").read_text().splitlines()]
    rows_b = [json.loads(x) for x in (tmp_path / "b" / "fitness.jsonl").read_text().splitlines()]
    assert [r["generation"] for r in rows_b] == [1, 2, 3, 4]
    for ra, rb in zip(rows_a, rows_b):
        for k in ("best", "mean", "worst", "mean_candidate", "sigma"):
            assert ra[k] == rb[k], (k, ra, rb)
    ta, z, h = load_controller(tmp_path / "a" / "best.safetensors")
    tb, _, _ = load_controller(tmp_path / "b" / "best.safetensors")
    assert (z, h) == (8, 16) and ta.numel() == num_params(8, 16) and np.array_equal(ta.numpy(), tb.numpy())
    assert (tmp_path / "a" / "fitness.png").exists()


def test_real_env_fitness_and_periodic_real_evaluation(tmp_path: Path) -> None:
    pytest.importorskip("gymnasium")
    vae, mdn, mu, lv = tiny_world_model(seed=0)
    run = write_world_run(tmp_path / "wm", vae, mdn, mu, lv)
    cfg = CMAConfig(generations=2, popsize=2, rollouts=1, horizon=12, fitness="real", eval_every=1, eval_episodes=1,
                    select_by_real=True, workers=1, env_id="dreamlab/CarRacing64-v3", device="cpu")
    res = train_controller(run, cfg, progress=False, out=tmp_path / "c")
    rows = [json.loads(x) for x in (tmp_path / "c" / "fitness.jsonl").read_text().splitlines()]
    assert res["generations"] == 2 and len(rows) == 2
    assert all("real_mean" in r and np.isfinite(r["real_mean"]) for r in rows)
    # a 12-step CarRacing episode loses 0.1 per frame and gains at most a few tiles
    assert all(-1.3 <= r["best"] <= 50 for r in rows)
    # with select_by_real the kept controller is the checked one with the best real check
    best_gen = max(rows, key=lambda r: r["real_mean"])["generation"]
    assert res["best_real_generation"] == best_gen and res["best_real_check"] == max(r["real_mean"] for r in rows)
    # with real fitness each check scores that generation's distribution mean: 0 in generation 1, moved in 2
    c1, c2 = (load_controller(tmp_path / "c" / "checks" / f"gen_{g:05d}.safetensors")[0] for g in (1, 2))
    assert not c1.any() and c2.any()


def test_saved_controller_keeps_the_m_it_was_trained_in(tmp_path: Path) -> None:
    """After M is retrained (iterative training), a kept controller still acts with its own M snapshot."""
    import shutil

    import torch

    from worlds.collect import load_model_policy
    from worlds.policies import controller_mdn

    vae, mdn, mu, lv = tiny_world_model(seed=0)
    run = write_world_run(tmp_path / "wm", vae, mdn, mu, lv)
    cfg = CMAConfig(generations=2, popsize=4, rollouts=2, horizon=10, sigma0=0.2, eval_every=0, device="cpu", seed=1)
    train_controller(run, cfg, progress=False)
    best = run / "controller" / "best.safetensors"
    snap = controller_mdn(best)
    assert snap is not None and snap.parent == run / "controller"
    assert sorted(p.name for p in (run / "controller").glob("mdn_*")) == [snap.name]  # one snapshot, no orphans
    trained_in = {k: v.clone() for k, v in mdn.state_dict().items()}
    # "retrain" M in the run folder: the kept controller must not silently switch to it
    with torch.no_grad():
        for p in mdn.parameters():
            p.add_(1.0)
    mdn.save_pretrained(run / "mdn" / "model")
    acting = load_model_policy(str(run), str(best)).mdn.state_dict()
    for k, v in trained_in.items():
        torch.testing.assert_close(acting[k].cpu(), v.cpu())
    assert any(not torch.equal(acting[k].cpu(), v.cpu()) for k, v in mdn.state_dict().items())
    shutil.rmtree(run / "mdn")  # the controller's snapshot is all it needs of M
    load_model_policy(str(run), str(best))
    shutil.rmtree(snap)
    with pytest.raises(DreamlabError, match=snap.name):
        controller_mdn(best)
    from envs import register_all
    from worlds.collect import CollectConfig, collect

    # the collector checks a controller policy once, before any worker starts (not a crash per worker)
    with pytest.raises(DreamlabError, match=snap.name):
        collect(CollectConfig(out=str(tmp_path / "roll"), episodes=2, max_steps=5, workers=1, policy="controller",
                              env_id="dreamlab/CarRacing64-v3", world_model=str(run), controller=str(best)), progress=False,
                env_setup=register_all)
    assert not (tmp_path / "roll").exists()


def test_z_only_controller_searches_3z_plus_3_parameters(tmp_path: Path) -> None:
    import dataclasses

    import torch

    from worlds.policies import unflatten

    vae, mdn, mu, lv = tiny_world_model(seed=0)
    run = write_world_run(tmp_path / "wm", vae, mdn, mu, lv)
    cfg = CMAConfig(generations=2, popsize=4, rollouts=2, horizon=10, sigma0=0.2, eval_every=0, device="cpu", seed=1, features="z")
    train_controller(run, cfg, progress=False)
    z_dim, hidden = mdn.config.z_dim, mdn.config.hidden
    assert json.loads((run / "controller" / "cma_state.json").read_text())["generation"] == 2
    cfg_json = json.loads((run / "controller" / "config.json").read_text())
    assert cfg_json["searched_params"] == 3 * (z_dim + 1) and cfg_json["num_params"] == num_params(z_dim, hidden)
    theta, _, _ = load_controller(run / "controller" / "best.safetensors")
    w, b = unflatten(theta, z_dim, hidden)
    assert torch.count_nonzero(w[z_dim:]) == 0 and torch.count_nonzero(w[:z_dim]) > 0
    with pytest.raises(DreamlabError, match="features"):
        train_controller(run, CMAConfig(features="hz", device="cpu"), progress=False, out=tmp_path / "bad")  # type: ignore[arg-type]
    with pytest.raises(DreamlabError, match="steer_penalty=-0.1"):
        train_controller(run, CMAConfig(steer_penalty=-0.1, device="cpu"), progress=False, out=tmp_path / "bad")
    with pytest.raises(DreamlabError, match=r"start_anywhere=1.5: it is a fraction"):
        train_controller(run, CMAConfig(start_anywhere=1.5, device="cpu"), progress=False, out=tmp_path / "bad")
    # anywhere-starts run through the search, and the controller's config records them
    train_controller(run, dataclasses.replace(cfg, start_anywhere=0.5, state_stride=1), progress=False, out=tmp_path / "any")
    anycfg = json.loads((tmp_path / "any" / "config.json").read_text())
    assert anycfg["cma"]["start_anywhere"] == 0.5 and anycfg["cma"]["state_stride"] == 1
    # so does the lost-car rule, and a bad value is named
    with pytest.raises(DreamlabError, match="lost_steps=-2"):
        train_controller(run, CMAConfig(lost_steps=-2, device="cpu"), progress=False, out=tmp_path / "bad")
    train_controller(run, dataclasses.replace(cfg, lost_steps=3), progress=False, out=tmp_path / "lost")
    assert json.loads((tmp_path / "lost" / "config.json").read_text())["cma"]["lost_steps"] == 3


def test_worst_frac_fitness_is_the_mean_of_the_worst_rollouts(tmp_path: Path) -> None:
    """worst_frac < 1: a candidate's fitness is the mean of its lowest ceil(frac x R) dream returns (CVaR)."""
    import dataclasses

    import torch

    from agents.wm_config import make_config
    from worlds.dream import DreamConfig, DreamSimulator, worst_mean

    r = torch.tensor([[1.0, 5.0, 3.0, 7.0], [2.0, 2.0, 2.0, 10.0]])
    torch.testing.assert_close(worst_mean(r, 1.0), r.mean(1))
    torch.testing.assert_close(worst_mean(r, 0.5), torch.tensor([2.0, 2.0]))
    torch.testing.assert_close(worst_mean(r, 0.3), torch.tensor([2.0, 2.0]))  # ceil(1.2) = 2 rollouts
    torch.testing.assert_close(worst_mean(r, 0.01), torch.tensor([1.0, 2.0]))  # at least one
    for bad in (0.0, 1.5, float("nan")):
        with pytest.raises(DreamlabError, match="worst_frac"):
            worst_mean(r, bad)
    vae, mdn, mu, lv = tiny_world_model(seed=0)
    sim = DreamSimulator(mdn, mu, lv, DreamConfig(horizon=12))
    thetas = torch.randn(3, sim.n_params) * 0.3
    rets = sim.rollout(thetas, 4, seed=5)["returns"]
    torch.testing.assert_close(sim.fitness(thetas, 4, seed=5, worst_frac=0.5), rets.sort(1).values[:, :2].mean(1))
    assert (sim.fitness(thetas, 4, seed=5, worst_frac=0.5) <= sim.fitness(thetas, 4, seed=5) + 1e-6).all()
    run = write_world_run(tmp_path / "wm", vae, mdn, mu, lv)
    cfg = CMAConfig(generations=2, popsize=4, rollouts=4, horizon=10, sigma0=0.2, eval_every=0, device="cpu", seed=1, worst_frac=0.5)
    train_controller(run, cfg, progress=False)
    assert json.loads((run / "controller" / "config.json").read_text())["cma"]["worst_frac"] == 0.5
    with pytest.raises(DreamlabError, match="worst_frac=0"):
        train_controller(run, dataclasses.replace(cfg, worst_frac=0.0), progress=False, out=tmp_path / "bad")
    with pytest.raises(DreamlabError, match="worst_frac=2"):
        make_config("tiny", {"worst_frac": "2"})


def test_restart_starts_a_fresh_search_but_keeps_the_run(tmp_path: Path) -> None:
    import dataclasses

    vae, mdn, mu, lv = tiny_world_model(seed=0)
    run = write_world_run(tmp_path / "wm", vae, mdn, mu, lv)
    cfg = CMAConfig(generations=2, popsize=4, rollouts=2, horizon=10, sigma0=0.2, eval_every=0, device="cpu", seed=1)
    train_controller(run, cfg, progress=False)
    train_controller(run, dataclasses.replace(cfg, generations=3), resume=True, restart=True, reset_best=True, progress=False)
    st = json.loads((run / "controller" / "cma_state.json").read_text())
    assert st["generation"] == 3 and st["countiter"] == 1  # the run goes on; the search is one generation old
    assert len((run / "controller" / "fitness.jsonl").read_text().splitlines()) == 3
    assert (run / "controller" / "best.safetensors").exists()


def test_playoff_rescores_the_best_checks_and_keeps_the_winner(tmp_path: Path) -> None:
    """Every checked controller is kept in checks/; the playoff re-scores the best-checked ones on fresh seeds and
    best.safetensors becomes the one with the best playoff mean (asserted against a direct re-evaluation)."""
    import dataclasses

    pytest.importorskip("gymnasium")
    from agents.evaluate import RealEvaluator
    from worlds.policies import controller_mdn

    vae, mdn, mu, lv = tiny_world_model(seed=0)
    run = write_world_run(tmp_path / "wm", vae, mdn, mu, lv)
    cfg = CMAConfig(generations=3, popsize=4, rollouts=2, horizon=12, sigma0=0.5, eval_every=1, eval_episodes=1, select_by_real=True,
                    playoff_top=2, playoff_episodes=2, workers=1, env_id="dreamlab/CarRacing64-v3", device="cpu", seed=2)
    res = train_controller(run, cfg, progress=False)
    out = run / "controller"
    checks = sorted(p.name for p in (out / "checks").glob("*.safetensors"))
    assert checks == ["gen_00001.safetensors", "gen_00002.safetensors", "gen_00003.safetensors"]
    po = json.loads((out / "playoff.json").read_text())
    assert res["playoff"] == po and po["seeds"] == [100, 101]
    cands = po["candidates"]
    assert len(cands) == 2 and len({c["generation"] for c in cands}) == len(cands)
    # the candidates are the best checks (distinct controllers), the winner the best playoff mean
    rows = {json.loads(x)["generation"]: json.loads(x) for x in (out / "fitness.jsonl").read_text().splitlines()}
    assert all(c["real_check"] == pytest.approx(rows[c["generation"]]["real_mean"], abs=1e-3) for c in cands)
    assert po["chosen_generation"] == max(cands, key=lambda c: c["playoff_mean"])["generation"]
    best = load_controller(out / "best.safetensors")[0]
    chosen = out / "checks" / f"gen_{po['chosen_generation']:05d}.safetensors"
    np.testing.assert_array_equal(best.numpy(), load_controller(chosen)[0].numpy())
    assert controller_mdn(chosen) == controller_mdn(out / "best.safetensors")  # the checks name the same M snapshot
    with RealEvaluator(run, cfg.env_id, 1, cfg.horizon, controller_mdn(chosen)) as ev:
        again = ev.returns([best.numpy()] * 2, [100, 101])
    assert float(np.mean(again)) == pytest.approx(po["chosen_playoff_mean"], abs=1e-4)
    # resuming a finished search does not re-run the playoff; a fresh search clears the old checks
    assert train_controller(run, cfg, resume=True, progress=False)["playoff"] == po
    assert [json.loads(x) for x in (out / "playoffs.jsonl").read_text().splitlines()] == [po]
    stale = tmp_path / "c2" / "checks" / "gen_00007.safetensors"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(chosen.read_bytes())
    (tmp_path / "c2" / "playoff.json").write_text("{}")
    train_controller(run, dataclasses.replace(cfg, generations=1, playoff_top=0), out=tmp_path / "c2", progress=False)
    assert [p.name for p in (tmp_path / "c2" / "checks").glob("*")] == ["gen_00001.safetensors"]
    assert not (tmp_path / "c2" / "playoff.json").exists()


def test_restart_every_runs_several_searches_and_resumes_across_them(tmp_path: Path) -> None:
    """restart_every=3 over 7 generations: searches of 3, 3 and 1 generations, each from mean 0 with sigma0 and its
    own seed (cma's countiter starts again; the searches' first candidates differ); a run stopped at the first
    boundary and resumed writes the same curves as an uninterrupted one."""
    import dataclasses

    vae, mdn, mu, lv = tiny_world_model(seed=0)
    run = write_world_run(tmp_path / "wm", vae, mdn, mu, lv)
    cfg = CMAConfig(generations=7, popsize=4, rollouts=2, horizon=10, sigma0=0.2, eval_every=0, restart_every=3, device="cpu", seed=1)
    train_controller(run, cfg, progress=False, out=tmp_path / "a")
    rows = [json.loads(x) for x in (tmp_path / "a" / "fitness.jsonl").read_text().splitlines()]
    assert [r["search"] for r in rows] == [0, 0, 0, 1, 1, 1, 2]
    st = json.loads((tmp_path / "a" / "cma_state.json").read_text())
    assert st["generation"] == 7 and st["countiter"] == 1  # the last search is one generation old
    assert len({r["best"] for r in (rows[0], rows[3], rows[6])}) == 3  # own seeds: not the same first generation
    train_controller(run, dataclasses.replace(cfg, generations=3), progress=False, out=tmp_path / "b")
    train_controller(run, cfg, progress=False, out=tmp_path / "b", resume=True)
    rows_b = [json.loads(x) for x in (tmp_path / "b" / "fitness.jsonl").read_text().splitlines()]
    for ra, rb in zip(rows, rows_b, strict=True):
        for k in ("best", "mean", "worst", "mean_candidate", "sigma", "search"):
            assert ra[k] == rb[k], (k, ra, rb)
    with pytest.raises(DreamlabError, match="restart_every"):
        train_controller(run, dataclasses.replace(cfg, restart_every=-1), progress=False, out=tmp_path / "c")


def test_restart_every_checks_each_search_and_playoff_spans_them(tmp_path: Path) -> None:
    """With real checks, each search is checked every eval_every of its own generations and at its end; the playoff
    chooses among the checks of all searches."""
    pytest.importorskip("gymnasium")
    import dataclasses

    vae, mdn, mu, lv = tiny_world_model(seed=0)
    run = write_world_run(tmp_path / "wm", vae, mdn, mu, lv)
    cfg = CMAConfig(generations=6, popsize=4, rollouts=2, horizon=10, sigma0=0.2, eval_every=2, eval_episodes=1, restart_every=3,
                    select_by_real=True, playoff_top=3, playoff_episodes=2, workers=1, env_id="dreamlab/CarRacing64-v3", device="cpu", seed=1)
    train_controller(run, dataclasses.replace(cfg), progress=False)
    rows = [json.loads(x) for x in (run / "controller" / "fitness.jsonl").read_text().splitlines()]
    assert [r["generation"] for r in rows if "real_mean" in r] == [2, 3, 5, 6]
    checks = sorted(int(f.stem[4:]) for f in (run / "controller" / "checks").glob("gen_*.safetensors"))
    assert checks == [2, 3, 5, 6]
    po = json.loads((run / "controller" / "playoff.json").read_text())
    assert po["search_start"] == 0 and {c["generation"] for c in po["candidates"]} <= {2, 3, 5, 6}


def test_rotating_ensemble_runs_each_search_in_one_member_and_the_playoff_compares_members(tmp_path: Path) -> None:
    """ensemble_mode='rotate': search k dreams in member k mod K alone, its controllers name that member's M, and the
    playoff re-scores controllers of both members, each with its own M."""
    import dataclasses

    import torch
    from safetensors.torch import load_file

    pytest.importorskip("gymnasium")
    from agents.evaluate import RealEvaluator
    from worlds.dream import DreamConfig, DreamSimulator
    from worlds.encode import initial_latents
    from worlds.policies import controller_mdn

    vae, mdn, mu, lv = tiny_world_model(seed=0)
    run = write_world_run(tmp_path / "wm", vae, mdn, mu, lv)
    other = tiny_world_model(seed=5)[1]
    other.save_pretrained(run / "mdn_1" / "model")
    cfg = CMAConfig(generations=4, popsize=4, rollouts=2, horizon=12, sigma0=0.5, ensemble=2, ensemble_mode="rotate", restart_every=2,
                    eval_every=1, eval_episodes=1, select_by_real=True, playoff_top=4, playoff_episodes=2, workers=1,
                    env_id="dreamlab/CarRacing64-v3", device="cpu", seed=3)
    res = train_controller(run, cfg, progress=False)
    out = run / "controller"
    rows = [json.loads(x) for x in (out / "fitness.jsonl").read_text().splitlines()]
    assert [r["member"] for r in rows] == [0, 0, 1, 1] and [r["search"] for r in rows] == [0, 0, 1, 1]
    # each search starts at the zero controller; its dream validation score is that of member 0, then member 1, alone
    zero = torch.zeros(1, num_params(8, 16))
    for g, m in ((0, mdn), (2, other)):
        sim = DreamSimulator(m, *initial_latents(run / "latents"), DreamConfig(horizon=12, temperature=cfg.temperature))
        want = float(sim.fitness(zero, cfg.val_rollouts, seed=_VAL_SEED + cfg.seed)[0])
        assert rows[g]["mean_candidate_val"] == pytest.approx(want, abs=1e-4)
    assert rows[0]["mean_candidate_val"] != pytest.approx(rows[2]["mean_candidate_val"], abs=1e-3)
    # each check names the M it was trained in
    for g in range(1, 5):
        snap = controller_mdn(out / "checks" / f"gen_{g:05d}.safetensors")
        want = (mdn if g <= 2 else other).state_dict()
        weights = load_file(str(snap / "model.safetensors"))
        assert all(torch.equal(weights[k].cpu(), v.cpu()) for k, v in want.items())
    po = res["playoff"]
    assert len({c["mdn"] for c in po["candidates"]}) == 2  # controllers of both members compete
    assert {Path(str(controller_mdn(out / "checks" / f"gen_{c['generation']:05d}.safetensors"))).name for c in po["candidates"]} == \
        {c["mdn"] for c in po["candidates"]}
    # the winner, re-run with its own M, scores its playoff mean; best.safetensors names that M
    best = out / "best.safetensors"
    assert controller_mdn(best).name == next(c["mdn"] for c in po["candidates"] if c["generation"] == po["chosen_generation"])
    with RealEvaluator(run, cfg.env_id, 1, cfg.horizon, controller_mdn(best)) as ev:
        again = ev.returns([load_controller(best)[0].numpy()] * 2, [100, 101])
    assert float(np.mean(again)) == pytest.approx(po["chosen_playoff_mean"], abs=1e-4)
    with pytest.raises(DreamlabError, match="restart_every > 0"):
        train_controller(run, dataclasses.replace(cfg, restart_every=0), out=tmp_path / "c2", progress=False)
    with pytest.raises(DreamlabError, match="ensemble_mode='blend'"):
        train_controller(run, dataclasses.replace(cfg, ensemble_mode="blend"), out=tmp_path / "c3", progress=False)  # type: ignore[arg-type]
