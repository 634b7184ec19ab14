"""Train C with CMA-ES (the `cma` package), with fitness in the dream (batched) or in the real env (parallel).

Every generation the complete CMA-ES state is checkpointed without pickle: `controller/cma_state.safetensors`
(mean, C, B, D, the evolution paths pc and ps, sigma_vec, best x) + `controller/cma_state.json` (sigma,
counters, lazy-eigendecomposition bookkeeping, best f, numpy's global RNG state, which `cma` samples from).
`resume` rebuilds a `cma.CMAEvolutionStrategy` from the same options and writes that state back, so a
resumed run asks exactly the candidates an uninterrupted run would have asked (tested). Not restored:
cma's own logger files and its stop-criterion history (`es.fit.hist`), which only affect termination
tests such as tolfun, not the search.

Run folder (`RUN/controller/`): best_dream.safetensors (the best controller so far by dream fitness of the
distribution mean), best.safetensors (the one downstream stages use: best_dream, or with `select_by_real`
the dream-trained checkpoint whose periodic real-env check, `eval_episodes` episodes of `horizon` steps on
env seeds 0.., scored best; the search itself only ever sees dream fitness), fitness.jsonl (per generation: best/mean/worst candidate, mean-candidate dream fitness,
sigma, and real-env means when evaluated), fitness.png (dream vs real curves), config.json.
"""
from __future__ import annotations

import dataclasses
import json
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
    horizon: int = 1000              # dream steps (or real steps per episode)
    fitness: Literal["dream", "real"] = "dream"
    diagonal: bool = False           # CMA_diagonal: much cheaper updates at 867 dimensions
    eval_every: int = 10             # real-env evaluation of the best controller every N generations (0 = off)
    eval_episodes: int = 4
    select_by_real: bool = False     # keep, as best.safetensors, the checked controller with the best real check
    workers: int = 0                 # real-env worker processes (0 = all cores)
    env_id: str = "CarRacing-v3"
    seed: int = 0
    device: str = "auto"


# ----------------------------------------------------------------------------- CMA state (no pickle)


def _make_es(n: int, cfg: CMAConfig, x0: np.ndarray | None = None) -> Any:
    try:
        import cma
    except ImportError as e:
        raise DreamlabError("training the controller needs the cma package: pip install cma") from e
    opts = {"popsize": cfg.popsize, "seed": cfg.seed + 1, "verbose": -9, "CMA_diagonal": cfg.diagonal,
            "tolfun": 0, "tolx": 0, "tolfunhist": 0, "tolstagnation": int(1e9), "maxiter": int(1e9)}
    return cma.CMAEvolutionStrategy(np.zeros(n) if x0 is None else x0, cfg.sigma0, opts)


def save_cma_state(folder: Path, es: Any, extra: dict[str, Any]) -> None:
    sm, ad = es.sm, es.adapt_sigma
    arrays: dict[str, np.ndarray] = {"mean": es.mean, "pc": es.pc}
    if isinstance(getattr(es, "mean_old", None), np.ndarray):
        arrays["mean_old"] = es.mean_old
    for k in ("C", "B", "D"):
        v = getattr(sm, k, None)
        if isinstance(v, np.ndarray):
            arrays[f"sm.{k}"] = v
    if isinstance(getattr(ad, "ps", None), np.ndarray):
        arrays["ps"] = ad.ps
    scaling = getattr(es.sigma_vec, "scaling", None)
    if isinstance(scaling, np.ndarray):
        arrays["sigma_vec"] = scaling
    if es.best.x is not None:
        arrays["best_x"] = np.asarray(es.best.x)
    rng = np.random.get_state()
    meta = {
        "sigma": float(es.sigma), "countiter": int(es.countiter), "countevals": int(es.countevals),
        "sm": {k: int(getattr(sm, k)) for k in ("last_update", "count_tell", "count_eigen") if hasattr(sm, k)},
        "adapt_sigma": {k: (v if isinstance(v, (int, float, bool)) else None) for k, v in vars(ad).items()
                        if k in ("is_initialized", "_ps_updated_iteration", "delta")},
        "best_f": None if es.best.f is None else float(es.best.f), "best_evals": int(es.best.evals or 0),
        "numpy_rng": [rng[0], rng[1].tolist(), int(rng[2]), int(rng[3]), float(rng[4])],
        **extra,
    }
    save_tensors(folder / "cma_state.safetensors", {k: torch.from_numpy(np.ascontiguousarray(v, dtype=np.float64)) for k, v in arrays.items()})
    save_json(folder / "cma_state.json", meta)


def load_cma_state(folder: Path, n: int, cfg: CMAConfig) -> tuple[Any, dict[str, Any]]:
    meta = load_json(folder / "cma_state.json")
    t = {k: v.numpy().astype(np.float64) for k, v in load_tensors(folder / "cma_state.safetensors").items()}
    if t["mean"].shape != (n,):
        raise DreamlabError(f"{folder / 'cma_state.safetensors'} is for {t['mean'].shape[0]} parameters, this controller has {n}; "
                            "start a new run (another --out) or match the world model")
    es = _make_es(n, cfg, x0=t["mean"])
    # one throw-away iteration creates the attributes cma builds lazily (timer, mean_old, ...); everything
    # that shapes the search is overwritten below, and numpy's RNG is restored last
    xs = es.ask()
    es.tell(xs, [0.0] * len(xs))
    es.mean = t["mean"].copy()
    if "mean_old" in t:
        es.mean_old = t["mean_old"].copy()
    es.pc = t["pc"].copy()
    es.sigma = float(meta["sigma"])
    es.countiter, es.countevals = int(meta["countiter"]), int(meta["countevals"])
    for k in ("C", "B", "D"):
        if f"sm.{k}" in t:
            setattr(es.sm, k, t[f"sm.{k}"].copy())
    for k, v in meta["sm"].items():
        setattr(es.sm, k, v)
    if "ps" in t:
        es.adapt_sigma.ps = t["ps"].copy()
    for k, v in meta.get("adapt_sigma", {}).items():
        if v is not None:
            setattr(es.adapt_sigma, k, v)
    if "sigma_vec" in t and hasattr(es.sigma_vec, "scaling"):
        es.sigma_vec.scaling = t["sigma_vec"].copy()
    if "best_x" in t and meta.get("best_f") is not None:
        es.best.x, es.best.f, es.best.evals = t["best_x"].copy(), float(meta["best_f"]), int(meta["best_evals"])
    r = meta["numpy_rng"]
    np.random.set_state((r[0], np.array(r[1], dtype=np.uint32), r[2], r[3], r[4]))
    return es, meta


# ----------------------------------------------------------------------------- training


def train_controller(run_dir: str | Path, cfg: CMAConfig, *, resume: bool = False, progress: bool = True,
                     out: str | Path | None = None, reset_best: bool = False) -> dict[str, Any]:
    """CMA-ES on C for `cfg.generations` generations; state and curves go to `out` (default RUN/controller)."""
    from tqdm.auto import tqdm

    from dreamlab.device import resolve_device
    from worlds.dream import DreamConfig, load_dream
    from worlds.policies import num_params, save_controller

    run_dir = Path(run_dir)
    out_dir = Path(out) if out else run_dir / "controller"
    if cfg.popsize < 2 or cfg.rollouts < 1 or cfg.generations < 1 or cfg.sigma0 <= 0:
        raise DreamlabError(f"need popsize >= 2, rollouts >= 1, generations >= 1, sigma0 > 0 (got {cfg.popsize}, {cfg.rollouts}, "
                            f"{cfg.generations}, {cfg.sigma0})")
    has_state = (out_dir / "cma_state.json").exists()
    if has_state and not resume:
        raise DreamlabError(f"{out_dir} already holds a CMA-ES state; pass --resume to continue it, or choose another --out")
    if resume and not has_state:
        raise DreamlabError(f"--resume given but {out_dir / 'cma_state.json'} does not exist; start without --resume")
    dev = resolve_device(cfg.device)
    vae, mdn, sim = load_dream(run_dir, dev, DreamConfig(horizon=cfg.horizon, temperature=cfg.temperature))
    z_dim, hidden = mdn.config.z_dim, mdn.config.hidden
    n = num_params(z_dim, hidden)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_json(out_dir / "config.json", {"cma": dataclasses.asdict(cfg), "world_model": str(run_dir), "num_params": n})
    if resume:
        es, meta = load_cma_state(out_dir, n, cfg)
        best = {"fitness": meta.get("best_mean_fitness", -float("inf")), "generation": meta.get("best_generation", -1)}
        best_real = {"mean": meta.get("best_real_mean", -float("inf")), "generation": meta.get("best_real_generation", -1)}
        gen = int(meta["generation"])
        if reset_best:  # the world model changed (iterative training): old dream fitness is not comparable
            best = {"fitness": -float("inf"), "generation": -1}
        _truncate_jsonl(out_dir / "fitness.jsonl", gen)
    else:
        np.random.seed(cfg.seed)
        es = _make_es(n, cfg)
        best, gen = {"fitness": -float("inf"), "generation": -1}, 0
        best_real = {"mean": -float("inf"), "generation": -1}
        (out_dir / "fitness.jsonl").unlink(missing_ok=True)
    evaluator = None
    if cfg.fitness == "real" or cfg.eval_every > 0:
        from agents.evaluate import RealEvaluator

        evaluator = RealEvaluator(run_dir, cfg.env_id, cfg.workers, cfg.horizon)
    bar = tqdm(total=cfg.generations, initial=gen, desc=f"CMA-ES ({cfg.fitness})", unit="gen", disable=not progress, dynamic_ncols=True)
    t_start = time.perf_counter()
    try:
        if evaluator is not None:
            evaluator.__enter__()
        while gen < cfg.generations:
            t0 = time.perf_counter()
            xs = np.asarray(es.ask())
            cand = np.concatenate([xs, es.mean[None]], 0)  # the distribution mean rides along, same rollouts
            if cfg.fitness == "dream":
                f = sim.fitness(torch.from_numpy(cand).float(), cfg.rollouts, seed=cfg.seed * 1_000_003 + gen).cpu().numpy().astype(np.float64)
                dream_steps = len(cand) * cfg.rollouts * cfg.horizon
            else:
                seeds = [10_000_000 + cfg.seed * 100_000 + gen * cfg.rollouts + j for j in range(cfg.rollouts)]
                thetas = [c for c in cand for _ in seeds]
                rs = evaluator.returns(thetas, seeds * len(cand))
                f = np.asarray(rs, np.float64).reshape(len(cand), cfg.rollouts).mean(1)
                dream_steps = 0
            if not np.isfinite(f).all():
                raise DreamlabError(f"fitness became NaN/inf at generation {gen}; the world model in {run_dir} is broken: retrain M")
            es.tell(list(xs), list(-f[:-1]))  # cma minimises
            gen += 1
            row: dict[str, Any] = {"generation": gen, "best": float(f[:-1].max()), "mean": float(f[:-1].mean()),
                                   "worst": float(f[:-1].min()), "mean_candidate": float(f[-1]), "sigma": float(es.sigma),
                                   "seconds": round(time.perf_counter() - t0, 3)}
            if dream_steps:
                row["dream_steps_per_s"] = round(dream_steps / max(time.perf_counter() - t0, 1e-9), 1)
            if f[-1] > best["fitness"]:
                best = {"fitness": float(f[-1]), "generation": gen}
                save_controller(out_dir / "best_dream.safetensors", cand[-1], z_dim, hidden, generation=str(gen), fitness=f"{f[-1]:.4f}")
                if not cfg.select_by_real or best_real["generation"] < 0:
                    save_controller(out_dir / "best.safetensors", cand[-1], z_dim, hidden, generation=str(gen), fitness=f"{f[-1]:.4f}")
            if cfg.eval_every > 0 and (gen % cfg.eval_every == 0 or gen == cfg.generations) and evaluator is not None:
                from worlds.policies import load_controller

                theta = load_controller(out_dir / "best_dream.safetensors")[0].numpy()
                seeds = list(range(cfg.eval_episodes))
                rs = evaluator.returns([theta] * len(seeds), seeds)
                row["real_mean"], row["real_std"] = float(np.mean(rs)), float(np.std(rs))
                if cfg.select_by_real and row["real_mean"] > best_real["mean"]:
                    best_real = {"mean": row["real_mean"], "generation": gen}
                    save_controller(out_dir / "best.safetensors", theta, z_dim, hidden, generation=str(gen), real_check=f"{row['real_mean']:.4f}")
            with open(out_dir / "fitness.jsonl", "a") as fh:
                fh.write(json.dumps(row) + "\n")
            save_cma_state(out_dir, es, {"generation": gen, "best_mean_fitness": best["fitness"], "best_generation": best["generation"],
                                         "best_real_mean": best_real["mean"], "best_real_generation": best_real["generation"]})
            bar.update(1)
            bar.set_postfix(best=f"{row['best']:.1f}", mean=f"{row['mean']:.1f}", sigma=f"{es.sigma:.3f}",
                            **({"real": f"{row['real_mean']:.1f}"} if "real_mean" in row else {}))
    finally:
        bar.close()
        if evaluator is not None:
            evaluator.__exit__(None, None, None)
    plot_fitness(out_dir)
    rows = read_fitness(out_dir)
    return {"generations": gen, "best_dream_fitness": best["fitness"], "best_generation": best["generation"],
            "best_real_check": best_real["mean"], "best_real_generation": best_real["generation"],
            "last": rows[-1] if rows else {}, "seconds": round(time.perf_counter() - t_start, 1)}


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
    ax.plot(g, [r["mean_candidate"] for r in rows], label="dream: distribution mean", lw=2)
    real = [(r["generation"], r["real_mean"], r.get("real_std", 0.0)) for r in rows if "real_mean" in r]
    if real:
        ax.errorbar([x[0] for x in real], [x[1] for x in real], yerr=[x[2] for x in real], fmt="o-", color="k", label="real env: best controller")
    ax.set_xlabel("generation")
    ax.set_ylabel("return")
    ax.set_title("C trained by CMA-ES: dream vs real fitness")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, Path(folder) / "fitness.png")
