"""The whole DAG on the tiny config: `dag.test()`, then each task through `airflow tasks test`."""

import os
import re
import subprocess
from pathlib import Path

import pytest

from tasks import artifacts
from tests.conftest import airflow_bin

pytestmark = pytest.mark.e2e

STAGES = list(artifacts.STAGES)
# Skipped, not failed, when the quality gate fails: nothing to export, nothing to promote.
GATED = ("export", "promote")
# Mapped over the sweep's variants (one instance when there are none).
MAPPED = {"finetune", "generate"}


def run_dir_of(dag_run) -> Path:
    from tasks.airflow_settings import run_dir_for

    return run_dir_for(dag_run.run_id)


def expected_promote_state(run_dir: Path) -> str:
    gate = artifacts.read_metrics(run_dir)["gate"]
    return "success" if gate["passed"] else "skipped"


@pytest.fixture(scope="module")
def dag_run(airflow_db):
    from airflow.dag_processing.dagbag import DagBag

    dag = DagBag(dag_folder=os.environ["AIRFLOW__CORE__DAGS_FOLDER"]).get_dag("gemma_lora_finetune")
    # One export format: the formats and their runtimes are tests/tasks/test_export.py's.
    return dag.test(run_conf={"num_examples": 24, "lora_rank": 2, "export_formats": ["keras"]})


def test_dag_test_runs_every_stage(dag_run):
    from airflow.utils.state import DagRunState

    assert dag_run.state == DagRunState.SUCCESS
    tis = dag_run.get_task_instances()
    states = {ti.task_id: ti.state for ti in tis}
    assert sorted((ti.task_id, ti.map_index) for ti in tis if ti.task_id in MAPPED) == [("finetune", 0), ("generate", 0)]
    run_dir = run_dir_of(dag_run)
    # The gate decides promote's state: success when it passed, skipped (not failed) when it did not.
    # The Asset leaf succeeds (an event) when the snapshot changed, else it is skipped (no event); the
    # run root is shared by this session's tests, so which one depends on what ran before.
    changed = artifacts.read_snapshot_manifest(run_dir)["changed"]
    assert states == {**{s: "success" for s in STAGES}, **{s: expected_promote_state(run_dir) for s in GATED},
                      "snapshot_changed": "success" if changed else "skipped"}
    html = artifacts.report_path(run_dir).read_text()
    assert "What should I do on a trip to Europe?" in html

    result = artifacts.read_finetune_result(run_dir)
    assert result["config"]["lora_rank"] == 2 and result["examples"] == 24  # run conf reached the stage


def tasks_test(task_id: str, run_id: str, *extra: str) -> tuple[str, str]:
    out = subprocess.run(
        [airflow_bin(), "tasks", "test", "gemma_lora_finetune", task_id, run_id, *extra],
        capture_output=True, text=True, env=os.environ.copy(), timeout=600,
    )
    log = out.stdout + out.stderr
    # `airflow tasks test` exits 0 even when the task fails: read the state it reports instead.
    states = re.findall(r"new_state=(\w+)", log)
    return (states[-1] if states else "unknown"), log


@pytest.mark.parametrize("task_id", STAGES)
def test_each_task_through_airflow_tasks_test(dag_run, task_id):
    state, log = tasks_test(task_id, dag_run.run_id, *(["--map-index", "0"] if task_id in MAPPED else []))
    expected = expected_promote_state(run_dir_of(dag_run)) if task_id in GATED else "success"
    assert state == expected, log[-3000:]
    assert f"running: python -m tasks.{task_id} --config tiny_test" in log


def test_airflow_tasks_test_failure_is_seen(dag_run):
    # Passes the Param schema (a string), fails inside the task: exit code 0, state failed.
    state, log = tasks_test("snapshot", dag_run.run_id, "-t", '{"dataset_source": "/no/such/dolly.jsonl"}')
    assert state == "failed"
    assert "dataset_source" in log and "/no/such/dolly.jsonl" in log
