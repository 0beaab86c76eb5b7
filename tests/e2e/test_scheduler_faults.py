"""Faults under the real scheduler (`airflow standalone`, what `make ui` runs), on the tiny model:
the fine-tune's task process SIGKILLed mid-training is retried by Airflow on its own (the DAG's
default retries) and resumes from its checkpoint; a second run triggered meanwhile waits
(max_active_runs=1), then completes; the snapshot store and the champion stay consistent."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest

from tasks import artifacts
from tasks.airflow_settings import run_folder_name
from tests.e2e.airflow_api import dag_run, task_instances, trigger, wait_finished, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.xdist_group("airflow-standalone")]

# Long enough to kill between two checkpoints (the server checkpoints every 10 steps): one example
# a step. The second run only has to wait and then finish: the tiny_test workload on 16 examples.
FIRST = {"num_examples": 200, "batch_size": 1}
SECOND = {"num_examples": 16}


def run_dir(server: dict, run_id: str) -> Path:
    return server["home"] / "gemma_runs" / "runs" / run_folder_name(run_id)


def task_process(ti_id: str) -> int | None:
    """The pid of the process running the task instance (its title: `airflow worker -- <ti id>`)."""
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if f"airflow worker -- {ti_id}" in (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"):
                    return int(proc.name)
            except OSError:
                continue
    return None


def finetune_ti(server: dict, run_id: str) -> dict | None:
    return next((t for t in task_instances(server, run_id) if t["task_id"] == "finetune"), None)


def test_a_killed_finetune_is_retried_and_resumes_and_a_second_run_waits(airflow_server):
    server = airflow_server
    champion = server["home"] / "gemma_runs" / "runs" / artifacts.CHAMPION
    champion_before = champion.read_text() if champion.exists() else None
    first, second = trigger(server, FIRST), trigger(server, SECOND)
    latest = artifacts.checkpoint_dir(run_dir(server, first)) / "latest.json"

    def training_checkpointed():
        ti = finetune_ti(server, first)
        if ti and ti["state"] == "running" and latest.is_file() and json.loads(latest.read_text())["step"] >= 10:
            return ti
        return None

    ti = wait_for("the first run's fine-tune to checkpoint", training_checkpointed, timeout=600, every=0.5)
    assert dag_run(server, second)["state"] == "queued"  # max_active_runs=1: it waits
    pid = wait_for("the fine-tune's task process", lambda: task_process(ti["id"]), timeout=30, every=0.5)
    os.kill(pid, signal.SIGKILL)  # what the OOM killer or a node drain does: no cleanup
    killed_at = json.loads(latest.read_text())["step"]
    assert killed_at < FIRST["num_examples"]

    assert wait_finished(server, first) == "success", {t["task_id"]: t["state"] for t in task_instances(server, first)}
    ti = finetune_ti(server, first)
    assert ti["try_number"] == 2  # retried by Airflow, no one clicked
    result = artifacts.read_finetune_result(run_dir(server, first))
    assert result["resumed_from_step"] is not None and result["resumed_from_step"] >= killed_at
    assert result["steps"] == FIRST["num_examples"]
    assert [h["step"] for h in artifacts.read_history(run_dir(server, first))] == list(range(1, FIRST["num_examples"] + 1))
    report = (run_dir(server, first) / artifacts.REPORT / artifacts.REPORT_HTML).read_text()
    assert f"resumed from the checkpoint at step {result['resumed_from_step']}" in report

    # The second run started only after the first ended, and completed.
    assert wait_finished(server, second) == "success"
    a, b = dag_run(server, first), dag_run(server, second)
    assert b["start_date"] >= a["end_date"]
    # One snapshot in the store: the first run published it, the second found the same content.
    ma = artifacts.read_snapshot_manifest(run_dir(server, first))
    mb = artifacts.read_snapshot_manifest(run_dir(server, second))
    assert mb["changed"] is False and mb["snapshot_id"] == ma["snapshot_id"]
    store = Path(ma["store"])
    assert json.loads((store / "LATEST.json").read_text())["snapshot_id"] == ma["snapshot_id"]
    assert [p.name for p in store.iterdir() if p.is_dir() and not p.name.startswith(".")] == [ma["snapshot_id"]]
    # The champion is the last of these runs whose gate passed; if neither passed, it did not move.
    promoted = [r for r in (first, second) if {t["task_id"]: t["state"] for t in task_instances(server, r)}["promote"] == "success"]
    if promoted:
        assert json.loads(champion.read_text())["run_id"] == run_folder_name(promoted[-1])
    else:
        assert (champion.read_text() if champion.exists() else None) == champion_before
