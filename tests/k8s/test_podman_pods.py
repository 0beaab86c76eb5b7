"""The Pod the KubernetesPodOperator builds, run for real: the project's CPU image in podman
(`podman kube play`, tests/k8s/podman.py), the run root a folder the worker shares with the pod,
the Kaggle and tracking credentials Secrets, the securityContext as the operator sets it.

The worker side (snapshot, preprocess, sweep) runs here in-process, as the kubernetes runner runs it;
then the `finetune` pod the DAG (parsed with runner = kubernetes) would send trains the adapter inside
the image as uid 50000 and writes it to the shared run root, and its XCom comes from the sidecar."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import pytest
import yaml

from tests.k8s import podman
from tests.k8s.conftest import DAG_FILE, DAG_ID
from tests.k8s.fake_kube_api import FakeKubeAPI

pytestmark = [pytest.mark.image, pytest.mark.xdist_group("podman")]

RUN_ID = "manual__2026-12-07T10:00:00+00:00"
SMALL = {"num_examples": 16, "heldout_examples": 8, "eval_examples": 4, "heldout_generate_examples": 4}


@pytest.fixture(scope="module")
def cpu_image() -> str:
    return podman.ready_image("cpu")


@pytest.fixture(scope="module")
def shared_run_root(tmp_path_factory) -> Path:
    return podman.shared_run_root(tmp_path_factory.mktemp("shared"))


def kubernetes_dag(monkeypatch, run_root: Path, image: str):
    from airflow.dag_processing.dagbag import DagBag

    for key, value in podman.pod_settings_env(run_root, image, GEMMA_CONFIG="tiny_test",
                                              GEMMA_MLFLOW_SECRET="mlflow-credentials").items():
        monkeypatch.setenv(key, value)
    bag = DagBag(dag_folder=str(DAG_FILE))
    assert bag.import_errors == {}
    return bag.dags[DAG_ID]


def worker_side(run_dir: Path) -> list[dict]:
    """snapshot, preprocess and sweep as the worker runs them; the sweep's plan."""
    from tasks import preprocess, snapshot, sweep
    from tasks.pipeline.config import load_config

    cfg = load_config("tiny_test", {k: str(v) for k, v in SMALL.items()})
    old = os.umask(0o002)
    try:
        snapshot.run(cfg, run_dir)
        preprocess.run(cfg, run_dir)
        return sweep.run(cfg, run_dir)["variants"]
    finally:
        os.umask(old)


def operator_pod(dag, stage: str, plan: list[dict]) -> dict:
    """The Pod the operator would send for the run's first variant, as the API server gets it."""
    from kubernetes.client import ApiClient

    from tests.k8s.conftest import StubTaskInstance

    op = copy.deepcopy(dag.get_task(stage))
    params = copy.deepcopy(dag.params)
    for key, value in SMALL.items():
        params[key] = value
    ctx = {"dag": dag, "task": op, "run_id": RUN_ID, "params": params.validate(),
           "ti": StubTaskInstance(dag.dag_id, op.task_id, 0, {"sweep": plan})}
    op.render_template_fields(ctx)
    pod = op.build_pod_request_obj(ctx)
    return yaml.safe_load(yaml.safe_dump(ApiClient().sanitize_for_serialization(pod)))


def test_the_operators_finetune_pod_trains_in_the_cpu_image_as_uid_50000(cpu_image, shared_run_root, monkeypatch, tmp_path,
                                                                       request):
    from tasks.infra.settings import run_dir_for
    from tasks.pipeline import artifacts

    dag = kubernetes_dag(monkeypatch, shared_run_root, cpu_image)
    # The XCom sidecar's default image (alpine) cannot be pulled here: the connection names another.
    # (Building the Pod asks the connection, not the API server; the stand-in only gives it a kubeconfig.)
    api = FakeKubeAPI().start()
    request.addfinalizer(api.stop)
    monkeypatch.setenv("AIRFLOW_CONN_KUBERNETES_DEFAULT", json.dumps(
        {"conn_type": "kubernetes", "extra": {"kube_config_path": str(api.write_kubeconfig(tmp_path / "kubeconfig", "gemma")),
                                              "xcom_sidecar_container_image": podman.BASE_IMAGE}}))
    run_dir = run_dir_for(RUN_ID)
    plan = worker_side(run_dir)
    manifest = operator_pod(dag, "finetune", plan)
    base = manifest["spec"]["containers"][0]
    sidecar = manifest["spec"]["containers"][1]
    assert base["image"] == cpu_image and sidecar["image"] == podman.BASE_IMAGE
    assert base["securityContext"]["readOnlyRootFilesystem"] is True and manifest["spec"]["securityContext"]["runAsUser"] == 50000
    podman.create_secret("kaggle-credentials", {"username": "fake-user", "key": "fake-key"})
    podman.create_secret("mlflow-credentials", {"username": "fake-tracker", "password": "fake-tracking-pw"})

    with podman.played(podman.for_podman(manifest, str(shared_run_root)), tmp_path) as pod:
        code = podman.wait_exit(podman.container(pod), timeout=600)
        log = podman.logs(podman.container(pod))
        assert code == 0, log[-3000:]
        result = podman.xcom(pod)
        user = podman.podman("inspect", podman.container(pod), "--format", "{{.Config.User}} {{.HostConfig.ReadonlyRootfs}}").stdout.split()
        env = podman.podman("inspect", podman.container(pod), "--format", "{{json .Config.Env}}").stdout

    assert user == ["50000:0", "true"]
    # Both Secrets reached the container as env, from the secrets (the Pod spec names only the Secrets).
    for pair in ("KAGGLE_USERNAME=fake-user", "KAGGLE_KEY=fake-key", "MLFLOW_TRACKING_USERNAME=fake-tracker",
                 "MLFLOW_TRACKING_PASSWORD=fake-tracking-pw"):
        assert pair in env
    assert "fake-tracking-pw" not in json.dumps(manifest)
    assert "finetune: step" in log and "stage finetune: published" in log
    adapter = Path(result["adapter"])
    assert adapter.is_file() and adapter.is_relative_to(run_dir) and adapter.stat().st_uid == 50000
    assert storage_done(run_dir, artifacts.FINETUNE)


def storage_done(run_dir: Path, stage: str) -> bool:
    from tasks.pipeline import storage

    return bool(storage.completed(run_dir, stage))
