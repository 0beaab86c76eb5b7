"""The package's shape, read from the source: the stages and tools sit at the top of `tasks/`, the
library in subpackages that import one way (each only those listed before it in LAYERS), no stage
imports another stage, no library module imports a stage or a tool, and nothing imports itself back
through a cycle."""

from __future__ import annotations

import ast
import shutil
from pathlib import Path

import pytest

from tasks.pipeline.artifacts import STAGES

pytestmark = pytest.mark.unit

TASKS = Path(__file__).resolve().parents[2] / "tasks"
# The library's packages, lowest first: a module may import its own package and those before it.
LAYERS = ("text", "pipeline", "infra", "evaluate", "modeling", "training", "serving")
TOOLS = ("chat", "track", "models")
DATA_FOLDERS = ("configs", "prompt_suites", "data")


def module_name(path: Path, root: Path) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(source: str, modules: set[str]) -> set[str]:
    """Every module of the package a source file imports, at any depth (function-level imports too),
    as its name under `tasks.` (`from tasks.pipeline import storage` is `pipeline.storage`)."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found |= {a.name[len("tasks."):] for a in node.names if a.name[len("tasks."):] in modules}
        elif isinstance(node, ast.ImportFrom) and node.module and (node.module == "tasks" or node.module.startswith("tasks.")):
            base = node.module[len("tasks."):]
            # `from tasks.pipeline import storage` imports a module; `from tasks.pipeline.storage
            # import write_json` a name of one.
            named = {f"{base}.{a.name}".lstrip(".") for a in node.names} & modules
            found |= named or ({base} & modules)
    return found


def import_graph(root: Path = TASKS) -> dict[str, set[str]]:
    paths = {module_name(p, root): p for p in root.rglob("*.py")}
    paths.pop("", None)
    modules = set(paths)
    return {name: imports_of(path.read_text(encoding="utf-8"), modules) - {name} for name, path in paths.items()}


def layer_of(module: str) -> int:
    """A library module's layer (its package's place in LAYERS); the top of `tasks/` is above all."""
    head = module.split(".")[0]
    return LAYERS.index(head) if head in LAYERS else len(LAYERS)


def violations(graph: dict[str, set[str]], stages=STAGES) -> list[str]:
    found = []
    for src in sorted(graph):
        for dst in sorted(graph[src]):
            if src in stages and dst in stages:
                found.append(f"stage {src} imports stage {dst}")
            elif layer_of(dst) > layer_of(src) or (layer_of(dst) == len(LAYERS) and layer_of(src) < len(LAYERS)):
                found.append(f"{src} imports {dst}, which is above it")
            elif src in TOOLS and dst in stages:
                found.append(f"tool {src} imports stage {dst}")
    return found


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


def test_the_top_of_tasks_is_the_stages_the_tools_and_the_library_packages():
    names = {p.name for p in TASKS.iterdir() if p.name != "__pycache__"}
    expected = ({f"{s}.py" for s in STAGES} | {f"{t}.py" for t in TOOLS} | set(LAYERS) | set(DATA_FOLDERS)
                | {"__init__.py"})
    assert names == expected
    for layer in LAYERS:
        assert (TASKS / layer / "__init__.py").is_file() and not [p for p in (TASKS / layer).iterdir() if p.is_dir() and p.name != "__pycache__"]


def test_imports_run_one_way():
    assert violations(import_graph()) == []


def test_the_package_has_no_import_cycle():
    assert cycles(import_graph()) == []


def test_the_rules_catch_a_planted_upward_import_a_stage_import_and_a_cycle(tmp_path):
    """The checks above would fail on a violation: plant one of each in a copy of the package."""
    pkg = tmp_path / "tasks"
    shutil.copytree(TASKS, pkg, ignore=shutil.ignore_patterns("__pycache__"))
    assert violations(import_graph(pkg)) == [] and cycles(import_graph(pkg)) == []
    generate = pkg / "generate.py"
    generate.write_text(generate.read_text() + "\n\ndef late():\n    from tasks.preprocess import filter_records\n")
    storage = pkg / "pipeline" / "storage.py"
    storage.write_text(storage.read_text() + "\nfrom tasks.serving import parity  # noqa\n")
    records = pkg / "text" / "records.py"
    records.write_text(records.read_text() + "\nfrom tasks.text import batching  # noqa\n")
    batching = pkg / "text" / "batching.py"
    batching.write_text(batching.read_text() + "\nfrom tasks.text import records  # noqa\n")
    graph = import_graph(pkg)
    assert violations(graph) == ["stage generate imports stage preprocess",
                                 "pipeline.storage imports serving.parity, which is above it"]
    assert ["text.batching", "text.records", "text.batching"] in cycles(graph)


@pytest.mark.parametrize("stage", STAGES)
def test_each_stage_is_a_command_with_its_own_name(stage):
    """One stage = one module = one task id = one CLI: the module's STAGE is its own name."""
    import importlib

    module = importlib.import_module(f"tasks.{stage}")
    assert module.STAGE == stage and callable(module.main) and callable(module.run)
    assert (module.__doc__ or "").startswith(f"python -m tasks.{stage} ")
    # Its place in the chain, as its docstring numbers it.
    assert f"\nStage {STAGES.index(stage) + 1} of {len(STAGES)}: " in module.__doc__
