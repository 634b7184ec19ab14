"""Train C: CMA-ES (agents.cma_search) scored in the dream (batched) or in the real env (parallel workers), and the
selection of the controller to keep (agents.selection). This file is the short loop that joins them.

Each generation: the search asks for `popsize` candidates; they and the distribution mean are scored (`rollouts`
dreams each, every candidate on the same initial states); the search is told; the mean's score on `val_rollouts`
fixed dreams is offered to the selection, which keeps the best and, when due, checks it in the real env. Every
generation ends with one row in controller/fitness.jsonl (best/mean/worst candidate, the mean's dream fitness,
sigma, real checks) and a checkpoint of the search and the selection together (a resume continues exactly).
With `fitness="real"` the periodic checks score the generation's distribution mean (not the candidate with the best
few-episode real mean so far, which is mostly the luckiest).

Run folder (`RUN/controller/`): config.json, cma_state.safetensors (+ .json), fitness.jsonl, fitness.png, and the
controllers agents.selection describes (best.safetensors is the one later stages use).
"""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from agents.cma_search import Search, SearchConfig
from agents.evaluate import RealEvaluator
from agents.selection import SelectionConfig, Selector, prune_mdn_snapshots
from dreamlab.config import to_dict
from dreamlab.device import resolve_device
from dreamlab.errors import DreamlabError
from dreamlab.io import atomic_write_text, remove_stale_temps, save_json
from dreamlab.parallel import Backend
from worlds.dream import DreamConfig, load_dream
from worlds.policies import num_params

_VAL_SEED = 987_654_321  # dream validation rollouts: disjoint from the per-generation seeds (seed * 1_000_003 + gen)


def train_controller(run_dir: str | Path, search: SearchConfig, selection: SelectionConfig, dream: DreamConfig, *,
                     seed: int = 0, workers: int = 0, env_id: str = "CarRacing-v3", device: str = "auto",
                     resume: bool = False, progress: bool = True, out: str | Path | None = None,
                     reset_best: bool = False, restart: bool = False, backend: Backend | None = None
                     ) -> dict[str, Any]:
    """CMA-ES on C for `search.generations` generations (counted over every call on this folder) in the dream of the
    run's V and M; real episodes (checks, `fitness="real"`) run in `env_id` with `workers` processes (or Ray tasks,
    with a Ray `backend`). State and curves go to `out` (default RUN/controller).

    `resume` continues the saved search; with `restart` as well, it keeps the generation count, the curves and the
    kept controllers but starts a fresh search (mean 0, sigma0): for a new M (iterative training), whose landscape the
    old covariance no longer describes; `reset_best` forgets the old dream's fitness records."""
    from tqdm.auto import tqdm

    run_dir = Path(run_dir)
    out_dir = Path(out) if out else run_dir / "controller"
    # the state file itself (cma_state.json only repeats it for people, and is written after it: a kill between the
    # two, or a damaged state deleted as its error advised, left one without the other)
    has_state = (out_dir / "cma_state.safetensors").exists()
    if has_state and not resume:
        raise DreamlabError(f"{out_dir} already holds a CMA-ES state; pass --resume to continue it, or choose another "
                            "--out")
    if resume and not has_state:
        raise DreamlabError(f"--resume given but {out_dir / 'cma_state.safetensors'} does not exist; start without "
                            "--resume")
    _, mdn, sim = load_dream(run_dir, resolve_device(device), dream)
    n = num_params(mdn.config.z_dim, mdn.config.hidden)
    out_dir.mkdir(parents=True, exist_ok=True)
    for folder in (out_dir, out_dir / "checks"):  # what a kill in the middle of a write left behind
        remove_stale_temps(folder)
    save_json(out_dir / "config.json", {"search": to_dict(search), "selection": to_dict(selection),
                                        "dream": to_dict(dream), "seed": seed, "env_id": env_id,
                                        "world_model": str(run_dir), "num_params": n})
    if resume:
        cma, state = Search.resume(out_dir, n, search, seed, restart=restart)
        gen = int(state["generation"])
        _truncate_jsonl(out_dir / "fitness.jsonl", gen)
        for f in (out_dir / "checks").glob("gen_*.safetensors"):  # checks past the resumed generation are redone
            if int(f.stem[4:]) > gen:
                f.unlink()
    else:
        cma, state, gen = Search(n, search, seed), {}, 0
        for name in ("fitness.jsonl", "playoff.json", "playoffs.jsonl"):
            (out_dir / name).unlink(missing_ok=True)
        shutil.rmtree(out_dir / "checks", ignore_errors=True)
    real = search.fitness == "real" or selection.check_every > 0
    evaluator = RealEvaluator(run_dir, env_id, workers, dream.horizon, backend=backend) if real else None
    bar = tqdm(total=search.generations, initial=gen, desc=f"CMA-ES ({search.fitness})", unit="gen",
               disable=not progress, dynamic_ncols=True)
    t_start = time.perf_counter()
    playoff = None
    try:
        if evaluator is not None:
            evaluator.__enter__()
        keep = Selector(out_dir, selection, mdn, evaluator, state, reset_best)
        while gen < search.generations:
            t0 = time.perf_counter()
            if cma.begin_generation(gen):
                keep.new_search()
            index, search_start = cma.index(gen), cma.first_generation(gen)
            xs = cma.ask()
            cand = np.concatenate([xs, cma.mean[None]], 0)  # the distribution mean rides along, same rollouts
            if search.fitness == "dream":
                f = sim.fitness(torch.from_numpy(cand).float(), search.rollouts,
                                seed=seed * 1_000_003 + gen).cpu().numpy().astype(np.float64)
            else:
                seeds = [10_000_000 + seed * 100_000 + gen * search.rollouts + j for j in range(search.rollouts)]
                rs = evaluator.returns([c for c in cand for _ in seeds], seeds * len(cand))
                f = torch.tensor(rs, dtype=torch.float64).reshape(len(cand), search.rollouts).mean(-1).numpy()
            if not np.isfinite(f).all():
                raise DreamlabError(f"fitness became NaN/inf at generation {gen}; the world model in {run_dir} is "
                                    "broken: retrain M")
            cma.tell(xs, f[:-1])
            gen += 1
            row: dict[str, Any] = {"generation": gen, "best": float(f[:-1].max()), "mean": float(f[:-1].mean()),
                                   "worst": float(f[:-1].min()), "mean_candidate": float(f[-1]), "sigma": cma.sigma,
                                   "seconds": round(time.perf_counter() - t0, 3)}
            if search.restart_every:
                row["search"] = index
            if search.fitness == "dream":
                steps = len(cand) * search.rollouts * dream.horizon
                row["dream_steps_per_s"] = round(steps / max(time.perf_counter() - t0, 1e-9), 1)
            # best_dream: picked on a fixed dream validation set (the same initial states and M noise every
            # generation), so it is the best mean so far, not the one that drew the luckiest rollouts
            score = float(f[-1])
            if search.fitness == "dream" and search.val_rollouts > 0:
                score = float(sim.fitness(torch.from_numpy(cand[-1:]).float(), search.val_rollouts,
                                          seed=_VAL_SEED + seed)[0])
                row["mean_candidate_val"] = score
            keep.offer(gen, cand[-1], score)
            if keep.check_due(gen, search_start, search.restart_every, search.generations):
                row["real_mean"], row["real_std"] = keep.check(gen, cand[-1] if search.fitness == "real" else None)
            with open(out_dir / "fitness.jsonl", "a") as fh:
                fh.write(json.dumps(row) + "\n")
            cma.save(out_dir, {"generation": gen, **keep.state()})
            bar.update(1)
            bar.set_postfix(**({"search": index} if search.restart_every else {}), best=f"{row['best']:.1f}",
                            mean=f"{row['mean']:.1f}", sigma=f"{cma.sigma:.3f}",
                            **({"real": f"{row['real_mean']:.1f}"} if "real_mean" in row else {}))
        bar.close()
        playoff = keep.playoff(cma.start, gen, progress)
    finally:
        bar.close()
        if evaluator is not None:
            evaluator.__exit__(None, None, None)
    prune_mdn_snapshots(out_dir)  # M copies that no kept controller needs any more
    plot_fitness(out_dir)
    rows = read_fitness(out_dir)
    return {"generations": gen, "best_dream_fitness": keep.overall["fitness"],
            "best_generation": keep.overall["generation"], "best_real_check": keep.best_real["mean"],
            "best_real_generation": keep.best_real["generation"], "last": rows[-1] if rows else {},
            **({"playoff": playoff} if playoff else {}), "seconds": round(time.perf_counter() - t_start, 1)}


def read_fitness(folder: Path) -> list[dict[str, Any]]:
    """The rows of controller/fitness.jsonl; a last line cut off by a crash is left out (the resumed search writes
    that generation again), a damaged line before it is an error naming the file."""
    p = Path(folder) / "fitness.jsonl"
    if not p.exists():
        return []
    lines = [ln for ln in p.read_text(errors="replace").splitlines() if ln.strip()]
    rows = []
    for i, ln in enumerate(lines):
        try:
            row = json.loads(ln)
            if not isinstance(row, dict) or not isinstance(row.get("generation"), int):
                raise ValueError("no generation")
        except ValueError as e:
            if i == len(lines) - 1:
                break
            raise DreamlabError(f"{p} line {i + 1} is not a fitness row ({e}); delete the file's lines from there on "
                                "and resume: the search state has every generation") from e
        rows.append(row)
    return rows


def _truncate_jsonl(path: Path, generation: int) -> None:
    if path.exists():
        keep = [json.dumps(r) for r in read_fitness(path.parent) if r["generation"] <= generation]
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
        ax.plot(
            [r["generation"] for r in rows if "mean_candidate_val" in r],
            [r["mean_candidate_val"] for r in rows if "mean_candidate_val" in r],
            label="dream: distribution mean, fixed validation rollouts",
            lw=2,
        )
    real = [(r["generation"], r["real_mean"], r.get("real_std", 0.0)) for r in rows if "real_mean" in r]
    if real:
        ax.errorbar(
            [x[0] for x in real],
            [x[1] for x in real],
            yerr=[x[2] for x in real],
            fmt="o-",
            color="k",
            label="real env: best controller",
        )
    starts = [b["generation"] - 1 for a, b in zip(rows, rows[1:]) if "search" in b and b["search"] != a.get("search")]
    for i, x in enumerate(starts):  # restart_every: where each fresh search began
        ax.axvline(x + 0.5, color="grey", ls=":", lw=1, label="fresh search" if i == 0 else None)
    ax.set_xlabel("generation")
    ax.set_ylabel("return")
    ax.set_title("C trained by CMA-ES: dream vs real fitness")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, Path(folder) / "fitness.png")
