"""The package's import graph: no cycle anywhere in edge_tl, calibrate and export, and fine-tuning's layers
point one way. Read from the source (an AST walk, imports inside functions included), nothing imported."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("edge_tl", "calibrate", "export")


def _modules() -> dict[str, Path]:
    modules = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def _owner(name: str, modules) -> str | None:
    """The project module an imported name lives in (``edge_tl.data.load_image`` -> ``edge_tl.data``)."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def import_graph() -> dict[str, set[str]]:
    """module -> the project modules it imports, at module level or inside functions."""
    modules = _modules()
    graph = {}
    for module, path in modules.items():
        package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
        imported = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                imported.update(_owner(alias.name, modules) for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package[:len(package) - node.level + 1] + ([base] if base else []))
                imported.update(_owner(f"{base}.{alias.name}", modules) for alias in node.names)
        graph[module] = imported - {None, module}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected component of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in sorted(graph[node]):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_cycle_finder_finds_a_planted_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_the_graph_sees_imports_inside_functions():
    graph = import_graph()
    assert "edge_tl.qat" in graph["edge_tl.quantize"]  # quantize imports qat only when QAT is asked for
    assert {"edge_tl.data", "edge_tl.errors"} <= graph["edge_tl.groups"]


def test_no_import_cycle_in_the_package():
    assert cycles(import_graph()) == []


BOTTOM = ("edge_tl.head", "edge_tl.operating_point", "edge_tl.out_of_fold")
ABOVE_BOTTOM = ("edge_tl.features", "edge_tl.checkpoint", "edge_tl.head_refit", "edge_tl.finetune_config",
                "edge_tl.finetune", "edge_tl.crossval")


@pytest.mark.parametrize("module", BOTTOM)
def test_the_head_math_imports_no_trunk_pass_and_no_fine_tuning(module):
    assert not import_graph()[module] & set(ABOVE_BOTTOM)


def test_fine_tuning_and_cross_validation_stand_side_by_side():
    graph = import_graph()
    assert "edge_tl.crossval" not in graph["edge_tl.finetune"]
    assert "edge_tl.finetune" not in graph["edge_tl.crossval"]
    for top in ("edge_tl.finetune", "edge_tl.crossval"):  # both use the layers below
        assert {"edge_tl.finetune_config", "edge_tl.features", "edge_tl.out_of_fold"} <= graph[top]
    below = {"edge_tl.features", "edge_tl.checkpoint", "edge_tl.finetune_config", *BOTTOM}
    for module in below:
        assert not graph[module] & {"edge_tl.finetune", "edge_tl.crossval"}, module


def test_qat_takes_its_pieces_from_below_quantize():
    graph = import_graph()
    assert "edge_tl.quantize" not in graph["edge_tl.qat"]
    assert {"edge_tl.quantize_config", "edge_tl.quantize_targets"} <= graph["edge_tl.qat"]
    assert not graph["edge_tl.quantize_targets"] & {"edge_tl.quantize", "edge_tl.qat"}
