"""Every package imports from this repository (not from some installed copy), and layering holds."""
import ast
import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ["dreamlab", "generators", "worlds", "agents", "envs", "multimodal"]
# package -> packages it may import (imports go one way)
ALLOWED = {
    "dreamlab": {"dreamlab"},
    "generators": {"dreamlab", "generators"},
    "worlds": {"dreamlab", "generators", "worlds"},
    "envs": {"dreamlab", "generators", "worlds", "envs"},
    "agents": {"dreamlab", "generators", "worlds", "envs", "agents"},
    "multimodal": {"dreamlab", "generators", "multimodal"},
}


@pytest.mark.parametrize("name", PACKAGES)
def test_package_imports_from_repo(name: str) -> None:
    mod = importlib.import_module(name)
    assert Path(mod.__file__).resolve().parent == ROOT / name


@pytest.mark.parametrize("name", PACKAGES)
def test_imports_go_one_way(name: str) -> None:
    bad = []
    for f in (ROOT / name).rglob("*.py"):
        tree = ast.parse(f.read_text())
        # CLI modules are entry points: they may reach upper layers, but only lazily, inside handlers
        nodes = tree.body if f.name == "cli.py" else ast.walk(tree)
        for node in nodes:
            mods = []
            if isinstance(node, ast.Import):
                mods = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                mods = [node.module]
            for m in mods:
                top = m.split(".")[0]
                if top in ALLOWED and top not in ALLOWED[name]:
                    bad.append(f"{f.relative_to(ROOT)} imports {m}")
    assert not bad, bad


def test_no_generic_top_level_packages() -> None:
    for generic in ("utils", "models", "data", "common", "lib"):
        assert not (ROOT / generic).exists(), f"generic top-level package {generic}/ is not allowed"
