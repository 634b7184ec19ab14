"""The stages of the World Models pipeline, each usable alone (`dreamlab worldmodel collect|train-vae|...`).

Each stage reads its part of the run's `WorldModelConfig` (agents.wm_config), writes its part of the run folder
(see agents.pipeline) and records its result in RUN/summary.json.
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import torch

from agents.cmaes import train_controller
from agents.evaluate import evaluate_run
from agents.report import write_report
from agents.wm_config import WorldModelConfig
from dreamlab.device import seeded
from dreamlab.errors import DreamlabError
from dreamlab.images import save_video
from dreamlab.io import check_finite_weights, load_json, save_json
from envs import register_all
from generators.base import TrainConfig
from generators.trainer import load_run, train
from worlds.collect import collect
from worlds.dream import decode_frames, load_dream
from worlds.encode import encode_rollouts
from worlds.models import MDNRNN, MDNRNNConfig, WorldVAE, WorldVAEConfig
from worlds.policies import controller_mdn, load_controller


def set_threads(cfg: WorldModelConfig) -> None:
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)


def stop_if_interrupted(res: Any) -> Any:
    """A trainer stopped by Ctrl-C returns {"status": "interrupted"} after saving its checkpoint; the stages after it
    must not run on a half-trained V or M, so the pipeline stops too (the CLI exits 130; --resume continues)."""
    if isinstance(res, dict) and res.get("status") == "interrupted":
        raise KeyboardInterrupt
    return res


def record_summary(run_dir: Path, stage: str, info: dict[str, Any]) -> None:
    p = run_dir / "summary.json"
    s = load_json(p) if p.exists() else {}
    s[stage] = info
    save_json(p, s)


def _steps(total: int) -> tuple[int, int]:
    """log_every and ckpt_every of a V or M training of `total` steps."""
    return max(1, min(50, total // 10)), max(100, total // 10)


def stage_collect(run_dir: Path, cfg: WorldModelConfig, *, resume: bool = True, progress: bool = True,
                  episodes: int | None = None, policy: str | None = None, controller: str = "",
                  seed: int | None = None, record: bool = True) -> dict[str, Any]:
    """Collect into RUN/rollouts (`episodes` and `policy` override the collect stage's: iterative rounds add
    controller episodes); `record=False` keeps the result out of RUN/summary.json (the rounds record their own)."""
    over = {k: v for k, v in {"episodes": episodes, "policy": policy}.items() if v is not None}
    res = collect(
        dataclasses.replace(cfg.collect, **over),
        run_dir / "rollouts",
        seed=cfg.seed if seed is None else seed,
        workers=cfg.workers,
        world_model=str(run_dir) if controller else "",
        controller=controller,
        resume=resume,
        progress=progress,
        env_setup=register_all,
        backend=cfg.parallel(run_dir),
    )
    if record:
        record_summary(run_dir, "collect", res)
    return res


def stage_train_vae(run_dir: Path, cfg: WorldModelConfig, *, resume: bool = False, progress: bool = True
                    ) -> dict[str, Any]:
    set_threads(cfg)
    v = cfg.vae
    with seeded(cfg.seed):  # V's initial weights from the run's seed alone: a seeded run repeats on CPU
        model = WorldVAE(WorldVAEConfig(rollouts=str(run_dir / "rollouts"), z_dim=v.z_dim, width=v.width,
                                        eval_frames=2000 if v.steps < 10_000 else 20_000))
    log_every, ckpt_every = _steps(v.steps)
    tc = TrainConfig(steps=v.steps, batch_size=v.batch_size, lr=v.lr, device=cfg.device, seed=cfg.seed,
                     threads=cfg.threads, log_every=log_every, ckpt_every=ckpt_every)
    t0 = time.perf_counter()
    res = train(model, tc, run_dir / "vae", resume=resume, progress=progress)
    res["seconds"] = round(time.perf_counter() - t0, 1)
    record_summary(run_dir, "train_vae", res)
    return res


def stage_encode(run_dir: Path, cfg: WorldModelConfig, *, progress: bool = True, record: bool = True
                 ) -> dict[str, Any]:
    set_threads(cfg)
    weights = run_dir / "vae" / "model" / "model.safetensors"
    if not weights.is_file():
        raise DreamlabError(f"{run_dir / 'vae'} holds no trained V; train it first: dreamlab worldmodel train-vae "
                            f"{run_dir}" + (" --resume" if (run_dir / "vae" / "checkpoint").is_dir() else ""))
    vae = load_run(run_dir / "vae", device=cfg.device)
    check_finite_weights(vae, weights)  # a diverged V would encode every frame to NaN
    st = weights.stat()
    res = encode_rollouts(vae, run_dir / "rollouts", run_dir / "latents", progress=progress,
                          vae_id=f"{st.st_size}:{st.st_mtime_ns}")
    if record:
        record_summary(run_dir, "encode", res)
    return res


def mdn_model(run_dir: Path, cfg: WorldModelConfig) -> MDNRNN:
    """M as the run's settings describe it, its initial weights from the run's seed alone."""
    m = cfg.mdn
    with seeded(cfg.seed):
        return MDNRNN(MDNRNNConfig(latents=str(run_dir / "latents"), z_dim=cfg.vae.z_dim, hidden=m.hidden,
                                   mixtures=m.mixtures, seq_len=m.seq_len, temperature=cfg.dream.temperature))


def stage_train_mdn(run_dir: Path, cfg: WorldModelConfig, *, resume: bool = False, progress: bool = True
                    ) -> dict[str, Any]:
    """Train M in RUN/mdn (with `resume`, continue its checkpoint if it has one)."""
    set_threads(cfg)
    m = cfg.mdn
    log_every, ckpt_every = _steps(m.steps)
    tc = TrainConfig(steps=m.steps, batch_size=m.batch_size, lr=m.lr, device=cfg.device, seed=cfg.seed, grad_clip=1.0,
                     threads=cfg.threads, log_every=log_every, ckpt_every=ckpt_every)
    t0 = time.perf_counter()
    resume = resume and (run_dir / "mdn" / "checkpoint").exists()
    res = train(mdn_model(run_dir, cfg), tc, run_dir / "mdn", resume=resume, progress=progress)
    res["seconds"] = round(time.perf_counter() - t0, 1)
    record_summary(run_dir, "train_mdn", res)
    return res


def stage_train_controller(run_dir: Path, cfg: WorldModelConfig, *, resume: bool = False, progress: bool = True,
                           reset_best: bool = False, restart: bool = False) -> dict[str, Any]:
    set_threads(cfg)
    res = train_controller(run_dir, cfg.search, cfg.selection, cfg.dream, seed=cfg.seed, workers=cfg.workers,
                           env_id=cfg.collect.env_id, device=cfg.device, resume=resume, progress=progress,
                           reset_best=reset_best, restart=restart, backend=cfg.parallel(run_dir))
    record_summary(run_dir, "train_controller", res)
    return res


def stage_evaluate(run_dir: Path, cfg: WorldModelConfig, *, progress: bool = True) -> dict[str, Any]:
    e = cfg.evaluation
    t0 = time.perf_counter()
    res = evaluate_run(run_dir, episodes=e.episodes, seed=e.seed, workers=cfg.workers, env_id=e.env_id,
                       max_steps=e.max_steps, temperature=cfg.dream.temperature, progress=progress,
                       backend=cfg.parallel(run_dir))
    short = {k: {kk: v[kk] for kk in ("episodes", "mean", "std", "seeds")} if isinstance(v, dict) else v
             for k, v in res.items()}
    short["seconds"] = round(time.perf_counter() - t0, 1)
    record_summary(run_dir, "evaluate", short)
    return res


def stage_dream_video(run_dir: Path, cfg: WorldModelConfig, *, steps: int = 300, seed: int = 0,
                      out: Path | None = None) -> Path:
    """The kept controller (or a zero one) driving in the dream, decoded by V."""
    set_threads(cfg)
    ctrl = run_dir / "controller" / "best.safetensors"
    vae, _, sim = load_dream(run_dir, "cpu", dataclasses.replace(cfg.dream, horizon=steps),
                             mdn_dir=controller_mdn(ctrl) if ctrl.exists() else None)
    theta = load_controller(ctrl)[0] if ctrl.exists() else torch.zeros(sim.n_params)
    rec = sim.rollout(theta[None], 1, seed=seed, horizon=steps, record=True)
    frames = decode_frames(vae, rec["z"][:, 0]).numpy().repeat(4, 1).repeat(4, 2)
    return save_video(frames, out or run_dir / "dream.mp4", fps=30)


def refresh_report(run_dir: Path) -> Path | None:
    """Rewrite RUN/report.md; a failure here is reported, never allowed to fail the run that produced the results."""
    try:
        p = write_report(run_dir)
    except Exception as e:  # noqa: BLE001 - the report is a view of files already written
        print(f"warning: {Path(run_dir) / 'report.md'} not written ({type(e).__name__}: {e}); "
              f"retry with: dreamlab worldmodel report {run_dir}", flush=True)
        return None
    print(f"report: {p}", flush=True)
    return p
