"""Real containers for the kubernetes runner's pods: podman (Debian's 4.3, with runc) runs the Pod the
operator builds, with `podman kube play`.

Measured with podman 4.3 in a VM (docker/containers.conf holds the settings it needs): `kube play`
honours the containers' command and args, env, `secretKeyRef` env (from a podman secret holding a
JSON map of base64 values), `hostPath` and `emptyDir` volumes, `runAsUser`/`runAsGroup`,
`readOnlyRootFilesystem`, and the CPU and memory limits. It accepts and ignores what a single machine
has no use for: the `nvidia.com/gpu` limit, `ephemeral-storage`, tolerations, the node selector and
the service account. It has no PersistentVolumeClaim provisioner: `for_podman` mounts the run root
as a `hostPath` at the same path instead, which is what the claim is in a cluster (one shared
folder, the same path in the worker and the pod).
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import subprocess
import time
from pathlib import Path
from typing import Iterator

import yaml

REPO = Path(__file__).resolve().parents[2]
CONTAINERS_CONF = REPO / "docker" / "containers.conf"
SIDECAR = "airflow-xcom-sidecar"
BASE_IMAGE = "localhost/gemma-python-base:3.11-bookworm"


def podman(*args: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "CONTAINERS_CONF": os.environ.get("CONTAINERS_CONF", str(CONTAINERS_CONF))}
    out = subprocess.run(["podman", *args], capture_output=True, text=True, env=env, timeout=timeout)
    if check and out.returncode != 0:
        raise RuntimeError(f"podman {' '.join(args)} exited {out.returncode}: {out.stderr.strip()[-2000:]}")
    return out


def image(flavour: str = "cpu") -> str:
    """The project's image in that flavour: built by `make image` (docker/build-image.sh), which
    reuses an image whose inputs have not changed (make test builds the cpu one before pytest)."""
    out = subprocess.run([str(REPO / "docker" / "build-image.sh"), flavour], capture_output=True, text=True,
                         timeout=3600, env={**os.environ, "CONTAINERS_CONF": str(CONTAINERS_CONF)})
    if out.returncode != 0:
        raise RuntimeError(f"docker/build-image.sh {flavour} failed:\n{out.stderr[-3000:]}")
    return "localhost/" + out.stdout.strip().splitlines()[-1]


def ready_image(flavour: str = "cpu") -> str:
    """The image, on a podman that works (else the test fails, saying what to install)."""
    import pytest

    if podman("info", check=False).returncode != 0:
        pytest.fail("podman does not work here: make test installs and configures it (docs/production.md)")
    return image(flavour)


def shared_run_root(parent: Path) -> Path:
    """A run root the pods' uid 50000 (group 0) can write, as a cluster's shared volume is; what the
    worker writes in it must be group-writable (umask 002), as the Airflow image's uid 50000 leaves it."""
    root = parent / "run-root"
    root.mkdir()
    os.chown(root, 50000, 0)
    root.chmod(0o2775)
    return root


def create_secret(name: str, data: dict[str, str]) -> None:
    """A Kubernetes Secret as podman 4.3's `kube play` reads one for `secretKeyRef`."""
    podman("secret", "rm", name, check=False)
    payload = json.dumps({k: base64.b64encode(v.encode()).decode() for k, v in data.items()})
    subprocess.run(["podman", "secret", "create", name, "-"], input=payload, text=True, check=True, capture_output=True,
                   env={**os.environ, "CONTAINERS_CONF": str(CONTAINERS_CONF)})


def pod_settings_env(run_root: Path, image: str, **more: str) -> dict[str, str]:
    """The [gemma] pod settings for a CPU pod from `image` on this machine (no GPU, nothing to pull)."""
    return {"GEMMA_RUNNER": "kubernetes", "GEMMA_RUN_ROOT": str(run_root), "GEMMA_IMAGE": image,
            "GEMMA_IMAGE_PULL_POLICY": "Never", "GEMMA_GPU_COUNT": "0", "GEMMA_ALLOW_CPU": "true",
            "GEMMA_CPU_REQUEST": "1", "GEMMA_CPU_LIMIT": "2", "GEMMA_MEMORY_REQUEST": "4Gi", "GEMMA_MEMORY_LIMIT": "8Gi",
            **more}


def wire_operator(mp, api, workdir: Path) -> None:
    """Point the operator's Kubernetes connection at the loopback API `api` (a FakeKubeAPI), with the
    XCom sidecar from a local image (its default, alpine, cannot be pulled here). The provider reads
    the XCom file and stops the sidecar through a websocket exec, which the loopback API does not
    serve: the same two steps go to the API, which does them with podman in the sidecar."""
    from airflow.providers.cncf.kubernetes.utils.pod_manager import PodManager

    mp.setenv("AIRFLOW_CONN_KUBERNETES_DEFAULT", json.dumps({"conn_type": "kubernetes", "extra": {
        "kube_config_path": str(api.write_kubeconfig(workdir / "kubeconfig", "gemma")),
        "xcom_sidecar_container_image": BASE_IMAGE}}))
    mp.setattr(PodManager, "extract_xcom_json", lambda self, pod: api.read_xcom(pod.metadata.namespace, pod.metadata.name))
    mp.setattr(PodManager, "extract_xcom_kill", lambda self, pod: api.kill_sidecar(pod.metadata.namespace, pod.metadata.name))


def for_podman(manifest: dict, run_root: str) -> dict:
    """The operator's Pod, with its run-root claim mounted as the host folder it stands for."""
    pod = json.loads(json.dumps(manifest))
    for volume in pod["spec"]["volumes"]:
        if "persistentVolumeClaim" in volume:
            del volume["persistentVolumeClaim"]
            volume["hostPath"] = {"path": run_root, "type": "Directory"}
    return pod


@contextlib.contextmanager
def played(pod: dict, workdir: Path) -> Iterator[str]:
    """`podman kube play` of the Pod; yields its name; `kube down` afterwards, also on failure."""
    path = workdir / f"{pod['metadata']['name']}.yaml"
    path.write_text(yaml.safe_dump(pod))
    try:
        podman("kube", "play", str(path), timeout=300)
        yield pod["metadata"]["name"]
    finally:
        podman("kube", "down", str(path), check=False, timeout=120)


def container(pod_name: str, name: str = "base") -> str:
    return f"{pod_name}-{name}"


def wait_exit(name: str, timeout: float = 600) -> int:
    deadline = time.time() + timeout
    while time.time() < deadline:
        state = podman("inspect", name, "--format", "{{.State.Status}} {{.State.ExitCode}}").stdout.split()
        if state[0] in ("exited", "stopped"):
            return int(state[1])
        time.sleep(1)
    raise TimeoutError(f"container {name} still running after {timeout:.0f} s")


def logs(name: str) -> str:
    out = podman("logs", name, check=False)
    return out.stdout + out.stderr


def xcom(pod_name: str) -> dict:
    """What the stage wrote for XCom, read by the sidecar as the operator would (`cat` in it)."""
    out = podman("exec", container(pod_name, SIDECAR), "cat", "/airflow/xcom/return.json")
    return json.loads(out.stdout)
