"""docker/: the example manifests are valid Kubernetes and agree with the runner's defaults; the RBAC
Role allows what the operator really does; the Dockerfile matches the lock. (No image is built here:
there is no container engine on these machines.)"""

from __future__ import annotations

import importlib.metadata
import re

import kubernetes_validate
import pytest
import yaml
from kubernetes.utils import parse_quantity

from tasks.infra.pod_settings import SETTINGS
from tests.k8s.conftest import REPO
from tests.k8s.fake_kube_api import Script
from tests.k8s.test_pod_execute import TRAINING_LOG, run_pod_task

pytestmark = pytest.mark.unit

DOCKER = REPO / "docker"
MANIFESTS = sorted((DOCKER / "k8s").glob("*.yaml"))


def default(key: str) -> str:
    return SETTINGS[key][0]


def documents() -> list[dict]:
    return [d for path in MANIFESTS for d in yaml.safe_load_all(path.read_text()) if d]


def find(kind: str) -> list[dict]:
    return [d for d in documents() if d["kind"] == kind]


@pytest.mark.parametrize("version", ["1.30", "1.37"])
def test_manifests_are_valid_kubernetes(version):
    assert [p.name for p in MANIFESTS] == [
        "00-namespace.yaml", "10-kaggle-secret.yaml", "20-run-root-storage.yaml", "30-rbac.yaml",
    ]
    for doc in documents():
        kubernetes_validate.validate(doc, version, strict=True)


def test_manifests_agree_with_the_runner_defaults():
    (ns,) = find("Namespace")
    assert ns["metadata"]["name"] == default("namespace")
    assert all(d["metadata"].get("namespace", ns["metadata"]["name"]) == default("namespace") for d in documents()
               if d["kind"] not in ("Namespace", "PersistentVolume"))
    (secret,) = find("Secret")
    assert secret["metadata"]["name"] == default("kaggle_secret")
    assert set(secret["stringData"]) == {default("kaggle_username_key"), default("kaggle_key_key")}
    assert all(v.startswith("REPLACE_WITH_") for v in secret["stringData"].values())  # placeholders only
    (pvc,) = find("PersistentVolumeClaim")
    (pv,) = find("PersistentVolume")
    assert pvc["metadata"]["name"] == default("pvc") and pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    assert pv["spec"]["claimRef"] == {"namespace": default("namespace"), "name": default("pvc")}
    assert pvc["spec"]["volumeName"] == pv["metadata"]["name"]
    assert parse_quantity(pvc["spec"]["resources"]["requests"]["storage"]) <= parse_quantity(pv["spec"]["capacity"]["storage"])
    (sa,) = find("ServiceAccount")
    assert sa["metadata"]["name"] == default("service_account") and sa["automountServiceAccountToken"] is False
    (role,), (binding,) = find("Role"), find("RoleBinding")
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": role["metadata"]["name"]}


def _api_calls(requests: list[str]) -> set[tuple[str, str]]:
    """(resource, RBAC verb) of each request the fake API server saw."""
    calls = set()
    for request in requests:
        method, path = request.split(" ", 1)
        m = re.fullmatch(r"/api/v1/namespaces/[^/]+/(pods|events)(/[^/]+)?(/log)?", path)
        assert m, request
        resource = m.group(1) + ("/log" if m.group(3) else "")
        named = m.group(2) is not None
        verb = {"POST": "create", "PATCH": "patch", "DELETE": "delete"}.get(method) or ("get" if named else "list")
        calls.add((resource, verb))
    return calls


def test_rbac_role_allows_everything_the_operator_does(k8s_dag_module, fake_cluster):
    from airflow.providers.cncf.kubernetes.utils.pod_manager import OnFinishAction

    dag, _ = k8s_dag_module
    fake_cluster.script = Script(lines=TRAINING_LOG, xcom={"ok": 1})
    assert run_pod_task(dag, "finetune").error is None
    fake_cluster.script = Script(lines=["boom"], exit_code=1)
    assert run_pod_task(dag, "generate", on_finish_action=OnFinishAction.DELETE_SUCCEEDED_POD).error is not None
    # The XCom read and the sidecar stop are websocket execs into the pod (stubbed in these tests).
    used = _api_calls(fake_cluster.requests) | {("pods/exec", "create")}
    assert {("pods", "create"), ("pods", "patch"), ("pods", "delete"), ("pods/log", "get"), ("events", "list")} <= used

    (role,) = find("Role")
    allowed = {(res, verb) for rule in role["rules"] if rule["apiGroups"] == [""]
               for res in rule["resources"] for verb in rule["verbs"]}
    assert used <= allowed, f"the Role misses {sorted(used - allowed)}"


def test_dockerfile_matches_the_lock_and_the_runner():
    dockerfile = (DOCKER / "Dockerfile").read_text()
    base = re.search(r"^ARG PYTHON_IMAGE=(\S+)$", dockerfile, re.M).group(1)
    assert re.fullmatch(r"python:3\.11\.\d+-slim-\w+(@sha256:[0-9a-f]{64})?", base), base  # pinned, no :latest
    assert dockerfile.count("FROM ${PYTHON_IMAGE}") == 2
    assert 'gpu) cuda="-r requirements-cuda.txt"' in dockerfile and "--require-hashes -r requirements.lock ${cuda}" in dockerfile
    assert "--no-deps" in dockerfile
    user = re.search(r"^USER (\d+):(\d+)$", dockerfile, re.M)
    assert user and (user.group(1), user.group(2)) == (default("run_as_user"), default("fs_group"))
    assert int(user.group(1)) != 0
    assert re.search(r'RUN FLAVOUR="\$\{FLAVOUR\}" python -c "import os, importlib.metadata as md, tasks, keras_hub, tensorflow', dockerfile)

    lock = (REPO / "requirements.lock").read_text()
    cuda = (DOCKER / "requirements-cuda.txt").read_text()
    tf_lock = re.search(r"^tensorflow==(\S+) \\$", lock, re.M).group(1)
    assert re.search(r"^tensorflow\[and-cuda\]==(\S+) \\$", cuda, re.M).group(1) == tf_lock
    # The CUDA pins are the minimums that this TensorFlow declares for its and-cuda extra.
    assert importlib.metadata.version("tensorflow") == tf_lock
    wanted = {}
    for req in importlib.metadata.requires("tensorflow"):
        m = re.match(r"(nvidia-[a-z0-9-]+)<[^,]+,>=(\S+); extra == \"and-cuda\"", req)
        if m:
            wanted[m.group(1)] = m.group(2)
    pinned = dict(re.findall(r"^(nvidia-[a-z0-9-]+)==(\S+) \\$", cuda, re.M))
    assert wanted and pinned == wanted


def test_every_lock_carries_hashes_and_is_installed_with_them():
    """Each package of requirements.lock, requirements-parity.lock and the image's CUDA file has a
    sha256, and make setup, make parity and the image install with --require-hashes."""
    for path in (REPO / "requirements.lock", REPO / "requirements-parity.lock", DOCKER / "requirements-cuda.txt"):
        text = path.read_text()
        entries = re.split(r"^(?=[A-Za-z0-9][A-Za-z0-9._\[\]-]*==)", text, flags=re.M)[1:]
        assert entries, path
        bare = [e.split()[0] for e in entries if "--hash=sha256:" not in e]
        assert bare == [], f"{path.name}: no hash for {bare}"
    makefile = (REPO / "Makefile").read_text()
    assert makefile.count("--require-hashes") >= 3  # setup, the parity lock, the llama.cpp sdist


def test_dockerignore_lets_in_what_the_dockerfile_copies():
    ignore = [line for line in (DOCKER / "Dockerfile.dockerignore").read_text().splitlines()
              if line and not line.startswith("#")]
    assert ignore[0] == "*"
    let_in = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    copied = set()
    for line in (DOCKER / "Dockerfile").read_text().splitlines():
        if line.startswith("COPY ") and "--from=" not in line:
            copied |= set(line.split()[1:-1])
    assert copied == let_in
    assert all((REPO / path).exists() for path in copied)
