"""`dreamlab worldmodel ...`: World Models on CarRacing, end to end or stage by stage.

    dreamlab worldmodel run --preset quick --out runs/wm-quick      # everything (collect .. evaluate)
    dreamlab worldmodel collect RUN --episodes 200 --workers 8      # rollouts into RUN/rollouts
    dreamlab worldmodel train-vae RUN | encode RUN | train-mdn RUN | train-controller RUN
    dreamlab worldmodel evaluate RUN --episodes 100 --seed 0        # real CarRacing-v3 scores + video
    dreamlab worldmodel dream-video RUN                             # the controller driving in the dream
    dreamlab worldmodel iterate RUN --rounds 3                      # collect with C, retrain M and C
    dreamlab worldmodel collect RUN --backend ray --ray-address auto # episodes on a Ray cluster (docs/scale.md)
    dreamlab worldmodel report RUN                                  # RUN/report.md: scores, stages, pictures, one page

Stage commands read RUN/config.json (written by `run`, or created from --preset on first use); `--set stage.field=v`
overrides any pipeline setting (agents.wm_config). Only the standard library is imported at module level.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from dreamlab.config import finite_float  # standard library only, like this module

# agents.wm_config.PRESETS' keys, spelled out so that --help needs no torch import (a test keeps them equal)
PRESET_NAMES = ["quick", "medium", "paper", "tiny"]

def _cfg(
    args: argparse.Namespace, write: bool = True, flags: dict[str, Any] | None = None, create: bool = False
) -> Any:
    """The run's config (its config.json, else the preset) with --set applied, then a stage's own flags (`flags`:
    setting -> value, e.g. collect's --episodes as collect.episodes), which apply to this command only. A bad value
    fails here, before anything is written. --set changes are saved into an existing run's config.json; a new folder
    gets one only with `create` (collect, the first stage: a later stage pointed at a folder that does not exist fails
    with its own error and leaves nothing behind)."""
    from agents.report import not_a_world_model_run
    from agents.wm_config import apply_settings, config_json, load_config, make_config
    from dreamlab.config import parse_set_args
    from dreamlab.errors import DreamlabError
    from dreamlab.io import load_json, save_json

    run = Path(args.run)
    why = not_a_world_model_run(run)  # another kind of run, or a folder of other files: say what it is, write nothing
    if why:
        raise DreamlabError(why)
    over = {**parse_set_args(getattr(args, "set", None)), **_backend_flags(args)}
    exists = (run / "config.json").exists()
    cfg = apply_settings(load_config(run), over) if exists else make_config(args.preset, over)
    with_flags = apply_settings(cfg, flags or {})  # checked before anything is written
    if write and exists and over:
        save_json(run / "config.json", config_json(cfg, load_json(run / "config.json").get("preset")))
    elif write and not exists and (create or run.is_dir()):
        run.mkdir(parents=True, exist_ok=True)
        save_json(run / "config.json", config_json(cfg, args.preset))
    return with_flags


def _backend_flags(args: argparse.Namespace) -> dict[str, Any]:
    """--backend and --ray-address as the run's settings `backend` and `ray_address` (saved like --set: the run
    folder remembers where its episodes run); `--backend local` also clears a saved cluster address."""
    backend, address = getattr(args, "backend", None), getattr(args, "ray_address", None)
    if backend == "local" and address is None:
        address = ""
    return {k: v for k, v in {"backend": backend, "ray_address": address}.items() if v is not None}


def _print(d: Any) -> None:
    print(json.dumps(d, indent=2, default=str))


def _plan(cfg: Any, out: Path) -> str:
    """One line saying what the run will do (and a warning when the paper's sizes meet a CPU)."""
    from dreamlab.device import resolve_device

    dev = resolve_device(cfg.device)
    c, s = cfg.collect, cfg.search
    line = (f"plan: {c.episodes} episodes x {c.max_steps} steps of {c.env_id} ({c.policy}); V {cfg.vae.steps} steps; "
            f"M {cfg.mdn.steps} steps; C {s.generations} generations of {s.popsize}x{s.rollouts} dreams of "
            f"{cfg.dream.horizon} steps{f'; {cfg.rounds.count} rounds' if cfg.rounds.count > 1 else ''}; on "
            f"{dev.type}; into {out} (interrupt any time, continue with --resume)")
    if dev.type == "cpu" and cfg.vae.steps * cfg.vae.batch_size >= 1_000_000:
        line += ("\nwarning: these are paper-scale sizes and no CUDA device is present: expect days on a CPU "
                 "(on 2 cores --preset quick finishes in about 10 minutes, --preset medium in about 40)")
    return line


def _run(args: argparse.Namespace) -> int:
    from agents.pipeline import run_pipeline
    from agents.wm_config import apply_settings, config_json, load_config, make_config
    from dreamlab.config import parse_set_args
    from dreamlab.io import load_json, save_json

    out = Path(args.out or f"runs/worldmodel-{args.preset}")
    resuming = args.resume and (out / "config.json").exists()
    cfg = load_config(out) if resuming else make_config(args.preset, parse_set_args(args.set))
    if _backend_flags(args):
        cfg = apply_settings(cfg, _backend_flags(args))
        if resuming:  # the resumed pipeline reads the run's config.json: the new backend goes there first
            save_json(out / "config.json", config_json(cfg, load_json(out / "config.json").get("preset")))
    print(_plan(cfg, out), flush=True)
    res = run_pipeline(out, cfg, preset=args.preset, progress=not args.no_progress, resume=args.resume)
    print(f"run folder: {out}")
    c, r = res["controller"], res["random"]
    print(
        f"controller: {c['mean']:.1f} ± {c['std']:.1f} over {c['episodes']} real CarRacing episodes (env seeds "
        f"{c['seeds'][0]}..{c['seeds'][-1]})"
    )
    if r:
        print(f"random policy: {r['mean']:.1f} ± {r['std']:.1f} on the same seeds")
    print(f"total {res['seconds_total']} s; stages: {res['stage_seconds']}")
    return 0


def _collect(args: argparse.Namespace) -> int:
    from agents.stages import stage_collect
    from dreamlab.config import parse_set_args
    from worlds.collect import collected_settings

    flags = {k: v for k, v in {"collect.episodes": args.episodes, "collect.max_steps": args.max_steps,
                               "workers": args.workers, "collect.env_id": args.env_id, "seed": args.seed,
                               "collect.policy": args.policy}.items() if v is not None}
    run = Path(args.run)
    if args.resume and args.policy != "controller":
        # --resume continues the folder's collection with its recorded settings (episodes, max_steps, policy, seed,
        # env): the flags of the first command are not in config.json. A setting this command gives explicitly is
        # checked against the recorded one by the collector (an error naming both).
        given = set(flags) | set(parse_set_args(getattr(args, "set", None)))
        old = collected_settings(run / "rollouts")
        flags = {**{k: old[k.split(".")[-1]] for k in ("collect.episodes", "collect.max_steps", "collect.env_id",
                                                       "collect.policy", "seed")
                    if k.split(".")[-1] in old and k not in given}, **flags}
    cfg = _cfg(args, flags=flags, create=True)
    ctrl = ""
    if args.policy == "controller":
        ctrl = args.controller or str(run / "controller" / "best.safetensors")
    res = stage_collect(run, cfg, resume=args.resume, progress=not args.no_progress, policy=cfg.collect.policy,
                        controller=ctrl)
    _print(res)
    return 0


def _train_vae(args: argparse.Namespace) -> int:
    from agents.stages import stage_train_vae

    res = stage_train_vae(Path(args.run), _cfg(args), resume=args.resume, progress=not args.no_progress)
    _print(res)
    return 0 if res.get("status") == "finished" else 130


def _encode(args: argparse.Namespace) -> int:
    from agents.stages import stage_encode

    _print(stage_encode(Path(args.run), _cfg(args), progress=not args.no_progress))
    return 0


def _train_mdn(args: argparse.Namespace) -> int:
    from agents.stages import stage_train_mdn

    res = stage_train_mdn(Path(args.run), _cfg(args), resume=args.resume, progress=not args.no_progress)
    _print(res)
    return 0 if res.get("status") == "finished" else 130


def _train_controller(args: argparse.Namespace) -> int:
    from agents.stages import stage_train_controller

    flags = {k: v for k, v in {"search.fitness": args.fitness, "search.generations": args.generations,
                               "search.popsize": args.popsize, "search.rollouts": args.rollouts,
                               "search.sigma0": args.sigma0, "dream.temperature": args.temperature,
                               "selection.check_every": args.eval_every,
                               "search.restart_every": args.restart_every}.items() if v is not None}
    cfg = _cfg(args, flags=flags)
    _print(stage_train_controller(Path(args.run), cfg, resume=args.resume, progress=not args.no_progress))
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from agents.evaluate import evaluate_run

    cfg = _cfg(args, write=False)
    res = evaluate_run(args.run, episodes=args.episodes, seed=args.seed,
                       workers=args.workers if args.workers is not None else cfg.workers, controller=args.controller,
                       env_id=args.env_id or "CarRacing-v3", max_steps=args.max_steps, baseline=not args.no_baseline,
                       video=not args.no_video, temperature=cfg.dream.temperature, progress=not args.no_progress,
                       baseline_cache=not args.fresh_baseline, backend=cfg.parallel(args.run))
    for k in ("controller", "random"):
        if k in res:
            r = res[k]
            print(
                f"{k}: {r['mean']:.1f} ± {r['std']:.1f} over {r['episodes']} episodes "
                f"(env seeds {r['seeds'][0]}..{r['seeds'][-1]})"
            )
    if "video" in res:
        print(f"video: {res['video']}")
    print("scores: " + ", ".join(res.get("files", [])))
    from agents.stages import refresh_report

    refresh_report(Path(args.run))
    return 0


def _report(args: argparse.Namespace) -> int:
    from agents.report import write_report

    print(f"wrote {write_report(args.run)}")
    return 0


def _dream_video(args: argparse.Namespace) -> int:
    from agents.stages import stage_dream_video

    p = stage_dream_video(
        Path(args.run),
        _cfg(args, write=False),
        steps=args.steps,
        seed=args.seed,
        out=Path(args.out) if args.out else None,
    )
    print(f"wrote {p}")
    return 0


def _iterate(args: argparse.Namespace) -> int:
    from agents.iterate import iterate_rounds

    cfg = _cfg(args, flags={"rounds.count": args.rounds})
    _print(iterate_rounds(Path(args.run), cfg, progress=not args.no_progress))
    return 0


def register_cli(sub: argparse._SubParsersAction) -> None:
    w = sub.add_parser("worldmodel", help="World Models on CarRacing: collect, V, M, C in the dream, evaluate")
    ws = w.add_subparsers(dest="sub", required=True, metavar="STAGE")

    def common(p: argparse.ArgumentParser, resume: bool = True, run: bool = True) -> None:
        if run:
            p.add_argument("run", help="the world-model run folder")
        p.add_argument(
            "--preset",
            default="quick",
            choices=PRESET_NAMES,
            help="settings for a new run folder (default: quick; medium: about 40 min on 2 cores)",
        )
        p.add_argument(
            "--set",
            action="append",
            metavar="KEY=VALUE",
            help="override a pipeline setting (repeatable), e.g. --set collect.episodes=100 (stages: collect, vae, "
            "mdn, dream, search, selection, evaluation, rounds)",
        )
        p.add_argument("--no-progress", action="store_true", help="hide progress bars")
        if resume:
            p.add_argument("--resume", action="store_true", help="continue an interrupted stage")

    def backend(p: argparse.ArgumentParser) -> None:
        p.add_argument("--backend", choices=["local", "ray"],
                       help="where episodes run: local worker processes (default) or Ray (pip install "
                            "'dreamlab[scale]'); saved in RUN/config.json")
        p.add_argument("--ray-address", metavar="ADDR",
                       help="with --backend ray: empty = an embedded instance (temp dir RUN/ray, no dashboard), "
                            "'auto' = the cluster this machine joined with `ray start`, or HOST:PORT")

    p = ws.add_parser(
        "run", help="every stage in one command (collect, train-vae, encode, train-mdn, train-controller, evaluate)"
    )
    common(p, run=False)
    p.add_argument("--out", help="run folder (default: runs/worldmodel-PRESET)")
    backend(p)
    p.set_defaults(func=_run)

    p = ws.add_parser("collect", help="collect rollouts with N worker processes into RUN/rollouts")
    common(p)
    p.add_argument("--episodes", type=int, help="total episodes wanted (resume continues up to it)")
    p.add_argument("--max-steps", type=int, help="steps per episode (default from the preset)")
    p.add_argument("--workers", type=int, help="worker processes (0 = all cores); with --backend ray: episodes at "
                   "once (0 = every CPU of the cluster)")
    p.add_argument(
        "--policy", default=None, choices=["brownian", "random_controller", "mixed", "pursuit", "explore", "controller"]
    )
    p.add_argument(
        "--controller", help="controller .safetensors for --policy controller (default RUN/controller/best.safetensors)"
    )
    p.add_argument("--env-id", help="gymnasium env id (default CarRacing-v3; e.g. dreamlab/CarRacing-v3)")
    p.add_argument("--seed", type=int)
    backend(p)
    p.set_defaults(func=_collect)

    for name, fn, hlp in (("train-vae", _train_vae, "train V (ConvVAE) on RUN/rollouts with a streaming loader"),
                          ("encode", _encode, "encode every episode to (mu, logvar) in RUN/latents"),
                          ("train-mdn", _train_mdn, "train M (MDN-RNN) on RUN/latents")):
        p = ws.add_parser(name, help=hlp)
        common(p, resume=name != "encode")
        p.set_defaults(func=fn)

    p = ws.add_parser("train-controller", help="train C with CMA-ES in the dream (or the real env)")
    common(p)
    p.add_argument(
        "--fitness",
        choices=["dream", "real"],
        help="where CMA-ES scores candidates: in M's dream (default) or in the real env (the run's env_id, "
        "parallel workers; affordable with dreamlab/CarRacing64-v3: about 45 s per generation of 32 x 2 "
        "episodes on 2 cores)",
    )
    p.add_argument("--generations", type=int)
    p.add_argument("--popsize", type=int)
    p.add_argument("--rollouts", type=int)
    p.add_argument("--sigma0", type=finite_float("--sigma0", above=0))
    p.add_argument("--temperature", type=finite_float("--temperature", above=0))
    p.add_argument("--eval-every", type=int, help="real-env check of the search's best every N generations")
    p.add_argument(
        "--restart-every",
        type=int,
        help="a fresh search every N generations; the checks and the playoff choose among them",
    )
    backend(p)
    p.set_defaults(func=_train_controller)

    p = ws.add_parser(
        "evaluate", help="score the controller in the real CarRacing-v3 (per-episode file, mean ± std, video)"
    )
    common(p, resume=False)
    p.add_argument("--episodes", type=int, default=100)
    p.add_argument("--seed", type=int, default=0, help="episode i uses env seed SEED + i")
    p.add_argument("--workers", type=int)
    p.add_argument("--controller", help="controller file (default RUN/controller/best.safetensors)")
    p.add_argument("--env-id", help="default CarRacing-v3 (gymnasium's)")
    p.add_argument("--max-steps", type=int, default=1000, help="steps per episode (default 1000, CarRacing-v3's limit)")
    p.add_argument("--no-baseline", action="store_true", help="skip the random-policy baseline")
    p.add_argument(
        "--fresh-baseline",
        action="store_true",
        help="re-run every random-policy episode instead of reading those measured earlier from "
        "$DREAMLAB_CACHE/random_baseline.json",
    )
    p.add_argument("--no-video", action="store_true")
    backend(p)
    p.set_defaults(func=_evaluate)

    p = ws.add_parser("dream-video", help="decode the controller's drive in the dream into a video")
    common(p, resume=False)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="video path (.mp4 or .gif; default RUN/dream.mp4)")
    p.set_defaults(func=_dream_video)

    p = ws.add_parser(
        "report", help="(re)write RUN/report.md: scores, stage times and figures, pictures and videos on one page"
    )
    p.add_argument("run", help="the world-model run folder")
    p.set_defaults(func=_report)

    p = ws.add_parser("iterate", help="iterative training: collect with C, retrain M and C, for N rounds")
    common(p, resume=False)
    p.add_argument("--rounds", type=int, default=2)
    backend(p)
    p.set_defaults(func=_iterate)
