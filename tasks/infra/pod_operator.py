"""The `kubernetes` runner: the GPU stages (finetune, generate, export) as KubernetesPodOperator
tasks, one pod each (one per variant for the mapped ones).

The pod runs the same `python -m tasks.<stage> --config ... --run-dir ... --set ...` argv as the local
runner, on the training image (docker/), with the run root mounted from a PersistentVolumeClaim at
the SAME path as on the workers, so the run directory in the argv means the same folder in both.
Its settings are tasks.infra.pod_settings. Only imported in kubernetes mode; imports nothing ML.
"""

from __future__ import annotations

import datetime as dt
import re

from tasks.infra.pod_settings import PodSettings, pod_settings

POD_LABELS = {"app": "gemma-lora"}
RUN_ROOT_VOLUME = "run-root"
# The pod's writable scratch (an emptyDir): temp files, HOME and the libraries' caches.
SCRATCH_VOLUME, SCRATCH = "scratch", "/tmp"
BASE_CONTAINER = "base"


def _explain_failure_callback(settings: PodSettings):
    """A provider callback that says, in the task log, why a stage's container died and what to change."""
    from airflow.providers.cncf.kubernetes.callbacks import KubernetesPodOperatorCallback

    class ExplainFailure(KubernetesPodOperatorCallback):
        @staticmethod
        def on_pod_completion(*, pod, operator, **kwargs) -> None:
            statuses = (pod.status.container_statuses if pod and pod.status else None) or []
            base = next((s for s in statuses if s.name == BASE_CONTAINER), None)
            ended = base.state.terminated if base and base.state else None
            if not ended or ended.exit_code == 0:
                return
            where = f"pod {settings.namespace}/{pod.metadata.name}"
            if ended.reason == "OOMKilled":
                operator.log.error(
                    "stage %s: container OOMKilled (exit code %s): it needed more than memory_limit=%s. "
                    "Raise [gemma] memory_limit / GEMMA_MEMORY_LIMIT (and memory_request), or lower batch_size. %s",
                    operator.task_id, ended.exit_code, settings.limits.get("memory", "none"), where,
                )
            else:
                operator.log.error(
                    "stage %s: container exited with code %s (reason %s); its last log lines are above. %s",
                    operator.task_id, ended.exit_code, ended.reason, where,
                )

    return ExplainFailure


def gpu_stage_operator(task_id: str, arguments: list[str], execution_timeout: dt.timedelta,
                       map_index_template: str | None = None, trigger_rule: str = "all_success"):
    """The KubernetesPodOperator that runs `python -m tasks.<task_id> <arguments>` in a GPU pod.

    In the DAG finetune and generate sit in the mapped `variant` group: one pod per sweep variant, at
    most max_parallel_pods of them at a time, each taking a slot of `pool`; export runs once, after
    them (the merge needs the model in memory)."""
    from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator
    from airflow.providers.cncf.kubernetes.secret import Secret
    from kubernetes.client import models as k8s

    s = pod_settings()
    execution_timeout = s.timeouts.get(task_id, execution_timeout)
    env = {
        "GEMMA_WRITE_XCOM": "1",  # the stage writes its result dict to /airflow/xcom/return.json
        "GEMMA_REQUIRE_GPU": "1",
        "GEMMA_ALLOW_CPU": "1" if s.allow_cpu else "0",
        "PYTHONUNBUFFERED": "1",  # training progress reaches the task log as it happens
        # Model downloads (gemma_2b_en is ~5 GB) are kept on the shared volume, not per pod.
        "GEMMA_MODELS_DIR": f"{s.run_root}/cache/models",
        "KAGGLEHUB_CACHE": f"{s.run_root}/cache/kagglehub",
    }
    if s.mlflow_tracking_uri:
        env["GEMMA_MLFLOW_TRACKING_URI"] = s.mlflow_tracking_uri
    # The image's filesystem is read-only: what a stage writes outside the run root (Python's and
    # the libraries' caches, temp files) goes to the pod's own scratch volume, bounded by its
    # ephemeral-storage limit.
    env.update({"HOME": SCRATCH, "XDG_CACHE_HOME": f"{SCRATCH}/.cache", "KERAS_HOME": f"{SCRATCH}/.keras",
                "MPLCONFIGDIR": f"{SCRATCH}/.matplotlib"})
    # secretKeyRef: the values stay in the cluster, never in the DAG, a rendered template or a log.
    secrets = []
    if s.kaggle_secret:
        secrets += [
            Secret("env", "KAGGLE_USERNAME", s.kaggle_secret, s.kaggle_username_key),
            Secret("env", "KAGGLE_KEY", s.kaggle_secret, s.kaggle_key_key),
        ]
    if s.mlflow_secret:
        secrets += [
            Secret("env", "MLFLOW_TRACKING_USERNAME", s.mlflow_secret, s.mlflow_username_key),
            Secret("env", "MLFLOW_TRACKING_PASSWORD", s.mlflow_secret, s.mlflow_password_key),
        ]
    restricted = k8s.V1SecurityContext(
        allow_privilege_escalation=False, capabilities=k8s.V1Capabilities(drop=["ALL"]), read_only_root_filesystem=True,
    )
    return KubernetesPodOperator(
        task_id=task_id,
        name=f"gemma-{task_id}",
        kubernetes_conn_id=s.conn_id,
        namespace=s.namespace,
        image=s.image,
        image_pull_policy=s.image_pull_policy,
        image_pull_secrets=[k8s.V1LocalObjectReference(name=s.image_pull_secret)] if s.image_pull_secret else None,
        cmds=["python", "-m", f"tasks.{task_id}"],
        arguments=list(arguments),
        env_vars=[k8s.V1EnvVar(name=k, value=v) for k, v in env.items()],
        secrets=secrets,
        container_resources=k8s.V1ResourceRequirements(requests=dict(s.requests), limits=dict(s.limits)),
        volumes=[
            k8s.V1Volume(
                name=RUN_ROOT_VOLUME,
                persistent_volume_claim=k8s.V1PersistentVolumeClaimVolumeSource(claim_name=s.pvc),
            ),
            k8s.V1Volume(name=SCRATCH_VOLUME, empty_dir=k8s.V1EmptyDirVolumeSource(size_limit=s.ephemeral_storage_limit)),
        ],
        volume_mounts=[k8s.V1VolumeMount(name=RUN_ROOT_VOLUME, mount_path=s.run_root),
                       k8s.V1VolumeMount(name=SCRATCH_VOLUME, mount_path=SCRATCH)],
        node_selector=dict(s.node_selector),
        tolerations=[k8s.V1Toleration(**{_snake(k): v for k, v in t.items()}) for t in s.tolerations],
        # The provider adds dag_id, task_id, run_id and try_number labels itself.
        labels={**POD_LABELS, "stage": task_id},
        service_account_name=s.service_account,
        automount_service_account_token=False,
        security_context=k8s.V1PodSecurityContext(
            run_as_non_root=True,
            run_as_user=s.run_as_user,
            run_as_group=s.fs_group,
            fs_group=s.fs_group,
            # A large run root would otherwise be chown-ed file by file at every pod start.
            fs_group_change_policy="OnRootMismatch",
            seccomp_profile=k8s.V1SeccompProfile(type="RuntimeDefault"),
        ),
        container_security_context=restricted,
        xcom_sidecar_container_security_context=restricted,
        startup_timeout_seconds=s.startup_timeout,
        schedule_timeout_seconds=s.startup_timeout,
        execution_timeout=execution_timeout,
        # If the worker dies, the pod must not hold its GPU forever.
        active_deadline_seconds=int(execution_timeout.total_seconds()) + s.startup_timeout,
        max_active_tis_per_dag=s.max_parallel_pods,
        pool=s.pool,
        map_index_template=map_index_template,
        trigger_rule=trigger_rule,
        on_finish_action=s.on_finish_action,
        get_logs=True,
        log_events_on_failure=True,
        # The full spec dump would bury the reason; the spec is in the task's Rendered Template view.
        log_pod_spec_on_failure=False,
        # When the stage dies without a message, Kubernetes keeps its last log lines as the reason.
        termination_message_policy="FallbackToLogsOnError",
        do_xcom_push=True,
        callbacks=[_explain_failure_callback(s)],
    )


def _snake(key: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", key).lower()
