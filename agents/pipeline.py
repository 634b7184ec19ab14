"""The whole World Models pipeline in one run folder: collect -> V -> encode -> M -> C (CMA-ES in the dream)
-> real-env evaluation, optionally iterated (collect with the current controller, retrain M and C).

    RUN/config.json        the pipeline settings (preset + overrides, by stage: agents.wm_config)
    RUN/rollouts/          episode files + manifest.json          (stage: collect)
    RUN/vae/               V's trainer run folder                 (stage: train-vae)
    RUN/latents/           (mu, logvar) series per episode        (stage: encode)
    RUN/mdn/               M's trainer run folder                 (stage: train-mdn)
    RUN/controller/        CMA-ES state, best.safetensors, fitness.jsonl/png   (stage: train-controller)
    RUN/rounds.json        the iterative rounds done so far        (stage: iterate, with rounds.count > 1)
    RUN/eval/              per-episode real-env scores, side-by-side video      (stage: evaluate)
    RUN/dream.mp4          the controller driving in the dream, decoded         (stage: dream-video)
    RUN/summary.json       timings and scores of every stage
    RUN/report.md          one page: scores beside the random policy's, stage times, pictures, videos (agents/report.py)
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from agents.cma_search import cma_state_info
from agents.iterate import iterate_rounds
from agents.report import not_a_world_model_run
from agents.stages import (
    record_summary,
    refresh_report,
    stage_collect,
    stage_dream_video,
    stage_encode,
    stage_evaluate,
    stage_train_controller,
    stage_train_mdn,
    stage_train_vae,
    stop_if_interrupted,
)
from agents.wm_config import WorldModelConfig, config_json, load_config
from dreamlab.errors import DreamlabError
from dreamlab.io import load_json, save_json


def _controller_done(run_dir: Path, cfg: WorldModelConfig) -> bool:
    """C's stage finished: its search state reached the generations asked for and the stage recorded its result (a
    kill after the last generation, in the playoff, left fitness.jsonl complete but best.safetensors unchosen)."""
    state = run_dir / "controller" / "cma_state.safetensors"
    summary = run_dir / "summary.json"
    if not state.exists() or not summary.exists() or "train_controller" not in load_json(summary):
        return False
    return int(cma_state_info(run_dir / "controller")["generation"]) >= cfg.search.generations


def run_pipeline(run_dir: Path, cfg: WorldModelConfig, *, preset: str | None, progress: bool = True,
                 resume: bool = False) -> dict[str, Any]:
    """All stages; with `resume`, stages already completed in RUN are skipped and an interrupted one continues."""
    run_dir = Path(run_dir)
    why = not_a_world_model_run(run_dir)  # another kind of run (or other files): say so, write nothing
    if why:
        raise DreamlabError(why)
    if (run_dir / "config.json").exists() and not resume:
        raise DreamlabError(f"{run_dir} already holds a world-model run; pass --resume to continue it, or choose "
                            "another --out")
    run_dir.mkdir(parents=True, exist_ok=True)
    if resume and (run_dir / "config.json").exists():
        cfg = load_config(run_dir)
    save_json(run_dir / "config.json", config_json(cfg, preset))
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
        timed("train_vae", stage_train_vae, run_dir, cfg, resume=(run_dir / "vae" / "checkpoint").exists(),
              progress=progress)
    timed("encode", stage_encode, run_dir, cfg, progress=progress)
    if not (run_dir / "mdn" / "model").exists():
        timed("train_mdn", stage_train_mdn, run_dir, cfg, resume=True, progress=progress)
    if not _controller_done(run_dir, cfg):
        timed("train_controller", stage_train_controller, run_dir, cfg,
              resume=(run_dir / "controller" / "cma_state.safetensors").exists(), progress=progress)
    if cfg.rounds.count > 1:
        timed("iterate", iterate_rounds, run_dir, cfg, progress=progress)
    timed("dream_video", stage_dream_video, run_dir, cfg)
    res = timed("evaluate", stage_evaluate, run_dir, cfg, progress=progress)
    out = {"seconds_total": round(time.perf_counter() - t0, 1), "stage_seconds": times,
           "controller": {k: res["controller"][k] for k in ("episodes", "mean", "std", "seeds")},
           "random": {k: res["random"][k] for k in ("episodes", "mean", "std", "seeds")} if "random" in res else None}
    record_summary(run_dir, "pipeline", out)
    refresh_report(run_dir)
    return out
