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


def create_secret(name: str, data: dict[str, str]) -> None:
    """A Kubernetes Secret as podman 4.3's `kube play` reads one for `secretKeyRef`."""
    podman("secret", "rm", name, check=False)
    payload = json.dumps({k: base64.b64encode(v.encode()).decode() for k, v in data.items()})
    subprocess.run(["podman", "secret", "create", name, "-"], input=payload, text=True, check=True, capture_output=True,
                   env={**os.environ, "CONTAINERS_CONF": str(CONTAINERS_CONF)})


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
