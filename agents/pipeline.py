"""The whole World Models pipeline in one run folder: collect -> V -> encode -> M -> C (CMA-ES in the dream)
-> real-env evaluation, optionally iterated (collect with the current controller, retrain M and C).

    RUN/config.json        the pipeline settings (preset + overrides)
    RUN/rollouts/          episode files + manifest.json          (stage: collect)
    RUN/vae/               V's trainer run folder                 (stage: train-vae)
    RUN/latents/           (mu, logvar) series per episode        (stage: encode)
    RUN/mdn/               M's trainer run folder                 (stage: train-mdn)
    RUN/mdn_1/ ...         more Ms of the dream ensemble (mdn_ensemble > 1; stage: train-mdn)
    RUN/controller/        CMA-ES state, best.safetensors, fitness.jsonl/png   (stage: train-controller)
    RUN/eval/              per-episode real-env scores, side-by-side video      (stage: evaluate)
    RUN/dream.mp4          the controller driving in the dream, decoded         (stage: dream-video)
    RUN/summary.json       timings and scores of every stage
    RUN/report.md          one page: scores beside the random policy's, stage times, pictures, videos (agents/report.py)
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from dreamlab.config import apply_overrides, to_dict
from dreamlab.errors import DreamlabError
from dreamlab.io import load_json, save_json

# what WorldModelConfig.__post_init__ checks, so a bad --set fails at once and not after collection, V and M
_AT_LEAST_1 = ("episodes", "max_steps", "z_dim", "vae_width", "vae_steps", "vae_batch", "hidden", "mixtures", "seq_len",
               "mdn_steps", "mdn_batch", "mdn_ensemble", "generations", "rollouts", "horizon", "state_stride", "val_rollouts",
               "eval_episodes", "final_episodes", "eval_max_steps", "rounds", "round_episodes",
               "round_mdn_steps", "round_generations")
_ZERO_MEANS = {"workers": "0 = all cores", "seed": "numpy seeds are non-negative", "eval_seed": "the first evaluation episode's env seed",
               "lost_steps": "0 = off", "eval_every": "0 = no periodic real checks", "check_steps": "0 = horizon",
               "playoff_top": "0 = no playoff", "playoff_episodes": "0 = no playoff",
               "restart_every": "0 = one search per round",
               "round_check_episodes": "0 = eval_episodes", "threads": "0 = torch's default"}
_AT_LEAST_0 = tuple(_ZERO_MEANS)


@dataclass
class WorldModelConfig:
    # collect (any gymnasium id; dreamlab/CarRacing64-v3 is the same physics rendered ~10x faster straight at 64x64)
    env_id: str = "CarRacing-v3"
    episodes: int = 10_000
    max_steps: int = 1000
    policy: Literal["brownian", "random_controller", "mixed", "pursuit", "explore"] = "random_controller"
    workers: int = 0
    seed: int = 0
    # V
    z_dim: int = 32
    vae_width: int = 32
    vae_steps: int = 100_000
    vae_batch: int = 100
    vae_lr: float = 1e-4
    # M
    hidden: int = 256
    mixtures: int = 5
    seq_len: int = 999
    mdn_steps: int = 20_000
    mdn_batch: int = 100
    mdn_lr: float = 1e-3
    mdn_chunk_stride: int = 0        # M's training chunks start every N steps (0 = seq_len: no overlap); smaller overlaps them
    mdn_self_feed: float = 0.0       # M trained on its own draws: each input z replaced by M's draw with this probability
    mdn_ensemble: int = 1            # Ms the controller is trained in: M and K-1 more from other seeds (RUN/mdn_1 ..); C reads
                                     # M's h, each dream rollout runs in one member: one M's errors pay only in its share
    mdn_ensemble_mode: Literal["mix", "rotate"] = "mix"  # "rotate": each CMA-ES search (restart_every) dreams in one member
                                     # alone, C reads that member's h, and the real checks and playoff choose among members
    # C
    generations: int = 300
    popsize: int = 64
    rollouts: int = 16
    sigma0: float = 0.1
    temperature: float = 1.15
    steer_penalty: float = 0.0       # dream reward minus this x |steer| per step: discourages bang-bang steering M rewards
    worst_frac: float = 1.0          # C's fitness: the mean of each candidate's worst fraction of dream rollouts (1 = all)
    start_anywhere: float = 0.0      # fraction of dream rollouts that start from a real frame anywhere in an episode,
                                     # not at the start line (0 = every dream starts at the start line)
    state_stride: int = 16           # those frames: every N-th of each encoded episode
    lost_steps: int = 0              # a dream rollout ends after this many steps in a row with M's reward below
    lost_reward: float = 0.0         # lost_reward (a car lost off the road; 0 = off)
    common_noise: bool = False       # C's dreams: rollout j of every candidate draws the same M noise (common random numbers)
    action_noise: float = 0.0        # C's dreams: std of Gaussian noise on C's actions before M sees them (0 = off)
    horizon: int = 1000
    diagonal: bool = False
    val_rollouts: int = 32           # fixed dream rollouts that pick the best mean (best_dream)
    features: Literal["zh", "z"] = "zh"   # what C reads: [z, h] as in the paper, or z alone
    eval_every: int = 25
    eval_episodes: int = 8
    check_steps: int = 0             # steps per real-check episode (0 = horizon)
    select_by_real: bool = False     # final C = the dream-trained checkpoint with the best periodic real check
    playoff_top: int = 0             # with select_by_real: the N best-checked controllers of a search are re-scored
    playoff_episodes: int = 16       # on this many fresh real episodes, the best of those is kept (0 = off)
    restart_every: int = 0           # a fresh CMA-ES search every N generations (in every round too); the checks and the
                                     # playoff choose among all of them (0 = one search per round)
    # evaluation and iteration
    final_episodes: int = 100
    eval_max_steps: int = 1000       # CarRacing-v3's own limit; shorter only for tests
    eval_env_id: str = "CarRacing-v3"  # final scores always come from gymnasium's env
    eval_seed: int = 1000
    rounds: int = 1
    round_episodes: int = 1000
    round_mdn_steps: int = 5000      # M's extra steps per iterative round
    round_generations: int = 100     # CMA-ES generations per iterative round
    round_restart: bool = False      # a fresh CMA-ES search in each round's new dream (the kept controllers stay)
    round_collect: Literal["best", "dream", "both"] = "both"  # who drives the new episodes: the kept C, the dream-best C, or both
    round_check_episodes: int = 0    # episodes of the full-length check that compares the rounds' controllers (0 = eval_episodes)
    device: str = "auto"
    threads: int = 0                 # torch CPU threads in this process (0 = torch's default); 1 avoids
                                     # OpenMP oversubscription on a busy machine (measured 7x faster there)

    def __post_init__(self) -> None:
        # every way a config is made (preset, --set on a stage, a run's config.json) fails here, before hours of collection
        for name in _AT_LEAST_1:
            if getattr(self, name) < 1:
                raise DreamlabError(f"{name}={getattr(self, name)} must be at least 1")
        for name in _AT_LEAST_0:
            if getattr(self, name) < 0:
                raise DreamlabError(f"{name}={getattr(self, name)} must be >= 0 ({_ZERO_MEANS[name]})")
        for name in ("vae_lr", "mdn_lr", "sigma0", "temperature"):
            if not getattr(self, name) > 0:
                raise DreamlabError(f"{name}={getattr(self, name)} must be > 0")
        if self.popsize < 2:
            raise DreamlabError(f"popsize={self.popsize} must be at least 2 (CMA-ES ranks the candidates of a generation)")
        if self.steer_penalty < 0:
            raise DreamlabError(f"steer_penalty={self.steer_penalty} must be >= 0 (0 = the plain dream reward)")
        if not self.action_noise >= 0:
            raise DreamlabError(f"action_noise={self.action_noise} must be >= 0 (a standard deviation; 0 = C's actions reach M unchanged)")
        if not 0.0 <= self.start_anywhere <= 1.0:
            raise DreamlabError(f"start_anywhere={self.start_anywhere} must be a fraction in [0, 1] (0 = every dream starts at the start line)")
        if not 0.0 <= self.mdn_self_feed <= 1.0:
            raise DreamlabError(f"mdn_self_feed={self.mdn_self_feed} must be a probability in [0, 1] (0 = teacher forcing)")
        if not 0 <= self.mdn_chunk_stride <= self.seq_len:
            raise DreamlabError(f"mdn_chunk_stride={self.mdn_chunk_stride} must be in [0, seq_len={self.seq_len}] (0 = seq_len: chunks don't overlap)")
        if not 0.0 < self.worst_frac <= 1.0:
            raise DreamlabError(f"worst_frac={self.worst_frac} must be in (0, 1] (1 = C's fitness is the mean of all its dream rollouts)")


# 2 CPU cores, about 7-13 min by host speed (docs/worldmodels.md has the measured times and real-env scores per seed): whole
# 1000-step episodes, the paper's LSTM 256 and three short CMA-ES searches of 10 generations (the real checks of a
# search peaked around its 10th generation and fell as it went on exploiting the dream); one round. The round_*
# settings apply with `--set rounds=N`; medium inherits round_collect, round_restart and round_check_episodes.
_QUICK: dict[str, Any] = {"env_id": "dreamlab/CarRacing64-v3", "episodes": 160, "max_steps": 1000, "policy": "explore", "vae_width": 16,
    "vae_steps": 1000, "vae_batch": 64, "vae_lr": 1e-3, "hidden": 256, "seq_len": 64, "mdn_steps": 2000, "mdn_batch": 32,
    "generations": 30, "popsize": 32, "rollouts": 8, "horizon": 1000, "restart_every": 10, "eval_every": 5, "eval_episodes": 4,
    "select_by_real": True, "playoff_top": 3, "playoff_episodes": 16, "round_check_episodes": 16,
    "final_episodes": 10,
    "rounds": 1, "round_episodes": 16, "round_mdn_steps": 400, "round_generations": 30, "round_collect": "both", "round_restart": True,
    "threads": 1}

PRESETS: dict[str, dict[str, Any]] = {
    "quick": _QUICK,
    # 2 CPU cores, about 40 minutes: quick's exploration data, small V, LSTM 256, whole 1000-step episodes and selection
    # rules at a larger scale: more data and training, 5 searches of 20 generations, 3 rounds (runs in docs/worldmodels.md).
    # 400 episodes, not 160: about 100 s more; seed 0's run scored 691.4 with it against 575.0 (seed 4: 531.7 against
    # 614.3); in forks the seed of M mattered more than the data (docs/worldmodels.md, "Which M")
    "medium": {**_QUICK, "episodes": 400, "max_steps": 1000, "vae_steps": 3000, "hidden": 256, "seq_len": 64, "mdn_steps": 4000,
               "generations": 100, "popsize": 32, "horizon": 1000, "eval_every": 5, "restart_every": 20, "final_episodes": 100,
               "rounds": 3, "round_episodes": 40, "round_mdn_steps": 1000, "round_generations": 60},
    # the paper's sizes (a GPU and many CPU cores for collection). The final C is the checkpoint with the best
    # periodic real-env check (every 25 generations, 8 episodes), not the dream's best: on an H100 a reduced
    # paper-size run's dream fitness kept rising (to 563) while its real score fell from 61 to -40 after
    # generation 20 (bench/RESULTS.md)
    "paper": {"select_by_real": True},
    # for tests: seconds
    "tiny": {"episodes": 2, "max_steps": 50, "policy": "brownian", "workers": 1, "z_dim": 8, "vae_width": 4, "vae_steps": 3,
             "vae_batch": 16, "vae_lr": 1e-3, "hidden": 16, "mixtures": 2, "seq_len": 16, "mdn_steps": 1, "mdn_batch": 4,
             "generations": 2, "popsize": 4, "rollouts": 2, "horizon": 20, "eval_every": 0, "final_episodes": 1,
             "eval_max_steps": 50, "eval_episodes": 1, "round_episodes": 1, "round_mdn_steps": 1, "round_generations": 1,
             "threads": 1},
}


def make_config(preset: str | None, overrides: dict[str, Any] | None = None) -> WorldModelConfig:
    if preset is not None and preset not in PRESETS:
        raise DreamlabError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    return apply_overrides(WorldModelConfig(), {**PRESETS.get(preset or "paper", {}), **(overrides or {})}, what="worldmodel config")


def load_config(run_dir: Path) -> WorldModelConfig:
    p = Path(run_dir) / "config.json"
    if not p.exists():
        raise DreamlabError(f"{run_dir} is not a world-model run (no config.json); start one with: dreamlab worldmodel run --preset quick --out {run_dir}")
    d = load_json(p)
    return apply_overrides(WorldModelConfig(), d.get("config", {}), what=f"{p}")


def _threads(cfg: WorldModelConfig) -> None:
    if cfg.threads > 0:
        import torch

        torch.set_num_threads(cfg.threads)


def stop_if_interrupted(res: Any) -> Any:
    """A trainer stopped by Ctrl-C returns {"status": "interrupted"} after saving its checkpoint; the stages after it
    must not run on a half-trained V or M, so the pipeline stops too (the CLI exits 130; --resume continues)."""
    if isinstance(res, dict) and res.get("status") == "interrupted":
        raise KeyboardInterrupt
    return res


def _summary(run_dir: Path, stage: str, info: dict[str, Any]) -> None:
    p = run_dir / "summary.json"
    s = load_json(p) if p.exists() else {}
    s[stage] = info
    save_json(p, s)


# ----------------------------------------------------------------------------- stages


def stage_collect(run_dir: Path, cfg: WorldModelConfig, *, resume: bool = True, progress: bool = True, out: Path | None = None,
                  episodes: int | None = None, policy: str | None = None, controller: str = "", seed: int | None = None,
                  record: bool = True) -> dict[str, Any]:
    """Collect into RUN/rollouts (or `out`); `record=False` keeps the result out of RUN/summary.json (the iterative
    rounds record their collections in their own entry)."""
    from worlds.collect import CollectConfig, collect

    cc = CollectConfig(out=str(out or run_dir / "rollouts"), episodes=episodes or cfg.episodes, max_steps=cfg.max_steps,
                       workers=cfg.workers, policy=policy or cfg.policy, env_id=cfg.env_id, seed=cfg.seed if seed is None else seed,
                       world_model=str(run_dir) if controller else "", controller=controller)
    res = collect(cc, resume=resume, progress=progress)
    if record:
        _summary(run_dir, "collect" if out is None else f"collect_{Path(out).name}", res)
    return res


def stage_train_vae(run_dir: Path, cfg: WorldModelConfig, *, resume: bool = False, progress: bool = True) -> dict[str, Any]:
    from generators.base import TrainConfig
    from generators.trainer import train
    from worlds.models import WorldVAE, WorldVAEConfig

    _threads(cfg)
    from dreamlab.device import seeded

    with seeded(cfg.seed):  # V's initial weights from the run's seed alone: a seeded run repeats on CPU
        model = WorldVAE(WorldVAEConfig(rollouts=str(run_dir / "rollouts"), z_dim=cfg.z_dim, width=cfg.vae_width,
                                        eval_frames=2000 if cfg.vae_steps < 10_000 else 20_000))
    tc = TrainConfig(steps=cfg.vae_steps, batch_size=cfg.vae_batch, lr=cfg.vae_lr, device=cfg.device, seed=cfg.seed, threads=cfg.threads,
                     log_every=max(1, min(50, cfg.vae_steps // 10)), ckpt_every=max(100, cfg.vae_steps // 10))
    t0 = time.perf_counter()
    res = train(model, tc, run_dir / "vae", resume=resume, progress=progress)
    res["seconds"] = round(time.perf_counter() - t0, 1)
    _summary(run_dir, "train_vae", res)
    return res


def stage_encode(run_dir: Path, cfg: WorldModelConfig, *, progress: bool = True, rollouts: Path | None = None,
                 record: bool = True) -> dict[str, Any]:
    from generators.trainer import load_run
    from worlds.encode import encode_rollouts

    _threads(cfg)
    if not (run_dir / "vae" / "model" / "model.safetensors").is_file():
        raise DreamlabError(f"{run_dir / 'vae'} holds no trained V; train it first: dreamlab worldmodel train-vae {run_dir}"
                            + (" --resume" if (run_dir / "vae" / "checkpoint").is_dir() else ""))
    vae = load_run(run_dir / "vae", device=cfg.device)
    st = (run_dir / "vae" / "model" / "model.safetensors").stat()
    res = encode_rollouts(vae, rollouts or run_dir / "rollouts", run_dir / "latents", progress=progress,
                          vae_id=f"{st.st_size}:{st.st_mtime_ns}")
    if record:
        _summary(run_dir, "encode", res)
    return res


def stage_train_mdn(run_dir: Path, cfg: WorldModelConfig, *, resume: bool = False, progress: bool = True, out: Path | None = None) -> dict[str, Any]:
    """Train M in RUN/mdn (or `out`); with `mdn_ensemble` K > 1, then the other members in RUN/mdn_1 .. mdn_{K-1}
    (seeds seed+1 ..: other initial weights and batch order). Finished members are skipped, interrupted ones
    continue; while members are missing, a trained M is skipped too (members added to a finished run)."""
    from dreamlab.device import seeded
    from generators.base import TrainConfig
    from generators.trainer import train
    from worlds.dream import mdn_dirs
    from worlds.models import MDNRNN, MDNRNNConfig

    _threads(cfg)
    if cfg.mdn_ensemble < 1:
        raise DreamlabError(f"mdn_ensemble={cfg.mdn_ensemble}: need at least 1 (M alone)")
    folders = mdn_dirs(run_dir, cfg.mdn_ensemble)
    folders[0] = out or folders[0]
    # members added to a run whose M is trained (`--set mdn_ensemble=3` later): train only the new members
    skip_m = any(not (d / "model").is_dir() for d in folders[1:])
    t0 = time.perf_counter()
    res: dict[str, Any] = {}
    for k, folder in enumerate(folders):
        if (k > 0 or skip_m) and (folder / "model").is_dir():
            if k == 0:  # M itself is trained (a `model` folder is written only at the end): report its test metrics
                res = load_json(folder / "eval.json") if (folder / "eval.json").exists() else {"status": "finished"}
            continue
        with seeded(cfg.seed + k):  # member k's initial weights from its own seed alone
            model = MDNRNN(MDNRNNConfig(latents=str(run_dir / "latents"), z_dim=cfg.z_dim, hidden=cfg.hidden, mixtures=cfg.mixtures,
                                        seq_len=cfg.seq_len, chunk_stride=cfg.mdn_chunk_stride, temperature=cfg.temperature,
                                        self_feed=cfg.mdn_self_feed))
        tc = TrainConfig(steps=cfg.mdn_steps, batch_size=cfg.mdn_batch, lr=cfg.mdn_lr, device=cfg.device, seed=cfg.seed + k, grad_clip=1.0,
                         threads=cfg.threads, log_every=max(1, min(50, cfg.mdn_steps // 10)), ckpt_every=max(100, cfg.mdn_steps // 10))
        r = train(model, tc, folder, resume=(resume or k > 0) and (folder / "checkpoint").exists(), progress=progress)
        if k == 0:
            res = r
        else:
            res.setdefault("members", {})[folder.name] = {kk: r.get(kk) for kk in ("status", "step", "test_nll_per_step", "test_reward_mse")}
        if r.get("status") != "finished":  # Ctrl-C: stop here (the checkpoint is saved); --resume continues this member
            res["status"] = r.get("status", "interrupted")
            break
    res["seconds"] = round(time.perf_counter() - t0, 1)
    _summary(run_dir, "train_mdn", res)
    return res


def cma_config(cfg: WorldModelConfig, **over: Any) -> Any:
    from agents.cmaes import CMAConfig

    base = CMAConfig(generations=cfg.generations, popsize=cfg.popsize, rollouts=cfg.rollouts, sigma0=cfg.sigma0,
                     temperature=cfg.temperature, steer_penalty=cfg.steer_penalty, worst_frac=cfg.worst_frac, start_anywhere=cfg.start_anywhere, state_stride=cfg.state_stride, lost_steps=cfg.lost_steps, lost_reward=cfg.lost_reward, common_noise=cfg.common_noise, action_noise=cfg.action_noise, ensemble=cfg.mdn_ensemble, ensemble_mode=cfg.mdn_ensemble_mode, horizon=cfg.horizon, diagonal=cfg.diagonal, features=cfg.features, val_rollouts=cfg.val_rollouts, eval_every=cfg.eval_every,
                     eval_episodes=cfg.eval_episodes, check_steps=cfg.check_steps, select_by_real=cfg.select_by_real,
                     playoff_top=cfg.playoff_top, playoff_episodes=cfg.playoff_episodes, restart_every=cfg.restart_every, workers=cfg.workers, env_id=cfg.env_id, seed=cfg.seed, device=cfg.device)
    return dataclasses.replace(base, **over)


def stage_train_controller(run_dir: Path, cfg: WorldModelConfig, *, resume: bool = False, progress: bool = True, **over: Any) -> dict[str, Any]:
    from agents.cmaes import train_controller

    _threads(cfg)
    res = train_controller(run_dir, cma_config(cfg, **over), resume=resume, progress=progress)
    _summary(run_dir, "train_controller", res)
    return res


def stage_evaluate(run_dir: Path, cfg: WorldModelConfig, *, episodes: int | None = None, seed: int | None = None,
                   progress: bool = True, baseline: bool = True, video: bool = True) -> dict[str, Any]:
    from agents.evaluate import evaluate_run

    t0 = time.perf_counter()
    res = evaluate_run(run_dir, episodes=episodes or cfg.final_episodes, seed=cfg.eval_seed if seed is None else seed,
                       workers=cfg.workers, env_id=cfg.eval_env_id, max_steps=cfg.eval_max_steps, baseline=baseline, video=video,
                       temperature=cfg.temperature, progress=progress)
    short = {k: {kk: v[kk] for kk in ("episodes", "mean", "std", "seeds")} if isinstance(v, dict) else v for k, v in res.items()}
    short["seconds"] = round(time.perf_counter() - t0, 1)
    _summary(run_dir, "evaluate", short)
    return res


def stage_dream_video(run_dir: Path, cfg: WorldModelConfig, *, steps: int = 300, seed: int = 0, out: Path | None = None) -> Path:
    import torch

    from dreamlab.images import save_video
    from worlds.dream import DreamConfig, decode_frames, load_dream
    from worlds.policies import controller_mdn, load_controller

    _threads(cfg)
    ctrl = run_dir / "controller" / "best.safetensors"
    vae, mdn, sim = load_dream(run_dir, "cpu", DreamConfig(horizon=steps, temperature=cfg.temperature),
                               mdn_dir=controller_mdn(ctrl) if ctrl.exists() else None)
    theta = load_controller(ctrl)[0] if ctrl.exists() else torch.zeros(sim.n_params)
    rec = sim.rollout(theta[None], 1, seed=seed, horizon=steps, record=True)
    frames = decode_frames(vae, rec["z"][:, 0]).numpy().repeat(4, 1).repeat(4, 2)
    return save_video(frames, out or run_dir / "dream.mp4", fps=30)


# ----------------------------------------------------------------------------- everything


def run_pipeline(run_dir: Path, cfg: WorldModelConfig, *, preset: str | None, progress: bool = True, resume: bool = False) -> dict[str, Any]:
    """All stages; with `resume`, stages already completed in RUN are skipped and an interrupted one continues."""
    from agents.iterate import iterate_rounds

    run_dir = Path(run_dir)
    if (run_dir / "config.json").exists() and not resume:
        raise DreamlabError(f"{run_dir} already holds a world-model run; pass --resume to continue it, or choose another --out")
    run_dir.mkdir(parents=True, exist_ok=True)
    if resume and (run_dir / "config.json").exists():
        cfg = load_config(run_dir)
    save_json(run_dir / "config.json", {"preset": preset, "config": to_dict(cfg)})
    t0 = time.perf_counter()
    times: dict[str, float] = {}

    def timed(name: str, fn: Any, *a: Any, **k: Any) -> Any:
        s = time.perf_counter()
        r = stop_if_interrupted(fn(*a, **k))
        times[name] = round(time.perf_counter() - s, 1)
        print(f"[{name}] {times[name]} s", flush=True)
        return r

    timed("collect", stage_collect, run_dir, cfg, resume=True, progress=progress)
    if not (run_dir / "vae" / "model").exists():
        timed("train_vae", stage_train_vae, run_dir, cfg, resume=(run_dir / "vae" / "checkpoint").exists(), progress=progress)
    timed("encode", stage_encode, run_dir, cfg, progress=progress)
    from worlds.dream import mdn_dirs

    if not all((d / "model").exists() for d in mdn_dirs(run_dir, cfg.mdn_ensemble)):
        timed("train_mdn", stage_train_mdn, run_dir, cfg, resume=(run_dir / "mdn" / "checkpoint").exists(), progress=progress)
    ctrl_done = (run_dir / "controller" / "fitness.jsonl").exists() and \
        len((run_dir / "controller" / "fitness.jsonl").read_text().splitlines()) >= cfg.generations
    if not ctrl_done:
        timed("train_controller", stage_train_controller, run_dir, cfg, resume=(run_dir / "controller" / "cma_state.safetensors").exists(),
              progress=progress)
    if cfg.rounds > 1:
        timed("iterate", iterate_rounds, run_dir, cfg, progress=progress)
    timed("dream_video", stage_dream_video, run_dir, cfg)
    res = timed("evaluate", stage_evaluate, run_dir, cfg, progress=progress)
    total = round(time.perf_counter() - t0, 1)
    out = {"seconds_total": total, "stage_seconds": times,
           "controller": {k: res["controller"][k] for k in ("episodes", "mean", "std", "seeds")},
           "random": {k: res["random"][k] for k in ("episodes", "mean", "std", "seeds")} if "random" in res else None}
    _summary(run_dir, "pipeline", out)
    refresh_report(run_dir)
    return out


def refresh_report(run_dir: Path) -> Path | None:
    """Rewrite RUN/report.md; a failure here is reported, never allowed to fail the run that produced the results."""
    from agents.report import write_report

    try:
        p = write_report(run_dir)
    except Exception as e:  # noqa: BLE001 - the report is a view of files already written
        print(f"warning: {Path(run_dir) / 'report.md'} not written ({type(e).__name__}: {e}); "
              f"retry with: dreamlab worldmodel report {run_dir}", flush=True)
        return None
    print(f"report: {p}", flush=True)
    return p
