"""The whole DAG on the tiny config: `dag.test()`, then each task through `airflow tasks test`."""

import os
import re
from pathlib import Path

import pytest

from tasks.pipeline import artifacts
from tests.e2e import airflow_cli

pytestmark = pytest.mark.e2e

STAGES = list(artifacts.STAGES)
# Skipped, not failed, when the quality gate fails: nothing to export, nothing to promote.
GATED = ("export", "promote")
# Mapped over the sweep's variants (one instance when there are none).
MAPPED = {"finetune", "generate"}


def run_dir_of(dag_run) -> Path:
    from tasks.infra.settings import run_dir_for

    return run_dir_for(dag_run.run_id)


def expected_promote_state(run_dir: Path) -> str:
    gate = artifacts.read_metrics(run_dir)["gate"]
    return "success" if gate["passed"] else "skipped"


@pytest.fixture(scope="module")
def dag_run(airflow_db):
    from airflow.dag_processing.dagbag import DagBag

    dag = DagBag(dag_folder=os.environ["AIRFLOW__CORE__DAGS_FOLDER"]).get_dag("gemma_lora_finetune")
    # One export format: the formats and their runtimes are tests/tasks/test_export.py's.
    dag_run = dag.test(run_conf={"num_examples": 24, "lora_rank": 2, "export_formats": ["keras"]})
    # As dag.test left them (the `airflow tasks test` runs below record their own states).
    return dag_run, {(ti.task_id, ti.map_index): ti.state for ti in dag_run.get_task_instances()}


def test_dag_test_runs_every_stage(dag_run):
    from airflow.utils.state import DagRunState

    dag_run, tis = dag_run
    assert dag_run.state == DagRunState.SUCCESS
    states = {task_id: state for (task_id, _), state in tis.items()}
    assert sorted(k for k in tis if k[0] in MAPPED) == [("finetune", 0), ("generate", 0)]
    run_dir = run_dir_of(dag_run)
    # The gate decides promote's state: success when it passed, skipped (not failed) when it did not.
    # The Asset leaf succeeds (an event) when the snapshot changed, else it is skipped (no event); the
    # run root is shared by this session's tests, so which one depends on what ran before.
    changed = artifacts.read_snapshot_manifest(run_dir)["changed"]
    # A trusted run (only training keys changed): the approve task asks no one, it is skipped.
    assert states == {**{s: "success" for s in STAGES}, **{s: expected_promote_state(run_dir) for s in GATED},
                      "snapshot_changed": "success" if changed else "skipped", "approve": "skipped"}
    html = artifacts.report_path(run_dir).read_text()
    assert "What should I do on a trip to Europe?" in html

    result = artifacts.read_finetune_result(run_dir)
    assert result["config"]["lora_rank"] == 2 and result["examples"] == 24  # run conf reached the stage


# The run's XComs feed each task, as after a scheduler's run; the last command fails inside the task:
# it passes the Param schema (a string) but names no file.
BAD_SOURCE = "/no/such/dolly.jsonl"


@pytest.fixture(scope="module")
def tasks_tested(dag_run) -> dict[str, tuple[str, str]]:
    """{task id: (the state `airflow tasks test` reported, its output)} for every stage of the run,
    and "bad snapshot" for the snapshot with a missing file. `airflow tasks test` exits 0 even when
    the task fails, so the state is read from its output."""
    dag_run, _ = dag_run
    commands = [["tasks", "test", "gemma_lora_finetune", t, dag_run.run_id, *(["--map-index", "0"] if t in MAPPED else [])]
                for t in STAGES]
    commands.append(["tasks", "test", "gemma_lora_finetune", "snapshot", dag_run.run_id,
                     "-t", f'{{"dataset_source": "{BAD_SOURCE}"}}'])
    logs = airflow_cli.run(commands, os.environ.copy())
    states = [(re.findall(r"new_state=(\w+)", log) or ["unknown"])[-1] for log in logs]
    return dict(zip(STAGES + ["bad snapshot"], zip(states, logs)))


@pytest.mark.parametrize("task_id", STAGES)
def test_each_task_through_airflow_tasks_test(dag_run, tasks_tested, task_id):
    state, log = tasks_tested[task_id]
    expected = expected_promote_state(run_dir_of(dag_run[0])) if task_id in GATED else "success"
    assert state == expected, log[-3000:]
    assert f"running: python -m tasks.{task_id} --config tiny_test" in log


def test_airflow_tasks_test_failure_is_seen(tasks_tested):
    state, log = tasks_tested["bad snapshot"]
    assert state == "failed"
    assert "dataset_source" in log and BAD_SOURCE in log
