"""`dreamlab agents ppo ...`: the stable-baselines3 PPO baseline on the fast CarRacing (see agents/ppo.py)."""
from __future__ import annotations

import argparse
from pathlib import Path


def _ppo(args: argparse.Namespace) -> int:
    from agents.ppo import PPOConfig, train
    from dreamlab.config import dataclass_from_namespace

    cfg = dataclass_from_namespace(PPOConfig, args)
    out = Path(args.out or f"runs/ppo-{cfg.env.split('/')[-1]}-{cfg.timesteps}")
    res = train(cfg, out, progress=not args.no_progress)
    print(f"run folder: {out}")
    t = res["train"]
    print(f"trained {t['timesteps']} agent steps ({t['env_steps']} env steps) in {t['train_seconds']} s, "
          f"{t['train_episodes']} training episodes")
    if "eval" in res:
        e = res["eval"]
        print(f"eval ({'deterministic' if e['deterministic'] else 'stochastic'}): {e['mean']:.1f} +- {e['std']:.1f} "
              f"over {e['episodes']} episodes (env seeds {e['seed']}..{e['seed'] + e['episodes'] - 1})")
    return 0


def _ppo_eval(args: argparse.Namespace) -> int:
    from agents.ppo import evaluate, load_policy

    model, cfg = load_policy(args.run_dir, device=args.device)
    if args.max_steps is not None:
        cfg.eval_max_steps = args.max_steps
    cfg.video = not args.no_video
    cfg.eval_deterministic = not args.stochastic
    e = evaluate(model, cfg, Path(args.run_dir), args.episodes, args.seed, progress=not args.no_progress)
    print(f"eval ({'deterministic' if e['deterministic'] else 'stochastic'}): {e['mean']:.1f} +- {e['std']:.1f} "
          f"over {e['episodes']} episodes (env seeds {e['seed']}..{e['seed'] + e['episodes'] - 1})")
    return 0


def register_cli(sub: argparse._SubParsersAction) -> None:
    from agents.ppo import PPOConfig
    from dreamlab.config import add_dataclass_arguments

    a = sub.add_parser("agents", help="RL baselines (stable-baselines3) on the fast CarRacing")
    asub = a.add_subparsers(dest="sub", required=True, metavar="SUB")
    p = asub.add_parser("ppo", help="train PPO with rl-zoo's CarRacing recipe, then evaluate it",
                        description="PPO (stable-baselines3) with rl-zoo's CarRacing preprocessing: frame skip, "
                                    "grayscale 64x64, frame stack. Writes a run folder and eval/ scores.")
    add_dataclass_arguments(p, PPOConfig)
    p.add_argument("--out", help="run folder (default: runs/ppo-ENV-TIMESTEPS)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    p.set_defaults(func=_ppo)

    e = asub.add_parser("ppo-eval", help="evaluate a trained PPO run folder again")
    e.add_argument("run_dir")
    e.add_argument("--episodes", type=int, default=10)
    e.add_argument("--seed", type=int, default=1000, help="episode i is env seed SEED+i (default 1000)")
    e.add_argument("--max-steps", type=int, default=None, help="env steps per episode (default: the run's)")
    e.add_argument("--device", default="auto")
    e.add_argument("--stochastic", action="store_true",
                   help="sample actions as in training (gSDE noise redrawn every sde_sample_freq steps)")
    e.add_argument("--no-video", action="store_true")
    e.add_argument("--no-progress", action="store_true")
    e.set_defaults(func=_ppo_eval)
