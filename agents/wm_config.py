"""The World Models pipeline's settings: `WorldModelConfig` and the presets (quick, medium, paper, tiny)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from dreamlab.config import apply_overrides
from dreamlab.errors import DreamlabError
from dreamlab.io import load_json

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


