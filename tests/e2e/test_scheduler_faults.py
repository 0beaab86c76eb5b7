"""Faults under the real scheduler (`airflow standalone`, what `make ui` runs), on the tiny model:
the fine-tune's task process SIGKILLed mid-training is retried by Airflow on its own (the DAG's
default retries) and resumes from its checkpoint; a run triggered while another runs waits
(max_active_runs=1), then completes; the snapshot store and the champion stay consistent. The runs
are tests/e2e/conftest.py's `scheduler_runs`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tasks.pipeline import artifacts
from tasks.infra.settings import run_folder_name
from tests.e2e.airflow_api import dag_run, task_instances
from tests.e2e.conftest import KILLED, run_dir

pytestmark = [pytest.mark.e2e, pytest.mark.xdist_group("airflow-standalone")]


def test_a_killed_finetune_is_retried_and_resumes_and_a_second_run_waits(airflow_server, scheduler_runs):
    server, runs = airflow_server, scheduler_runs
    first, second = runs["sweep"], runs["killed"]
    assert runs["killed_state_while_sweep_ran"] == "queued"  # max_active_runs=1: it waits
    assert runs["killed_at"] < KILLED["num_examples"]

    assert runs["killed_state"] == "success", {t["task_id"]: t["state"] for t in task_instances(server, second)}
    ti = next(t for t in task_instances(server, second) if t["task_id"] == "finetune")
    assert ti["try_number"] == 2  # retried by Airflow, no one clicked
    result = artifacts.read_finetune_result(run_dir(server, second))
    assert result["resumed_from_step"] is not None and result["resumed_from_step"] >= runs["killed_at"]
    assert result["steps"] == KILLED["num_examples"]
    assert [h["step"] for h in artifacts.read_history(run_dir(server, second))] == list(range(1, KILLED["num_examples"] + 1))
    report = (run_dir(server, second) / artifacts.REPORT / artifacts.REPORT_HTML).read_text()
    assert f"resumed from the checkpoint at step {result['resumed_from_step']}" in report

    # The waiting run started only after the first ended, and completed.
    assert runs["sweep_state"] == "success"
    a, b = dag_run(server, first), dag_run(server, second)
    assert b["start_date"] >= a["end_date"]
    # One snapshot in the store: the first run published it (or found it), the second found the same content.
    ma = artifacts.read_snapshot_manifest(run_dir(server, first))
    mb = artifacts.read_snapshot_manifest(run_dir(server, second))
    assert mb["changed"] is False and mb["snapshot_id"] == ma["snapshot_id"]
    store = Path(ma["store"])
    assert json.loads((store / "LATEST.json").read_text())["snapshot_id"] == ma["snapshot_id"]
    assert [p.name for p in store.iterdir() if p.is_dir() and not p.name.startswith(".")] == [ma["snapshot_id"]]
    # The champion is the last of these runs whose gate passed; if neither passed, it did not move.
    champion = server["home"] / "gemma_runs" / "runs" / artifacts.CHAMPION
    promoted = [r for r in (first, second) if {t["task_id"]: t["state"] for t in task_instances(server, r)}["promote"] == "success"]
    if promoted:
        assert json.loads(champion.read_text())["run_id"] == run_folder_name(promoted[-1])
    else:
        assert (champion.read_text() if champion.exists() else None) == runs["champion_before"]
