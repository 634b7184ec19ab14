"""The fast CarRacing: identical physics to gymnasium's, observations within 6/255, wrappers, checkers."""
from __future__ import annotations

import cv2
import gymnasium as gym
import numpy as np
import pytest
from gymnasium.envs.box2d.car_racing import CarRacing

import envs
from dreamlab.errors import DreamlabError
from envs.carracing import FastCarRacing
from envs.wrappers import ActionRepeat, CropHUD, Resize, Resize64, world_model_env

MAE_LIMIT = 6.0  # /255, per pixel, at 64x64 (the fidelity bar)


def _actions(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(1000 + seed)
    return rng.uniform([-1.0, 0.0, 0.0], [1.0, 1.0, 0.3], size=(n, 3)).astype(np.float32)


def _car_state(env: CarRacing) -> tuple:
    car = env.car
    hull = car.hull
    wheels = tuple((w.omega, w.phase, w.joint.angle, tuple(w.position), w.angle) for w in car.wheels)
    return (tuple(hull.position), hull.angle, tuple(hull.linearVelocity), hull.angularVelocity, wheels,
            env.tile_visited_count, env.reward)


def _r64(x: np.ndarray) -> np.ndarray:
    return cv2.resize(x, (64, 64), interpolation=cv2.INTER_AREA).astype(np.float64)


@pytest.mark.parametrize("seed", range(5))
def test_same_physics_and_observations_within_6_of_255(seed: int) -> None:
    """Same seed + actions: identical rewards, terminations and car state; 64x64 obs MAE < 6/255 (HUD included)."""
    ref, fast, wm = CarRacing(), FastCarRacing(), FastCarRacing(obs_size=64, crop_hud=True)
    o_ref, _ = ref.reset(seed=seed)
    o_fast, _ = fast.reset(seed=seed)
    o_wm, _ = wm.reset(seed=seed)
    assert o_fast.shape == o_ref.shape == (96, 96, 3) and o_fast.dtype == np.uint8
    assert o_wm.shape == (64, 64, 3)
    assert len(ref.road_poly) == len(fast.road_poly) > 0
    assert all(np.array_equal(a[0], b[0]) for a, b in zip(ref.road_poly, fast.road_poly))
    mae, mae_wm = [], []
    visited = 0
    for a in _actions(250, seed):
        o_ref, r_ref, te_ref, tr_ref, i_ref = ref.step(a)
        o_fast, r_fast, te_fast, tr_fast, i_fast = fast.step(a)
        o_wm, r_wm, te_wm, _, _ = wm.step(a)
        assert (r_fast, te_fast, tr_fast, i_fast) == (r_ref, te_ref, tr_ref, i_ref)
        assert (r_wm, te_wm) == (r_ref, te_ref)
        assert _car_state(fast) == _car_state(ref) == _car_state(wm)
        mae.append(np.abs(_r64(o_ref) - _r64(o_fast)).mean())
        mae_wm.append(np.abs(_r64(o_ref[:84]) - o_wm.astype(np.float64)).mean())
        visited = ref.tile_visited_count
        if te_ref:
            break
    assert visited > 0, "the random drive should reach the road (tile recolouring is then exercised)"
    print(f"seed {seed}: MAE@64 drop-in {np.mean(mae):.3f}/255 (max step {np.max(mae):.3f}), "
          f"CarRacing64 {np.mean(mae_wm):.3f}/255 (max step {np.max(mae_wm):.3f})")
    assert np.mean(mae) < MAE_LIMIT and np.max(mae) < MAE_LIMIT
    assert np.mean(mae_wm) < MAE_LIMIT and np.max(mae_wm) < MAE_LIMIT


def test_renderer_is_not_a_copy_of_a_constant_frame() -> None:
    """Observations follow the car: frames differ over time and the HUD speed bar lights up with gas."""
    env = FastCarRacing()
    first, _ = env.reset(seed=3)
    frames = [env.step(np.array([0.0, 1.0, 0.0], np.float32))[0] for _ in range(80)]
    assert np.abs(frames[-1].astype(int) - first).mean() > 5
    hud_speed_bar = frames[-1][84:, 12:15]  # window x 125..150 -> columns 12..14
    assert hud_speed_bar.max() > 200 and first[84:, 12:15].max() < 50


def test_discrete_domain_randomize_and_lap_percent_match_gymnasium() -> None:
    kw = {"continuous": False, "domain_randomize": True, "lap_complete_percent": 0.5}
    ref, fast = CarRacing(**kw), FastCarRacing(**kw)
    o_ref, _ = ref.reset(seed=11)
    o_fast, _ = fast.reset(seed=11)
    assert fast.action_space == ref.action_space == gym.spaces.Discrete(5)
    np.testing.assert_array_equal(fast.bg_color, ref.bg_color)
    rng = np.random.default_rng(0)
    for t in range(120):
        a = int(rng.choice([0, 1, 2, 3, 3, 3, 4]))
        o_ref, *rest_ref = ref.step(a)
        o_fast, *rest_fast = fast.step(a)
        assert rest_fast == rest_ref
        assert _car_state(fast) == _car_state(ref)
        if t % 20 == 0:
            assert np.abs(_r64(o_ref) - _r64(o_fast)).mean() < MAE_LIMIT
    # reset options: keep the colours on demand, change them by default
    o_ref, _ = ref.reset(seed=12, options={"randomize": False})
    o_fast, _ = fast.reset(seed=12, options={"randomize": False})
    np.testing.assert_array_equal(fast.road_color, ref.road_color)
    assert np.abs(_r64(o_ref) - _r64(o_fast)).mean() < MAE_LIMIT


def test_render_modes() -> None:
    env = gym.make("dreamlab/CarRacing-v3", render_mode="rgb_array")
    env.reset(seed=0)
    for _ in range(60):
        env.step(np.array([0.3, 0.5, 0.0], np.float32))
    frame = env.render()
    ref = gym.make("CarRacing-v3", render_mode="rgb_array")
    ref.reset(seed=0)
    for _ in range(60):
        ref.step(np.array([0.3, 0.5, 0.0], np.float32))
    ref_frame = ref.render()
    assert frame.shape == ref_frame.shape == (400, 600, 3)
    small = lambda x: cv2.resize(x, (64, 64), interpolation=cv2.INTER_AREA).astype(float)  # noqa: E731
    assert np.abs(small(frame) - small(ref_frame)).mean() < MAE_LIMIT
    assert set(FastCarRacing.metadata["render_modes"]) == set(CarRacing.metadata["render_modes"])


def test_bad_arguments_are_one_line_errors() -> None:
    with pytest.raises(DreamlabError, match="obs_size"):
        FastCarRacing(obs_size=3)
    with pytest.raises(DreamlabError, match="render_mode='video'.*rgb_array"):
        FastCarRacing(render_mode="video")
    with pytest.raises(DreamlabError, match="unknown env id 'dreamlab/Nope-v0'.*dreamlab/CarRacing-v3"):
        envs.make("dreamlab/Nope-v0")
    with pytest.raises(DreamlabError, match="repeat"):
        ActionRepeat(FastCarRacing(), 0)


# ---------------------------------------------------------------------------------------------- wrappers
def test_wrappers_on_gymnasiums_env_and_ours_agree() -> None:
    ref = ActionRepeat(Resize64(CropHUD(gym.make("CarRacing-v3"))), repeat=2)
    fast = world_model_env("dreamlab/CarRacing-v3", repeat=2)
    direct = world_model_env("dreamlab/CarRacing64-v3", repeat=2)
    assert ref.observation_space.shape == fast.observation_space.shape == direct.observation_space.shape == (64, 64, 3)
    outs = [e.reset(seed=5)[0] for e in (ref, fast, direct)]
    for a in _actions(40, 5):
        steps = [e.step(a) for e in (ref, fast, direct)]
        assert steps[0][1:4] == steps[1][1:4] == steps[2][1:4]
        outs = [s[0] for s in steps]
    assert all(o.shape == (64, 64, 3) for o in outs)
    assert np.abs(outs[0].astype(float) - outs[1]).mean() < MAE_LIMIT
    assert np.abs(outs[0].astype(float) - outs[2]).mean() < MAE_LIMIT


def test_action_repeat_sums_rewards_of_the_inner_steps() -> None:
    a = np.array([0.0, 0.6, 0.0], np.float32)
    once = FastCarRacing()
    once.reset(seed=2)
    twice = ActionRepeat(FastCarRacing(), 3)
    twice.reset(seed=2)
    expected = sum(once.step(a)[1] for _ in range(3))
    _, got, *_ = twice.step(a)
    assert got == pytest.approx(expected, abs=1e-9)
    assert _car_state(once) == _car_state(twice.unwrapped)


def test_crop_and_resize_shapes() -> None:
    env = Resize(CropHUD(FastCarRacing()), size=(48, 32), interpolation="bilinear")
    obs, _ = env.reset(seed=0)
    assert obs.shape == (48, 32, 3) and env.observation_space.contains(obs)
    assert CropHUD(FastCarRacing()).observation_space.shape == (84, 96, 3)
    with pytest.raises(DreamlabError, match="interpolation='lanczos'"):
        Resize(FastCarRacing(), 64, "lanczos")


# ---------------------------------------------------------------------------------------------- checkers
@pytest.mark.parametrize("env_id", envs.env_ids())
def test_gymnasium_and_sb3_env_checkers(env_id: str) -> None:
    from gymnasium.utils.env_checker import check_env
    from stable_baselines3.common.env_checker import check_env as sb3_check_env

    env = gym.make(env_id)
    check_env(env.unwrapped, skip_render_check=False)
    sb3_check_env(gym.make(env_id), warn=True)
    obs, _ = env.reset(seed=0)
    assert env.observation_space.contains(obs)
    assert env.spec is not None and env.spec.id == env_id


def test_ids_are_registered_and_listed() -> None:
    ids = envs.env_ids()
    assert {"dreamlab/CarRacing-v3", "dreamlab/CarRacing64-v3", "dreamlab/CarRacing64HUD-v3",
            "dreamlab/Dream-v0"} <= set(ids)
    for env_id in ids:
        assert env_id in gym.registry
    spec = gym.spec("dreamlab/CarRacing-v3")
    assert spec.max_episode_steps == gym.spec("CarRacing-v3").max_episode_steps
    assert gym.make("dreamlab/CarRacing64HUD-v3").observation_space.shape == (64, 64, 3)
