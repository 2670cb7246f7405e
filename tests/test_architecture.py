"""The architecture's rules, enforced: a forbidden import or an oversized file fails here, as a line
budget would in CI. The graph is every import of every file of refine/ and critics/, lazy ones (inside
functions) included, read with ``ast``; docs/architecture.md describes the layers.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MAX_LINES = 500
MAX_TOP_LEVEL_FILES = 12
# The layers, by path prefix. "engine" is everything but the outer rings (demo, offline).
ENTRY_POINTS = ("refine/loop.py", "refine/runs.py", "refine/score.py")
VIEWS = ("refine/runs.py", "refine/score.py")


def source_files() -> list[Path]:
    return sorted(p for d in ("refine", "critics") for p in (ROOT / d).rglob("*.py"))


def rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def module_file(module: str) -> Path | None:
    """The file a dotted module name loads (``refine.objects`` -> refine/objects/__init__.py), if ours."""
    if module.split(".")[0] not in ("refine", "critics"):
        return None
    base = ROOT.joinpath(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def imports(path: Path) -> Iterator[str]:
    """Every module ``path`` imports, at any depth: ``from a.b import c`` yields ``a.b.c`` when that is a
    module of ours, else ``a.b``."""
    tree = ast.parse(path.read_text(), str(path))
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this file's package
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, base] if base else parts)
            for alias in node.names:
                full = f"{base}.{alias.name}"
                yield full if module_file(full) else base


def graph() -> dict[str, set[str]]:
    edges: dict[str, set[str]] = {}
    for path in source_files():
        targets = {module_file(m) for m in imports(path)}
        edges[rel(path)] = {rel(t) for t in targets if t is not None and t != path}
    return edges


def layer(file: str) -> str:
    if file in ENTRY_POINTS:
        return "views" if file in VIEWS else "entry"
    if file.startswith("critics/"):
        return "critics"
    parts = file.split("/")
    return parts[1] if len(parts) > 2 else parts[1].removesuffix(".py")


# (layer, the layers it must never import, why)
FORBIDDEN = [
    ("config", {"infra", "images", "objects", "stages", "metrics", "critics", "entry", "views", "demo", "offline"},
     "the config is a leaf: every part imports it, it imports none"),
    ("infra", {"images", "objects", "stages", "metrics", "critics", "entry", "views", "demo", "offline"},
     "infrastructure serves every part and depends on none"),
    ("objects", {"infra", "images", "stages", "metrics", "critics", "entry", "views", "demo", "offline"},
     "the object matcher is pure text"),
    ("critics", {"stages", "entry", "views", "demo", "offline"}, "critic backends never depend on the loop's stages"),
    ("stages", {"entry", "views", "demo", "offline"}, "stages never import the loop or the views"),
    ("metrics", {"stages", "entry", "views", "demo", "offline"}, "metrics are pure scores of recorded rows"),
    ("images", {"stages", "metrics", "critics", "entry", "views", "demo", "offline"}, "image sets are a leaf of data"),
    ("students", {"images", "objects", "stages", "metrics", "critics", "entry", "views", "demo", "offline"},
     "students are models: they know tensors and PIL images, not image sets, stages or the loop"),
    ("entry", {"demo", "offline"}, "the engine never imports the demo world or the offline fakes"),
    ("views", {"demo", "offline"}, "the engine never imports the demo world or the offline fakes"),
]


@pytest.mark.parametrize("source, banned, why", FORBIDDEN, ids=[f[0] for f in FORBIDDEN])
def test_layers_import_only_what_they_may(source, banned, why):
    bad = [f"{a} imports {b}" for a, targets in graph().items() if layer(a) == source
           for b in sorted(targets) if layer(b) in banned]
    assert not bad, f"{why}: " + "; ".join(bad)


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """A cycle in ``edges`` as the list of its nodes (first == last), or None (depth-first search)."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_cycles_between_files():
    cycle = find_cycle(graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_the_checks_can_fail():
    """A lazy import inside a function is an edge, and a cycle through it is found."""
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    probe = ROOT / "refine" / "infra" / "_architecture_probe.py"
    probe.write_text("def f():\n    from refine.stages.student import Student\n")
    try:
        assert "refine.stages.student" in set(imports(probe))
        assert layer(rel(probe)) == "infra" and layer("refine/stages/student.py") == "stages"
    finally:
        probe.unlink()


def test_importing_the_config_loads_no_torch_or_transformers():
    code = "import sys, refine.config; print(sorted({'torch', 'transformers'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]"


def test_no_source_file_is_over_the_line_budget():
    long = {rel(p): n for p in source_files() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"over {MAX_LINES} lines (split by what each part owns): {long}"


def test_the_top_level_holds_the_entry_points_and_few_files():
    files = sorted(p.name for p in (ROOT / "refine").glob("*.py"))
    assert {"loop.py", "runs.py", "score.py", "config.py"} <= set(files)
    assert len(files) <= MAX_TOP_LEVEL_FILES, files
