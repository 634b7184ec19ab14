"""The stages of the World Models pipeline, each usable alone (`dreamlab worldmodel collect|train-vae|...`).

Each stage reads the run's `WorldModelConfig` (agents.wm_config), writes its part of the run folder (see
agents.pipeline) and records its result in RUN/summary.json.
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

from agents.wm_config import WorldModelConfig
from dreamlab.errors import DreamlabError
from dreamlab.io import load_json, save_json


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


def record_summary(run_dir: Path, stage: str, info: dict[str, Any]) -> None:
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
    from envs import register_all
    from worlds.collect import CollectConfig, collect

    cc = CollectConfig(out=str(out or run_dir / "rollouts"), episodes=episodes or cfg.episodes, max_steps=cfg.max_steps,
                       workers=cfg.workers, policy=policy or cfg.policy, env_id=cfg.env_id, seed=cfg.seed if seed is None else seed,
                       world_model=str(run_dir) if controller else "", controller=controller)
    res = collect(cc, resume=resume, progress=progress, env_setup=register_all)
    if record:
        record_summary(run_dir, "collect" if out is None else f"collect_{Path(out).name}", res)
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
    record_summary(run_dir, "train_vae", res)
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
        record_summary(run_dir, "encode", res)
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
    record_summary(run_dir, "train_mdn", res)
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
    record_summary(run_dir, "train_controller", res)
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
    record_summary(run_dir, "evaluate", short)
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
