"""The whole DAG with the kubernetes runner, every pod for real: `dag.test()` on the tiny config, the
real KubernetesPodOperator talking to the loopback API (tests/k8s/fake_kube_api.py) in its podman
mode, so that `finetune`, `generate` and `export` each run in the cpu image as uid 50000, against one
run root shared with the worker. Then the same run with the local runner: the outputs agree.

What is compared, and what is not (the same seed, data and config both ways):
- the adapter's weights, within an absolute 1e-5 (the same TensorFlow build in the image and here);
- `answers.json`, except its timing fields (`seconds`, `batch_seconds`) and the prompt suite's path
  (the package lives in the image's venv in the pod);
- the report's `metrics.json`, except timings and wall times, the export's parity (the image carries
  no parity runtimes) and provenance that names paths or hosts.
"""

from __future__ import annotations

import datetime as dt
import os
from pathlib import Path

import pytest
import yaml

from tasks.pipeline.config import config_path
from tests.k8s import podman
from tests.k8s.conftest import DAG_FILE, DAG_ID, FAKE_KAGGLE_KEY, FAKE_KAGGLE_USERNAME
from tests.k8s.fake_kube_api import FakeKubeAPI

pytestmark = [pytest.mark.image, pytest.mark.xdist_group("podman")]

# Training keys only: a trusted run, promoted without a person (dag.test would wait for one).
CONF = {"num_examples": 16, "export_formats": ["keras"]}
TOLERANCE = 1e-5
TIMING = {"seconds", "batch_seconds", "generation_seconds", "wall_seconds", "started_at", "finished_at", "timings", "stage_seconds",
          "train_seconds", "tokens_per_second", "real_tokens_per_second", "steps_per_second", "seconds_per_step"}


def run_dag(runner: str, run_root: Path, image: str, workdir: Path, day: int, config: Path):
    """dag.test() of the DAG parsed with `runner`; (the DagRun, its run folder)."""
    from airflow.dag_processing.dagbag import DagBag

    from tasks.infra.settings import run_dir_for

    env = podman.pod_settings_env(run_root, image, GEMMA_RUNNER=runner, GEMMA_CONFIG=str(config))
    api = FakeKubeAPI(secrets={("gemma", "kaggle-credentials"): {"username": FAKE_KAGGLE_USERNAME, "key": FAKE_KAGGLE_KEY}},
                      podman_run_root=str(run_root), workdir=workdir).start()
    old_umask = os.umask(0o002)  # the worker's files are group-writable, as the Airflow image's uid 50000 / gid 0 makes them
    try:
        with pytest.MonkeyPatch.context() as mp:
            for key, value in env.items():
                mp.setenv(key, value)
            podman.wire_operator(mp, api, workdir)
            bag = DagBag(dag_folder=str(DAG_FILE))
            assert bag.import_errors == {}
            when = dt.datetime(2026, 12, day, 9, 0, tzinfo=dt.timezone.utc)
            dag_run = bag.dags[DAG_ID].test(run_after=when, logical_date=when, run_conf=CONF)
            return dag_run, run_dir_for(dag_run.run_id), api
    finally:
        os.umask(old_umask)
        api.stop()


@pytest.fixture(scope="module")
def both_runs(airflow_db, tmp_path_factory):
    image = podman.ready_image("cpu")
    shared = podman.shared_run_root(tmp_path_factory.mktemp("k8s-shared"))
    # tiny_test with wide gate margins: the gate passes whatever the tiny model scores, so export runs
    # in its pod and promote promotes (the gate's own rules are tests/tasks/test_report.py's). A config
    # named by path must be where the pods see it too: on the shared volume.
    config = shared / "tiny_open_gate.yaml"
    config.write_text(yaml.safe_dump({**yaml.safe_load(config_path("tiny_test").read_text()), "gate_rouge_l_margin": 1.0,
                                      "gate_eos_rate_margin": 1.0, "gate_perplexity_margin": 100.0}))
    k8s = run_dag("kubernetes", shared, image, tmp_path_factory.mktemp("pods"), 1, config)
    local = run_dag("local", tmp_path_factory.mktemp("local") / "run-root", image, tmp_path_factory.mktemp("unused"), 2, config)
    return {"kubernetes": k8s, "local": local}


def states(dag_run) -> dict:
    return {(ti.task_id, ti.map_index): ti.state for ti in dag_run.get_task_instances()}


def test_every_pod_stage_ran_in_the_image_as_uid_50000(both_runs):
    dag_run, run_dir, api = both_runs["kubernetes"]
    assert dag_run.state == "success", states(dag_run)
    created = {p["metadata"]["labels"]["stage"]: p for p in api.created}
    assert set(created) == {"finetune", "generate", "export"}
    for stage, pod in created.items():
        assert pod["spec"]["containers"][0]["image"].endswith("gemma-lora-pipeline:0.1.0-cpu")
        assert pod["spec"]["securityContext"]["runAsUser"] == 50000
    from tasks.pipeline import artifacts

    for path in (artifacts.path(run_dir, artifacts.FINETUNE, artifacts.ADAPTER),
                 artifacts.path(run_dir, artifacts.GENERATE, artifacts.ANSWERS),
                 artifacts.path(run_dir, artifacts.EXPORT, artifacts.MANIFEST)):
        assert path.stat().st_uid == 50000, path  # written in the pod
    assert artifacts.report_path(run_dir).stat().st_uid == os.getuid()  # the worker's
    assert api.deleted and not podman.podman("pod", "ps", "-q", "--filter", "label=app=gemma-lora").stdout.strip()


def without(value, drop: set):
    if isinstance(value, dict):
        return {k: without(v, drop) for k, v in value.items() if k not in drop}
    if isinstance(value, list):
        return [without(v, drop) for v in value]
    return value


def test_the_kubernetes_runner_gives_the_local_runners_outputs(both_runs):
    import h5py
    import numpy as np

    from tasks.pipeline import artifacts

    (_, k8s_dir, _), (local_run, local_dir, _) = both_runs["kubernetes"], both_runs["local"]
    assert local_run.state == "success", states(local_run)

    def weights(run_dir: Path) -> dict:
        with h5py.File(artifacts.path(run_dir, artifacts.FINETUNE, artifacts.ADAPTER), "r") as f:
            out = {}
            f.visititems(lambda name, obj: out.__setitem__(name, np.array(obj)) if isinstance(obj, h5py.Dataset) else None)
            return out

    a, b = weights(k8s_dir), weights(local_dir)
    assert a.keys() == b.keys() and a
    worst = max(float(np.max(np.abs(a[k].astype(np.float64) - b[k].astype(np.float64)))) for k in a)
    assert worst <= TOLERANCE, f"adapter weights differ by up to {worst}"

    answers = [without(artifacts.read_answers(d), TIMING) for d in (k8s_dir, local_dir)]
    for one in answers:
        one["suite"].pop("path")
    assert answers[0] == answers[1]

    metrics = [without(artifacts.read_metrics(d), TIMING | {"parity", "run_dir", "host", "hostname", "path"}) for d in (k8s_dir, local_dir)]
    assert metrics[0] == metrics[1]
