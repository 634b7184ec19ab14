"""CMA-ES: the checkpointed state rebuilds the search exactly; train_controller resumes to the same result; the
selection keeps the controllers its settings ask for."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("cma")

from agents.cma_search import SearchConfig, cma_state_info, load_cma_state, make_es, save_cma_state  # noqa: E402
from agents.cmaes import train_controller  # noqa: E402
from agents.selection import SelectionConfig  # noqa: E402
from dreamlab.errors import DreamlabError  # noqa: E402
from worlds.dream import DreamConfig, tiny_world_model, write_world_run  # noqa: E402
from worlds.policies import load_controller, num_params  # noqa: E402

FAST = "dreamlab/CarRacing64-v3"
SEARCH = {f for f in SearchConfig.__dataclass_fields__}
SELECTION = {f for f in SelectionConfig.__dataclass_fields__}


def _train(run: Path, *, out: Path | None = None, resume: bool = False, restart: bool = False, reset_best: bool = False,
           seed: int = 1, horizon: int = 10, **settings) -> dict:
    """train_controller on CPU with search and selection settings by name (no real checks unless asked)."""
    sel = {"check_every": 0, **{k: v for k, v in settings.items() if k in SELECTION}}
    search = {k: v for k, v in settings.items() if k in SEARCH}
    assert set(settings) <= SEARCH | SELECTION, set(settings) - SEARCH - SELECTION
    return train_controller(run, SearchConfig(**search), SelectionConfig(**sel), DreamConfig(horizon=horizon),
                            seed=seed, workers=1, env_id=FAST, device="cpu", progress=False, out=out, resume=resume,
                            restart=restart, reset_best=reset_best)


def _rows(folder: Path) -> list[dict]:
    return [json.loads(x) for x in (folder / "fitness.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("n", [12, 320])  # from 300 dimensions (every real controller) cma adapts sigma by TPA
def test_cma_state_round_trip_is_exact(tmp_path: Path, n: int) -> None:
    cfg = SearchConfig(popsize=8, sigma0=0.3)

    def f(x: np.ndarray) -> float:
        return float(np.sum((np.asarray(x) - 1.0) ** 2) + 3 * np.asarray(x)[0] ** 2)

    np.random.seed(0)
    es = make_es(n, cfg, seed=3)
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
    es2, meta = load_cma_state(tmp_path, n, cfg, 3)
    assert meta["generation"] == 5 and cma_state_info(tmp_path)["generation"] == 5
    assert json.loads((tmp_path / "cma_state.json").read_text())["generation"] == 5  # the readable copy
    for r in ref:
        xs = es2.ask()
        np.testing.assert_array_equal(np.array(xs), r)
        es2.tell(xs, [f(x) for x in xs])
    assert es2.sigma == es.sigma
    assert type(es2.adapt_sigma).__name__ == ("CMAAdaptSigmaTPA" if n >= 300 else "CMAAdaptSigmaCSA")
    with pytest.raises(DreamlabError, match="parameters"):
        load_cma_state(tmp_path, n + 1, cfg, 3)


def test_cma_state_bad_or_legacy_file(tmp_path: Path) -> None:
    """A truncated state names the file; a state from before the whole-state format still resumes, with a warning."""
    import torch

    from dreamlab.io import save_json, save_tensors

    cfg = SearchConfig(popsize=6, sigma0=0.2)
    np.random.seed(0)
    es = make_es(10, cfg, seed=1)
    xs = es.ask()
    es.tell(xs, [float(np.sum(np.square(x))) for x in xs])
    save_cma_state(tmp_path, es, {"generation": 1})
    raw = (tmp_path / "cma_state.safetensors").read_bytes()
    (tmp_path / "cma_state.safetensors").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(DreamlabError, match="cma_state.safetensors"):
        load_cma_state(tmp_path, 10, cfg, 1)
    legacy = tmp_path / "legacy"
    save_tensors(legacy / "cma_state.safetensors", {"mean": torch.from_numpy(es.mean.copy()),
                                                    "pc": torch.from_numpy(es.pc.copy())})
    rng = np.random.get_state()
    numpy_rng = [rng[0], rng[1].tolist(), int(rng[2]), int(rng[3]), float(rng[4])]
    save_json(legacy / "cma_state.json", {"sigma": 0.15, "countiter": 1, "countevals": 6, "sm": {}, "adapt_sigma": {},
                                          "best_f": None, "best_evals": 0, "generation": 1, "numpy_rng": numpy_rng})
    with pytest.warns(UserWarning, match="older, partial"):
        es3, meta = load_cma_state(legacy, 10, cfg, 1)
    assert meta["generation"] == 1 and es3.sigma == 0.15 and np.array_equal(es3.mean, es.mean)


def test_train_controller_resume_equals_uninterrupted(tmp_path: Path) -> None:
    vae, mdn, mu, lv = tiny_world_model(seed=0)
    run = write_world_run(tmp_path / "wm", vae, mdn, mu, lv)
    settings = {"popsize": 6, "rollouts": 2, "sigma0": 0.2, "horizon": 15}
    full = _train(run, out=tmp_path / "a", generations=4, **settings)
    assert full["generations"] == 4
    _train(run, out=tmp_path / "b", generations=2, **settings)
    with pytest.raises(DreamlabError, match="--resume"):
        _train(run, out=tmp_path / "b", generations=4, **settings)
    _train(run, out=tmp_path / "b", generations=4, resume=True, **settings)
    rows_a, rows_b = _rows(tmp_path / "a"), _rows(tmp_path / "b")
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
    res = _train(run, out=tmp_path / "c", seed=0, horizon=12, generations=2, popsize=2, rollouts=1, fitness="real",
                 check_every=1, check_episodes=1, by_real=True)
    rows = _rows(tmp_path / "c")
    assert res["generations"] == 2 and len(rows) == 2
    assert all("real_mean" in r and np.isfinite(r["real_mean"]) for r in rows)
    # a 12-step CarRacing episode loses 0.1 per frame and gains at most a few tiles
    assert all(-1.3 <= r["best"] <= 50 for r in rows)
    # with by_real the kept controller is the checked one with the best real check
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
    _train(run, generations=2, popsize=4, rollouts=2, sigma0=0.2)
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
        collect(CollectConfig(episodes=2, max_steps=5, policy="controller", env_id="dreamlab/CarRacing64-v3"),
                tmp_path / "roll", workers=1, world_model=str(run), controller=str(best), progress=False,
                env_setup=register_all)
    assert not (tmp_path / "roll").exists()


def test_restart_starts_a_fresh_search_but_keeps_the_run(tmp_path: Path) -> None:
    vae, mdn, mu, lv = tiny_world_model(seed=0)
    run = write_world_run(tmp_path / "wm", vae, mdn, mu, lv)
    settings = {"popsize": 4, "rollouts": 2, "sigma0": 0.2}
    _train(run, generations=2, **settings)
    _train(run, generations=3, resume=True, restart=True, reset_best=True, **settings)
    st = json.loads((run / "controller" / "cma_state.json").read_text())
    assert st["generation"] == 3 and st["countiter"] == 1  # the run goes on; the search is one generation old
    assert len((run / "controller" / "fitness.jsonl").read_text().splitlines()) == 3
    assert (run / "controller" / "best.safetensors").exists()


def test_playoff_rescores_the_best_checks_and_keeps_the_winner(tmp_path: Path) -> None:
    """Every checked controller is kept in checks/; the playoff re-scores the best-checked ones on fresh seeds and
    best.safetensors becomes the one with the best playoff mean (asserted against a direct re-evaluation)."""
    pytest.importorskip("gymnasium")
    from agents.evaluate import RealEvaluator
    from worlds.policies import controller_mdn

    vae, mdn, mu, lv = tiny_world_model(seed=0)
    run = write_world_run(tmp_path / "wm", vae, mdn, mu, lv)
    settings = {"seed": 2, "horizon": 12, "generations": 3, "popsize": 4, "rollouts": 2, "sigma0": 0.5,
                "check_every": 1, "check_episodes": 1, "by_real": True, "playoff_top": 2, "playoff_episodes": 2}
    res = _train(run, **settings)
    out = run / "controller"
    checks = sorted(p.name for p in (out / "checks").glob("*.safetensors"))
    assert checks == ["gen_00001.safetensors", "gen_00002.safetensors", "gen_00003.safetensors"]
    po = json.loads((out / "playoff.json").read_text())
    assert res["playoff"] == po and po["seeds"] == [100, 101]
    cands = po["candidates"]
    assert len(cands) == 2 and len({c["generation"] for c in cands}) == len(cands)
    # the candidates are the best checks (distinct controllers), the winner the best playoff mean
    rows = {r["generation"]: r for r in _rows(out)}
    assert all(c["real_check"] == pytest.approx(rows[c["generation"]]["real_mean"], abs=1e-3) for c in cands)
    assert po["chosen_generation"] == max(cands, key=lambda c: c["playoff_mean"])["generation"]
    best = load_controller(out / "best.safetensors")[0]
    chosen = out / "checks" / f"gen_{po['chosen_generation']:05d}.safetensors"
    np.testing.assert_array_equal(best.numpy(), load_controller(chosen)[0].numpy())
    assert controller_mdn(chosen) == controller_mdn(out / "best.safetensors")  # the checks name the same M snapshot
    with RealEvaluator(run, FAST, 1, 12, controller_mdn(chosen)) as ev:
        again = ev.returns([best.numpy()] * 2, [100, 101])
    assert float(np.mean(again)) == pytest.approx(po["chosen_playoff_mean"], abs=1e-4)
    # resuming a finished search does not re-run the playoff; a fresh search clears the old checks
    assert _train(run, resume=True, **settings)["playoff"] == po
    assert [json.loads(x) for x in (out / "playoffs.jsonl").read_text().splitlines()] == [po]
    stale = tmp_path / "c2" / "checks" / "gen_00007.safetensors"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(chosen.read_bytes())
    (tmp_path / "c2" / "playoff.json").write_text("{}")
    _train(run, out=tmp_path / "c2", **{**settings, "generations": 1, "playoff_top": 0})
    assert [p.name for p in (tmp_path / "c2" / "checks").glob("*")] == ["gen_00001.safetensors"]
    assert not (tmp_path / "c2" / "playoff.json").exists()


def test_restart_every_runs_several_searches_and_resumes_across_them(tmp_path: Path) -> None:
    """restart_every=3 over 7 generations: searches of 3, 3 and 1 generations, each from mean 0 with sigma0 and its
    own seed (cma's countiter starts again; the searches' first candidates differ); a run stopped at the first
    boundary and resumed writes the same curves as an uninterrupted one."""
    vae, mdn, mu, lv = tiny_world_model(seed=0)
    run = write_world_run(tmp_path / "wm", vae, mdn, mu, lv)
    settings = {"popsize": 4, "rollouts": 2, "sigma0": 0.2, "restart_every": 3}
    _train(run, out=tmp_path / "a", generations=7, **settings)
    rows = _rows(tmp_path / "a")
    assert [r["search"] for r in rows] == [0, 0, 0, 1, 1, 1, 2]
    st = json.loads((tmp_path / "a" / "cma_state.json").read_text())
    assert st["generation"] == 7 and st["countiter"] == 1  # the last search is one generation old
    assert len({r["best"] for r in (rows[0], rows[3], rows[6])}) == 3  # own seeds: not the same first generation
    _train(run, out=tmp_path / "b", generations=3, **settings)
    _train(run, out=tmp_path / "b", generations=7, resume=True, **settings)
    for ra, rb in zip(rows, _rows(tmp_path / "b"), strict=True):
        for k in ("best", "mean", "worst", "mean_candidate", "sigma", "search"):
            assert ra[k] == rb[k], (k, ra, rb)
    with pytest.raises(DreamlabError, match="restart_every=-1"):
        SearchConfig(restart_every=-1)


def test_restart_every_checks_each_search_and_playoff_spans_them(tmp_path: Path) -> None:
    """With real checks, each search is checked every check_every of its own generations and at its end; the playoff
    chooses among the checks of all searches."""
    pytest.importorskip("gymnasium")
    vae, mdn, mu, lv = tiny_world_model(seed=0)
    run = write_world_run(tmp_path / "wm", vae, mdn, mu, lv)
    _train(run, generations=6, popsize=4, rollouts=2, sigma0=0.2, check_every=2, check_episodes=1, restart_every=3,
           by_real=True, playoff_top=3, playoff_episodes=2)
    rows = _rows(run / "controller")
    assert [r["generation"] for r in rows if "real_mean" in r] == [2, 3, 5, 6]
    checks = sorted(int(f.stem[4:]) for f in (run / "controller" / "checks").glob("gen_*.safetensors"))
    assert checks == [2, 3, 5, 6]
    po = json.loads((run / "controller" / "playoff.json").read_text())
    assert po["search_start"] == 0 and {c["generation"] for c in po["candidates"]} <= {2, 3, 5, 6}


@pytest.mark.parametrize("bad, needle", [({"popsize": 1}, "popsize=1"), ({"sigma0": 0}, "sigma0=0"),
                                         ({"generations": 0}, "generations=0"),
                                         ({"fitness": "both"}, "fitness='both'")])
def test_search_config_checks_its_ranges(bad: dict, needle: str) -> None:
    from dreamlab.config import apply_overrides

    with pytest.raises(DreamlabError, match=needle):
        apply_overrides(SearchConfig(), bad)


def test_selection_config_checks_its_ranges() -> None:
    with pytest.raises(DreamlabError, match="check_episodes=0"):
        SelectionConfig(check_episodes=0)
    with pytest.raises(DreamlabError, match="playoff_top=-1"):
        SelectionConfig(playoff_top=-1)
