"""The `kubernetes` runner's pod settings: what the GPU stages' pods get (image, resources, node
placement, volume, Secrets, timeouts, the securityContext's ids), each `[gemma] <key>` read by
tasks.infra.settings (Airflow config, then GEMMA_<KEY>, then the default in SETTINGS; an empty
value is unset, `none` turns an optional item with a default off). They are read and checked when
the DAG file is parsed: a wrong value is an import error of the DAG that names the setting. Imports
nothing ML; the operator built from them is tasks.infra.pod_operator.
"""

from __future__ import annotations

import datetime as dt
import json
import re
from dataclasses import dataclass
from typing import Any

from tasks.infra.settings import read, run_root

# key -> (default, what it is). The README's settings table is this dict.
SETTINGS: dict[str, tuple[str, str]] = {
    "image": ("gemma-lora-pipeline:0.1.0", "training image built from docker/Dockerfile (push it and name it with its "
              "registry; by digest, name@sha256:..., the pods run exactly the image that was tested)"),
    "image_pull_policy": ("IfNotPresent", "Always, IfNotPresent or Never"),
    "image_pull_secret": ("", "Secret for a private registry; empty: none"),
    "namespace": ("gemma", "namespace the pods run in"),
    "service_account": ("gemma-stage", "the pod's service account (needs no API rights; its token is not mounted)"),
    "conn_id": ("kubernetes_default", "Airflow connection to the cluster (in-cluster or a kubeconfig)"),
    "gpu_count": ("1", "GPUs per pod; 0 only with allow_cpu"),
    "gpu_resource": ("nvidia.com/gpu", "extended resource name of the GPU"),
    "cpu_request": ("4", "CPU request"),
    "cpu_limit": ("8", "CPU limit; none: no limit"),
    "memory_request": ("32Gi", "memory request"),
    "memory_limit": ("32Gi", "memory limit; above it the container is OOMKilled; none: no limit"),
    "ephemeral_storage_limit": ("20Gi", "node-local disk the pod may use (its /tmp and cache volumes, logs); above it "
                                "the pod is evicted"),
    "node_selector": ("{}", "JSON object of node labels, e.g. {\"cloud.google.com/gke-accelerator\": \"nvidia-l4\"}"),
    "tolerations": (
        '[{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]',
        "JSON list of tolerations (the default tolerates the usual GPU-node taint)",
    ),
    "pvc": ("gemma-runs", "PersistentVolumeClaim mounted at the run root ([gemma] run_root)"),
    "kaggle_secret": ("kaggle-credentials", "Secret with the Kaggle credentials; none: no credentials"),
    "kaggle_username_key": ("username", "key in that Secret for KAGGLE_USERNAME"),
    "kaggle_key_key": ("key", "key in that Secret for KAGGLE_KEY"),
    "startup_timeout": ("900", "seconds a pod may take to be scheduled, and then to start (GPU node scale-up, image pull)"),
    "finetune_timeout": ("", "minutes the finetune task may run; empty: the DAG's 12 h"),
    "generate_timeout": ("", "minutes the generate task may run; empty: the DAG's 2 h"),
    "max_parallel_pods": ("4", "in a sweep: at most this many variants' pods of one stage run at the same time (max_active_tis_per_dag)"),
    "pool": ("default_pool", "Airflow pool the GPU tasks take a slot of (size a pool to your GPUs to bound all DAGs together)"),
    "on_finish_action": ("delete_pod", "delete_pod, delete_succeeded_pod, delete_active_pod or keep_pod (a kept pod that never started still holds its GPU)"),
    "allow_cpu": ("false", "let the stage continue on CPU when the pod sees no GPU"),
    "mlflow_tracking_uri": ("", "MLflow tracking server the stages log to (the pods get it as GEMMA_MLFLOW_TRACKING_URI), "
                            "without credentials in it (see mlflow_secret); empty: the SQLite store in the run root, which "
                            "parallel pods cannot share"),
    "mlflow_secret": ("", "Secret with the tracking server's credentials: the pods get MLFLOW_TRACKING_USERNAME and "
                      "MLFLOW_TRACKING_PASSWORD from it (secretKeyRef); empty: none"),
    "mlflow_username_key": ("username", "key in that Secret for MLFLOW_TRACKING_USERNAME"),
    "mlflow_password_key": ("password", "key in that Secret for MLFLOW_TRACKING_PASSWORD"),
    "run_as_user": ("50000", "uid of the stage (the image's user, like the official Airflow image)"),
    "fs_group": ("0", "group that owns the run-root volume (gid 0, like the official Airflow image)"),
}

_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_RESOURCE_NAME = re.compile(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?/[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$")
_TOLERATION_KEYS = {"key", "operator", "value", "effect", "tolerationSeconds"}


class PodSettingError(ValueError):
    """A pod setting is wrong; the message names the setting and where its value came from."""


@dataclass(frozen=True)
class PodSettings:
    image: str
    image_pull_policy: str
    image_pull_secret: str
    namespace: str
    service_account: str
    conn_id: str
    gpu_count: int
    gpu_resource: str
    requests: dict[str, str]
    limits: dict[str, str]
    node_selector: dict[str, str]
    tolerations: list[dict[str, Any]]
    pvc: str
    run_root: str
    kaggle_secret: str
    kaggle_username_key: str
    kaggle_key_key: str
    startup_timeout: int
    timeouts: dict[str, dt.timedelta]
    max_parallel_pods: int
    pool: str
    on_finish_action: str
    allow_cpu: bool
    mlflow_tracking_uri: str
    mlflow_secret: str
    mlflow_username_key: str
    mlflow_password_key: str
    ephemeral_storage_limit: str
    run_as_user: int
    fs_group: int


def _raw(key: str) -> tuple[str, str]:
    """(value, where it came from), by tasks.infra.settings' precedence; `none` turns an optional item off."""
    value, source = read(key, SETTINGS[key][0])
    return ("" if value.lower() == "none" else value), source


def _run_root_mount() -> str:
    """The workers' run root (the DAG's own `run_root()`), which the pod mounts at the same path."""
    path = run_root()
    if not path.is_absolute():
        raise PodSettingError(f"[gemma] run_root / GEMMA_RUN_ROOT must be an absolute path to mount in the pod, not {str(path)!r}")
    return str(path)


def pod_settings() -> PodSettings:
    """Read and check every pod setting; raises PodSettingError naming the first wrong one."""
    raw = {key: _raw(key) for key in SETTINGS}

    def fail(key: str, want: str) -> PodSettingError:
        value, source = raw[key]
        return PodSettingError(f"pod setting {key} ({source}): expected {want}, got {value!r}")

    def text(key: str, pattern: re.Pattern | None = None, optional: bool = False) -> str:
        value = raw[key][0]
        if not value and optional:
            return ""
        if not value or (pattern and not pattern.match(value)):
            raise fail(key, f"a name matching {pattern.pattern}" if pattern else "a non-empty value")
        return value

    def whole(key: str, lo: int, hi: int) -> int:
        try:
            value = int(raw[key][0])
        except ValueError:
            raise fail(key, f"a whole number in [{lo}, {hi}]") from None
        if not lo <= value <= hi:
            raise fail(key, f"a whole number in [{lo}, {hi}]")
        return value

    def choice(key: str, options: tuple[str, ...]) -> str:
        if raw[key][0] not in options:
            raise fail(key, f"one of {list(options)}")
        return raw[key][0]

    def flag(key: str) -> bool:
        value = raw[key][0].lower()
        if value not in ("true", "false", "1", "0", "yes", "no"):
            raise fail(key, "true or false")
        return value in ("true", "1", "yes")

    def quantity(key: str, optional: bool = False):
        from kubernetes.utils import parse_quantity

        value = raw[key][0]
        if not value and optional:
            return None
        try:
            parsed = parse_quantity(value)
        except ValueError:
            raise fail(key, "a Kubernetes quantity such as 4, 500m, 32Gi") from None
        if parsed <= 0:
            raise fail(key, "a quantity above 0")
        return parsed

    def json_value(key: str, kind: type):
        try:
            value = json.loads(raw[key][0] or ("{}" if kind is dict else "[]"))
        except json.JSONDecodeError as e:
            raise fail(key, f"JSON ({e})") from None
        if not isinstance(value, kind):
            raise fail(key, f"a JSON {'object' if kind is dict else 'list'}")
        return value

    image = text("image")
    if any(c.isspace() for c in image):
        raise fail("image", "an image reference without spaces")

    requests, limits = {}, {}
    for res in ("cpu", "memory"):
        req, lim = quantity(f"{res}_request"), quantity(f"{res}_limit", optional=True)
        requests[res] = raw[f"{res}_request"][0]
        if lim is not None:
            if lim < req:
                raise fail(f"{res}_limit", f"at least {res}_request ({requests[res]})")
            limits[res] = raw[f"{res}_limit"][0]

    gpu_count, allow_cpu = whole("gpu_count", 0, 16), flag("allow_cpu")
    gpu_resource = text("gpu_resource", _RESOURCE_NAME)
    if gpu_count == 0 and not allow_cpu:
        raise fail("gpu_count", "at least 1 unless allow_cpu is true (the stage would refuse to start without a GPU)")
    if gpu_count:
        # Extended resources go in limits only: Kubernetes sets the request equal to it.
        limits[gpu_resource] = str(gpu_count)

    node_selector = json_value("node_selector", dict)
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in node_selector.items()):
        raise fail("node_selector", "a JSON object of label names to string values")
    tolerations = json_value("tolerations", list)
    for tol in tolerations:
        if not isinstance(tol, dict) or not set(tol) <= _TOLERATION_KEYS:
            raise fail("tolerations", f"a JSON list of objects with keys from {sorted(_TOLERATION_KEYS)}")
        if tol.get("operator", "Equal") not in ("Equal", "Exists") or tol.get("effect", "") not in (
            "", "NoSchedule", "PreferNoSchedule", "NoExecute",
        ):
            raise fail("tolerations", "operator Equal/Exists and effect NoSchedule/PreferNoSchedule/NoExecute")

    kaggle_secret = text("kaggle_secret", _DNS_SUBDOMAIN, optional=True)
    mlflow_secret = text("mlflow_secret", _DNS_SUBDOMAIN, optional=True)
    tracking_uri = text("mlflow_tracking_uri", re.compile(r"^[a-z][a-z0-9+.-]*://\S+$"), optional=True)
    if re.match(r"^[a-z][a-z0-9+.-]*://[^/?#@]+@", tracking_uri):
        # A pod's env is plain text in its spec (the Rendered Template view shows it).
        raise PodSettingError(f"pod setting mlflow_tracking_uri ({raw['mlflow_tracking_uri'][1]}): credentials in the URI "
                              "would reach the pods' plain env; put them in the Secret named by mlflow_secret")
    quantity("ephemeral_storage_limit")
    limits["ephemeral-storage"] = raw["ephemeral_storage_limit"][0]
    return PodSettings(
        image=image,
        image_pull_policy=choice("image_pull_policy", ("Always", "IfNotPresent", "Never")),
        image_pull_secret=text("image_pull_secret", _DNS_SUBDOMAIN, optional=True),
        namespace=text("namespace", _DNS_LABEL),
        service_account=text("service_account", _DNS_SUBDOMAIN),
        conn_id=text("conn_id"),
        gpu_count=gpu_count,
        gpu_resource=gpu_resource,
        requests=requests,
        limits=limits,
        node_selector=node_selector,
        tolerations=tolerations,
        pvc=text("pvc", _DNS_SUBDOMAIN),
        run_root=_run_root_mount(),
        kaggle_secret=kaggle_secret,
        kaggle_username_key=text("kaggle_username_key", re.compile(r"^[-._a-zA-Z0-9]+$")) if kaggle_secret else "",
        kaggle_key_key=text("kaggle_key_key", re.compile(r"^[-._a-zA-Z0-9]+$")) if kaggle_secret else "",
        startup_timeout=whole("startup_timeout", 10, 24 * 3600),
        timeouts={
            stage: dt.timedelta(minutes=whole(f"{stage}_timeout", 1, 7 * 24 * 60))
            for stage in ("finetune", "generate")
            if raw[f"{stage}_timeout"][0]
        },
        max_parallel_pods=whole("max_parallel_pods", 1, 1024),
        mlflow_tracking_uri=tracking_uri,
        mlflow_secret=mlflow_secret,
        mlflow_username_key=text("mlflow_username_key", re.compile(r"^[-._a-zA-Z0-9]+$")) if mlflow_secret else "",
        mlflow_password_key=text("mlflow_password_key", re.compile(r"^[-._a-zA-Z0-9]+$")) if mlflow_secret else "",
        ephemeral_storage_limit=raw["ephemeral_storage_limit"][0],
        pool=text("pool", re.compile(r"^[A-Za-z0-9_.-]{1,256}$")),
        on_finish_action=choice("on_finish_action", ("delete_pod", "delete_succeeded_pod", "delete_active_pod", "keep_pod")),
        allow_cpu=allow_cpu,
        run_as_user=whole("run_as_user", 1, 2**31 - 1),
        fs_group=whole("fs_group", 0, 2**31 - 1),
    )
