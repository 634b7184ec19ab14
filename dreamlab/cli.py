"""`dreamlab` command line. Kept fast: torch and friends are imported inside the handlers.

Sub-command groups of the upper layers (worlds, envs, agents, multimodal) are plugged in by module
name from `PLUGINS`; each such module defines `register_cli(subparsers)` and imports only the
standard library at module level.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
from pathlib import Path

from dreamlab.errors import DreamlabError

PLUGINS = ("envs.cli", "agents.cli", "multimodal.cli")


def _generators_list(args: argparse.Namespace) -> int:
    from generators.base import get_model_class, list_models

    rows = []
    for name in list_models():
        cls = get_model_class(name)
        lp = getattr(cls, "log_prob_kind", None)
        rows.append((name, cls.kind, ",".join(sorted(cls.presets)) or "-", lp or "-", (cls.__doc__ or "").strip().splitlines()[0]))
    header = ("name", "kind", "presets", "log_prob", "description")
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(4)]
    for r in [header, *rows]:
        print("  ".join(f"{c:<{w}}" for c, w in zip(r[:4], widths)) + "  " + r[4])
    return 0


def _train(args: argparse.Namespace) -> int:
    from dreamlab.config import parse_set_args
    from generators.trainer import train_from_name

    overrides = parse_set_args(args.set)
    if args.device:
        overrides["device"] = args.device
    _, res, run_dir = train_from_name(args.name, preset=args.preset, overrides=overrides, out=args.out,
                                      resume=args.resume, progress=not args.no_progress)
    shown = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in res.items()}
    print(f"run folder: {run_dir}")
    print(" ".join(f"{k}={v}" for k, v in shown.items()))
    return 0 if res.get("status") == "finished" else 130


def _sample(args: argparse.Namespace) -> int:
    import torch

    from dreamlab.config import parse_set_args
    from dreamlab.images import save_grid
    from dreamlab.io import save_tensors
    from generators.base import Generator
    from generators.trainer import load_run

    if args.n < 1:
        raise DreamlabError(f"-n {args.n} must be at least 1")
    out = Path(args.out)
    if out.suffix not in (".png", ".safetensors"):
        raise DreamlabError(f"--out {out} must end in .png (an image grid) or .safetensors (raw samples)")
    model = load_run(args.run_dir, device=args.device or "auto")
    if not isinstance(model, Generator):
        raise DreamlabError(f"{args.run_dir} holds a {model.kind} ({model.name}); only generators can sample")
    cond = {k: _literal(v) for k, v in parse_set_args(args.cond).items()} or dict(type(model).example_condition)
    g = torch.Generator(device=model.device).manual_seed(args.seed)
    x = model.sample(args.n, generator=g, **cond)
    if out.suffix == ".safetensors":
        save_tensors(out, {"samples": x})
    elif x.ndim != 4 or x.shape[1] not in (1, 3):
        raise DreamlabError(f"{model.name} samples have shape {tuple(x.shape)}, not images; use --out FILE.safetensors")
    else:
        save_grid(x, out)
    print(f"wrote {args.n} samples to {out}")
    return 0


def _literal(v: str) -> object:
    for t in (int, float):
        try:
            return t(v)
        except ValueError:
            pass
    return v


def _eval(args: argparse.Namespace) -> int:
    from dreamlab.io import save_json
    from generators.trainer import load_run

    model = load_run(args.run_dir, device=args.device or "auto")
    res = model.evaluate(args.split, max_items=args.max_items or None)
    save_json(Path(args.run_dir) / f"eval_{args.split}.json", res)
    for k, v in res.items():
        print(f"{k}: {v:.6g}" if isinstance(v, float) else f"{k}: {v}")
    return 0


def _data_list(args: argparse.Namespace) -> int:
    from dreamlab.data import list_datasets

    for d in list_datasets():
        print(f"{d.name:<16} {d.description}  [source: {d.source}]")
    return 0


def _data_prepare(args: argparse.Namespace) -> int:
    from dreamlab.data import SPLITS, load_dataset

    for split in SPLITS:
        d = load_dataset(args.name, split)
        print(f"{args.name}/{split}: " + ", ".join(f"{k} {tuple(v.shape)}" for k, v in d.items()))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dreamlab", description="World models, text-to-image and every model of "
                                "Generative Deep Learning (2nd ed.) behind one Generator interface.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    g = sub.add_parser("generators", help="list registered models")
    gs = g.add_subparsers(dest="sub", required=True, metavar="SUB")
    gs.add_parser("list", help="list every registered model with its presets").set_defaults(func=_generators_list)

    t = sub.add_parser("train", help="train a registered model into a run folder")
    t.add_argument("name", help="a registered model name (see: dreamlab generators list)")
    t.add_argument("--preset", default="quick", help="quick (minutes on a CPU) or full (default: quick)")
    t.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a model or trainer setting (repeatable)")
    t.add_argument("--out", help="run folder (default: runs/NAME-PRESET)")
    t.add_argument("--resume", action="store_true", help="continue the checkpoint in --out exactly")
    t.add_argument("--device", help="auto (default), cpu or cuda")
    t.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    t.set_defaults(func=_train)

    s = sub.add_parser("sample", help="sample a trained generator into an image grid")
    s.add_argument("run_dir")
    s.add_argument("-n", type=int, default=64, help="number of samples (default 64)")
    s.add_argument("--out", default="samples.png", help="a .png grid (images) or .safetensors (any samples)")
    s.add_argument("--cond", action="append", metavar="KEY=VALUE", help="conditioning passed to sample(), e.g. --cond label=3")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--device")
    s.set_defaults(func=_sample)

    e = sub.add_parser("eval", help="evaluate a trained model on held-out data")
    e.add_argument("run_dir")
    e.add_argument("--split", default="test", choices=["val", "test"])
    e.add_argument("--max-items", type=int, default=0, help="evaluate on the first N items only (default: all)")
    e.add_argument("--device")
    e.set_defaults(func=_eval)

    d = sub.add_parser("data", help="offline datasets")
    ds = d.add_subparsers(dest="sub", required=True, metavar="SUB")
    ds.add_parser("list", help="list registered datasets").set_defaults(func=_data_list)
    dp = ds.add_parser("prepare", help="decode and cache a dataset, printing its split shapes")
    dp.add_argument("name")
    dp.set_defaults(func=_data_prepare)

    for mod in PLUGINS:
        try:
            m = importlib.import_module(mod)
        except ModuleNotFoundError as err:
            if err.name and mod.startswith(err.name):
                continue  # that layer is not present in this install
            raise
        m.register_cli(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never hang on a hub look-up: dreamlab is offline by design
    os.environ.setdefault("SDL_VIDEODRIVER", "dummy")
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except DreamlabError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        hint = "; finished work and checkpoints are saved: run the same command with --resume to continue" if hasattr(args, "resume") else ""
        print(f"interrupted{hint}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
