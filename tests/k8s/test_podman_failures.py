"""What breaks in a real container breaks clearly: the KubernetesPodOperator the DAG builds (runner =
kubernetes, the tiny config) runs its `finetune` pod in podman through the loopback API's podman mode
(tests/k8s/fake_kube_api.py), and each failure ends the task with the pod's own message in the
task's log: a run root the pod cannot write, a Secret the cluster lacks, an image without the project,
a stage that fails in the pod."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest
import structlog

from tests.k8s import podman
from tests.k8s.conftest import DAG_FILE, DAG_ID, FAKE_KAGGLE_KEY, FAKE_KAGGLE_USERNAME, StubTaskInstance
from tests.k8s.fake_kube_api import FakeKubeAPI

pytestmark = [pytest.mark.image, pytest.mark.xdist_group("podman")]

RUN_ID = "manual__2026-12-07T11:00:00+00:00"
KAGGLE = {("gemma", "kaggle-credentials"): {"username": FAKE_KAGGLE_USERNAME, "key": FAKE_KAGGLE_KEY}}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """A run root with the worker's stages done (group-writable, as the worker's uid 50000 / gid 0
    leaves them), and the cpu image."""
    from tasks import preprocess, snapshot, sweep
    from tasks.pipeline.config import load_config

    image = podman.ready_image("cpu")
    root = podman.shared_run_root(tmp_path_factory.mktemp("failures"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("GEMMA_RUN_ROOT", str(root))
        from tasks.infra.settings import run_dir_for

        run_dir = run_dir_for(RUN_ID)
        cfg = load_config("tiny_test", {"num_examples": "8"})
        old = os.umask(0o002)
        try:
            snapshot.run(cfg, run_dir)
            preprocess.run(cfg, run_dir)
            plan = sweep.run(cfg, run_dir)["variants"]
        finally:
            os.umask(old)
    return {"image": image, "root": root, "run_dir": run_dir, "plan": plan}


def run_finetune_pod(prepared, tmp_path, monkeypatch, *, image: str | None = None, secrets=KAGGLE, conf: dict | None = None,
                     startup_timeout: int = 120) -> tuple[Exception | None, str]:
    """Execute the DAG's finetune task (its KubernetesPodOperator) against podman; (error, task log)."""
    from airflow.dag_processing.dagbag import DagBag

    api = FakeKubeAPI(secrets=secrets, podman_run_root=str(prepared["root"]), workdir=tmp_path).start()
    try:
        env = podman.pod_settings_env(prepared["root"], image or prepared["image"], GEMMA_CONFIG="tiny_test",
                                      GEMMA_STARTUP_TIMEOUT=str(startup_timeout))
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        podman.wire_operator(monkeypatch, api, tmp_path)
        dag = DagBag(dag_folder=str(DAG_FILE)).dags[DAG_ID]
        op = copy.deepcopy(dag.get_task("finetune"))
        op.startup_check_interval_seconds = 0.5
        params = copy.deepcopy(dag.params)
        for key, value in {"num_examples": 8, **(conf or {})}.items():
            params[key] = value
        ctx = {"dag": dag, "task": op, "run_id": RUN_ID, "params": params.validate(),
               "ti": StubTaskInstance(dag.dag_id, op.task_id, 0, {"sweep": prepared["plan"]})}
        op.render_template_fields(ctx)
        error = None
        with structlog.testing.capture_logs() as events:
            try:
                op.execute(ctx)
            except Exception as e:
                error = e
        return error, "\n".join(f"{e['log_level']} {e['event']}" for e in events) + f"\nERROR {error}"
    finally:
        api.stop()
        for leftover in Path(tmp_path).glob("*.yaml"):
            podman.podman("kube", "down", str(leftover), check=False)


def test_a_run_root_the_pod_cannot_write(prepared, tmp_path, monkeypatch):
    run_dir = prepared["run_dir"]
    run_dir.chmod(0o755)  # the worker's umask 022, root-owned: uid 50000 may read, not write
    try:
        error, log = run_finetune_pod(prepared, tmp_path, monkeypatch)
    finally:
        run_dir.chmod(0o2775)
    assert error is not None
    assert "Permission denied" in log and str(run_dir) in log, log[-3000:]


def test_a_secret_the_cluster_lacks(prepared, tmp_path, monkeypatch):
    error, log = run_finetune_pod(prepared, tmp_path, monkeypatch, secrets={}, startup_timeout=15)
    assert error is not None
    # podman's own refusal, as the pod's state and event (on a cluster: CreateContainerConfigError).
    assert 'cannot set env KAGGLE_USERNAME: no secret with name or id "kaggle-credentials"' in log, log[-3000:]


def test_an_image_without_the_project(prepared, tmp_path, monkeypatch):
    error, log = run_finetune_pod(prepared, tmp_path, monkeypatch, image=podman.BASE_IMAGE)
    assert error is not None
    assert "No module named tasks" in log or "No module named 'tasks'" in log, log[-3000:]


def test_a_stage_that_fails_in_the_pod(prepared, tmp_path, monkeypatch):
    """A config value the worker's checks let through but the stage refuses in the pod: its own
    message, not only an exit code."""
    error, log = run_finetune_pod(prepared, tmp_path, monkeypatch, conf={"model_preset": "tiny:gemma2"})
    assert error is not None
    assert "unknown tiny model 'tiny:gemma2'" in log, log[-3000:]
