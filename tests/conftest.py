"""Shared test set-up: an isolated Airflow home on SQLite, the tiny config, and cached models.

Environment comes first, before anything imports Airflow, so the DAG and the CLI see the same
settings a user's `make test` would. Models are cached in .cache/models (shared with `make demo`):
building tiny models is deterministic and importing the real GGUF takes about a minute.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
_SESSION_TMP = Path(tempfile.mkdtemp(prefix="gemma-tests-"))

os.environ["AIRFLOW_HOME"] = str(_SESSION_TMP / "airflow_home")
os.environ["AIRFLOW__CORE__DAGS_FOLDER"] = str(REPO / "dags")
os.environ["AIRFLOW__CORE__PLUGINS_FOLDER"] = str(REPO / "plugins")
os.environ["AIRFLOW__CORE__LOAD_EXAMPLES"] = "False"
os.environ["AIRFLOW__CORE__UNIT_TEST_MODE"] = "False"
os.environ["GEMMA_RUNNER"] = "local"
os.environ["GEMMA_CONFIG"] = "tiny_test"
os.environ["GEMMA_RUN_ROOT"] = str(_SESSION_TMP / "runs")
os.environ.setdefault("GEMMA_MODELS_DIR", str(REPO / ".cache" / "models"))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# The full Dolly 15k for tests and benchmarks; product code never names this path.
DOLLY_FULL = Path(os.environ.get("DOLLY_FULL_JSONL", REPO.parent / "shared" / "data" / "dolly" / "databricks-dolly-15k.jsonl"))
DOLLY_OLDREV = DOLLY_FULL.parent.parent / "dolly-oldrev" / "dolly-15k-april2023-variants.jsonl"
# Tests read datasets from their temp folders and the shared data: those are the data roots here.
os.environ["GEMMA_DATA_ROOTS"] = os.pathsep.join([str(REPO / "tasks" / "data"), tempfile.gettempdir(),
                                                  str(DOLLY_FULL.parent.parent)])


# Every test carries exactly one of these (pyproject.toml describes them; tests/README.md has the
# commands and times): `make check` runs unit and model, `make test` all five.
TIERS = ("unit", "model", "e2e", "real", "image")


def _shares_module_state(item) -> bool:
    """Whether the test uses a fixture its own module defines with a scope wider than the test: the
    module's tests must then run on one xdist worker, or each worker builds that fixture again."""
    info = getattr(item, "_fixtureinfo", None)
    for defs in (info.name2fixturedefs.values() if info else ()):
        if defs and defs[-1].scope != "function" and getattr(defs[-1].func, "__module__", None) == item.module.__name__:
            return True
    return False


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    """Collection fails on a test without exactly one tier marker, so `make check` misses nothing
    by accident. Under xdist (`--dist loadgroup`) the tests of a module that share its fixtures run
    on one worker, so those are built once; tests that share a server name their group themselves;
    every other test goes to whichever worker is free. Session fixtures of conftest files are
    shared across workers through `shared_dir`."""
    wrong = []
    for item in items:
        tiers = sorted({m.name for m in item.iter_markers() if m.name in TIERS})
        if len(tiers) != 1:
            wrong.append(f"{item.nodeid}: {', '.join(tiers) or 'no tier marker'}")
        elif item.get_closest_marker("xdist_group") is None and _shares_module_state(item):
            item.add_marker(pytest.mark.xdist_group(item.nodeid.split("::")[0]))
    if wrong:
        raise pytest.UsageError(f"every test needs exactly one tier marker of {', '.join(TIERS)}:\n  " + "\n  ".join(wrong))


def airflow_bin() -> str:
    return str(Path(sys.executable).parent / "airflow")


@pytest.fixture(scope="session")
def airflow_db() -> Path:
    """A migrated SQLite metadata DB in the session's own AIRFLOW_HOME."""
    home = Path(os.environ["AIRFLOW_HOME"])
    if not (home / "airflow.db").exists():
        home.mkdir(parents=True, exist_ok=True)
        subprocess.run([airflow_bin(), "db", "migrate"], check=True, capture_output=True, env=os.environ.copy())
    return home


@pytest.fixture(scope="session")
def dolly_full() -> Path:
    if not DOLLY_FULL.is_file():
        pytest.skip(f"full Dolly file not found at {DOLLY_FULL} (set DOLLY_FULL_JSONL)")
    return DOLLY_FULL


@pytest.fixture(scope="session")
def shared_dir(tmp_path_factory) -> Path:
    """A folder every xdist worker of this session sees (each worker has its own session and temp
    folder): what one worker builds there, under `built_once`, the other reuses."""
    base = tmp_path_factory.getbasetemp()
    shared = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "shared"
    shared.mkdir(exist_ok=True)
    return shared


@contextlib.contextmanager
def built_once(folder: Path):
    """Yields True when the caller must build `folder` (then marked done), False when another
    worker (or an earlier call) built it; a second worker waits on the lock instead of building
    the same thing on the same two cores."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    done = folder.parent / f"{folder.name}.done"
    with (folder.parent / f"{folder.name}.lock").open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if done.is_file():
            yield False
            return
        shutil.rmtree(folder, ignore_errors=True)
        yield True
        done.touch()


# The stages a shared run goes through, in order, up to `until` (sweep and promote are not needed to
# read one; export only when asked for: it is the stage that loads the parity runtimes).
CHAIN = ("snapshot", "preprocess", "finetune", "generate", "report")


@pytest.fixture(scope="session")
def trained_run(shared_dir):
    """A factory of tiny runs the session shares: `trained_run(until="report", **settings)` runs the
    tiny_test config with these settings through the stage chain up to `until`, once per session for
    each distinct (until, settings), whichever worker asks first. The folder is read-only for the
    tests: a test that changes a run works on `copy_run(...)` of it. Each run has a run root of its
    own (its snapshot store and MLflow store beside it)."""
    import importlib

    from tasks.pipeline.config import fingerprint, load_config

    def get(until: str = "report", **settings) -> Path:
        key = (until, tuple(sorted((k, str(v)) for k, v in settings.items())))
        run_dir = shared_dir / "trained" / f"{until}-{fingerprint(key)}" / "runs" / "run"
        with built_once(run_dir.parent.parent) as build:
            if build:
                cfg = load_config("tiny_test", dict(key[1]))
                chain = CHAIN[:4] + ("export",) if until == "export" else CHAIN[: CHAIN.index(until) + 1]
                for stage in chain:
                    importlib.import_module(f"tasks.{stage}").run(cfg, run_dir)
        return run_dir

    return get


def copy_run(run: Path, dst: Path) -> Path:
    """A copy of a shared run to change: stage fingerprints travel with it, so a stage rerun on the
    copy with the same inputs is a no-op; its MLflow state (tracking/*.json) stays behind, so the
    copy is tracked afresh."""
    from tasks.infra import tracking

    shutil.copytree(run, dst, symlinks=True, ignore=shutil.ignore_patterns(tracking.STATE_DIR))
    return dst


@pytest.fixture(scope="session")
def tiny_run(trained_run) -> Path:
    """One complete tiny pipeline run (snapshot to report) that read-only tests share."""
    return trained_run("report")


def read_json(path: Path):
    return json.loads(Path(path).read_text(encoding="utf-8"))


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(_SESSION_TMP, ignore_errors=True)
