"""The package's shape, read from the source: stages import only library modules, never another
stage, and no module of the package imports itself back through a cycle."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tasks.artifacts import STAGES

pytestmark = pytest.mark.unit

TASKS = Path(__file__).resolve().parents[2] / "tasks"


def imports_of(source: str) -> set[str]:
    """Every `tasks.<module>` a source file imports, at any depth (function-level imports too)."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("tasks.")}
        elif isinstance(node, ast.ImportFrom) and node.module:
            if node.module == "tasks":
                found |= {a.name for a in node.names}
            elif node.module.startswith("tasks."):
                found.add(node.module.split(".")[1])
    return found


def import_graph(root: Path = TASKS) -> dict[str, set[str]]:
    modules = {p.stem: p for p in root.glob("*.py") if p.stem != "__init__"}
    return {name: imports_of(path.read_text(encoding="utf-8")) & set(modules) - {name} for name, path in modules.items()}


def stage_violations(graph: dict[str, set[str]], stages=STAGES) -> list[str]:
    return [f"stage {s} imports stage {t}" for s in stages if s in graph for t in sorted(graph[s] & set(stages))]


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every module that can reach itself, with one path that shows it."""
    found = []
    for start in sorted(graph):
        stack = [(start, [start])]
        seen = set()
        while stack:
            node, path = stack.pop()
            for nxt in sorted(graph.get(node, ())):
                if nxt == start:
                    found.append(path + [start])
                    stack.clear()
                    break
                if nxt not in seen:
                    seen.add(nxt)
                    stack.append((nxt, path + [nxt]))
    return found


def test_every_stage_is_a_module_of_the_package():
    graph = import_graph()
    assert set(STAGES) <= set(graph)


def test_no_stage_imports_another_stage():
    assert stage_violations(import_graph()) == []


def test_the_package_has_no_import_cycle():
    assert cycles(import_graph()) == []


def test_the_rules_catch_a_planted_stage_import_and_a_planted_cycle(tmp_path):
    """The checks above would fail on a violation: plant one of each in a copy of the package."""
    pkg = tmp_path / "tasks"
    pkg.mkdir()
    for p in TASKS.glob("*.py"):
        (pkg / p.name).write_text(p.read_text(encoding="utf-8"), encoding="utf-8")
    assert stage_violations(import_graph(pkg)) == [] and cycles(import_graph(pkg)) == []
    generate = pkg / "generate.py"
    generate.write_text(generate.read_text() + "\n\ndef late():\n    from tasks.preprocess import filter_records\n")
    storage = pkg / "storage.py"
    storage.write_text(storage.read_text() + "\nfrom tasks import artifacts  # noqa\n")
    graph = import_graph(pkg)
    assert stage_violations(graph) == ["stage generate imports stage preprocess"]
    found = cycles(graph)
    assert ["artifacts", "storage", "artifacts"] in found and ["storage", "artifacts", "storage"] in found


@pytest.mark.parametrize("stage", STAGES)
def test_each_stage_is_a_command_with_its_own_name(stage):
    """One stage = one module = one task id = one CLI: the module's STAGE is its own name."""
    import importlib

    module = importlib.import_module(f"tasks.{stage}")
    assert module.STAGE == stage and callable(module.main) and callable(module.run)
    assert (module.__doc__ or "").startswith(f"python -m tasks.{stage} ")
