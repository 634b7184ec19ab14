"""`dreamlab` command line. Kept fast: torch and friends are imported inside the handlers.

The command groups of the other packages (`train`/`sample`/`eval` in generators, `env`, `worldmodel`, `agents`,
`multimodal`, ...) are plugins: entry points of the group "dreamlab.cli" in pyproject.toml, each a module that
defines `register_cli(subparsers)` and imports only the standard library at module level.
"""
from __future__ import annotations

import argparse
import os
import sys

from dreamlab.errors import DreamlabError
from dreamlab.runtime import cpu_defaults


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
    p = argparse.ArgumentParser(prog="dreamlab", description="World models, text-to-image and the models of "
                                "Generative Deep Learning (2nd ed.) behind one Generator interface.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    d = sub.add_parser("data", help="offline datasets")
    ds = d.add_subparsers(dest="sub", required=True, metavar="SUB")
    ds.add_parser("list", help="list registered datasets").set_defaults(func=_data_list)
    dp = ds.add_parser("prepare", help="decode and cache a dataset, printing its split shapes")
    dp.add_argument("name")
    dp.set_defaults(func=_data_prepare)

    for ep in _plugins():
        try:
            m = ep.load()
        except ModuleNotFoundError as err:
            if err.name and ep.value.startswith(err.name):
                continue  # that layer is not present in this install
            raise
        m.register_cli(sub)
    return p


def _plugins() -> list:
    """The command groups of every layer (`generators`, `envs`, `agents`, `multimodal`), declared as entry points of
    the group "dreamlab.cli" in pyproject.toml: this core package names no upper layer, so imports go one way."""
    from importlib.metadata import entry_points

    eps = list(entry_points(group="dreamlab.cli"))
    if not eps:
        raise DreamlabError("dreamlab is not installed, so its commands are unknown; install it with: make install "
                            "(or pip install -e .)")
    return eps


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never hang on a hub look-up: dreamlab is offline by design
    os.environ.setdefault("SDL_VIDEODRIVER", "dummy")
    cpu_defaults()  # passive OpenMP threads and kept heap memory: graceful on shared cores (dreamlab.runtime)
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except DreamlabError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        hint = ("; finished work and checkpoints are saved: run the same command with --resume to continue"
                if hasattr(args, "resume") else "")
        print(f"interrupted{hint}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
