"""The search: CMA-ES (the `cma` package) over the controller's parameters, with exact checkpoint and resume.

Every generation the complete CMA-ES state is checkpointed without pickle in one atomically written file,
`controller/cma_state.safetensors`: every numeric attribute of cma's strategy object and its parts (mean,
covariance and its eigendecomposition, evolution paths, the step-size adaptation's state, TPA's mean-shift
direction, fitness records, ...) as tensors and JSON metadata, with numpy's global RNG state (which `cma` samples
from); `controller/cma_state.json` repeats the bookkeeping (generation, sigma, best so far) for people. A resume
rebuilds a `cma.CMAEvolutionStrategy` from the same options and writes that state back, so a resumed run asks
exactly the candidates an uninterrupted run would have asked (tested at 12 and 320 dimensions: from 300 cma adapts
sigma by two-point adaptation, whose state a hand-picked list once missed). Not restored: cma's logger and options.

With `restart_every` = N a fresh search (mean 0, sigma0, its own seed) starts every N generations: the real checks
of a search peaked around its 10th generation and fell as it went on exploiting the dream (agents.selection then
chooses among the controllers of every search).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from dreamlab.config import check_ranges
from dreamlab.errors import DreamlabError
from dreamlab.io import load_json, load_tensors, save_json, save_tensors


@dataclass
class SearchConfig:
    """CMA-ES on C (the `search` stage of a world-model run)."""

    generations: int = 300
    popsize: int = 64
    rollouts: int = 16               # dream rollouts (or real episodes) per candidate and generation
    sigma0: float = 0.1
    restart_every: int = 0           # a fresh search every N generations (0 = one search)
    val_rollouts: int = 32           # fixed dream rollouts that score the distribution mean every generation, to pick
                                     # the search's best (0 = the generation's own, ever-changing rollouts)
    fitness: Literal["dream", "real"] = "dream"  # where candidates are scored: in M's dream, or the real env

    def __post_init__(self) -> None:
        check_ranges(self, positive=("generations", "rollouts", "val_rollouts"), nonneg=("restart_every",))
        if self.popsize < 2:
            raise DreamlabError(f"popsize={self.popsize} must be at least 2 (CMA-ES ranks the candidates of a "
                                "generation)")
        if not self.sigma0 > 0:
            raise DreamlabError(f"sigma0={self.sigma0} must be > 0")


def make_es(n: int, cfg: SearchConfig, seed: int, x0: np.ndarray | None = None, start: int = 0) -> Any:
    """A CMA-ES over n parameters starting at generation `start`; cma re-seeds numpy's global RNG from its `seed`
    option, so every fresh search gets its own (seed + 1 + start) instead of replaying the first search's samples."""
    try:
        import cma
    except ImportError as e:
        raise DreamlabError("training the controller needs the cma package: pip install cma") from e
    opts = {"popsize": cfg.popsize, "seed": seed + 1 + start, "verbose": -9, "CMA_diagonal": False,
            "tolfun": 0, "tolx": 0, "tolfunhist": 0, "tolstagnation": int(1e9), "maxiter": int(1e9)}
    return cma.CMAEvolutionStrategy(np.zeros(n) if x0 is None else x0, cfg.sigma0, opts)


class Search:
    """The CMA-ES search of one `train_controller` call: ask, tell, checkpoint; with `restart_every`, a fresh search
    every N generations counted from `start` (the generation this call's first search began at)."""

    def __init__(self, n: int, cfg: SearchConfig, seed: int, es: Any = None, start: int = 0) -> None:
        self.n, self.cfg, self.seed, self.start = n, cfg, seed, start
        self.es = es if es is not None else make_es(n, cfg, seed, start=start)

    @classmethod
    def resume(cls, folder: Path, n: int, cfg: SearchConfig, seed: int, *, restart: bool = False
               ) -> tuple[Search, dict[str, Any]]:
        """The saved search and its bookkeeping; with `restart`, a fresh search from the saved generation on (for a new
        M, whose landscape the old covariance no longer describes)."""
        if restart:
            meta = cma_state_info(folder)
            return cls(n, cfg, seed, start=int(meta["generation"])), meta
        es, meta = load_cma_state(folder, n, cfg, seed)
        return cls(n, cfg, seed, es, start=int(meta.get("search_start", 0))), meta

    def begin_generation(self, gen: int) -> bool:
        """Called before each generation: True when a fresh search starts here (also right after a resume at the
        boundary, where the saved state is the finished search's)."""
        every = self.cfg.restart_every
        if every and gen > self.start and (gen - self.start) % every == 0:
            self.es = make_es(self.n, self.cfg, self.seed, start=gen)
            return True
        return False

    def index(self, gen: int) -> int:
        """Which of this call's searches generation `gen` (0-based, about to run) belongs to: 0, 1, ..."""
        every = self.cfg.restart_every
        return (gen - self.start) // every if every else 0

    def first_generation(self, gen: int) -> int:
        """The generation count at which the search of generation `gen` began (0 without restarts)."""
        every = self.cfg.restart_every
        return self.start + self.index(gen) * every if every else 0

    def ask(self) -> np.ndarray:
        """The generation's candidates (popsize, n)."""
        return np.asarray(self.es.ask())

    @property
    def mean(self) -> np.ndarray:
        return self.es.mean

    @property
    def sigma(self) -> float:
        return float(self.es.sigma)

    def tell(self, xs: np.ndarray, fitness: np.ndarray) -> None:
        """Fitness per candidate, higher is better (cma minimises)."""
        self.es.tell(list(xs), list(-fitness))

    def save(self, folder: Path, extra: dict[str, Any]) -> None:
        save_cma_state(folder, self.es, {**extra, "search_start": self.start})


# ----------------------------------------------------------------------------- CMA state (no pickle)


# cma keeps its state in plain attributes of the strategy object and its parts (sampler, step-size adaptation,
# fitness and best-solution records, ...). Which of them matter changes with the dimension (two-point step-size
# adaptation, TPA, from 300 dimensions: every real controller) and the cma version, so the state is every numeric
# leaf reachable from the strategy object through cma's own classes, not a hand-picked list: a hand-picked list
# missed TPA's state and resumed a paper-size search on different samples.
_CMA_SKIP = {
    "logger",
    "timer",
    "opts",
    "inopts",
    "_stopdict",
    "callbackstop",
    "gp",
    "boundary_handler",
    "noise_handler",
    "sp",
    "sp0",
}  # sp/sp0: parameters derived from the options, rebuilt by the constructor


def _cma_leaves(
    obj: Any, prefix: str = "", seen: set[int] | None = None
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
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
    tensors = {
        k: torch.from_numpy(np.array(v, dtype=np.float64 if v.dtype.kind == "f" else np.int64, order="C"))
        for k, v in arrays.items()
    }
    save_tensors(
        folder / "cma_state.safetensors", tensors, metadata={"cma_state": json.dumps(meta, default=_json_float)}
    )
    readable = {k: plain[k] for k in ("sigma", "countiter", "countevals") if k in plain}
    save_json(
        folder / "cma_state.json", {**readable, **{k: v for k, v in meta.items() if k not in ("plain", "numpy_rng")}}
    )


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
        meta = None if header is None else json.loads(header)
    except Exception as e:  # noqa: BLE001 - a truncated or foreign file
        raise DreamlabError(f"{path} is not a readable CMA-ES state ({type(e).__name__}: {e}); {_FRESH}") from e
    if meta is not None and not (isinstance(meta, dict) and isinstance(meta.get("generation"), int)
                                 and meta["generation"] >= 0 and isinstance(meta.get("plain"), dict)
                                 and isinstance(meta.get("numpy_rng"), list) and len(meta["numpy_rng"]) == 5):
        raise DreamlabError(f"{path} holds no complete CMA-ES state (its metadata lacks generation, plain or "
                            f"numpy_rng); {_FRESH}")
    return meta


# what to do with a damaged state: the search starts again (train-controller without --resume once it is gone)
_FRESH = "delete it and start the search again without --resume, or train into another --out"


def cma_state_info(folder: str | Path) -> dict[str, Any]:
    """The bookkeeping of a saved search (generation, best so far, ...), read from the state file itself, which is
    written atomically, so it always matches the state a resume continues."""
    meta = _cma_header(Path(folder))
    if meta is None:
        return load_json(Path(folder) / "cma_state.json")
    return {k: v for k, v in meta.items() if k not in ("plain", "numpy_rng")}


def load_cma_state(folder: Path, n: int, cfg: SearchConfig, seed: int) -> tuple[Any, dict[str, Any]]:
    path = folder / "cma_state.safetensors"
    meta = _cma_header(folder)
    if meta is None:
        return _load_legacy_cma_state(folder, n, cfg, seed)
    t = {k: v.numpy() for k, v in load_tensors(path).items()}
    sigma = meta["plain"].get("sigma")
    if "mean" not in t or not np.isfinite(t["mean"]).all() or not all(np.isfinite(t[k]).all() for k in ("C", "sm.C")
                                                                       if k in t):
        raise DreamlabError(f"{path} has no finite mean and covariance (missing, NaN or inf); {_FRESH}")
    if not isinstance(sigma, (int, float)) or not 0 < sigma < float("inf"):
        raise DreamlabError(f"{path} holds sigma={sigma!r}, not a finite step size > 0; {_FRESH}")
    if meta.get("cma_version") != _cma_version():
        import warnings

        warnings.warn(
            f"{path} was written with cma {meta.get('cma_version')}, this is cma {_cma_version()}: the resumed "
            "search may not replay the uninterrupted one exactly",
            stacklevel=2,
        )
    es = _fresh_es(path, t["mean"], n, cfg, seed)
    shapes = {**dict.fromkeys(("C", "B", "sm.C", "sm.B"), (n, n)),
              **dict.fromkeys(("D", "pc", "sm.D", "mean_old"), (n,))}
    wrong = [k for k, s in shapes.items() if k in t and t[k].shape != s]
    if wrong:
        k = wrong[0]
        raise DreamlabError(f"{path} holds {k} of shape {t[k].shape}, expected {shapes[k]}; {_FRESH}")
    try:
        for k, v in t.items():
            if not k.endswith("]"):  # "key[i]": an element of a list of arrays, restored with its list below
                _set_path(es, k, v.copy())
        for k, v in meta["plain"].items():
            if isinstance(v, dict) and "arrays" in v:
                _set_path(es, k, [t[f"{k}[{i}]"].copy() for i in range(int(v["arrays"]))])
            else:
                _set_path(es, k, list(v["list"]) if isinstance(v, dict) else v)
        _set_numpy_rng(meta["numpy_rng"])
    except (KeyError, TypeError, ValueError, IndexError, AttributeError) as e:
        raise DreamlabError(f"{path} is an incomplete CMA-ES state ({type(e).__name__}: {e}); {_FRESH}") from e
    return es, {k: v for k, v in meta.items() if k not in ("plain", "numpy_rng")}


def _fresh_es(path: Path, mean: np.ndarray, n: int, cfg: SearchConfig, seed: int) -> Any:
    """A strategy of the saved one's size after one throw-away iteration, which creates the attributes cma builds
    lazily (mean_old, fit, ...); the caller then writes the saved state over it and restores numpy's RNG last."""
    if mean.shape != (n,):
        raise DreamlabError(f"{path} is for {tuple(mean.shape)} parameters, this controller has {n}; "
                            "start a new run (another --out) or match the world model")
    es = make_es(n, cfg, seed, x0=mean.astype(np.float64))
    xs = es.ask()
    es.tell(xs, [0.0] * len(xs))
    return es


def _set_numpy_rng(r: list[Any]) -> None:
    np.random.set_state((r[0], np.array(r[1], dtype=np.uint32), r[2], r[3], r[4]))


def _load_legacy_cma_state(folder: Path, n: int, cfg: SearchConfig, seed: int) -> tuple[Any, dict[str, Any]]:
    """A state written before 2026-12-01 (a hand-picked subset: mean, covariance, paths, sigma, RNG). It resumes,
    but a search of 300+ dimensions (TPA step-size adaptation) does not replay the uninterrupted one exactly."""
    import warnings

    path = folder / "cma_state.safetensors"
    meta = load_json(folder / "cma_state.json")
    t = {k: v.numpy().astype(np.float64) for k, v in load_tensors(path).items()}
    es = _fresh_es(path, t["mean"], n, cfg, seed)
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
