"""Shared test set-up: an isolated Airflow home on SQLite, the tiny config, and cached models.

Environment comes first, before anything imports Airflow, so the DAG and the CLI see the same
settings a user's `make test` would. Models are cached in .cache/models (shared with `make demo`):
building tiny models is deterministic and importing the real GGUF takes about a minute.
"""

from __future__ import annotations

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
def tiny_run(tmp_path_factory) -> Path:
    """One complete tiny pipeline run (all five stages) that read-only tests share."""
    from tasks import finetune, generate, preprocess, report, snapshot
    from tasks.config import load_config

    run_dir = tmp_path_factory.mktemp("tiny-run")
    cfg = load_config("tiny_test")
    for stage in (snapshot, preprocess, finetune, generate, report):
        stage.run(cfg, run_dir)
    return run_dir


def read_json(path: Path):
    return json.loads(Path(path).read_text(encoding="utf-8"))


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(_SESSION_TMP, ignore_errors=True)
