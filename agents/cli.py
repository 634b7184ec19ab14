"""`dreamlab worldmodel ...` and `dreamlab agents ...`: the agent-side CLI groups.

`agents` is the top layer, so the world-model pipeline (which needs worlds, envs and agents together)
is driven from here. Each group module defines `register_cli(subparsers)` and imports only the stdlib
at module level.
"""
from __future__ import annotations

import argparse
import importlib

GROUPS = ("agents.worldmodel_cli", "agents.baselines_cli")


def register_cli(sub: argparse._SubParsersAction) -> None:
    for name in GROUPS:
        try:
            mod = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name == name:
                continue
            raise
        mod.register_cli(sub)
