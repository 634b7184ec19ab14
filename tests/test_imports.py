"""Every package imports from this repository (not from some installed copy), and layering holds."""
import ast
import importlib
import importlib.util
import re
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


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for f in (ROOT / pkg).rglob("*.py"):
            parts = f.relative_to(ROOT).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    return out


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The module of ours that `name` (a module, or a module.attribute) refers to, if any."""
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        if ".".join(parts[:i]) in modules:
            return ".".join(parts[:i])
    return None


def import_graph() -> dict[str, set[str]]:
    """Module -> modules of ours it imports: `import`/`from` statements anywhere in the file (inside functions too),
    `importlib.import_module("...")` calls and any string constant that names one of our modules (module lists
    such as plugin tables): a dependency by string is still a dependency."""
    modules = _modules()
    graph: dict[str, set[str]] = {}
    for name, f in modules.items():
        deps: set[str] = set()
        for node in ast.walk(ast.parse(f.read_text())):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Constant) and isinstance(node.value, str):
                s = node.value.split(":")[0]
                if s.split(".")[0] in PACKAGES and all(p.isidentifier() for p in s.split(".")):
                    targets = [s]
            for t in targets:
                r = _resolve(t, modules)
                if r is not None and r != name and not name.startswith(r + "."):  # a package's own __init__ is no edge
                    deps.add(r)
        graph[name] = deps
    return graph


def test_imports_go_one_way() -> None:
    bad = [f"{m} imports {d}" for m, deps in import_graph().items() for d in sorted(deps)
           if d.split(".")[0] not in ALLOWED[m.split(".")[0]]]
    assert not bad, bad


def test_no_import_cycles() -> None:
    graph = import_graph()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles: {cycles}"


def test_the_graph_sees_hidden_imports() -> None:
    """The checks above read function-level imports and strings; make sure they keep doing so."""
    graph = import_graph()
    assert "dreamlab.io" in graph["dreamlab.data"]
    assert graph, "no modules found"


def test_no_generic_top_level_packages() -> None:
    for generic in ("utils", "models", "data", "common", "lib"):
        assert not (ROOT / generic).exists(), f"generic top-level package {generic}/ is not allowed"


def test_makefile_names_only_files_that_exist() -> None:
    """`make bench` once pointed at a script that was never written; every path the Makefile runs must exist."""
    text = (ROOT / "Makefile").read_text()
    paths = set(re.findall(r"(?:bench|examples|tests)/[\w./-]+\.py", text))
    assert paths, "the Makefile names no scripts: update this test"
    assert [p for p in paths if not (ROOT / p).is_file()] == []


def test_bench_run_all_skips_fid_without_run_folders(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    spec = importlib.util.spec_from_file_location("run_all", ROOT / "bench" / "run_all.py")
    run_all = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(run_all)
    monkeypatch.setattr(run_all, "FID_RUNS", ["runs/does-not-exist"])
    out = tmp_path / "bench.md"
    assert run_all.main(["--only", "fid", "--out", str(out)]) == 0
    assert "fid: skipped, no run folder" in capsys.readouterr().out
    assert "does-not-exist" in out.read_text()
    with pytest.raises(SystemExit):
        run_all.main(["--only", "nope"])
