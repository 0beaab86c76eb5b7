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

from tests.k8s.conftest import DAG_FILE, DAG_ID, GPU_STAGES, REPO, RUN_ID, kubernetes_env, task_context

# A cluster version a couple of years old and the newest schema kubernetes-validate bundles.
K8S_VERSIONS = ("1.30", "1.37")
TRIGGER_CONF = {
    "num_examples": 24, "learning_rate": 0.0001, "lora_rank": 8, "model_preset": "gemma2_2b_en",
    "sampler": "greedy", "dataset_source": "bundled", "weight_decay": 0.0,
}


class _Response:
    def __init__(self, data: dict):
        self.data = json.dumps(data)


def render_pod(dag, stage: str, run_id: str = RUN_ID, conf: dict | None = None) -> tuple[dict, V1Pod]:
    """(the pod as the JSON the API server would get, the same read back as a V1Pod)."""
    op = copy.deepcopy(dag.get_task(stage))
    ctx = task_context(dag, op, run_id, conf)
    op.render_template_fields(ctx)
    pod = op.build_pod_request_obj(ctx, dry_run=True)
    client = ApiClient()
    manifest = yaml.safe_load(yaml.safe_dump(client.sanitize_for_serialization(pod)))
    return manifest, client.deserialize(_Response(manifest), "V1Pod")


def local_argv(module, stage: str, run_id: str, params: dict) -> list[str]:
    """What the local runner (`argv_for`) passes to `tasks.<stage>.main` for these params and run id."""
    overrides = {k: v for k, v in params.items() if k in module.PARAMS}
    return module.stage_argv(stage, module.CONFIG, str(module.run_dir_for(run_id)), overrides)


def base_container(pod: V1Pod):
    return next(c for c in pod.spec.containers if c.name == "base")


@pytest.mark.parametrize("stage", GPU_STAGES)
def test_gpu_stage_pod(k8s_dag_module, stage):
    from tasks.k8s_pod import SETTINGS

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


@pytest.mark.parametrize("conf", [None, TRIGGER_CONF], ids=["defaults", "trigger-conf"])
@pytest.mark.parametrize("stage", GPU_STAGES)
def test_pod_argv_is_the_local_runners_argv(k8s_dag_module, stage, conf):
    dag, module = k8s_dag_module
    _, pod = render_pod(dag, stage, RUN_ID, conf)
    params = task_context(dag, dag.get_task(stage), RUN_ID, conf)["params"]
    expected = local_argv(module, stage, RUN_ID, params)
    assert base_container(pod).args == expected
    assert expected[:2] == ["--config", "gemma_2b_lora"]  # the kubernetes runner's default config
    if conf:
        assert "--set" in expected and "learning_rate=0.0001" in expected and "sampler=greedy" in expected


@pytest.mark.parametrize("stage", GPU_STAGES)
def test_the_stage_cli_accepts_the_rendered_argv(k8s_dag_module, stage):
    """The argv parses and its overrides validate with the stage's own CLI (no model is loaded)."""
    import argparse

    from tasks.config import load_config, parse_overrides

    dag, _ = k8s_dag_module
    _, pod = render_pod(dag, stage, RUN_ID, TRIGGER_CONF)
    ap = argparse.ArgumentParser()
    ap.add_argument("--config"), ap.add_argument("--run-dir"), ap.add_argument("--set", action="append")
    args = ap.parse_args(base_container(pod).args)
    cfg = load_config(args.config, parse_overrides(args.set))
    assert cfg.learning_rate == 0.0001 and cfg.lora_rank == 8 and cfg.num_examples == 24


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
    chain = [[a, b] for a, b in zip(module.STAGES, module.STAGES[1:])]
    assert k8s["edges"] == local["edges"] == sorted(chain + [["snapshot", "snapshot_changed"]])
    assert sorted(k8s["tasks"]) == sorted(local["tasks"]) == sorted([*module.STAGES, "snapshot_changed"])
    assert {t: k8s["tasks"][t] for t in GPU_STAGES} == {t: "KubernetesPodOperator" for t in GPU_STAGES}
    assert all(k8s["tasks"][t] == local["tasks"][t] for t in module.STAGES if t not in GPU_STAGES)


def test_a_bad_pod_setting_is_an_import_error_that_names_it():
    env = {**os.environ, "GEMMA_RUNNER": "kubernetes", "GEMMA_GPU_COUNT": "two"}
    out = subprocess.run([sys.executable, str(DAG_FILE)], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode != 0
    assert "gpu_count" in out.stderr and "GEMMA_GPU_COUNT" in out.stderr and "'two'" in out.stderr
