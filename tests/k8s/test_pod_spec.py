"""The pods of the GPU stages, rendered by the provider's own code, as a cluster would receive them.

`render_template_fields` + `build_pod_request_obj(dry_run=True)` is what the operator does before it
POSTs the pod; the result goes through the kubernetes client's serialiser, back into a V1Pod, and is
checked against the local runner's argv and an offline copy of the Kubernetes API schema.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys

import kubernetes_validate
import pytest
import yaml
from kubernetes.client import ApiClient, V1Pod
from kubernetes.utils import parse_quantity

from tasks.pipeline.artifacts import STAGES
from tests.k8s.conftest import DAG_FILE, DAG_ID, GPU_STAGES, REPO, RUN_ID, kubernetes_env, parse_kubernetes_dag, task_context

pytestmark = pytest.mark.unit

# A cluster version a couple of years old and the newest schema kubernetes-validate bundles.
K8S_VERSIONS = ("1.30", "1.37")
TRIGGER_CONF = {
    "num_examples": 24, "learning_rate": 0.0001, "lora_rank": 8, "model_preset": "gemma2_2b_en",
    "sampler": "greedy", "dataset_source": "bundled", "weight_decay": 0.0,
}


class _Response:
    def __init__(self, data: dict):
        self.data = json.dumps(data)


def render_pod(dag, stage: str, run_id: str = RUN_ID, conf: dict | None = None, map_index: int = 0) -> tuple[dict, V1Pod]:
    """(the pod as the JSON the API server would get, the same read back as a V1Pod), for the mapped
    instance `map_index` (the sweep's variant of that index)."""
    op = copy.deepcopy(dag.get_task(stage))
    ctx = task_context(dag, op, run_id, conf, map_index)
    op.render_template_fields(ctx)
    pod = op.build_pod_request_obj(ctx, dry_run=True)
    client = ApiClient()
    manifest = yaml.safe_load(yaml.safe_dump(client.sanitize_for_serialization(pod)))
    return manifest, client.deserialize(_Response(manifest), "V1Pod")


def local_argv(module, stage: str, run_id: str, params: dict, spec: dict) -> list[str]:
    """What the local runner (`argv_for`) passes to `tasks.<stage>.main` for these params, run id
    and variant spec."""
    overrides = {k: v for k, v in params.items() if k in module.PARAMS and k not in module.VARIANT_PARAMS}
    return module.stage_argv(stage, module.CONFIG, str(module.run_dir_for(run_id)), overrides,
                             json.dumps(spec, sort_keys=True))


def base_container(pod: V1Pod):
    return next(c for c in pod.spec.containers if c.name == "base")


@pytest.mark.parametrize("stage", GPU_STAGES)
def test_gpu_stage_pod(k8s_dag_module, stage):
    from tasks.infra.pod_settings import SETTINGS

    dag, module = k8s_dag_module
    _, pod = render_pod(dag, stage)
    base = base_container(pod)
    assert pod.metadata.namespace == SETTINGS["namespace"][0]
    assert base.image == SETTINGS["image"][0]
    assert base.command == ["python", "-m", f"tasks.{stage}"]
    assert base.resources.limits["nvidia.com/gpu"] == "1"
    assert parse_quantity(base.resources.requests["memory"]) == parse_quantity("32Gi")

    env = {e.name: e for e in base.env}
    assert env["GEMMA_WRITE_XCOM"].value == "1" and env["GEMMA_REQUIRE_GPU"].value == "1"
    assert env["GEMMA_ALLOW_CPU"].value == "0"
    for name, key in (("KAGGLE_USERNAME", "username"), ("KAGGLE_KEY", "key")):
        assert env[name].value is None, f"{name} must come from the Secret, not a plain value"
        ref = env[name].value_from.secret_key_ref
        assert (ref.name, ref.key) == ("kaggle-credentials", key)

    # The run root is mounted at the workers' path, so the --run-dir in the argv is the same folder.
    mounts = {m.name: m.mount_path for m in base.volume_mounts}
    assert mounts["run-root"] == str(module.RUN_ROOT) == os.environ["GEMMA_RUN_ROOT"]
    assert mounts["xcom"] == "/airflow/xcom"
    claims = {v.name: v.persistent_volume_claim.claim_name for v in pod.spec.volumes if v.persistent_volume_claim}
    assert claims == {"run-root": "gemma-runs"}
    run_dir = base.args[base.args.index("--run-dir") + 1]
    assert run_dir.startswith(mounts["run-root"] + "/runs/")

    assert [(t.key, t.operator, t.effect) for t in pod.spec.tolerations] == [("nvidia.com/gpu", "Exists", "NoSchedule")]
    assert pod.spec.node_selector == {}
    labels = pod.metadata.labels
    assert labels["app"] == "gemma-lora" and labels["stage"] == stage and labels["task_id"] == stage
    assert labels["dag_id"] == DAG_ID and labels["run_id"].startswith("manual__2026-11-28T04")
    assert pod.spec.restart_policy == "Never" and pod.spec.service_account_name == "gemma-stage"
    assert pod.spec.automount_service_account_token is False
    assert pod.spec.active_deadline_seconds == int(module.TIMEOUTS[stage].total_seconds()) + 900
    assert base.termination_message_policy == "FallbackToLogsOnError"
    assert [c.name for c in pod.spec.containers] == ["base", "airflow-xcom-sidecar"]
    assert restricted_violations(pod) == []


def restricted_violations(pod: V1Pod) -> list[str]:
    """The "restricted" Pod Security Standard's checks that docker/k8s/00-namespace.yaml enforces."""
    spec, found = pod.spec, []
    if spec.host_network or spec.host_pid or spec.host_ipc:
        found.append("host namespaces")
    for v in spec.volumes or []:
        if not (v.empty_dir or v.persistent_volume_claim or v.secret or v.config_map or v.projected):
            found.append(f"volume type of {v.name}")
    pod_sc = spec.security_context
    for c in [*(spec.init_containers or []), *spec.containers]:
        sc = c.security_context
        if not sc or sc.allow_privilege_escalation is not False:
            found.append(f"{c.name}: allowPrivilegeEscalation")
        if not sc or not sc.capabilities or "ALL" not in (sc.capabilities.drop or []):
            found.append(f"{c.name}: capabilities not dropped")
        if sc and sc.privileged:
            found.append(f"{c.name}: privileged")
        if not ((sc and sc.run_as_non_root) or (pod_sc and pod_sc.run_as_non_root)):
            found.append(f"{c.name}: runAsNonRoot")
        if 0 in ((sc and sc.run_as_user), (pod_sc and pod_sc.run_as_user)):
            found.append(f"{c.name}: runAsUser 0")
        seccomp = (sc and sc.seccomp_profile) or (pod_sc and pod_sc.seccomp_profile)
        if not seccomp or seccomp.type not in ("RuntimeDefault", "Localhost"):
            found.append(f"{c.name}: seccompProfile")
    return found


@pytest.mark.parametrize("conf", [None, {**TRIGGER_CONF, "export_formats": ["gguf"], "variants": [{"lora_rank": 4}]}],
                         ids=["defaults", "trigger-conf"])
def test_export_pod_argv_is_the_local_runners_argv(k8s_dag_module, conf):
    """export runs once, not per variant: its pod gets every Param (lists as JSON) and no --variant."""
    dag, module = k8s_dag_module
    _, pod = render_pod(dag, "export", RUN_ID, conf)
    ctx = task_context(dag, dag.get_task("export"), RUN_ID, conf)
    overrides = {k: v for k, v in ctx["params"].items() if k in module.PARAMS}
    expected = module.stage_argv("export", module.CONFIG, str(module.run_dir_for(RUN_ID)), overrides)
    assert base_container(pod).args == expected and "--variant" not in expected
    assert base_container(pod).command == ["python", "-m", "tasks.export"]
    if conf:
        assert 'export_formats=["gguf"]' in expected and 'variants=[{"lora_rank": 4}]' in expected


@pytest.mark.parametrize("conf", [None, TRIGGER_CONF], ids=["defaults", "trigger-conf"])
@pytest.mark.parametrize("stage", GPU_STAGES)
def test_pod_argv_is_the_local_runners_argv(k8s_dag_module, stage, conf):
    dag, module = k8s_dag_module
    _, pod = render_pod(dag, stage, RUN_ID, conf)
    ctx = task_context(dag, dag.get_task(stage), RUN_ID, conf)
    expected = local_argv(module, stage, RUN_ID, ctx["params"], ctx["ti"].upstream["sweep"][0])
    assert base_container(pod).args == expected
    assert expected[:2] == ["--config", "gemma_2b_lora"]  # the kubernetes runner's default config
    if conf:
        assert "--set" in expected and "learning_rate=0.0001" in expected and "sampler=greedy" in expected


@pytest.mark.parametrize("stage", GPU_STAGES)
def test_the_stage_cli_accepts_the_rendered_argv(k8s_dag_module, stage):
    """The argv parses and its overrides validate with the stage's own CLI (no model is loaded)."""
    import argparse

    from tasks.pipeline.config import load_config, parse_overrides

    dag, _ = k8s_dag_module
    _, pod = render_pod(dag, stage, RUN_ID, TRIGGER_CONF)
    ap = argparse.ArgumentParser()
    ap.add_argument("--config"), ap.add_argument("--run-dir"), ap.add_argument("--set", action="append")
    ap.add_argument("--variant")
    args = ap.parse_args(base_container(pod).args)
    cfg = load_config(args.config, parse_overrides(args.set))
    assert cfg.learning_rate == 0.0001 and cfg.lora_rank == 8 and cfg.num_examples == 24
    assert json.loads(args.variant) == {"index": 0, "name": "", "label": "as configured", "overrides": {}}


AWKWARD = 'it\'s "quoted", a \\ backslash, {braces}, a line\u2028separator and \u00e9'


@pytest.mark.parametrize("stage", GPU_STAGES)
def test_awkward_text_arrives_in_the_pod_as_the_worker_validated_it(k8s_dag_module, stage):
    """Quotes, a backslash and U+2028 in a string Param and in a mapping Param: the pod's argv parses
    to the config the worker validated, and to what the local runner's argv parses to."""
    import argparse

    from tasks.pipeline.config import load_config, parse_overrides

    dag, module = k8s_dag_module
    columns = {"instruction": AWKWARD, "response": "answer " + AWKWARD}
    conf = {**TRIGGER_CONF, "dataset_format": "columns", "dataset_columns": columns, "dataset_split": AWKWARD}
    _, pod = render_pod(dag, stage, RUN_ID, conf)
    ap = argparse.ArgumentParser()
    ap.add_argument("--config"), ap.add_argument("--run-dir"), ap.add_argument("--set", action="append")
    ap.add_argument("--variant")
    in_pod = load_config(ap.parse_args(base_container(pod).args).config, parse_overrides(ap.parse_args(base_container(pod).args).set))
    ctx = task_context(dag, dag.get_task(stage), RUN_ID, conf)
    on_worker = load_config("gemma_2b_lora", {k: v for k, v in ctx["params"].items() if k in module.PARAMS})
    local = local_argv(module, stage, RUN_ID, ctx["params"], ctx["ti"].upstream["sweep"][0])
    locally = load_config(ap.parse_args(local).config, parse_overrides(ap.parse_args(local).set))
    assert in_pod.dataset_columns == on_worker.dataset_columns == locally.dataset_columns == columns
    assert in_pod.dataset_split == on_worker.dataset_split == locally.dataset_split == AWKWARD
    assert in_pod == on_worker == locally


SWEEP_CONF = {**TRIGGER_CONF, "variants": [{"lora_rank": 4}, {"lora_rank": 16, "learning_rate": 0.0002}, {}]}


@pytest.mark.parametrize("stage", GPU_STAGES)
def test_each_mapped_pod_carries_its_own_variant(k8s_dag_module, stage, tmp_path):
    """One pod per variant: the rendered argv of mapped instance i names variant i and its overrides,
    and the stage's CLI turns them into that variant's config and folder."""
    from tasks.infra.cli import stage_main

    dag, module = k8s_dag_module
    seen = []
    for i, want in enumerate(SWEEP_CONF["variants"]):
        _, pod = render_pod(dag, stage, RUN_ID, SWEEP_CONF, map_index=i)
        args = base_container(pod).args
        spec = json.loads(args[args.index("--variant") + 1])
        assert spec["index"] == i and spec["name"] == f"v{i}" and spec["overrides"] == want
        assert not any(a.startswith("variants=") for a in args)  # the sweep's list stays with the sweep
        ctx = task_context(dag, dag.get_task(stage), RUN_ID, SWEEP_CONF, i)
        assert args == local_argv(module, stage, RUN_ID, ctx["params"], spec)

        # The stage's own CLI with this argv (run dir moved to tmp_path; a stand-in run() records).
        argv = list(args)
        argv[argv.index("--run-dir") + 1] = str(tmp_path / "run")
        stage_main(stage, None, lambda cfg, run_dir, force: seen.append((cfg, run_dir)) or {}, argv)
    cfgs = [cfg for cfg, _ in seen]
    assert [c.lora_rank for c in cfgs] == [4, 16, 8]  # the third variant keeps the trigger's lora_rank
    assert [c.learning_rate for c in cfgs] == [0.0001, 0.0002, 0.0001]
    assert [c.num_examples for c in cfgs] == [24, 24, 24] and all(c.variants == () for c in cfgs)
    assert [run_dir for _, run_dir in seen] == [tmp_path / "run" / "variants" / f"v{i}" for i in range(3)]
    for i in range(3):
        assert (tmp_path / "run" / "variants" / f"v{i}" / "preprocess").resolve() == (tmp_path / "run" / "preprocess").resolve()


def test_sweep_pods_are_bounded_by_a_setting_and_a_pool(monkeypatch):
    """max_parallel_pods and pool reach both GPU operators (checked on a fresh parse)."""
    dag = parse_kubernetes_dag(monkeypatch, GEMMA_MAX_PARALLEL_PODS="2", GEMMA_POOL="gpu_pool")
    for stage in GPU_STAGES:
        op = dag.get_task(stage)
        assert (op.max_active_tis_per_dag, op.pool) == (2, "gpu_pool")
        assert op.task_group.group_id == "variant" and type(op.task_group).__name__ == "MappedTaskGroup"


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("stage", GPU_STAGES)
def test_manifest_is_valid_kubernetes(k8s_dag_module, stage, version):
    dag, _ = k8s_dag_module
    manifest, pod = render_pod(dag, stage)
    kubernetes_validate.validate(manifest, version, strict=True)
    quantities = [
        (c.name, kind, res, value)
        for c in pod.spec.containers
        for kind, values in (("requests", c.resources.requests), ("limits", c.resources.limits))
        for res, value in (values or {}).items()
    ]
    assert len(quantities) >= 6
    for name, kind, res, value in quantities:
        assert parse_quantity(value) > 0, (name, kind, res, value)
    base = base_container(pod)
    for res in ("cpu", "memory"):
        assert parse_quantity(base.resources.requests[res]) <= parse_quantity(base.resources.limits[res])


def parse_in_subprocess(env_overrides: dict[str, str | None]) -> dict:
    """Parse the DAG file in a fresh interpreter, as a dag-processor does, and serialise it."""
    code = f"""
import json, sys
from airflow.dag_processing.dagbag import DagBag
from airflow.serialization.serialized_objects import DagSerialization
bag = DagBag(dag_folder={str(DAG_FILE)!r})
dag = bag.dags[{DAG_ID!r}]
DagSerialization.to_dict(dag)
print(json.dumps({{
    "errors": {{k: str(v) for k, v in bag.import_errors.items()}},
    "tasks": {{t.task_id: type(t).__name__ for t in dag.tasks}},
    "edges": sorted([t.task_id, d] for t in dag.tasks for d in t.downstream_task_ids),
    "ml": [m for m in ("tensorflow", "keras", "keras_hub", "datasets", "kagglehub") if m in sys.modules],
}}))
"""
    env = {**os.environ}
    for key, value in env_overrides.items():
        env.pop(key, None) if value is None else env.__setitem__(key, value)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_dag_parses_in_kubernetes_mode_with_the_same_tasks_and_edges(k8s_dag_module):
    """No import error, no ML import, serialisable, and the local runner's task ids and edges."""
    _, module = k8s_dag_module
    k8s = parse_in_subprocess(kubernetes_env())
    local = parse_in_subprocess({"GEMMA_RUNNER": "local"})
    assert k8s["errors"] == {} and k8s["ml"] == []
    with_approval = list(STAGES[:-1]) + ["approve", STAGES[-1]]
    chain = [[a, b] for a, b in zip(with_approval, with_approval[1:])]
    extra = [["snapshot", "snapshot_changed"], ["sweep", "generate"], ["generate", "report"]]
    assert k8s["edges"] == local["edges"] == sorted(chain + extra)
    assert sorted(k8s["tasks"]) == sorted(local["tasks"]) == sorted([*STAGES, "snapshot_changed", "approve"])
    pods = (*GPU_STAGES, "export")  # export merges the model where the memory is
    assert {t: k8s["tasks"][t] for t in pods} == {t: "KubernetesPodOperator" for t in pods}
    assert all(k8s["tasks"][t] == local["tasks"][t] for t in STAGES if t not in pods)


def test_a_bad_pod_setting_is_an_import_error_that_names_it():
    env = {**os.environ, "GEMMA_RUNNER": "kubernetes", "GEMMA_GPU_COUNT": "two"}
    out = subprocess.run([sys.executable, str(DAG_FILE)], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode != 0
    assert "gpu_count" in out.stderr and "GEMMA_GPU_COUNT" in out.stderr and "'two'" in out.stderr


def test_pods_log_to_the_configured_tracking_server(monkeypatch):
    """[gemma] mlflow_tracking_uri reaches every GPU pod as GEMMA_MLFLOW_TRACKING_URI (the SQLite
    default cannot take parallel writers); unset, the pods get none and use the run root's store."""
    from airflow.dag_processing.dagbag import DagBag

    for key, value in kubernetes_env().items():
        monkeypatch.delenv(key, raising=False) if value is None else monkeypatch.setenv(key, value)
    for uri in ("http://mlflow.ml.svc:5000", None):
        monkeypatch.delenv("GEMMA_MLFLOW_TRACKING_URI", raising=False) if uri is None else \
            monkeypatch.setenv("GEMMA_MLFLOW_TRACKING_URI", uri)
        dag = DagBag(dag_folder=str(DAG_FILE)).dags[DAG_ID]
        for stage in GPU_STAGES:
            env = {e.name: e.value for e in dag.get_task(stage).env_vars}
            assert env.get("GEMMA_MLFLOW_TRACKING_URI") == uri


def test_a_four_gpu_pod_asks_for_four_and_its_finetune_uses_them(monkeypatch):
    """gpu_count: 4 is the pod's GPU limit; the stage needs nothing else: the device plugin exposes
    the four GPUs, the start-up check lists them, and data_parallel auto (the default) trains on all
    of them. No CUDA_VISIBLE_DEVICES narrows them."""
    from airflow.dag_processing.dagbag import DagBag

    from tasks.pipeline.config import load_config

    for key, value in {**kubernetes_env(), "GEMMA_GPU_COUNT": "4"}.items():
        monkeypatch.delenv(key, raising=False) if value is None else monkeypatch.setenv(key, value)
    dag = DagBag(dag_folder=str(DAG_FILE)).dags[DAG_ID]
    for stage in GPU_STAGES:
        _, pod = render_pod(dag, stage)
        base = base_container(pod)
        assert base.resources.limits["nvidia.com/gpu"] == "4"
        env = {e.name: e.value for e in base.env}
        assert env["GEMMA_REQUIRE_GPU"] == "1" and "CUDA_VISIBLE_DEVICES" not in env
        assert not any(a.startswith("data_parallel=") for a in base.args)  # the config's default: auto
    assert load_config("gemma_2b_lora").data_parallel == "auto"


def test_pods_take_the_runs_retries_setting(monkeypatch):
    """[gemma] retries / retry_delay_s are one setting for every task of a run: a killed pod is
    retried like a killed local task (and resumes from its checkpoint)."""
    import datetime as dt

    from airflow.dag_processing.dagbag import DagBag

    for key, value in {**kubernetes_env(), "GEMMA_RETRIES": "4", "GEMMA_RETRY_DELAY_S": "40"}.items():
        monkeypatch.delenv(key, raising=False) if value is None else monkeypatch.setenv(key, value)
    dag = DagBag(dag_folder=str(DAG_FILE)).dags[DAG_ID]
    for task in dag.tasks:
        assert (task.task_id, task.retries, task.retry_delay) == (task.task_id, 4, dt.timedelta(seconds=40))
    assert {type(dag.get_task(s)).__name__ for s in GPU_STAGES} == {"KubernetesPodOperator"}


def test_tracking_credentials_come_from_a_secret_and_never_in_the_uri(monkeypatch):
    """[gemma] mlflow_secret: the pods get MLflow's basic-auth env from a Secret (secretKeyRef); a
    tracking URI with credentials in it is refused, naming the setting (it would be plain env)."""
    dag = parse_kubernetes_dag(monkeypatch, GEMMA_MLFLOW_TRACKING_URI="https://mlflow.ml.svc",
                               GEMMA_MLFLOW_SECRET="mlflow-credentials")
    for stage in GPU_STAGES:
        task = dag.get_task(stage)
        refs = {s.deploy_target: (s.secret, s.key) for s in task.secrets}
        assert refs["MLFLOW_TRACKING_USERNAME"] == ("mlflow-credentials", "username")
        assert refs["MLFLOW_TRACKING_PASSWORD"] == ("mlflow-credentials", "password")
        assert not {"MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"} & {e.name for e in task.env_vars}

    from tasks.infra.pod_settings import PodSettingError, pod_settings

    monkeypatch.setenv("GEMMA_MLFLOW_TRACKING_URI", "https://ml:s3cret@mlflow.ml.svc")
    with pytest.raises(PodSettingError, match=r"mlflow_tracking_uri \(GEMMA_MLFLOW_TRACKING_URI\): credentials in the URI") as e:
        pod_settings()
    assert "s3cret" not in str(e.value)


def test_the_image_filesystem_is_read_only_and_scratch_is_bounded(k8s_dag_module):
    """readOnlyRootFilesystem on every container; the stage's temp files, HOME and caches on an
    emptyDir at /tmp; an ephemeral-storage limit on the pod (and the emptyDir's size)."""
    dag, _ = k8s_dag_module
    _, pod = render_pod(dag, "finetune", RUN_ID, None)
    for c in pod.spec.containers:
        assert c.security_context.read_only_root_filesystem is True, c.name
    base = pod.spec.containers[0]
    scratch = {v.name: v for v in pod.spec.volumes}["scratch"]
    assert scratch.empty_dir.size_limit == "20Gi"
    assert {m.mount_path: m.name for m in base.volume_mounts}["/tmp"] == "scratch"
    env = {e.name: e.value for e in base.env}
    assert env["HOME"] == "/tmp" and env["XDG_CACHE_HOME"].startswith("/tmp/") and env["KERAS_HOME"].startswith("/tmp/")
    assert base.resources.limits["ephemeral-storage"] == "20Gi"


@pytest.mark.parametrize("image", ["registry.example/gemma-lora-pipeline@sha256:" + "ab" * 32,
                                   "registry.example:5000/ml/gemma-lora-pipeline:0.1.0@sha256:" + "0f" * 32])
def test_the_image_can_be_pinned_by_digest(monkeypatch, image):
    from tasks.infra.pod_settings import pod_settings

    for key, value in kubernetes_env().items():
        monkeypatch.delenv(key, raising=False) if value is None else monkeypatch.setenv(key, value)
    monkeypatch.setenv("GEMMA_IMAGE", image)
    assert pod_settings().image == image
