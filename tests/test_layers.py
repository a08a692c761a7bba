"""The import direction between konstruct's packages: agent and channels never import each other, and no
two packages import each other, however indirectly (function-level imports included)."""

from __future__ import annotations

import ast
import tomllib
from collections import defaultdict
from pathlib import Path

import konstruct

ROOT = Path(konstruct.__file__).parent


def package_of(module: str) -> str:
    """konstruct.agent.tools.web → agent; konstruct.inbox → inbox."""
    return module.split(".")[1]


def imports() -> dict[tuple[str, str], list[str]]:
    """(importing package, imported package) → the modules that import it that way."""
    edges: dict[tuple[str, str], list[str]] = defaultdict(list)
    for path in sorted(ROOT.rglob("*.py")):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        module = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        if module == "konstruct":
            continue
        source = package_of(module)
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                # `from konstruct import audit` imports konstruct.audit
                names = [f"{node.module}.{a.name}" for a in node.names] if node.module == "konstruct" else [node.module]
            else:
                continue
            for name in names:
                if name.startswith("konstruct.") and package_of(name) != source:
                    edges[(source, package_of(name))].append(module)
    return edges


def cycles(edges: dict[tuple[str, str], list[str]]) -> list[list[str]]:
    """Every elementary cycle's packages (found by depth-first search from each package)."""
    graph: dict[str, set[str]] = defaultdict(set)
    for a, b in edges:
        graph[a].add(b)
    found: set[tuple[str, ...]] = set()

    def walk(start: str, node: str, path: list[str]) -> None:
        for nxt in sorted(graph[node]):
            if nxt == start:
                i = path.index(min(path))
                found.add(tuple(path[i:] + path[:i]))
            elif nxt not in path and nxt > start:
                walk(start, nxt, [*path, nxt])

    for package in sorted(graph):
        walk(package, package, [package])
    return [list(c) for c in sorted(found)]


def test_the_import_graph_is_read_from_the_source() -> None:
    edges = imports()
    assert ("worker", "agent") in edges and "konstruct.worker.runtime" in edges[("worker", "agent")]
    assert ("cli", "db") in edges
    assert cycles({("a", "b"): [], ("b", "c"): [], ("c", "a"): [], ("c", "d"): []}) == [["a", "b", "c"]]


def test_agent_and_channels_do_not_import_each_other() -> None:
    edges = imports()
    assert edges.get(("agent", "channels"), []) == [], "konstruct.agent imports a channel: put it behind the Channel protocol"
    assert edges.get(("channels", "agent"), []) == [], "a channel imports konstruct.agent"


def test_no_cycle_between_packages() -> None:
    edges = imports()
    found = cycles(edges)
    detail = [
        " → ".join([*c, c[0]])
        + ": "
        + "; ".join(f"{a}→{b} in {sorted(set(edges[(a, b)]))}" for a, b in zip(c, [*c[1:], c[0]], strict=True))
        for c in found
    ]
    assert found == [], "package cycles:\n" + "\n".join(detail)


def test_every_package_is_shipped() -> None:
    """pyproject lists the packages (the migrations keep their top-level folder, mapped to konstruct.migrations,
    which setuptools' finder cannot combine with a mapping): a package missing from the list fails here."""
    project = tomllib.loads((ROOT.parent / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(project["packages"])
    on_disk = {".".join(p.relative_to(ROOT.parent).parts[:-1]) for p in ROOT.rglob("__init__.py")}
    migrations = ROOT.parent / project["package-dir"]["konstruct.migrations"]
    on_disk |= {".".join(("konstruct", "migrations", *p.relative_to(migrations).parts[:-1])) for p in migrations.rglob("__init__.py")}
    assert on_disk == listed, f"missing from pyproject: {sorted(on_disk - listed)}; listed but gone: {sorted(listed - on_disk)}"


def test_channels_do_not_import_each_other() -> None:
    """What two channels share (the splitter, connections, the registry) lives in konstruct.channels itself."""
    crossing = []
    for name in ("slack", "whatsapp"):
        for path in sorted((ROOT / "channels" / name).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.ImportFrom) and node.module:
                    other = {"slack": "whatsapp", "whatsapp": "slack"}[name]
                    if node.module.startswith(f"konstruct.channels.{other}"):
                        crossing.append(f"{path.relative_to(ROOT)} imports {node.module}")
    assert crossing == []
