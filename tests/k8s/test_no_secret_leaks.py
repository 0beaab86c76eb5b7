"""Kaggle credentials reach the pod only through the Secret: never in templates, logs or XCom.

The worker's own environment holds the (fake, recognisable) credentials too, as it might on a
machine where someone exported them: a runner that copied them into the pod spec would show them in
the rendered templates, the serialized DAG, the client's debug log and the failure dump.
"""

from __future__ import annotations

import copy
import json
import logging

import pytest

from tests.k8s.conftest import (
    DAG_FILE, DAG_ID, FAKE_KAGGLE_KEY, FAKE_KAGGLE_USERNAME, GPU_STAGES, kubernetes_env, task_context,
)
from tests.k8s.fake_kube_api import Script
from tests.k8s.test_pod_execute import TRAINING_LOG, run_pod_task

pytestmark = pytest.mark.unit

SECRETS = (FAKE_KAGGLE_KEY, FAKE_KAGGLE_USERNAME)


def assert_clean(text: str, where: str) -> None:
    for value in SECRETS:
        assert value not in text, f"a Kaggle credential leaked into {where}"


@pytest.fixture
def dag_with_credentials_in_worker_env(monkeypatch):
    from airflow.dag_processing.dagbag import DagBag

    monkeypatch.setenv("KAGGLE_USERNAME", FAKE_KAGGLE_USERNAME)
    monkeypatch.setenv("KAGGLE_KEY", FAKE_KAGGLE_KEY)
    for key, value in kubernetes_env().items():
        monkeypatch.delenv(key, raising=False) if value is None else monkeypatch.setenv(key, value)
    bag = DagBag(dag_folder=str(DAG_FILE))
    assert bag.import_errors == {}
    return bag.dags[DAG_ID]


@pytest.mark.parametrize("stage", GPU_STAGES)
def test_no_secret_in_rendered_templates_or_the_serialized_dag(dag_with_credentials_in_worker_env, stage):
    from airflow.serialization.serialized_objects import DagSerialization
    from kubernetes.client import ApiClient

    dag = dag_with_credentials_in_worker_env
    op = copy.deepcopy(dag.get_task(stage))
    ctx = task_context(dag, op)
    op.render_template_fields(ctx)
    rendered = {field: repr(getattr(op, field)) for field in op.template_fields}
    assert_clean(json.dumps(rendered), "the rendered template fields")
    pod = op.build_pod_request_obj(ctx, dry_run=True)
    assert_clean(json.dumps(ApiClient().sanitize_for_serialization(pod)), "the pod spec")
    assert_clean(json.dumps(DagSerialization.to_dict(dag), default=str), "the serialized DAG")


@pytest.mark.parametrize("exit_code", [0, 1], ids=["success", "failure"])
def test_no_secret_in_task_logs_or_xcom(dag_with_credentials_in_worker_env, fake_cluster, caplog, capfd, exit_code):
    dag = dag_with_credentials_in_worker_env
    fake_cluster.script = Script(
        lines=TRAINING_LOG, exit_code=exit_code, xcom={"adapter": "a.lora.h5"}, env_checks=("KAGGLE_USERNAME", "KAGGLE_KEY")
    )
    caplog.set_level(logging.DEBUG)  # the kubernetes client logs whole request and response bodies
    run = run_pod_task(dag, "finetune")

    # The container did get both values, from the Secret through secretKeyRef.
    assert "[base] env KAGGLE_USERNAME: set" in run.log and "[base] env KAGGLE_KEY: set" in run.log
    assert (run.error is None) == (exit_code == 0)
    out = capfd.readouterr()
    assert_clean(run.log, "the task log")
    assert_clean(caplog.text, "the stdlib log (kubernetes client debug)")
    assert_clean(out.out + out.err, "stdout/stderr")
    assert_clean(str(run.error), "the task's error")
    assert_clean(json.dumps(run.ti.xcoms, default=str) + json.dumps(run.result), "XCom")
    assert_clean(json.dumps(fake_cluster.created), "the pod sent to the API server")
