"""The selection: which dream-trained controller to keep.

The search itself only ever sees dream fitness. This part keeps, in RUN/controller/:

    best_dream.safetensors   the current search's best by dream fitness of the distribution mean on `val_rollouts`
                             fixed dream rollouts (the same initial states and M noise every generation)
    checks/gen_<N>.safetensors  every controller given a periodic real-env check (`check_episodes` episodes of
                             `dream.horizon` steps on env seeds 0..), every `check_every` generations of a search,
                             at the end of each search and at the end
    best.safetensors         what later stages use: best_dream, or with `by_real` the checked controller with the best
                             real check, or with `playoff_top` the winner of a playoff among the best-checked ones of
                             the last search, re-scored on `playoff_episodes` fresh episodes (env seeds 100..)
    playoff.json             the last search's playoff; playoffs.jsonl: every search's
    mdn_<hash>/              the M the saved controllers were trained in, named in their metadata: C reads M's hidden
                             state, so a controller kept from an earlier round of iterative training keeps its own M
"""
from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dreamlab.config import check_ranges
from dreamlab.io import load_json, save_json
from worlds.policies import controller_metadata, load_controller, save_controller

_PLAYOFF_SEED = 100  # playoff episodes use env seeds 100.., disjoint from the periodic checks' 0..check_episodes-1


@dataclass
class SelectionConfig:
    """Which dream-trained controller to keep (the `selection` stage of a world-model run)."""

    check_every: int = 25      # a real-env check of the search's best every N generations (0 = none)
    check_episodes: int = 8
    by_real: bool = False      # best.safetensors = the checked controller with the best real check (else the dream's)
    playoff_top: int = 0       # with by_real: at the end of a search, re-score the N checked controllers with the best
    playoff_episodes: int = 16  # checks on this many fresh real episodes and keep the best of those (0 = no playoff)

    def __post_init__(self) -> None:
        check_ranges(self, positive=("check_episodes",), nonneg=("check_every", "playoff_top", "playoff_episodes"))


class Selector:
    """The bookkeeping of `train_controller`: the best controllers so far, the real checks, the playoff.

    `evaluator` (an agents.evaluate.RealEvaluator driving with M, or None) runs the real episodes; `state` is the
    bookkeeping saved with the CMA-ES state (a resumed run continues it); `reset_best` forgets the dream fitness of a
    previous M (iterative training: scores in another dream are not comparable)."""

    def __init__(self, out_dir: Path, cfg: SelectionConfig, mdn: Any, evaluator: Any,
                 state: dict[str, Any] | None = None, reset_best: bool = False) -> None:
        self.out_dir, self.cfg, self.mdn, self.evaluator = out_dir, cfg, mdn, evaluator
        self.z_dim, self.hidden = mdn.config.z_dim, mdn.config.hidden
        s = state or {}
        self.best = {"fitness": s.get("best_mean_fitness", -float("inf")), "generation": s.get("best_generation", -1)}
        self.overall = {"fitness": s.get("overall_best_fitness", self.best["fitness"]),
                        "generation": s.get("overall_best_generation", self.best["generation"])}
        self.best_real = {
            "mean": s.get("best_real_mean", -float("inf")),
            "generation": s.get("best_real_generation", -1),
        }
        if reset_best:
            self.best = {"fitness": -float("inf"), "generation": -1}
            self.overall = dict(self.best)
        self.mdn_tag = ""  # M's snapshot in out_dir, written the first time a controller trained in this M is saved
        self.last_check: tuple[int, float, float] = (-1, 0.0, 0.0)  # (checked generation, mean, std)

    def state(self) -> dict[str, Any]:
        return {"best_mean_fitness": self.best["fitness"], "best_generation": self.best["generation"],
                "best_real_mean": self.best_real["mean"], "best_real_generation": self.best_real["generation"],
                "overall_best_fitness": self.overall["fitness"],
                "overall_best_generation": self.overall["generation"]}

    def _save(self, name: str, theta: np.ndarray, **meta: str) -> None:
        self.mdn_tag = self.mdn_tag or snapshot_mdn(self.out_dir, self.mdn)
        mdn = meta.pop("mdn", self.mdn_tag)
        save_controller(self.out_dir / name, theta, self.z_dim, self.hidden, mdn=mdn, **meta)

    def new_search(self) -> None:
        """A fresh search has its own best_dream and checks."""
        self.best = {"fitness": -float("inf"), "generation": -1}

    def offer(self, gen: int, theta: np.ndarray, score: float) -> None:
        """The distribution mean of generation `gen` and its validation dream score."""
        if score <= self.best["fitness"]:
            return
        self.best = {"fitness": score, "generation": gen}
        self._save("best_dream.safetensors", theta, generation=str(gen), fitness=f"{score:.4f}")
        if score > self.overall["fitness"]:  # the best of all searches
            self.overall = dict(self.best)
            if not self.cfg.by_real or self.best_real["generation"] < 0:
                self._save("best.safetensors", theta, generation=str(gen), fitness=f"{score:.4f}")

    def check_due(self, gen: int, search_start: int, restart_every: int, generations: int) -> bool:
        """A real check every `check_every` generations of a search, at the end of each search and at the end."""
        k = gen - search_start
        return self.cfg.check_every > 0 and self.evaluator is not None and (
            k % self.cfg.check_every == 0 or k == restart_every or gen == generations)

    def check(self, gen: int, theta: np.ndarray | None = None) -> tuple[float, float]:
        """Real-env check at generation `gen` of `theta`, or by default of the search's best_dream; the checked
        controller is kept in checks/ (a later playoff re-scores the best of them). Returns (mean, std)."""
        if theta is None:
            theta, checked = (
                load_controller(self.out_dir / "best_dream.safetensors")[0].numpy(),
                self.best["generation"],
            )
        else:
            checked = gen
        if self.last_check[0] != checked:  # the same controller on the same seeds scores the same: not re-run
            seeds = list(range(self.cfg.check_episodes))
            rs = self.evaluator.returns([theta] * len(seeds), seeds)
            self.last_check = (checked, float(np.mean(rs)), float(np.std(rs)))
        mean, std = self.last_check[1], self.last_check[2]
        self.mdn_tag = self.mdn_tag or snapshot_mdn(self.out_dir, self.mdn)
        self._save(f"checks/gen_{gen:05d}.safetensors", theta, generation=str(gen), real_check=f"{mean:.4f}",
                   mdn=f"../{self.mdn_tag}")
        if self.cfg.by_real and mean > self.best_real["mean"]:
            self.best_real = {"mean": mean, "generation": gen}
            self._save("best.safetensors", theta, generation=str(gen), real_check=f"{mean:.4f}")
        return mean, std

    def playoff(self, search_start: int, gen: int, progress: bool) -> dict[str, Any] | None:
        """The playoff of the search that ran generations search_start+1..gen, if the settings ask for one."""
        if not (self.cfg.by_real and self.cfg.playoff_top > 0 and self.cfg.playoff_episodes > 0
                and self.evaluator is not None):
            return None
        tag = self.mdn_tag or snapshot_mdn(self.out_dir, self.mdn)
        return playoff(self.out_dir, tag, self.evaluator, self.cfg, search_start, gen, progress)


def playoff(out_dir: Path, mdn_tag: str, evaluator: Any, cfg: SelectionConfig, search_start: int, gen: int,
            progress: bool) -> dict[str, Any] | None:
    """Re-score the `playoff_top` checked controllers of this search (generations search_start+1..gen, trained in the
    M `mdn_tag`) with the best periodic checks on `playoff_episodes` fresh real episodes; best.safetensors becomes the
    one with the best playoff mean.

    Why: a periodic check is a mean of a few episodes (4 in the presets; one controller's episodes spread by about
    250 points over 1000 steps), and the largest of 10-30 such noisy means is mostly the luckiest, not the best.
    Written to controller/playoff.json; a finished playoff for the same generations is not re-run on resume."""
    from tqdm.auto import tqdm

    done_p = out_dir / "playoff.json"
    if done_p.exists():
        old = load_json(done_p)
        if old.get("search_start") == search_start and old.get("generation") == gen:
            return old
    cands: list[tuple[float, int, dict[str, str], Path]] = []
    for f in (out_dir / "checks").glob("gen_*.safetensors"):
        g = int(f.stem[4:])
        meta = controller_metadata(f)
        if search_start < g <= gen and Path(meta.get("mdn", "")).name == mdn_tag:
            cands.append((float(meta["real_check"]), g, meta, f))
    seen: set[bytes] = set()
    top: list[tuple[float, int, dict[str, str], np.ndarray]] = []
    for check, g, meta, f in sorted(cands, key=lambda c: (-c[0], c[1])):
        theta = load_controller(f)[0].numpy()
        if theta.tobytes() in seen:  # best_dream did not change between two checks: the same controller, checked twice
            continue
        seen.add(theta.tobytes())
        top.append((check, g, meta, theta))
        if len(top) == cfg.playoff_top:
            break
    if len(top) < 2:
        return None
    seeds = [_PLAYOFF_SEED + i for i in range(cfg.playoff_episodes)]
    rows = []
    for check, g, _meta, theta in tqdm(top, desc="playoff of the best checks", unit="controller", disable=not progress,
                                       dynamic_ncols=True):
        rs = evaluator.returns([theta] * len(seeds), seeds)
        rows.append({"generation": g, "real_check": check, "playoff_mean": float(np.mean(rs)),
                     "playoff_std": float(np.std(rs)), "mdn": mdn_tag})
    i = max(range(len(rows)), key=lambda j: rows[j]["playoff_mean"])
    win, (_, _, meta, theta) = rows[i], top[i]
    save_controller(out_dir / "best.safetensors", theta, int(meta["z_dim"]), int(meta["hidden"]),
                    generation=meta["generation"], real_check=meta["real_check"],
                    playoff=f"{win['playoff_mean']:.4f}", mdn=win["mdn"])
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
    # best, best_dream, round_k_best, checks/gen_* (cma_state names no M)
    files = [*out_dir.glob("*.safetensors"), *out_dir.glob("checks/*.safetensors")]
    used = {Path(controller_metadata(f).get("mdn", "")).name for f in files}
    for d in out_dir.glob("mdn_*"):
        if d.is_dir() and d.name not in used and not d.name.endswith(".tmp"):
            shutil.rmtree(d, ignore_errors=True)
