"""Fixtures for the kubernetes runner: the DAG parsed with GEMMA_RUNNER=kubernetes, task contexts.

tests/conftest.py sets GEMMA_RUNNER=local and GEMMA_CONFIG=tiny_test for the whole session; here the
DAG file is parsed again, under its own module name, with the runner switched and the config left to
the kubernetes default (gemma_2b_lora), as a production dag-processor and worker would see it.
"""

from __future__ import annotations

import copy
import datetime as dt
import importlib.util
import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DAG_FILE = REPO / "dags" / "gemma_lora_finetune.py"
DAG_ID = "gemma_lora_finetune"
GPU_STAGES = ["finetune", "generate"]
RUN_ID = "manual__2026-11-28T04:29:00+00:00"
# Recognisable fake credentials: they must reach the pod only through the Secret.
FAKE_KAGGLE_USERNAME = "fake-kaggle-user-7f3a"
FAKE_KAGGLE_KEY = "kgl-FAKE-SECRET-0c9d1e2f3a4b5c6d"


def kubernetes_env() -> dict[str, str | None]:
    """Environment of a kubernetes-mode dag-processor/worker (None: unset)."""
    return {"GEMMA_RUNNER": "kubernetes", "GEMMA_CONFIG": None}


def parse_kubernetes_dag(monkeypatch, **settings: str):
    """The DAG parsed afresh as a kubernetes-mode dag-processor would, with these GEMMA_* settings."""
    from airflow.dag_processing.dagbag import DagBag

    for key, value in kubernetes_env().items():
        monkeypatch.delenv(key, raising=False) if value is None else monkeypatch.setenv(key, value)
    for key, value in settings.items():
        monkeypatch.setenv(key, value)
    bag = DagBag(dag_folder=str(DAG_FILE))
    assert bag.import_errors == {}
    return bag.dags[DAG_ID]


@pytest.fixture(scope="module")
def k8s_dag_module():
    """(DAG from a DagBag parse, the DAG file as a module) with GEMMA_RUNNER=kubernetes."""
    from airflow.dag_processing.dagbag import DagBag

    with pytest.MonkeyPatch.context() as mp:
        for key, value in kubernetes_env().items():
            mp.delenv(key, raising=False) if value is None else mp.setenv(key, value)
        bag = DagBag(dag_folder=str(DAG_FILE))
        assert bag.import_errors == {}
        spec = importlib.util.spec_from_file_location("gemma_dag_kubernetes_mode", DAG_FILE)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    return bag.dags[DAG_ID], module


class StubTaskInstance:
    """What the operator reads from `context["ti"]`; records XCom pushes."""

    def __init__(self, dag_id: str, task_id: str, map_index: int = -1, upstream: dict | None = None):
        self.dag_id, self.task_id = dag_id, task_id
        self.map_index, self.try_number = map_index, 1
        self.start_date = dt.datetime.now(dt.timezone.utc)
        self.xcoms: dict[str, object] = {}
        self.upstream = upstream or {}

    def xcom_push(self, key, value) -> None:
        self.xcoms[key] = value

    def xcom_pull(self, task_ids: str, key: str = "return_value"):
        """The return values of upstream tasks (the sweep's plan for the mapped GPU stages)."""
        return self.upstream[task_ids]


def task_context(dag, task, run_id: str = RUN_ID, conf: dict | None = None, map_index: int = 0) -> dict:
    """A run-time context as the task runner builds it: params resolved with the trigger's conf; the
    `sweep` task's plan for those params, as the mapped instance `map_index` pulls it."""
    from tasks.pipeline.config import load_config
    from tasks.pipeline.variants import plan_variants

    params = copy.deepcopy(dag.params)
    for key, value in (conf or {}).items():
        params[key] = value
    params = params.validate()
    plan = plan_variants(load_config("gemma_2b_lora", {"variants": json.dumps(params.get("variants", []))}))
    return {
        "dag": dag,
        "task": task,
        "run_id": run_id,
        "params": params,
        "ti": StubTaskInstance(dag.dag_id, task.task_id, map_index, {"sweep": plan}),
    }


@pytest.fixture
def fake_cluster(tmp_path, monkeypatch):
    """A FakeKubeAPI on 127.0.0.1 that the default Kubernetes connection points at.

    The Kaggle Secret holds the recognisable fake credentials. Only the XCom sidecar's websocket
    exec is stubbed: the provider's two exec calls read the file the "container" wrote and stop the
    sidecar, as the real `cat` and `kill` would.
    """
    import json

    from airflow.providers.cncf.kubernetes.utils.pod_manager import PodManager

    from tests.k8s.fake_kube_api import FakeKubeAPI

    api = FakeKubeAPI(
        secrets={("gemma", "kaggle-credentials"): {"username": FAKE_KAGGLE_USERNAME, "key": FAKE_KAGGLE_KEY}}
    ).start()
    kubeconfig = api.write_kubeconfig(tmp_path / "kubeconfig", "gemma")
    monkeypatch.setenv(
        "AIRFLOW_CONN_KUBERNETES_DEFAULT",
        json.dumps({"conn_type": "kubernetes", "extra": {"kube_config_path": str(kubeconfig)}}),
    )
    monkeypatch.setattr(PodManager, "extract_xcom_json", lambda self, pod: api.read_xcom(pod.metadata.namespace, pod.metadata.name))
    monkeypatch.setattr(PodManager, "extract_xcom_kill", lambda self, pod: api.kill_sidecar(pod.metadata.namespace, pod.metadata.name))
    yield api
    api.stop()
