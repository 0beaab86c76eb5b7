"""The real KubernetesPodOperator.execute() of the GPU stages against a fake core/v1 API on 127.0.0.1.

Everything from pod creation to deletion goes through the provider and the kubernetes client over
HTTP; only the XCom sidecar's websocket exec is stubbed (see `fake_cluster`). The task log is what
the operator logs through structlog, which is what Airflow writes to the task's log.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import pytest
import structlog

from tests.k8s.conftest import GPU_STAGES, task_context
from tests.k8s.fake_kube_api import Script

pytestmark = pytest.mark.unit

TRAINING_LOG = [
    "INFO gemma_pipeline: stage finetune: run dir /runs/manual__x, config gemma_2b_lora",
    "INFO gemma_pipeline: gpu check: TensorFlow 2.21.0 (CUDA 12.5.1, cuDNN 9) sees 1 GPU(s)",
    "INFO gemma_pipeline: finetune: step 1/3 loss 2.1000 (running 2.1000) accuracy 0.4100 | 0.41 s/step, ETA 1 s",
    "INFO gemma_pipeline: finetune: step 2/3 loss 1.9000 (running 2.0000) accuracy 0.4300 | 0.40 s/step, ETA 0 s",
    "INFO gemma_pipeline: finetune: step 3/3 loss 1.7000 (running 1.9000) accuracy 0.4500 | 0.40 s/step, ETA 0 s",
]
RESULT = {"adapter": "/runs/manual__x/finetune/adapter.lora.h5", "steps": 3, "examples": 3}


@dataclass
class TaskRun:
    op: object
    ti: object
    result: object
    error: BaseException | None
    log: str


def run_pod_task(dag, stage: str, **op_changes) -> TaskRun:
    """Render and execute one GPU task as the task runner would; collect its log."""
    op = copy.deepcopy(dag.get_task(stage))
    # Poll the fake every 0.1 s instead of every 5 s (the value the provider uses on a cluster).
    op.startup_check_interval_seconds = 0.1
    for key, value in op_changes.items():
        setattr(op, key, value)
    ctx = task_context(dag, op)
    op.render_template_fields(ctx)
    result, error = None, None
    with structlog.testing.capture_logs() as events:
        try:
            result = op.execute(ctx)
        except Exception as e:  # the task fails with what the operator raises
            error = e
    log = "\n".join(f"{e['log_level']} {e['event']}" for e in events)
    return TaskRun(op, ctx["ti"], result, error, log)


@pytest.mark.parametrize("stage", GPU_STAGES)
def test_successful_pod_returns_its_xcom_and_is_deleted(k8s_dag_module, fake_cluster, stage):
    from tests.k8s.test_pod_spec import render_pod

    dag, _ = k8s_dag_module
    fake_cluster.script = Script(lines=TRAINING_LOG, xcom=RESULT)
    run = run_pod_task(dag, stage)

    assert run.error is None, run.log[-3000:]
    assert run.result == RESULT
    name = run.ti.xcoms["pod_name"]
    assert run.ti.xcoms["pod_namespace"] == "gemma"
    assert fake_cluster.deleted == [name] and fake_cluster.pods == {}
    assert fake_cluster.unhandled == []
    # Training progress streams into the task log, in order.
    steps = [run.log.find(f"[base] {line}") for line in TRAINING_LOG]
    assert -1 not in steps and steps == sorted(steps), run.log[-3000:]
    # What was POSTed is what the dry run renders (the spec a reviewer sees in the tests and the UI).
    _, dry = render_pod(dag, stage)
    sent = fake_cluster.created[0]["spec"]["containers"][0]
    assert sent["args"] == dry.spec.containers[0].args
    assert sent["command"] == ["python", "-m", f"tasks.{stage}"]
    assert sent["resources"]["limits"]["nvidia.com/gpu"] == "1"


def test_failing_pod_fails_the_task_with_its_last_log_lines_and_exit_reason(k8s_dag_module, fake_cluster):
    dag, _ = k8s_dag_module
    last_lines = [
        "Traceback (most recent call last):",
        '  File "/opt/venv/lib/python3.11/site-packages/tasks/modeling/presets.py", line 60, in check_kaggle_credentials',
        "tasks.modeling.presets.ModelSourceError: Kaggle credentials are missing: Gemma presets are gated on Kaggle.",
    ]
    fake_cluster.script = Script(lines=TRAINING_LOG[:2] + last_lines, exit_code=1)
    run = run_pod_task(dag, "finetune")

    from airflow.exceptions import AirflowException

    assert isinstance(run.error, AirflowException)
    message = str(run.error)
    assert "returned a failure" in message
    assert last_lines[-1] in message  # the kubelet's FallbackToLogsOnError termination message
    for line in last_lines:
        assert f"[base] {line}" in run.log
    assert "Container 'base': state='TERMINATED', reason='Error', exit_code=1" in run.log
    assert "stage finetune: container exited with code 1 (reason Error)" in run.log
    assert "return_value" not in run.ti.xcoms
    # delete_pod (the default): a failed pod never lingers holding its GPU; its logs are in the task log.
    assert fake_cluster.deleted == [run.ti.xcoms["pod_name"]]
    assert fake_cluster.unhandled == []


def test_oomkilled_pod_is_named_as_such_with_the_setting_to_change(k8s_dag_module, fake_cluster):
    dag, _ = k8s_dag_module
    fake_cluster.script = Script(lines=TRAINING_LOG[:3], exit_code=137, reason="OOMKilled")
    run = run_pod_task(dag, "finetune")

    assert run.error is not None
    assert "reason='OOMKilled', exit_code=137" in run.log
    assert "stage finetune: container OOMKilled (exit code 137)" in run.log
    assert "memory_limit=32Gi" in run.log and "GEMMA_MEMORY_LIMIT" in run.log
    assert f"[base] {TRAINING_LOG[2]}" in run.log


def test_failed_pod_is_kept_when_on_finish_action_says_so(k8s_dag_module, fake_cluster):
    dag, _ = k8s_dag_module
    fake_cluster.script = Script(lines=["boom"], exit_code=2)
    from airflow.providers.cncf.kubernetes.utils.pod_manager import OnFinishAction

    run = run_pod_task(dag, "generate", on_finish_action=OnFinishAction.DELETE_SUCCEEDED_POD)
    assert run.error is not None and fake_cluster.deleted == []
    (kept,) = fake_cluster.pods.values()
    # Labelled so that a retry starts a fresh pod instead of re-attaching to this one.
    assert kept.pod["metadata"]["labels"]["already_checked"] == "True"


def test_missing_kaggle_secret_shows_in_the_task_log(k8s_dag_module, fake_cluster):
    dag, _ = k8s_dag_module
    fake_cluster.secrets.clear()
    run = run_pod_task(dag, "finetune", startup_timeout_seconds=2, schedule_timeout_seconds=2)

    assert run.error is not None and "took too long to start" in str(run.error.__context__)
    assert 'secret "kaggle-credentials" not found' in run.log
    assert "CreateContainerConfigError" in run.log
    assert fake_cluster.pods == {}  # deleted, so the GPU it was given is freed
