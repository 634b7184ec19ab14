"""The World Models pipeline's settings: one small typed config per stage, composed in `WorldModelConfig`.

    collect     what to drive and how much (worlds.collect.CollectConfig)
    vae         V, the ConvVAE                     mdn         M, the MDN-RNN
    dream       the dream C is trained in (worlds.dream.DreamConfig)
    search      CMA-ES (agents.cma_search.SearchConfig)
    selection   which dream-trained controller to keep (agents.selection.SelectionConfig)
    evaluation  the final real-env score       rounds      iterative training (collect with C, retrain M and C)
    seed, workers, device, threads: the whole run's
    backend, ray_address: where collection and real-env episodes run (dreamlab.parallel: local processes or Ray)

Each stage reads its own part; every field is checked once, where its dataclass is made (`__post_init__`), so a bad
`--set search.popsize=1` fails before any collection. Settings are given as `stage.field=value`; the flat names of
earlier releases (`vae_steps`, `popsize`, ...) still work for this release, with a one-line deprecation notice.
"""
from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from agents.cma_search import SearchConfig
from agents.report import not_a_world_model_run
from agents.selection import SelectionConfig
from dreamlab.config import apply_overrides, check_ranges, to_dict
from dreamlab.errors import DreamlabError
from dreamlab.io import load_json
from dreamlab.parallel import Backend
from worlds.collect import CollectConfig
from worlds.dream import DreamConfig


@dataclass
class VConfig:
    """V: the ConvVAE, trained on the collected frames."""

    z_dim: int = 32
    width: int = 32          # channels of the first conv layer (the paper: 32)
    steps: int = 100_000
    batch_size: int = 100
    lr: float = 1e-4

    def __post_init__(self) -> None:
        check_ranges(self, positive=("z_dim", "width", "steps", "batch_size"))
        if not self.lr > 0:
            raise DreamlabError(f"lr={self.lr} must be > 0")


@dataclass
class MConfig:
    """M: the MDN-RNN, trained on V's codes of the episodes."""

    hidden: int = 256
    mixtures: int = 5
    seq_len: int = 999       # training chunk length in steps
    steps: int = 20_000
    batch_size: int = 100
    lr: float = 1e-3

    def __post_init__(self) -> None:
        check_ranges(self, positive=("hidden", "mixtures", "seq_len", "steps", "batch_size"))
        if not self.lr > 0:
            raise DreamlabError(f"lr={self.lr} must be > 0")


@dataclass
class EvalConfig:
    """The final score: the kept controller in gymnasium's own env."""

    episodes: int = 100
    max_steps: int = 1000    # CarRacing-v3's own limit; shorter only for tests
    env_id: str = "CarRacing-v3"
    seed: int = 1000         # episode i uses env seed seed + i

    def __post_init__(self) -> None:
        check_ranges(self, positive=("episodes", "max_steps"), nonneg=("seed",),
                     at_most={"episodes": 1_000_000, "max_steps": 100_000})


@dataclass
class RoundsConfig:
    """Iterative training (the paper's sec. 5): after the first controller, each further round collects episodes
    driven by the controllers, continues M on all data and continues (or restarts) CMA-ES in the new dream."""

    count: int = 1           # rounds in all (1 = no iteration)
    episodes: int = 1000     # new episodes per round
    mdn_steps: int = 5000    # M's extra steps per round
    generations: int = 100   # CMA-ES generations per round
    restart: bool = False  # a fresh CMA-ES search in each round's new dream (the kept controllers stay)
    collect: Literal["best", "dream", "both"] = (
        "both"  # who drives the new episodes: the kept C, the dream-best C, both
    )
    check_episodes: int = 0  # episodes of the full-length check that compares the rounds' controllers (0 = selection's)

    def __post_init__(self) -> None:
        check_ranges(self, positive=("count", "episodes", "mdn_steps", "generations"), nonneg=("check_episodes",),
                     at_most={"episodes": 1_000_000})


@dataclass
class WorldModelConfig:
    collect: CollectConfig = field(default_factory=lambda: CollectConfig(episodes=10_000, policy="random_controller"))
    vae: VConfig = field(default_factory=VConfig)
    mdn: MConfig = field(default_factory=MConfig)
    dream: DreamConfig = field(default_factory=DreamConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    selection: SelectionConfig = field(default_factory=SelectionConfig)
    evaluation: EvalConfig = field(default_factory=EvalConfig)
    rounds: RoundsConfig = field(default_factory=RoundsConfig)
    seed: int = 0
    workers: int = 0         # worker processes for collection and real-env episodes (0 = all cores; Ray: every CPU)
    device: str = "auto"
    threads: int = 0         # torch CPU threads in this process (0 = torch's default); 1 avoids OpenMP
                             # oversubscription on a busy machine (measured 7x faster there)
    backend: Literal["local", "ray"] = "local"  # collection and real-env episodes: worker processes here, or Ray
    ray_address: str = ""    # with backend=ray: "" = an embedded instance (temp dir RUN/ray), "auto" or HOST:PORT

    def __post_init__(self) -> None:
        check_ranges(self, nonneg=("seed", "workers", "threads"))
        Backend(self.backend, self.ray_address)  # checks the pair

    def parallel(self, run_dir: str | Path) -> Backend:
        """Where this run's parallel episodes go; an embedded Ray keeps its temp dir in RUN/ray."""
        return Backend(self.backend, self.ray_address, str(Path(run_dir) / "ray"))


STAGES = tuple(f.name for f in dataclasses.fields(WorldModelConfig) if f.default_factory is not dataclasses.MISSING)

# the flat names of earlier releases -> stage.field (still accepted in this release, with a deprecation notice)
FLAT_NAMES = {
    "env_id": "collect.env_id", "episodes": "collect.episodes", "max_steps": "collect.max_steps",
    "policy": "collect.policy",
    "z_dim": "vae.z_dim", "vae_width": "vae.width", "vae_steps": "vae.steps", "vae_batch": "vae.batch_size",
    "vae_lr": "vae.lr",
    "hidden": "mdn.hidden", "mixtures": "mdn.mixtures", "seq_len": "mdn.seq_len", "mdn_steps": "mdn.steps",
    "mdn_batch": "mdn.batch_size", "mdn_lr": "mdn.lr",
    "temperature": "dream.temperature", "horizon": "dream.horizon",
    "generations": "search.generations", "popsize": "search.popsize", "rollouts": "search.rollouts",
    "sigma0": "search.sigma0", "restart_every": "search.restart_every", "val_rollouts": "search.val_rollouts",
    "eval_every": "selection.check_every", "eval_episodes": "selection.check_episodes",
    "select_by_real": "selection.by_real", "playoff_top": "selection.playoff_top",
    "playoff_episodes": "selection.playoff_episodes",
    "final_episodes": "evaluation.episodes", "eval_max_steps": "evaluation.max_steps",
    "eval_env_id": "evaluation.env_id", "eval_seed": "evaluation.seed",
    "rounds": "rounds.count", "round_episodes": "rounds.episodes", "round_mdn_steps": "rounds.mdn_steps",
    "round_generations": "rounds.generations", "round_restart": "rounds.restart", "round_collect": "rounds.collect",
    "round_check_episodes": "rounds.check_episodes",
}
# experiment switches of earlier releases, measured and taken out (docs/experiments/): accepted at the value that is
# now fixed behaviour (a run folder written before stays readable), refused at any other
REMOVED = {"mdn_chunk_stride": 0, "mdn_self_feed": 0.0, "mdn_ensemble": 1, "mdn_ensemble_mode": "mix",
           "steer_penalty": 0.0, "worst_frac": 1.0, "start_anywhere": 0.0, "state_stride": None, "lost_steps": 0,
           "lost_reward": None, "common_noise": False, "action_noise": 0.0, "features": "zh", "diagonal": False,
           "check_steps": 0}  # None: any value (it only mattered with another removed switch on)


def apply_settings(cfg: WorldModelConfig, settings: dict[str, Any], *, warn: bool = True) -> WorldModelConfig:
    """`cfg` with `stage.field=value` settings applied (values may be strings from the CLI), each checked by its
    stage's dataclass. Flat names of earlier releases are mapped (with a notice unless `warn` is False)."""
    by_stage: dict[str, dict[str, Any]] = {}
    top: dict[str, Any] = {}
    for key, value in settings.items():
        if key in REMOVED:
            keep = REMOVED[key]
            if keep is not None and _parse(value, keep) != keep:
                raise DreamlabError(f"{key}={value} is an experiment option that dreamlab no longer has; its measured "
                                    "effect and the release that had it are in docs/experiments/")
            continue
        if key in FLAT_NAMES:
            if warn:
                print(f"deprecated: --set {key}=... is now --set {FLAT_NAMES[key]}=... (the flat names go in the next "
                      "release)", file=sys.stderr)
            key = FLAT_NAMES[key]
        stage, _, name = key.partition(".")
        if name:
            if stage not in STAGES:
                raise DreamlabError(f"unknown stage {stage!r} in {key!r}; stages: {', '.join(STAGES)}")
            by_stage.setdefault(stage, {})[name] = value
        else:
            top[key] = value
    changes = {s: apply_overrides(getattr(cfg, s), o, what=f"worldmodel {s} setting") for s, o in by_stage.items()}
    known = {f.name for f in dataclasses.fields(WorldModelConfig)} - set(STAGES)
    bad = [k for k in top if k not in known]
    if bad:
        raise DreamlabError(f"unknown worldmodel setting {bad[0]!r}; give stage.field (stages: {', '.join(STAGES)}) "
                            f"or one of {', '.join(sorted(known))}")
    out = dataclasses.replace(cfg, **changes)
    return apply_overrides(out, top, what="worldmodel setting") if top else out


def _parse(value: Any, like: Any) -> Any:
    """A CLI string as the type of `like` (for comparing a removed option's value with its fixed one)."""
    if not isinstance(value, str):
        return value
    if isinstance(like, bool):
        return value.lower() in ("1", "true", "yes", "on")
    try:
        return type(like)(value)
    except ValueError:
        return value


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"vae": {"steps": 3}} -> {"vae.steps": 3}."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


# 2 CPU cores, about 7-13 min by host speed (docs/experiments/quick-preset.md: measured times and scores per seed):
# whole 1000-step episodes, the paper's LSTM 256 and three short CMA-ES searches of 10 generations (the real checks of
# a search peaked around its 10th generation and fell as it went on exploiting the dream); one round. The rounds.*
# settings apply with `--set rounds.count=N`; medium inherits rounds.collect, rounds.restart, rounds.check_episodes.
_QUICK: dict[str, Any] = {
    "collect.env_id": "dreamlab/CarRacing64-v3", "collect.episodes": 160, "collect.max_steps": 1000,
    "collect.policy": "explore",
    "vae.width": 16, "vae.steps": 1000, "vae.batch_size": 64, "vae.lr": 1e-3,
    "mdn.hidden": 256, "mdn.seq_len": 64, "mdn.steps": 2000, "mdn.batch_size": 32,
    "dream.horizon": 1000,
    "search.generations": 30, "search.popsize": 32, "search.rollouts": 8, "search.restart_every": 10,
    "selection.check_every": 5, "selection.check_episodes": 4, "selection.by_real": True,
    "selection.playoff_top": 3, "selection.playoff_episodes": 16,
    "evaluation.episodes": 10,
    "rounds.count": 1, "rounds.episodes": 16, "rounds.mdn_steps": 400, "rounds.generations": 30,
    "rounds.collect": "both", "rounds.restart": True, "rounds.check_episodes": 16,
    "threads": 1,
}

PRESETS: dict[str, dict[str, Any]] = {
    "quick": _QUICK,
    # 2 CPU cores, about 40 minutes: quick's exploration data, small V, LSTM 256, whole 1000-step episodes and
    # selection rules at a larger scale: more data and training, 5 searches of 20 generations, 3 rounds. 400 episodes,
    # not 160: about 100 s more; seed 0's run scored 691.4 with it against 575.0 (seed 4: 531.7 against 614.3); in
    # forks the seed of M mattered more than the data (docs/experiments/medium-preset.md, data.md)
    "medium": {**_QUICK, "collect.episodes": 400, "vae.steps": 3000, "mdn.steps": 4000, "search.generations": 100,
               "search.restart_every": 20, "evaluation.episodes": 100, "rounds.count": 3, "rounds.episodes": 40,
               "rounds.mdn_steps": 1000, "rounds.generations": 60},
    # the paper's sizes (a GPU and many CPU cores for collection). The final C is the checkpoint with the best
    # periodic real-env check (every 25 generations, 8 episodes), not the dream's best: on an H100 a reduced
    # paper-size run's dream fitness kept rising (to 563) while its real score fell from 61 to -40 after
    # generation 20 (bench/RESULTS.md)
    "paper": {"selection.by_real": True},
    # for tests: seconds
    "tiny": {"collect.episodes": 2, "collect.max_steps": 50, "collect.policy": "brownian", "workers": 1,
             "vae.z_dim": 8, "vae.width": 4, "vae.steps": 3, "vae.batch_size": 16, "vae.lr": 1e-3,
             "mdn.hidden": 16, "mdn.mixtures": 2, "mdn.seq_len": 16, "mdn.steps": 1, "mdn.batch_size": 4,
             "search.generations": 2, "search.popsize": 4, "search.rollouts": 2, "dream.horizon": 20,
             "selection.check_every": 0, "selection.check_episodes": 1, "evaluation.episodes": 1,
             "evaluation.max_steps": 50, "rounds.episodes": 1, "rounds.mdn_steps": 1, "rounds.generations": 1,
             "threads": 1},
}


def make_config(preset: str | None, settings: dict[str, Any] | None = None) -> WorldModelConfig:
    if preset is not None and preset not in PRESETS:
        raise DreamlabError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    cfg = apply_settings(WorldModelConfig(), PRESETS.get(preset or "paper", {}))
    return apply_settings(cfg, settings or {})


def config_json(cfg: WorldModelConfig, preset: str | None) -> dict[str, Any]:
    """What RUN/config.json holds."""
    return {"preset": preset, "config": to_dict(cfg)}


def load_config(run_dir: str | Path) -> WorldModelConfig:
    """The run's settings from RUN/config.json (the stage layout, or the flat one of earlier releases)."""
    p = Path(run_dir) / "config.json"
    if not p.exists():
        raise DreamlabError(f"{run_dir} is not a world-model run (no config.json); start one with: "
                            f"dreamlab worldmodel run --preset quick --out {run_dir}")
    d = load_json(p)
    why = not_a_world_model_run(run_dir)
    if why:
        raise DreamlabError(why)
    try:
        return apply_settings(WorldModelConfig(), flatten(d["config"]), warn=False)
    except DreamlabError as e:  # a value that no --set would pass: the file is named, with the fix
        raise DreamlabError(f"{p}: {e}; correct it there (or give it with --set)") from e
