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


def test_common_noise_gives_every_candidate_rollout_js_dream() -> None:
    thetas = torch.randn(2, _sim().n_params, generator=torch.Generator().manual_seed(1)) * 0.3
    same = torch.cat([thetas[:1], thetas[:1], thetas[1:]])  # candidates 0 and 1 are the same controller
    for common in (False, True):
        sim = _sim(horizon=25, common_noise=common)
        with torch.no_grad():
            sim.mdn.head.bias[-1] = -30.0  # never done
        out = sim.rollout(same, 4, seed=3, record=True)
        z = out["z"].view(26, 3, 4, -1)
        # equal controllers dream the same only when the noise is common; a different controller still dreams its own
        assert torch.equal(z[:, 0], z[:, 1]) == common
        assert torch.equal(out["returns"][0], out["returns"][1]) == common
        assert not torch.equal(z[:, 0], z[:, 2])
        assert torch.equal(sim.rollout(same, 4, seed=3)["returns"], out["returns"])  # still reproducible by seed


def test_action_noise_perturbs_what_m_sees_within_the_action_box() -> None:
    thetas = torch.randn(2, _sim().n_params, generator=torch.Generator().manual_seed(4)) * 0.01  # steer ~ 0, gas ~ 0.5
    clean = _sim(horizon=10).rollout(thetas, 256, seed=2, record=True)
    noisy = _sim(horizon=10, action_noise=0.3).rollout(thetas, 256, seed=2, record=True)
    a, a0 = noisy["actions"], clean["actions"]
    assert a[..., 0].abs().max() <= 1 and a[..., 1:].min() >= 0 and a[..., 1:].max() <= 1  # clipped to CarRacing's box
    assert torch.equal(noisy["z"][0], clean["z"][0])  # the same real starts: the noise is drawn after them
    d = a[0] - a0[0]  # first step: same z and h = 0, so C's own action is the same; the difference is the noise
    # steer ~ 0 is rarely clipped; gas ~ 0.5 is clipped at 0 and 1 beyond 1.7 sigma, which trims its spread a little
    assert 0.27 < float(d[:, 0].std()) < 0.33 and 0.22 < float(d[:, 1].std()) < 0.31, d.std(0)
    assert abs(float(d[:, 0].mean())) < 0.05
    assert torch.equal(_sim(horizon=10, action_noise=0.3).rollout(thetas, 256, seed=2)["returns"], noisy["returns"])  # by seed
    # with common_noise, rollout j of every candidate also gets the same action noise
    same = torch.cat([thetas[:1], thetas[:1]])
    out = _sim(horizon=10, action_noise=0.3, common_noise=True).rollout(same, 4, seed=2, record=True)
    acts = out["actions"].view(10, 2, 4, -1)
    assert torch.equal(acts[:, 0], acts[:, 1])
    with pytest.raises(DreamlabError, match="action_noise=-0.1"):
        _sim(action_noise=-0.1)


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


def test_steer_penalty_subtracts_k_times_abs_steer_per_step() -> None:
    thetas = torch.randn(2, _sim().n_params, generator=torch.Generator().manual_seed(3)) * 0.5
    plain, pen = _sim(horizon=15), _sim(horizon=15, steer_penalty=0.25)
    for s in (plain, pen):
        with torch.no_grad():
            s.mdn.head.bias[-1] = -30.0  # never done: every step counts
    a = plain.rollout(thetas, 3, seed=4, record=True)
    b = pen.rollout(thetas, 3, seed=4, record=True)
    assert torch.equal(a["z"], b["z"])  # the penalty changes the fitness, not the dream
    steer = a["actions"][..., 0].abs().sum(0).view(2, 3)
    assert steer.min() > 0
    torch.testing.assert_close(a["returns"] - b["returns"], 0.25 * steer)


def test_lost_steps_ends_a_dream_after_that_many_steps_of_low_reward() -> None:
    thetas = torch.randn(2, _sim().n_params, generator=torch.Generator().manual_seed(5)) * 0.5
    sims = {n: _sim(horizon=20, lost_steps=n) for n in (0, 6)}
    for s in sims.values():
        with torch.no_grad():
            s.mdn.head.bias[-1] = -30.0  # never done by M's head
            s.mdn.head.weight[-2].zero_()
            s.mdn.head.bias[-2] = -0.1  # the reward of a lost car, every step
    off, on = sims[0].rollout(thetas, 3, seed=1), sims[6].rollout(thetas, 3, seed=1)
    assert torch.equal(off["steps"], torch.full((2, 3), 20.0))
    assert torch.equal(on["steps"], torch.full((2, 3), 6.0))  # ended at the 6th step in a row below lost_reward
    torch.testing.assert_close(on["returns"], torch.full((2, 3), -0.6))
    # a reward at or above lost_reward resets the count: the dream runs to the horizon
    with torch.no_grad():
        sims[6].mdn.head.bias[-2] = 0.0
    assert torch.equal(sims[6].rollout(thetas, 3, seed=1)["steps"], torch.full((2, 3), 20.0))
    # the count reads M's own reward: a steering penalty that pushes the dream's reward below 0 does not end it
    pen = _sim(horizon=20, lost_steps=6, steer_penalty=1.0)
    pen.mdn.load_state_dict(sims[6].mdn.state_dict())
    out = pen.rollout(thetas, 3, seed=1)
    assert torch.equal(out["steps"], torch.full((2, 3), 20.0)) and (out["returns"] < 0).all()
    with pytest.raises(DreamlabError, match="lost_steps=-1"):
        _sim(lost_steps=-1)


def test_start_anywhere_draws_that_fraction_of_starts_from_the_state_pool() -> None:
    _, mdn, mu, _ = tiny_world_model(seed=0)
    first = (torch.zeros_like(mu), torch.full_like(mu, -20.0))  # start-line states near 0, pool states near 5
    pool = (torch.full((40, 8), 5.0), torch.full((40, 8), -20.0))
    thetas = torch.zeros(2, num_params(8, 16))

    def z0(frac: float, seed: int = 3, r: int = 64) -> torch.Tensor:
        sim = DreamSimulator(mdn, *first, DreamConfig(horizon=2, start_anywhere=frac), states=pool if frac else None)
        return sim.rollout(thetas, r, seed=seed, record=True)["z"][0].view(2, r, 8)

    assert z0(0.0).abs().max() < 0.01
    assert (z0(1.0) - 5.0).abs().max() < 0.01
    half = z0(0.5)
    from_pool = (half[0, :, 0] > 2.5)
    assert 16 <= int(from_pool.sum()) <= 48  # about half of 64 rollouts
    assert torch.equal(half[0], half[1])  # every candidate still starts rollout j from the same state
    assert torch.equal(half, z0(0.5))  # reproducible by seed
    assert not torch.equal(half, z0(0.5, seed=4))
    # without start_anywhere a pool is ignored: dreams replay exactly as before the option existed
    plain = DreamSimulator(mdn, *first, DreamConfig(horizon=5)).rollout(thetas, 4, seed=1)["returns"]
    with_pool = DreamSimulator(mdn, *first, DreamConfig(horizon=5), states=pool).rollout(thetas, 4, seed=1)["returns"]
    assert torch.equal(plain, with_pool)
    with pytest.raises(DreamlabError, match="start_anywhere=1.5"):
        DreamSimulator(mdn, *first, DreamConfig(start_anywhere=1.5), states=pool)
    with pytest.raises(DreamlabError, match="start_anywhere=0.5 needs a pool"):
        DreamSimulator(mdn, *first, DreamConfig(start_anywhere=0.5))


def test_dream_rejects_bad_parameters() -> None:
    sim = _sim()
    with pytest.raises(DreamlabError, match="expected"):
        sim.rollout(torch.zeros(2, sim.n_params + 1), 2)
    bad = torch.zeros(2, sim.n_params)
    bad[0, 0] = float("nan")
    with pytest.raises(DreamlabError, match="NaN"):
        sim.rollout(bad, 2)


@pytest.fixture
def one_thread():
    """Bitwise comparisons of batches of different row counts need one thread: with two, BLAS splits the rows
    differently and the last bits differ (the test passed or failed with the test order before)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_ensemble_rollouts_run_in_their_member_and_c_reads_m(one_thread) -> None:
    import copy

    _, mdn, mu, lv = tiny_world_model(seed=0)
    _, other, _, _ = tiny_world_model(seed=5)
    thetas = torch.randn(3, num_params(8, 16), generator=torch.Generator().manual_seed(1)) * 0.3
    alone = DreamSimulator(mdn, mu, lv, DreamConfig(horizon=30)).rollout(thetas, 6, seed=1)["returns"]
    # members that are copies of M dream exactly M's dream (same draws, same heads)
    copies = DreamSimulator(mdn, mu, lv, DreamConfig(horizon=30), [copy.deepcopy(mdn), copy.deepcopy(mdn)])
    assert copies.ensemble == 3 and torch.equal(copies.rollout(thetas, 6, seed=1)["returns"], alone)
    # another M as member 1 changes rollouts 1, 3, 5 of every candidate and leaves M's rollouts 0, 2, 4 as they were
    mixed = DreamSimulator(mdn, mu, lv, DreamConfig(horizon=30), [other]).rollout(thetas, 6, seed=1)["returns"]
    assert torch.equal(mixed[:, 0::2], alone[:, 0::2])
    assert not torch.allclose(mixed[:, 1::2], alone[:, 1::2])
    _, wrong, _, _ = tiny_world_model(seed=0, z_dim=4)
    with pytest.raises(DreamlabError, match="member 1 has z_dim=4"):
        DreamSimulator(mdn, mu, lv, DreamConfig(), [wrong])


def test_load_dream_from_run_folder(tmp_path: Path) -> None:
    vae, mdn, mu, lv = tiny_world_model(seed=3)
    write_world_run(tmp_path / "wm", vae, mdn, mu, lv)
    v2, m2, sim = load_dream(tmp_path / "wm", "cpu", DreamConfig(horizon=5))
    assert sim.n_params == num_params(8, 16)
    assert torch.equal(m2.head.weight, mdn.head.weight)
    with pytest.raises(DreamlabError, match="no vae/"):
        load_dream(tmp_path / "missing", "cpu")
    with pytest.raises(DreamlabError, match=r"mdn_1/model; train the members with: .*--set mdn_ensemble=2"):
        load_dream(tmp_path / "wm", "cpu", ensemble=2)
    m2.save_pretrained(tmp_path / "wm" / "mdn_1" / "model")
    assert load_dream(tmp_path / "wm", "cpu", ensemble=2)[2].ensemble == 2
    # anywhere-starts read every state_stride-th frame of the encoded episodes (here one frame each)
    assert load_dream(tmp_path / "wm", "cpu", DreamConfig(horizon=5))[2].states is None
    any_sim = load_dream(tmp_path / "wm", "cpu", DreamConfig(horizon=5, start_anywhere=0.5))[2]
    pool = any_sim.states
    assert pool is not None and pool[0].shape == mu.shape
    torch.testing.assert_close(any_sim.init_mu, sim.init_mu)  # the one read gives the same start-line states


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
@pytest.mark.parametrize(("ensemble", "lost_steps"), [(1, 0), (3, 0), (1, 4)])
def test_cuda_graph_dream_is_reproducible_and_agrees_with_the_eager_path(ensemble: int, lost_steps: int) -> None:
    _, mdn, mu, lv = tiny_world_model(seed=0)
    mdn = mdn.cuda()
    members = [tiny_world_model(seed=10 + k)[1].cuda() for k in range(1, ensemble)]
    graph = DreamSimulator(mdn, mu, lv, DreamConfig(horizon=25, lost_steps=lost_steps), members)
    eager = DreamSimulator(mdn, mu, lv, DreamConfig(horizon=25, cuda_graph=False, lost_steps=lost_steps), members)
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
@pytest.mark.parametrize("action_noise", [0.0, 0.2])
def test_cuda_graph_common_noise_gives_equal_controllers_the_same_dream(action_noise: float) -> None:
    _, mdn, mu, lv = tiny_world_model(seed=0)
    sim = DreamSimulator(mdn.cuda(), mu, lv, DreamConfig(horizon=25, common_noise=True, action_noise=action_noise))
    theta = torch.randn(1, sim.n_params, generator=torch.Generator().manual_seed(0)) * 0.3
    ret = sim.rollout(torch.cat([theta, theta, -theta]), 64, seed=5)["returns"]
    # equal rows of one batched GEMM come out equal in practice; allclose leaves room for a kernel that tiles them apart
    assert torch.allclose(ret[0], ret[1], rtol=1e-4, atol=1e-4) and not torch.allclose(ret[0], ret[2])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_tiny_world_model_pipeline_runs_on_cuda(tmp_path: Path) -> None:
    import json

    from dreamlab.cli import main

    run = tmp_path / "wm"
    assert main(["worldmodel", "run", "--preset", "tiny", "--out", str(run), "--no-progress", "--set", "device=cuda"]) == 0
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
