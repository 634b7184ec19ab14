"""The batched dream (determinism by seed, done handling, common initial states) and the dream gymnasium env."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from dreamlab.errors import DreamlabError
from worlds.dream import DreamConfig, DreamSimulator, load_dream, tiny_world_model, write_world_run
from worlds.policies import num_params


def _sim(horizon: int = 30, **kw) -> DreamSimulator:
    _, mdn, mu, lv = tiny_world_model(seed=0)
    return DreamSimulator(mdn, mu, lv, DreamConfig(horizon=horizon, **kw))


def test_dream_is_reproducible_by_seed_on_cpu() -> None:
    sim = _sim()
    thetas = torch.randn(3, sim.n_params, generator=torch.Generator().manual_seed(0)) * 0.3
    a = sim.rollout(thetas, 4, seed=11, record=True)
    b = sim.rollout(thetas, 4, seed=11, record=True)
    c = sim.rollout(thetas, 4, seed=12, record=True)
    assert a["returns"].shape == (3, 4) and a["z"].shape == (31, 12, 8) and a["actions"].shape == (30, 12, 3)
    assert torch.equal(a["returns"], b["returns"]) and torch.equal(a["z"], b["z"])
    assert not torch.equal(a["z"], c["z"])
    # rollout j of every candidate starts from the same real state (common random numbers for CMA-ES)
    z0 = a["z"][0].view(3, 4, -1)
    assert torch.equal(z0[0], z0[1]) and torch.equal(z0[0], z0[2])
    # without recording, the same seed gives the same returns
    assert torch.equal(sim.rollout(thetas, 4, seed=11)["returns"], a["returns"])
    # actions respect CarRacing's bounds
    act = a["actions"]
    assert act[..., 0].abs().max() <= 1 and act[..., 1:].min() >= 0 and act[..., 1:].max() <= 1


def test_a_dream_step_is_the_papers() -> None:
    """a = C([z, h]); (h, c) = LSTM([z, a]); the head gives r, P(done) and the mixture z' is drawn from at tau."""
    from worlds.policies import act

    sim = _sim(temperature=1.3)
    theta = torch.randn(1, sim.n_params, generator=torch.Generator().manual_seed(2)) * 0.3
    w, b = sim._weights(theta)
    z, h = torch.randn(1, 8), torch.randn(1, 16)
    c = torch.zeros_like(h)
    z1, h1, c1, a, rew, done = sim._step(z, h, c, w, b, 1, 1, torch.Generator().manual_seed(9))
    a_ref = act(theta[0], z, h)
    h_ref, c_ref, out = sim.mdn.step(z, a_ref, h, c)
    logpi, mu, ls, r_ref, d_logit = sim.mdn.split_head(out)
    z_ref = sim.mdn.sample_mixture(logpi, mu, ls, 1.3, torch.Generator().manual_seed(9))
    for got, want in ((a, a_ref), (h1, h_ref), (c1, c_ref), (rew, r_ref), (z1, z_ref)):
        torch.testing.assert_close(got, want)
    assert torch.equal(done, (torch.sigmoid(d_logit) > 0.5).float())


def test_done_head_ends_dreams_and_stops_reward() -> None:
    sim = _sim(horizon=20)
    with torch.no_grad():
        sim.mdn.head.bias[-1] = 30.0  # P(done) ~ 1 after the first step
        sim.mdn.head.bias[-2] = 1.0
    out = sim.rollout(torch.zeros(2, sim.n_params), 3, seed=0)
    assert torch.equal(out["steps"], torch.ones(2, 3))
    with torch.no_grad():
        sim.mdn.head.bias[-1] = -30.0
    out = sim.rollout(torch.zeros(2, sim.n_params), 3, seed=0)
    assert torch.equal(out["steps"], torch.full((2, 3), 20.0))


def test_dream_rejects_bad_parameters() -> None:
    sim = _sim()
    with pytest.raises(DreamlabError, match="expected"):
        sim.rollout(torch.zeros(2, sim.n_params + 1), 2)
    bad = torch.zeros(2, sim.n_params)
    bad[0, 0] = float("nan")
    with pytest.raises(DreamlabError, match="NaN"):
        sim.rollout(bad, 2)


def test_load_dream_from_run_folder(tmp_path: Path) -> None:
    vae, mdn, mu, lv = tiny_world_model(seed=3)
    write_world_run(tmp_path / "wm", vae, mdn, mu, lv)
    v2, m2, sim = load_dream(tmp_path / "wm", "cpu", DreamConfig(horizon=5))
    assert sim.n_params == num_params(8, 16)
    assert torch.equal(m2.head.weight, mdn.head.weight)
    torch.testing.assert_close(sim.init_mu, mu.half().float())  # the first frame of every encoded episode
    with pytest.raises(DreamlabError, match="no vae/"):
        load_dream(tmp_path / "missing", "cpu")


def test_dream_config_checks_its_ranges() -> None:
    with pytest.raises(DreamlabError, match="temperature=0"):
        DreamConfig(temperature=0)
    with pytest.raises(DreamlabError, match="horizon=0"):
        DreamConfig(horizon=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graph_dream_matches_shapes_and_is_finite() -> None:
    _, mdn, mu, lv = tiny_world_model(seed=0)
    sim = DreamSimulator(mdn.cuda(), mu, lv, DreamConfig(horizon=50))
    out = sim.rollout(torch.zeros(4, sim.n_params), 3, seed=0)
    assert out["returns"].shape == (4, 3) and torch.isfinite(out["returns"]).all()
    assert (4, 3) in sim._graphs


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graph_dream_is_reproducible_and_agrees_with_the_eager_path() -> None:
    _, mdn, mu, lv = tiny_world_model(seed=0)
    mdn = mdn.cuda()
    graph = DreamSimulator(mdn, mu, lv, DreamConfig(horizon=25))
    eager = DreamSimulator(mdn, mu, lv, DreamConfig(horizon=25), cuda_graph=False)
    thetas = torch.randn(2, graph.n_params, generator=torch.Generator().manual_seed(0)) * 0.3
    a, b, c = (graph.rollout(thetas, 512, seed=s)["returns"] for s in (5, 5, 6))
    assert torch.equal(a, b) and not torch.equal(a, c)
    # the graph replays the eager step with its own noise buffers: same distribution of returns
    e = eager.rollout(thetas, 512, seed=5)["returns"]
    se = (a.var(1) / 512 + e.var(1) / 512).sqrt()
    assert ((a.mean(1) - e.mean(1)).abs() < 5 * se + 1e-3).all(), (a.mean(1), e.mean(1))
    # a cached graph is re-used across calls with new weights (CMA-ES generations)
    graph.rollout(thetas * 2, 512, seed=7)
    assert list(graph._graphs) == [(2, 512)]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_tiny_world_model_pipeline_runs_on_cuda(tmp_path: Path) -> None:
    import json

    from dreamlab.cli import main

    run = tmp_path / "wm"
    assert main(["worldmodel", "run", "--preset", "tiny", "--out", str(run), "--no-progress", "--set",
                 "device=cuda"]) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert np.isfinite(summary["pipeline"]["controller"]["mean"])
    assert json.loads((run / "config.json").read_text())["config"]["device"] == "cuda"


# ----------------------------------------------------------------------------- the gymnasium env


def test_dream_env_passes_checker_and_trains_with_ppo(tmp_path: Path) -> None:
    gym = pytest.importorskip("gymnasium")
    from gymnasium.utils.env_checker import check_env

    from envs.dream_env import DreamEnv

    check_env(DreamEnv(), skip_render_check=True)
    check_env(DreamEnv(obs="image"), skip_render_check=True)
    env = DreamEnv(max_steps=7)
    o1, _ = env.reset(seed=5)
    traj1 = [env.step(np.array([0.1, 0.5, 0.0], np.float32)) for _ in range(7)]
    o2, _ = env.reset(seed=5)
    traj2 = [env.step(np.array([0.1, 0.5, 0.0], np.float32)) for _ in range(7)]
    assert np.array_equal(o1, o2) and all(np.array_equal(a[0], b[0]) and a[1] == b[1] for a, b in zip(traj1, traj2))
    assert traj1[-1][3] is True  # truncated at max_steps
    with pytest.raises(DreamlabError, match="action"):
        env.step(np.array([np.nan, 0, 0]))
    # a trained world model from a run folder, through gymnasium's registry
    vae, mdn, mu, lv = tiny_world_model(seed=4)
    write_world_run(tmp_path / "wm", vae, mdn, mu, lv)
    import envs

    envs.register_all()
    e = gym.make("dreamlab/Dream-v0", run_dir=str(tmp_path / "wm"), obs="image", render_mode="rgb_array")
    obs, _ = e.reset(seed=0)
    assert obs.shape == (64, 64, 3) and obs.dtype == np.uint8 and e.render().shape == (64, 64, 3)
    sb3 = pytest.importorskip("stable_baselines3")
    model = sb3.PPO("MlpPolicy", DreamEnv(max_steps=32), n_steps=32, batch_size=16, n_epochs=1, device="cpu", seed=0)
    model.learn(64)
    act, _ = model.predict(DreamEnv().reset(seed=0)[0], deterministic=True)
    assert act.shape == (3,)
