"""The house rules on imports: store imports neither flows nor workers, workers never import
flows, and no module imports itself back through others (lazy imports inside functions
count: a cycle hidden in a function is still a cycle)."""

from __future__ import annotations

import ast
from pathlib import Path

import networkx as nx
import pytest

ROOT = Path(__file__).resolve().parents[2]
LAYERS = ("flows", "workers", "store")


def modules() -> dict[str, Path]:
    out = {}
    for layer in LAYERS:
        for path in (ROOT / layer).rglob("*.py"):
            if "migrations" in path.parts:  # alembic loads these by path
                continue
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            out[name.removesuffix(".__init__")] = path
    return out


def import_graph() -> nx.DiGraph:
    """Module -> the product modules it imports, anywhere in its body."""
    mods = modules()
    graph = nx.DiGraph()
    graph.add_nodes_from(mods)
    for name, path in mods.items():
        for node in ast.walk(ast.parse(path.read_text())):
            targets: list[str] = []
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            for target in targets:
                if target in mods and target != name:
                    graph.add_edge(name, target)
    return graph


def test_layers_import_downwards_only() -> None:
    wrong = [
        (a, b)
        for a, b in import_graph().edges
        if (a.startswith("store") and not b.startswith("store"))
        or (a.startswith("workers") and b.startswith("flows"))
    ]
    assert wrong == []


def test_no_import_cycles() -> None:
    cycles = [sorted(c) for c in nx.strongly_connected_components(import_graph()) if len(c) > 1]
    assert cycles == []


def test_the_graph_holds_the_real_imports() -> None:
    """The graph is built from real imports: a known edge is there."""
    graph = import_graph()
    assert graph.has_edge("flows.cycle", "flows.cycle_steps")
    assert graph.has_edge("flows.recovery", "flows.cycle_steps")
    with pytest.raises(nx.NetworkXNoCycle):
        nx.find_cycle(graph)
