"""Train C with CMA-ES (the `cma` package), with fitness in the dream (batched) or in the real env (parallel).

Every generation the complete CMA-ES state is checkpointed without pickle in one atomically written file,
`controller/cma_state.safetensors`: every numeric attribute of cma's strategy object and its parts (mean,
covariance and its eigendecomposition, evolution paths, the step-size adaptation's state, TPA's mean-shift
direction, fitness records, ...) as tensors and JSON metadata, with numpy's global RNG state (which `cma` samples
from); `controller/cma_state.json` repeats the bookkeeping (generation, sigma, best so far) for people. `resume`
rebuilds a `cma.CMAEvolutionStrategy` from the same options and writes that state back, so a resumed run asks
exactly the candidates an uninterrupted run would have asked (tested at 12 and 320 dimensions: from 300 cma adapts
sigma by two-point adaptation, whose state a hand-picked list once missed). Not restored: cma's logger and options.

With `fitness="real"` the periodic checks score the generation's distribution mean (not the candidate with the
best few-episode real mean so far, which is mostly the luckiest).

Run folder (`RUN/controller/`): mdn_<hash>/ (the M the saved controllers were trained in, named in their
metadata, so a controller kept from an earlier round of iterative training still acts with its own M), best_dream.safetensors (the search's best controller so far by dream fitness of the
distribution mean on `val_rollouts` fixed dream rollouts; with `restart_every`, of the current search), best.safetensors (the one downstream stages use: best_dream, or with `select_by_real`
the dream-trained checkpoint whose periodic real-env check, `eval_episodes` episodes of `horizon` steps on
env seeds 0.., scored best, or with `playoff_top` the best of the top-checked ones re-scored on `playoff_episodes` fresh
episodes, env seeds 100..; the search itself only ever sees dream fitness), checks/gen_<N>.safetensors (every checked
controller), playoff.json (the last search's playoff) and playoffs.jsonl (every search's), fitness.jsonl (per generation: best/mean/worst candidate, mean-candidate dream fitness,
sigma, and real-env means when evaluated), fitness.png (dream vs real curves), config.json.
"""
from __future__ import annotations

import dataclasses
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from dreamlab.errors import DreamlabError
from dreamlab.io import atomic_write_text, load_json, load_tensors, save_json, save_tensors


@dataclass
class CMAConfig:
    generations: int = 100
    popsize: int = 64
    rollouts: int = 16               # per candidate
    sigma0: float = 0.1
    temperature: float = 1.15        # tau of the dream (the paper's dream training used tau > 1)
    ensemble: int = 1                # Ms in the dream: M plus RUN/mdn_1 .. mdn_{K-1} (worlds.dream.DreamSimulator)
    ensemble_mode: Literal["mix", "rotate"] = "mix"  # with ensemble K > 1: "mix" = each dream rollout runs in one
                                     # member, C reads M's h; "rotate" = search k (restart_every) dreams in member k mod K
                                     # alone and C reads that member's h; the real checks and the playoff then choose among
                                     # the members' controllers (Ms trained from other seeds on the same data differ a lot)
    horizon: int = 1000              # dream steps (or real steps per episode)
    steer_penalty: float = 0.0       # dream reward minus this x |steer| per step (worlds.dream.DreamConfig)
    start_anywhere: float = 0.0      # fraction of dream rollouts starting from a real frame anywhere in an episode (worlds.dream)
    state_stride: int = 16           # those frames: every N-th of each encoded episode
    lost_steps: int = 0              # a dream rollout ends after this many steps in a row of M's reward < lost_reward: the car
    lost_reward: float = 0.0         # is lost off the road (worlds.dream.DreamConfig; 0 = off)
    common_noise: bool = False       # rollout j of every candidate draws the same M noise (common random numbers)
    action_noise: float = 0.0        # std of Gaussian noise on C's actions before M sees them, in the dream (0 = off)
    fitness: Literal["dream", "real"] = "dream"
    worst_frac: float = 1.0          # a candidate's fitness: the mean of its worst fraction of rollouts (CVaR; 1 = all of them)
    diagonal: bool = False           # CMA_diagonal: much cheaper updates at 867 dimensions
    val_rollouts: int = 32           # dream validation of the distribution mean: the same rollouts every generation
                                     # (0 = off: best_dream is picked on the generation's own, ever-changing rollouts)
    features: Literal["zh", "z"] = "zh"  # C reads [z, h] (the paper) or z alone (h weights fixed at 0: 3(Z+1) parameters searched)
    eval_every: int = 10             # real-env evaluation of the best controller every N generations (0 = off)
    eval_episodes: int = 4
    check_steps: int = 0             # steps of each real check episode (0 = horizon); longer checks favour controllers that last
    select_by_real: bool = False     # keep, as best.safetensors, the checked controller with the best real check
    playoff_top: int = 0             # with select_by_real: at the end of a search, re-score the N checked controllers with
    playoff_episodes: int = 16       # the best checks on this many fresh real episodes and keep the best of those (0 = off)
    restart_every: int = 0           # a fresh search (mean 0, sigma0, its own seed) every N generations; with select_by_real
                                     # the checks and the playoff compare the controllers of every search (0 = one search)
    workers: int = 0                 # real-env worker processes (0 = all cores)
    env_id: str = "CarRacing-v3"
    seed: int = 0
    device: str = "auto"


# ----------------------------------------------------------------------------- CMA state (no pickle)


_VAL_SEED = 987_654_321  # dream validation rollouts: disjoint from the per-generation seeds (seed * 1_000_003 + gen)


def _make_es(n: int, cfg: CMAConfig, x0: np.ndarray | None = None, start: int = 0) -> Any:
    """A CMA-ES starting at generation `start`; cma re-seeds numpy's global RNG from its `seed` option, so every
    fresh search gets its own (cfg.seed + 1 + start) instead of replaying the first search's samples."""
    try:
        import cma
    except ImportError as e:
        raise DreamlabError("training the controller needs the cma package: pip install cma") from e
    opts = {"popsize": cfg.popsize, "seed": cfg.seed + 1 + start, "verbose": -9, "CMA_diagonal": cfg.diagonal,
            "tolfun": 0, "tolx": 0, "tolfunhist": 0, "tolstagnation": int(1e9), "maxiter": int(1e9)}
    return cma.CMAEvolutionStrategy(np.zeros(n) if x0 is None else x0, cfg.sigma0, opts)


# cma keeps its state in plain attributes of the strategy object and its parts (sampler, step-size adaptation,
# fitness and best-solution records, ...). Which of them matter changes with the dimension (two-point step-size
# adaptation, TPA, from 300 dimensions: every real controller) and the cma version, so the state is every numeric
# leaf reachable from the strategy object through cma's own classes, not a hand-picked list: a hand-picked list
# missed TPA's state and resumed a paper-size search on different samples.
_CMA_SKIP = {"logger", "timer", "opts", "inopts", "_stopdict", "callbackstop", "gp", "boundary_handler", "noise_handler",
             "sp", "sp0"}  # sp/sp0: parameters derived from the options, rebuilt by the constructor


def _cma_leaves(obj: Any, prefix: str = "", seen: set[int] | None = None) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Numeric state of a cma object: arrays (for safetensors) and JSON scalars/lists, keyed by attribute path."""
    seen = set() if seen is None else seen
    seen.add(id(obj))
    arrays: dict[str, np.ndarray] = {}
    plain: dict[str, Any] = {}
    for k, v in vars(obj).items():
        if k in _CMA_SKIP or k.startswith("__"):
            continue
        key = prefix + k
        if isinstance(v, np.ndarray):
            if v.dtype.kind in "fiub":
                arrays[key] = v
        elif isinstance(v, (bool, int, float, str)) or v is None or isinstance(v, np.generic):
            plain[key] = v.item() if isinstance(v, np.generic) else v
        elif type(v) in (list, tuple) and all(isinstance(x, (bool, int, float, np.generic)) for x in v):
            plain[key] = {"list": [x.item() if isinstance(x, np.generic) else x for x in v]}
        elif type(v) in (list, tuple) and all(isinstance(x, np.ndarray) and x.dtype.kind in "fiub" for x in v):
            plain[key] = {"arrays": len(v)}  # e.g. TPA's injected mean-shift direction
            arrays.update({f"{key}[{i}]": x for i, x in enumerate(v)})
        elif type(v).__module__.startswith("cma") and id(v) not in seen and hasattr(v, "__dict__") and not callable(v):
            a, p = _cma_leaves(v, key + ".", seen)
            arrays.update(a)
            plain.update(p)
    return arrays, plain


def _set_path(obj: Any, path: str, value: Any) -> None:
    *parents, last = path.split(".")
    for name in parents:
        obj = getattr(obj, name, None)
        if obj is None:
            return  # a part this fresh strategy does not have (another cma version): skipped
    setattr(obj, last, value)


def save_cma_state(folder: Path, es: Any, extra: dict[str, Any]) -> None:
    """The whole search state in one atomically written file (cma_state.safetensors: arrays, plus the scalars and
    `extra` as JSON metadata), no pickle; cma_state.json repeats the bookkeeping for people and tools."""
    arrays, plain = _cma_leaves(es)
    rng = np.random.get_state()  # cma samples from numpy's global RNG
    meta = {"format": 2, "cma_version": _cma_version(), "plain": plain,
            "numpy_rng": [rng[0], rng[1].tolist(), int(rng[2]), int(rng[3]), float(rng[4])], **extra}
    tensors = {k: torch.from_numpy(np.array(v, dtype=np.float64 if v.dtype.kind == "f" else np.int64, order="C")) for k, v in arrays.items()}
    save_tensors(folder / "cma_state.safetensors", tensors, metadata={"cma_state": json.dumps(meta, default=_json_float)})
    readable = {k: plain[k] for k in ("sigma", "countiter", "countevals") if k in plain}
    save_json(folder / "cma_state.json", {**readable, **{k: v for k, v in meta.items() if k not in ("plain", "numpy_rng")}})


def _json_float(x: Any) -> Any:
    if isinstance(x, np.generic):
        return x.item()
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")


def _cma_version() -> str:
    import cma

    return str(getattr(cma, "__version__", "?"))


def _cma_header(folder: Path) -> dict[str, Any] | None:
    """The metadata saved inside cma_state.safetensors (None for a state written before the whole-state format)."""
    from safetensors import safe_open

    path = Path(folder) / "cma_state.safetensors"
    if not path.exists():
        raise DreamlabError(f"{path} does not exist: nothing to resume (start without --resume)")
    try:
        with safe_open(str(path), "pt") as fh:
            header = (fh.metadata() or {}).get("cma_state")
    except Exception as e:  # noqa: BLE001 - a truncated or foreign file
        raise DreamlabError(f"{path} is not a readable CMA-ES state ({e}); start a new run (another --out) or delete it") from e
    return None if header is None else json.loads(header)


def cma_state_info(folder: str | Path) -> dict[str, Any]:
    """The bookkeeping of a saved search (generation, best so far, ...), read from the state file itself, which is
    written atomically, so it always matches the state a resume continues."""
    meta = _cma_header(Path(folder))
    if meta is None:
        return load_json(Path(folder) / "cma_state.json")
    return {k: v for k, v in meta.items() if k not in ("plain", "numpy_rng")}


def load_cma_state(folder: Path, n: int, cfg: CMAConfig) -> tuple[Any, dict[str, Any]]:
    path = folder / "cma_state.safetensors"
    meta = _cma_header(folder)
    if meta is None:
        return _load_legacy_cma_state(folder, n, cfg)
    t = {k: v.numpy() for k, v in load_tensors(path).items()}
    if meta.get("cma_version") != _cma_version():
        import warnings

        warnings.warn(f"{path} was written with cma {meta.get('cma_version')}, this is cma {_cma_version()}: the resumed "
                      "search may not replay the uninterrupted one exactly", stacklevel=2)
    es = _fresh_es(path, t["mean"], n, cfg)
    for k, v in t.items():
        if not k.endswith("]"):  # "key[i]": an element of a list of arrays, restored with its list below
            _set_path(es, k, v.copy())
    for k, v in meta["plain"].items():
        if isinstance(v, dict) and "arrays" in v:
            _set_path(es, k, [t[f"{k}[{i}]"].copy() for i in range(int(v["arrays"]))])
        else:
            _set_path(es, k, list(v["list"]) if isinstance(v, dict) else v)
    _set_numpy_rng(meta["numpy_rng"])
    return es, {k: v for k, v in meta.items() if k not in ("plain", "numpy_rng")}


def _fresh_es(path: Path, mean: np.ndarray, n: int, cfg: CMAConfig) -> Any:
    """A strategy of the saved one's size after one throw-away iteration, which creates the attributes cma builds
    lazily (mean_old, fit, ...); the caller then writes the saved state over it and restores numpy's RNG last."""
    if mean.shape != (n,):
        raise DreamlabError(f"{path} is for {mean.shape[0]} parameters, this controller has {n}; "
                            "start a new run (another --out) or match the world model")
    es = _make_es(n, cfg, x0=mean.astype(np.float64))
    xs = es.ask()
    es.tell(xs, [0.0] * len(xs))
    return es


def _set_numpy_rng(r: list[Any]) -> None:
    np.random.set_state((r[0], np.array(r[1], dtype=np.uint32), r[2], r[3], r[4]))


def _load_legacy_cma_state(folder: Path, n: int, cfg: CMAConfig) -> tuple[Any, dict[str, Any]]:
    """A state written before 2026-12-01 (a hand-picked subset: mean, covariance, paths, sigma, RNG). It resumes,
    but a search of 300+ dimensions (TPA step-size adaptation) does not replay the uninterrupted one exactly."""
    import warnings

    path = folder / "cma_state.safetensors"
    meta = load_json(folder / "cma_state.json")
    t = {k: v.numpy().astype(np.float64) for k, v in load_tensors(path).items()}
    es = _fresh_es(path, t["mean"], n, cfg)
    warnings.warn(f"{path} is an older, partial CMA-ES state: the search resumes, but not exactly as it would have "
                  "continued", stacklevel=3)
    paths = {"ps": "adapt_sigma.ps", "sigma_vec": "sigma_vec.scaling", "best_x": "best.x"}
    for k, v in t.items():
        if k != "best_x" or meta.get("best_f") is not None:
            _set_path(es, paths.get(k, k), v.copy())
    es.sigma = float(meta["sigma"])
    es.countiter, es.countevals = int(meta["countiter"]), int(meta["countevals"])
    for k, v in meta.get("sm", {}).items():
        setattr(es.sm, k, v)
    for k, v in meta.get("adapt_sigma", {}).items():
        if v is not None:
            setattr(es.adapt_sigma, k, v)
    if meta.get("best_f") is not None:
        es.best.f, es.best.evals = float(meta["best_f"]), int(meta["best_evals"])
    _set_numpy_rng(meta["numpy_rng"])
    return es, meta


# ----------------------------------------------------------------------------- training


def train_controller(run_dir: str | Path, cfg: CMAConfig, *, resume: bool = False, progress: bool = True,
                     out: str | Path | None = None, reset_best: bool = False, restart: bool = False) -> dict[str, Any]:
    """CMA-ES on C for `cfg.generations` generations; state and curves go to `out` (default RUN/controller).

    `resume` continues the saved search; with `restart` as well, it keeps the generation count, the curves and
    the best controllers but starts a fresh search (mean 0, sigma0): for a new M, whose landscape the old
    covariance no longer describes (iterative training)."""
    from tqdm.auto import tqdm

    from dreamlab.device import resolve_device
    from worlds.dream import DreamConfig, load_dream, worst_mean
    from worlds.policies import num_params, save_controller

    run_dir = Path(run_dir)
    out_dir = Path(out) if out else run_dir / "controller"
    if cfg.popsize < 2 or cfg.rollouts < 1 or cfg.generations < 1 or cfg.sigma0 <= 0 or cfg.restart_every < 0:
        raise DreamlabError(f"need popsize >= 2, rollouts >= 1, generations >= 1, sigma0 > 0, restart_every >= 0 (got {cfg.popsize}, "
                            f"{cfg.rollouts}, {cfg.generations}, {cfg.sigma0}, {cfg.restart_every})")
    if not 0.0 < cfg.worst_frac <= 1.0:
        raise DreamlabError(f"worst_frac={cfg.worst_frac} must be in (0, 1]: the fraction of each candidate's rollouts, "
                            "the worst ones, whose mean is its fitness (1 = all)")
    if not cfg.steer_penalty >= 0:
        raise DreamlabError(f"steer_penalty={cfg.steer_penalty}: it must be >= 0 (0 = the plain dream reward)")
    has_state = (out_dir / "cma_state.json").exists()
    if has_state and not resume:
        raise DreamlabError(f"{out_dir} already holds a CMA-ES state; pass --resume to continue it, or choose another --out")
    if resume and not has_state:
        raise DreamlabError(f"--resume given but {out_dir / 'cma_state.json'} does not exist; start without --resume")
    if cfg.ensemble_mode not in ("mix", "rotate"):
        raise DreamlabError(f"ensemble_mode={cfg.ensemble_mode!r}: choose 'mix' (each dream rollout in one member) or 'rotate' (each search in one member)")
    rotate = cfg.ensemble > 1 and cfg.ensemble_mode == "rotate"
    if rotate and (cfg.restart_every < 1 or cfg.fitness != "dream"):
        raise DreamlabError(f"ensemble_mode='rotate' runs one dream search per member: it needs fitness='dream' and restart_every > 0 "
                            f"(got fitness={cfg.fitness!r}, restart_every={cfg.restart_every}); e.g. --set restart_every=20")
    dev = resolve_device(cfg.device)
    dcfg = DreamConfig(horizon=cfg.horizon, temperature=cfg.temperature, steer_penalty=cfg.steer_penalty,
                       start_anywhere=cfg.start_anywhere, state_stride=cfg.state_stride, lost_steps=cfg.lost_steps,
                       lost_reward=cfg.lost_reward, common_noise=cfg.common_noise,
                       action_noise=cfg.action_noise)
    vae, mdn, sim = load_dream(run_dir, dev, dcfg, ensemble=1 if rotate else cfg.ensemble)
    # one (M, dream) per member when rotating; member k's controllers read member k's h
    members: list[tuple[Any, Any]] = [(mdn, sim)]
    if rotate:
        from worlds.dream import DreamSimulator, load_members

        members += [(m, DreamSimulator(m, sim.init_mu, sim.init_logvar, dcfg, states=sim.states)) for m in load_members(run_dir, cfg.ensemble, dev)]
    z_dim, hidden = mdn.config.z_dim, mdn.config.hidden
    n = num_params(z_dim, hidden)
    if cfg.features not in ("zh", "z"):
        raise DreamlabError(f"features={cfg.features!r}: choose 'zh' (C reads [z, h]) or 'z' (z alone)")
    m = n if cfg.features == "zh" else num_params(z_dim, 0)  # dimensions CMA-ES searches

    def embed(x: np.ndarray) -> np.ndarray:
        """Search vectors (B, m) -> full controller parameters (B, n); with features='z' the h rows of W stay 0."""
        if m == n:
            return x
        full = np.zeros((len(x), n))
        k = 3 * z_dim  # W is (Z+H, 3) row-major: its first 3Z entries are the z rows
        full[:, :k], full[:, -3:] = x[:, :k], x[:, k:]
        return full

    out_dir.mkdir(parents=True, exist_ok=True)
    save_json(out_dir / "config.json", {"cma": dataclasses.asdict(cfg), "world_model": str(run_dir), "num_params": n, "searched_params": m})
    if resume and restart:  # a fresh search: only the bookkeeping of the saved state is needed
        meta = cma_state_info(out_dir)
        search_start = int(meta["generation"])
        es = _make_es(m, cfg, start=search_start)
    elif resume:
        es, meta = load_cma_state(out_dir, m, cfg)
        search_start = int(meta.get("search_start", 0))
    if resume:
        best = {"fitness": meta.get("best_mean_fitness", -float("inf")), "generation": meta.get("best_generation", -1)}
        overall = {"fitness": meta.get("overall_best_fitness", best["fitness"]), "generation": meta.get("overall_best_generation", best["generation"])}
        best_real = {"mean": meta.get("best_real_mean", -float("inf")), "generation": meta.get("best_real_generation", -1)}
        gen = int(meta["generation"])
        if reset_best:  # the world model changed (iterative training): old dream fitness is not comparable
            best = overall = {"fitness": -float("inf"), "generation": -1}
        _truncate_jsonl(out_dir / "fitness.jsonl", gen)
        for f in (out_dir / "checks").glob("gen_*.safetensors"):  # checks past the resumed generation are redone
            if int(f.stem[4:]) > gen:
                f.unlink()
    else:
        es = _make_es(m, cfg)
        best, gen = {"fitness": -float("inf"), "generation": -1}, 0
        overall = dict(best)
        search_start = 0
        best_real = {"mean": -float("inf"), "generation": -1}
        (out_dir / "fitness.jsonl").unlink(missing_ok=True)
        shutil.rmtree(out_dir / "checks", ignore_errors=True)
        (out_dir / "playoff.json").unlink(missing_ok=True)
        (out_dir / "playoffs.jsonl").unlink(missing_ok=True)
    evaluator = None
    evaluators: dict[int, Any] = {}  # member -> its real-env evaluator (rotate: started when the member's first check comes)
    if cfg.fitness == "real" or cfg.eval_every > 0:
        from agents.evaluate import RealEvaluator
        from worlds.dream import mdn_dirs

        steps = cfg.horizon if cfg.fitness == "real" else (cfg.check_steps or cfg.horizon)
        member_dirs = mdn_dirs(run_dir, len(members))
        evaluator = evaluators[0] = RealEvaluator(run_dir, cfg.env_id, cfg.workers, steps)

        def member_evaluator(k: int) -> Any:
            if k not in evaluators:
                evaluators[k] = RealEvaluator(run_dir, cfg.env_id, cfg.workers, steps, mdn_dir=member_dirs[k]).__enter__()
            return evaluators[k]
    mdn_tag = ""  # M's snapshot in out_dir, written the first time a controller trained in this M is saved
    member = 0
    bar = tqdm(total=cfg.generations, initial=gen, desc=f"CMA-ES ({cfg.fitness})", unit="gen", disable=not progress, dynamic_ncols=True)
    t_start = time.perf_counter()
    try:
        if evaluator is not None:
            evaluator.__enter__()
        every = cfg.restart_every
        last_check: tuple[int, float, float] = (-1, 0.0, 0.0)  # (best_dream's generation, mean, std) of the last real check
        while gen < cfg.generations:
            t0 = time.perf_counter()
            if every and gen > search_start and (gen - search_start) % every == 0:
                # the next of this call's searches (also right after a resume at the boundary, where the saved state
                # is the finished search's): fresh mean and sigma, its own seed; its own best_dream and checks
                es = _make_es(m, cfg, start=gen)
                best = {"fitness": -float("inf"), "generation": -1}
            search = (gen - search_start) // every if every else 0  # this call's searches, 0, 1, ...
            sub_start = search_start + search * every if every else 0
            if rotate and search % len(members) != member:
                member = search % len(members)
                mdn, sim = members[member]
                mdn_tag = ""
                if evaluator is not None:
                    evaluator = member_evaluator(member)
            xs = np.asarray(es.ask())
            cand = embed(np.concatenate([xs, es.mean[None]], 0))  # the distribution mean rides along, same rollouts
            if cfg.fitness == "dream":
                f = sim.fitness(torch.from_numpy(cand).float(), cfg.rollouts, seed=cfg.seed * 1_000_003 + gen,
                                worst_frac=cfg.worst_frac).cpu().numpy().astype(np.float64)
                dream_steps = len(cand) * cfg.rollouts * cfg.horizon
            else:
                seeds = [10_000_000 + cfg.seed * 100_000 + gen * cfg.rollouts + j for j in range(cfg.rollouts)]
                thetas = [c for c in cand for _ in seeds]
                rs = evaluator.returns(thetas, seeds * len(cand))
                f = worst_mean(torch.tensor(rs, dtype=torch.float64).reshape(len(cand), cfg.rollouts), cfg.worst_frac).numpy()
                dream_steps = 0
            if not np.isfinite(f).all():
                raise DreamlabError(f"fitness became NaN/inf at generation {gen}; the world model in {run_dir} is broken: retrain M")
            es.tell(list(xs), list(-f[:-1]))  # cma minimises
            gen += 1
            row: dict[str, Any] = {"generation": gen, "best": float(f[:-1].max()), "mean": float(f[:-1].mean()),
                                   "worst": float(f[:-1].min()), "mean_candidate": float(f[-1]), "sigma": float(es.sigma),
                                   "seconds": round(time.perf_counter() - t0, 3)}
            if every:
                row["search"] = search
            if rotate:
                row["member"] = member
            if dream_steps:
                row["dream_steps_per_s"] = round(dream_steps / max(time.perf_counter() - t0, 1e-9), 1)
            # best_dream: picked on a fixed dream validation set (the same initial states and M noise every
            # generation), so it is the best mean so far, not the one that drew the luckiest rollouts
            score = float(f[-1])
            if cfg.fitness == "dream" and cfg.val_rollouts > 0:
                score = float(sim.fitness(torch.from_numpy(cand[-1:]).float(), cfg.val_rollouts, seed=_VAL_SEED + cfg.seed,
                                          worst_frac=cfg.worst_frac)[0])
                row["mean_candidate_val"] = score
            if score > best["fitness"]:  # best_dream: the best of this search (what its real checks look at)
                best = {"fitness": score, "generation": gen}
                mdn_tag = mdn_tag or snapshot_mdn(out_dir, mdn)
                save_controller(out_dir / "best_dream.safetensors", cand[-1], z_dim, hidden, generation=str(gen), fitness=f"{score:.4f}", mdn=mdn_tag)
                if score > overall["fitness"]:  # the best of all searches
                    overall = dict(best)
                    if not cfg.select_by_real or best_real["generation"] < 0:
                        save_controller(out_dir / "best.safetensors", cand[-1], z_dim, hidden, generation=str(gen), fitness=f"{score:.4f}", mdn=mdn_tag)
            # checks every eval_every generations of the search (sub_start is 0 without restarts), at the end of each
            # search and at the end
            k = gen - sub_start
            if cfg.eval_every > 0 and (k % cfg.eval_every == 0 or k == every or gen == cfg.generations) and evaluator is not None:
                from worlds.policies import load_controller

                if cfg.fitness == "real":
                    # the search's own fitness is then a `rollouts`-episode real mean, and the largest of those over
                    # many generations is mostly luck (one run kept a 2-episode 916 from generation 15 that scored
                    # 809.5 over 100 episodes, while the distribution mean at generation 40 scored 853.1), so the
                    # checks score this generation's distribution mean on the fixed check episodes instead
                    theta, checked = cand[-1], gen
                else:
                    theta, checked = load_controller(out_dir / "best_dream.safetensors")[0].numpy(), best["generation"]
                if last_check[0] != checked:  # the same controller on the same seeds scores the same: not re-run
                    seeds = list(range(cfg.eval_episodes))
                    rs = evaluator.returns([theta] * len(seeds), seeds)
                    last_check = (checked, float(np.mean(rs)), float(np.std(rs)))
                row["real_mean"], row["real_std"] = last_check[1], last_check[2]
                # every checked controller is kept (a few KB each): later selection (`playoff`) re-scores the best of them
                mdn_tag = mdn_tag or snapshot_mdn(out_dir, mdn)
                save_controller(out_dir / "checks" / f"gen_{gen:05d}.safetensors", theta, z_dim, hidden, generation=str(gen),
                                real_check=f"{row['real_mean']:.4f}", mdn=f"../{mdn_tag}")
                if cfg.select_by_real and row["real_mean"] > best_real["mean"]:
                    best_real = {"mean": row["real_mean"], "generation": gen}
                    mdn_tag = mdn_tag or snapshot_mdn(out_dir, mdn)
                    save_controller(out_dir / "best.safetensors", theta, z_dim, hidden, generation=str(gen), real_check=f"{row['real_mean']:.4f}",
                                    mdn=mdn_tag)
            with open(out_dir / "fitness.jsonl", "a") as fh:
                fh.write(json.dumps(row) + "\n")
            save_cma_state(out_dir, es, {"generation": gen, "best_mean_fitness": best["fitness"], "best_generation": best["generation"],
                                         "best_real_mean": best_real["mean"], "best_real_generation": best_real["generation"],
                                         "search_start": search_start,
                                         "overall_best_fitness": overall["fitness"], "overall_best_generation": overall["generation"]})
            bar.update(1)
            bar.set_postfix(**({"search": row["search"]} if every else {}), best=f"{row['best']:.1f}", mean=f"{row['mean']:.1f}", sigma=f"{es.sigma:.3f}",
                            **({"real": f"{row['real_mean']:.1f}"} if "real_mean" in row else {}))
        bar.close()
        playoff = None
        if cfg.select_by_real and cfg.playoff_top > 0 and cfg.playoff_episodes > 0 and evaluator is not None:
            # each candidate is re-scored with the M it was trained in: every member's, when rotating
            by_tag = ({snapshot_mdn(out_dir, m): member_evaluator(k) for k, (m, _) in enumerate(members)} if rotate
                      else {mdn_tag or snapshot_mdn(out_dir, mdn): evaluator})
            playoff = _playoff(out_dir, by_tag, cfg, search_start, gen, progress)
    finally:
        bar.close()
        for ev in evaluators.values():
            ev.__exit__(None, None, None)
    prune_mdn_snapshots(out_dir)  # M copies that no kept controller needs any more
    plot_fitness(out_dir)
    rows = read_fitness(out_dir)
    return {"generations": gen, "best_dream_fitness": overall["fitness"], "best_generation": overall["generation"],
            "best_real_check": best_real["mean"], "best_real_generation": best_real["generation"],
            "last": rows[-1] if rows else {}, **({"playoff": playoff} if playoff else {}),
            "seconds": round(time.perf_counter() - t_start, 1)}


_PLAYOFF_SEED = 100  # playoff episodes use env seeds 100.., disjoint from the periodic checks' 0..eval_episodes-1


def _playoff(out_dir: Path, evaluators: dict[str, Any], cfg: CMAConfig, search_start: int, gen: int,
             progress: bool) -> dict[str, Any] | None:
    """Re-score the `playoff_top` checked controllers of this search (generations search_start+1..gen) with the best
    periodic checks on `playoff_episodes` fresh real episodes; best.safetensors becomes the one with the best playoff mean.
    `evaluators`: M snapshot name -> the evaluator that drives with that M; only controllers trained in one of them
    take part (the run's current M, or every member of a rotating ensemble).

    Why: a periodic check is a mean of a few episodes (4 in the presets; one controller's episodes spread by about
    250 points over 1000 steps), and the largest of 10-30 such noisy means is mostly the luckiest, not the best.
    Written to controller/playoff.json; a finished playoff for the same generations is not re-run on resume."""
    from tqdm.auto import tqdm

    from worlds.policies import controller_metadata, load_controller, save_controller

    done_p = out_dir / "playoff.json"
    if done_p.exists():
        old = load_json(done_p)
        if old.get("search_start") == search_start and old.get("generation") == gen:
            return old
    cands: list[tuple[float, int, dict[str, str], Path]] = []
    for f in (out_dir / "checks").glob("gen_*.safetensors"):
        g = int(f.stem[4:])
        meta = controller_metadata(f)
        if search_start < g <= gen and Path(meta.get("mdn", "")).name in evaluators:
            cands.append((float(meta["real_check"]), g, meta, f))
    seen: set[tuple[bytes, str]] = set()
    top: list[tuple[float, int, dict[str, str], np.ndarray]] = []
    for check, g, meta, f in sorted(cands, key=lambda c: (-c[0], c[1])):
        theta = load_controller(f)[0].numpy()
        key = (theta.tobytes(), Path(meta["mdn"]).name)  # the same weights read another M's h differently
        if key in seen:  # best_dream did not change between two checks: the same controller, checked twice
            continue
        seen.add(key)
        top.append((check, g, meta, theta))
        if len(top) == cfg.playoff_top:
            break
    if len(top) < 2:
        return None
    seeds = [_PLAYOFF_SEED + i for i in range(cfg.playoff_episodes)]
    rows = []
    for check, g, meta, theta in tqdm(top, desc="playoff of the best checks", unit="controller", disable=not progress, dynamic_ncols=True):
        tag = Path(meta["mdn"]).name
        rs = evaluators[tag].returns([theta] * len(seeds), seeds)
        rows.append({"generation": g, "real_check": check, "playoff_mean": float(np.mean(rs)), "playoff_std": float(np.std(rs)), "mdn": tag})
    i = max(range(len(rows)), key=lambda j: rows[j]["playoff_mean"])
    win, (_, _, meta, theta) = rows[i], top[i]
    save_controller(out_dir / "best.safetensors", theta, int(meta["z_dim"]), int(meta["hidden"]), generation=meta["generation"],
                    real_check=meta["real_check"], playoff=f"{win['playoff_mean']:.4f}", mdn=win["mdn"])
    res = {"search_start": search_start, "generation": gen, "seeds": seeds, "chosen_generation": win["generation"],
           "chosen_playoff_mean": win["playoff_mean"], "candidates": rows}
    save_json(done_p, res)
    with open(out_dir / "playoffs.jsonl", "a") as fh:  # every search's playoff (iterative training runs one per round)
        fh.write(json.dumps(res) + "\n")
    return res


def snapshot_mdn(out_dir: Path, mdn: Any) -> str:
    """Save M beside the controllers as `mdn_<hash of its weights>/` (once) and return that folder's name.

    Saved controllers name it in their metadata (`worlds.policies.controller_mdn`): C reads M's hidden state,
    so a controller kept from an earlier round of iterative training must keep running with the M it was trained in."""
    import hashlib

    h = hashlib.sha1()
    for k, v in sorted(mdn.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().float().cpu().numpy().tobytes())
    name = f"mdn_{h.hexdigest()[:12]}"
    if not (out_dir / name / "model.safetensors").exists():
        mdn.save_pretrained(out_dir / name)
    return name


def prune_mdn_snapshots(out_dir: Path) -> None:
    """Remove M snapshots no saved controller refers to."""

    from worlds.policies import controller_metadata

    # best, best_dream, round_k_best, checks/gen_* (cma_state names no M)
    files = [*out_dir.glob("*.safetensors"), *out_dir.glob("checks/*.safetensors")]
    used = {Path(controller_metadata(f).get("mdn", "")).name for f in files}
    for d in out_dir.glob("mdn_*"):
        if d.is_dir() and d.name not in used and not d.name.endswith(".tmp"):
            shutil.rmtree(d, ignore_errors=True)


def read_fitness(folder: Path) -> list[dict[str, Any]]:
    p = Path(folder) / "fitness.jsonl"
    return [json.loads(ln) for ln in p.read_text().splitlines() if ln.strip()] if p.exists() else []


def _truncate_jsonl(path: Path, generation: int) -> None:
    if path.exists():
        keep = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln)["generation"] <= generation]
        atomic_write_text(path, "".join(k + "\n" for k in keep))


def plot_fitness(folder: Path) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from dreamlab.images import save_figure

    rows = read_fitness(folder)
    if not rows:
        return None
    g = [r["generation"] for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(g, [r["best"] for r in rows], label="dream: best candidate", alpha=0.6)
    ax.plot(g, [r["mean"] for r in rows], label="dream: population mean", alpha=0.6)
    ax.plot(g, [r["mean_candidate"] for r in rows], label="dream: distribution mean", lw=1)
    if any("mean_candidate_val" in r for r in rows):
        ax.plot([r["generation"] for r in rows if "mean_candidate_val" in r], [r["mean_candidate_val"] for r in rows if "mean_candidate_val" in r],
                label="dream: distribution mean, fixed validation rollouts", lw=2)
    real = [(r["generation"], r["real_mean"], r.get("real_std", 0.0)) for r in rows if "real_mean" in r]
    if real:
        ax.errorbar([x[0] for x in real], [x[1] for x in real], yerr=[x[2] for x in real], fmt="o-", color="k", label="real env: best controller")
    starts = [b["generation"] - 1 for a, b in zip(rows, rows[1:]) if "search" in b and b["search"] != a.get("search")]
    for i, x in enumerate(starts):  # restart_every: where each fresh search began
        ax.axvline(x + 0.5, color="grey", ls=":", lw=1, label="fresh search" if i == 0 else None)
    ax.set_xlabel("generation")
    ax.set_ylabel("return")
    ax.set_title("C trained by CMA-ES: dream vs real fitness")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, Path(folder) / "fitness.png")
