"""A small stand-in for kube-apiserver and one kubelet, served on 127.0.0.1 with the stdlib.

It speaks enough core/v1 for the real KubernetesPodOperator to run: create/read/list/patch/delete
pods, follow pod logs, list events. A created pod is "run" by a thread that plays a `Script` (log
lines, exit code, reason, the XCom file) and moves the pod's status the way a kubelet does:
Pending -> scheduled -> containers running -> base terminated (sidecar still up) -> sidecar gone ->
Succeeded/Failed. `secretKeyRef` env is resolved against `secrets`; a missing Secret or key leaves
the container waiting in CreateContainerConfigError, as on a cluster.

With `podman_run_root`, a created pod is not played but run: the Pod as the operator sent it is
started with `podman kube play` (tests/k8s/podman.py: its run-root claim mounted as that host folder,
the Secrets it references made podman secrets), and its status, log lines, exit code and XCom come
from the containers (`podman inspect`, `podman logs`, `cat` in the sidecar).

Not here: the XCom sidecar's websocket exec (tests stub the provider's two exec calls with
`read_xcom` and `kill_sidecar`), and pod watches (the provider's synchronous path polls instead).
"""

from __future__ import annotations

import datetime as dt
import json
import re
import threading
import time
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

SIDECAR = "airflow-xcom-sidecar"
EMPTY_XCOM = "__airflow_xcom_result_empty__"


@dataclass
class Script:
    """What the base container of the next created pod does."""

    lines: list[str]
    exit_code: int = 0
    reason: str | None = None  # default: Completed for 0, Error otherwise
    xcom: dict | None = None  # what the stage writes to /airflow/xcom/return.json
    line_delay: float = 0.02
    # Checks the container makes on its resolved env; each logs a line without printing a value.
    env_checks: tuple[str, ...] = ()


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def _ts(t: dt.datetime) -> str:
    return t.strftime("%Y-%m-%dT%H:%M:%SZ")


def _match_selector(labels: dict, selector: str | None) -> bool:
    for term in filter(None, (selector or "").split(",")):
        term = term.strip()
        if "!=" in term:
            k, v = term.split("!=", 1)
            if labels.get(k) == v:
                return False
        elif "=" in term:
            k, v = term.split("=", 1)
            if labels.get(k.rstrip("=")) != v:
                return False
        elif term.startswith("!"):
            if term[1:] in labels:
                return False
        elif term not in labels:
            return False
    return True


def _merge(into: dict, patch: dict) -> None:
    for k, v in patch.items():
        if v is None:
            into.pop(k, None)
        elif isinstance(v, dict) and isinstance(into.get(k), dict):
            _merge(into[k], v)
        else:
            into[k] = v


@dataclass
class _Running:
    pod: dict
    script: Script
    log: list[tuple[dt.datetime, str]] = field(default_factory=list)
    base_done: bool = False
    xcom: str | None = None
    env: dict = field(default_factory=dict)


class FakeKubeAPI:
    def __init__(self, secrets: dict[tuple[str, str], dict[str, str]] | None = None,
                 podman_run_root: str | None = None, workdir: Path | None = None):
        self.secrets = secrets or {}
        self.podman_run_root, self.workdir = podman_run_root, workdir
        self.pods: dict[tuple[str, str], _Running] = {}
        self.deleted: list[str] = []
        self.created: list[dict] = []  # request bodies, as sent
        self.requests: list[str] = []
        self.unhandled: list[str] = []
        self.events: list[dict] = []
        self.script = Script(lines=["hello"])
        self._cond = threading.Condition()
        self._rv = 0
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    # -- lifecycle -------------------------------------------------------------------------
    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def start(self) -> "FakeKubeAPI":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def write_kubeconfig(self, path: Path, namespace: str) -> Path:
        path.write_text(json.dumps({
            "apiVersion": "v1", "kind": "Config", "current-context": "fake",
            "clusters": [{"name": "fake", "cluster": {"server": self.url}}],
            "users": [{"name": "fake", "user": {"token": "fake-token"}}],
            "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "fake", "namespace": namespace}}],
        }))
        return path

    # -- what the stubbed sidecar exec does --------------------------------------------------
    def read_xcom(self, namespace: str, name: str) -> str:
        with self._cond:
            run = self.pods[(namespace, name)]
            return run.xcom if run.xcom is not None else EMPTY_XCOM

    def kill_sidecar(self, namespace: str, name: str) -> None:
        if self.podman_run_root:
            self._podman_down(name)
        with self._cond:
            run = self.pods[(namespace, name)]
            self._set_state(run, SIDECAR, {"terminated": {"exitCode": 0, "reason": "Completed",
                                                          "startedAt": _ts(_now()), "finishedAt": _ts(_now())}})
            base = self._status(run, "base")["state"].get("terminated") or {}
            if run.base_done:
                run.pod["status"]["phase"] = "Succeeded" if base.get("exitCode") == 0 else "Failed"
            self._touch(run)

    # -- the kubelet -------------------------------------------------------------------------
    def _touch(self, run: _Running) -> None:
        self._rv += 1
        run.pod["metadata"]["resourceVersion"] = str(self._rv)
        self._cond.notify_all()

    def _event(self, run: _Running, reason: str, message: str, kind: str = "Normal") -> None:
        self._rv += 1
        meta = run.pod["metadata"]
        self.events.append({
            "apiVersion": "v1", "kind": "Event", "type": kind, "reason": reason, "message": message,
            "metadata": {"name": f"{meta['name']}.{self._rv}", "namespace": meta["namespace"],
                         "uid": str(uuid.uuid4()), "resourceVersion": str(self._rv)},
            "involvedObject": {"kind": "Pod", "name": meta["name"], "namespace": meta["namespace"],
                               "uid": meta["uid"], "fieldPath": "spec.containers{base}"},
            "firstTimestamp": _ts(_now()), "lastTimestamp": _ts(_now()), "count": 1,
        })

    @staticmethod
    def _status(run: _Running, container: str) -> dict:
        return next(s for s in run.pod["status"]["containerStatuses"] if s["name"] == container)

    def _set_state(self, run: _Running, container: str, state: dict) -> None:
        status = self._status(run, container)
        status["state"] = state
        status["ready"] = "running" in state
        status["started"] = "running" in state

    def _log(self, run: _Running, line: str) -> None:
        with self._cond:
            run.log.append((_now(), line))
            self._cond.notify_all()

    # -- podman mode ---------------------------------------------------------------------------
    def _podman_down(self, name: str) -> None:
        from tests.k8s import podman

        path = self.workdir / f"{name}.yaml"
        if path.is_file():
            podman.podman("kube", "down", str(path), check=False, timeout=120)
            path.unlink()

    def _run_in_podman(self, run: _Running) -> None:
        """The pod's containers in podman, its status and log lines read back from them."""
        from tests.k8s import podman

        meta = run.pod["metadata"]
        for env in run.pod["spec"]["containers"][0].get("env") or []:
            ref = (env.get("valueFrom") or {}).get("secretKeyRef")
            if ref and (meta["namespace"], ref["name"]) in self.secrets:
                podman.create_secret(ref["name"], self.secrets[(meta["namespace"], ref["name"])])
            elif ref:
                podman.podman("secret", "rm", ref["name"], check=False)  # a Secret the cluster lacks
        path = self.workdir / f"{meta['name']}.yaml"
        path.write_text(json.dumps(podman.for_podman(run.pod, self.podman_run_root)))
        played = podman.podman("kube", "play", str(path), check=False, timeout=300)
        base = podman.container(meta["name"])
        if played.returncode != 0:
            with self._cond:
                reason = played.stderr.strip().splitlines()[-1] if played.stderr.strip() else "kube play failed"
                self._set_state(run, "base", {"waiting": {"reason": "CreateContainerError", "message": reason}})
                self._event(run, "Failed", f"Error: {reason}", "Warning")
                self._touch(run)
            return
        with self._cond:
            for c in run.pod["spec"]["containers"]:
                self._set_state(run, c["name"], {"running": {"startedAt": _ts(_now())}})
            run.pod["status"].update(phase="Running", startTime=_ts(_now()), podIP="10.88.0.7")
            self._event(run, "Started", "Started container base")
            self._touch(run)
        seen = 0
        while True:
            state = podman.podman("inspect", base, "--format", "{{.State.Status}} {{.State.ExitCode}} {{.State.OOMKilled}}",
                                  check=False).stdout.split()
            lines = podman.logs(base).splitlines()
            for line in lines[seen:]:
                self._log(run, line)
            seen = len(lines)
            if not state or state[0] in ("exited", "stopped"):
                break
            time.sleep(0.5)
        code = int(state[1]) if state else 1
        with self._cond:
            if code == 0:
                out = podman.podman("exec", podman.container(meta["name"], SIDECAR), "cat", "/airflow/xcom/return.json",
                                    check=False)
                run.xcom = out.stdout if out.returncode == 0 and out.stdout.strip() else None
            terminated = {"exitCode": code,
                          "reason": "OOMKilled" if state and state[2] == "true" else ("Completed" if code == 0 else "Error"),
                          "startedAt": _ts(_now()), "finishedAt": _ts(_now())}
            if code != 0:
                terminated["message"] = "\n".join(line for _, line in run.log[-80:])[-2048:]
            self._set_state(run, "base", {"terminated": terminated})
            run.base_done = True
            self._touch(run)

    def _run_pod(self, run: _Running) -> None:
        spec, meta = run.pod["spec"], run.pod["metadata"]
        time.sleep(0.05)
        with self._cond:
            run.pod["status"]["conditions"] = [{"type": "PodScheduled", "status": "True",
                                                "lastTransitionTime": _ts(_now())}]
            self._event(run, "Scheduled", f"Successfully assigned {meta['namespace']}/{meta['name']} to gpu-node-1")
            self._touch(run)
        time.sleep(0.05)
        with self._cond:
            run.pod["status"]["containerStatuses"] = [
                {"name": c["name"], "image": c["image"], "imageID": "", "ready": False, "restartCount": 0,
                 "started": False, "state": {"waiting": {"reason": "ContainerCreating"}}}
                for c in spec["containers"]
            ]
            base = spec["containers"][0]
            for env in base.get("env") or []:
                ref = (env.get("valueFrom") or {}).get("secretKeyRef")
                if ref and self.podman_run_root:
                    continue  # podman resolves it, or fails with its own message
                if ref:
                    data = self.secrets.get((meta["namespace"], ref["name"]))
                    if data is None or ref["key"] not in data:
                        what = f'secret "{ref["name"]}" not found' if data is None else f'couldn\'t find key {ref["key"]} in Secret {meta["namespace"]}/{ref["name"]}'
                        self._set_state(run, "base", {"waiting": {"reason": "CreateContainerConfigError", "message": what}})
                        self._event(run, "Failed", f"Error: {what}", "Warning")
                        self._touch(run)
                        return
                    run.env[env["name"]] = data[ref["key"]]
                elif "value" in env:
                    run.env[env["name"]] = env["value"]
        if self.podman_run_root:
            return self._run_in_podman(run)
        with self._cond:
            for c in spec["containers"]:
                self._set_state(run, c["name"], {"running": {"startedAt": _ts(_now())}})
            run.pod["status"].update(phase="Running", startTime=_ts(_now()), podIP="10.0.0.7")
            self._event(run, "Started", "Started container base")
            self._touch(run)
        for name in run.script.env_checks:
            self._log(run, f"env {name}: {'set' if run.env.get(name) else 'MISSING'}")
        for line in run.script.lines:
            time.sleep(run.script.line_delay)
            self._log(run, line)
        time.sleep(run.script.line_delay)
        with self._cond:
            code = run.script.exit_code
            if code == 0 and run.script.xcom is not None:
                run.xcom = json.dumps(run.script.xcom)
            message = ""
            if code != 0 and base.get("terminationMessagePolicy") == "FallbackToLogsOnError":
                # The kubelet's fallback: the tail of the log (80 lines, 2 KiB) becomes the message.
                message = "\n".join(line for _, line in run.log[-80:])[-2048:]
            terminated = {"exitCode": code, "reason": run.script.reason or ("Completed" if code == 0 else "Error"),
                          "startedAt": _ts(_now()), "finishedAt": _ts(_now())}
            if message:
                terminated["message"] = message
            self._set_state(run, "base", {"terminated": terminated})
            run.base_done = True
            self._touch(run)

    # -- HTTP --------------------------------------------------------------------------------
    def _handler(self):
        api = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.0"  # a streamed log ends when the connection closes

            def log_message(self, *args):  # keep the test output for the operator's log
                pass

            def _send(self, code: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _not_found(self, what: str) -> None:
                self._send(404, {"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 404,
                                 "reason": "NotFound", "message": f"{what} not found"})

            def _body(self) -> dict | list:
                n = int(self.headers.get("Content-Length") or 0)
                return json.loads(self.rfile.read(n) or b"{}")

            def _route(self, method: str) -> None:
                url = urlparse(self.path)
                q = {k: v[-1] for k, v in parse_qs(url.query).items()}
                api.requests.append(f"{method} {url.path}")
                m = re.fullmatch(r"/api/v1/namespaces/([^/]+)/(pods|events)(?:/([^/]+))?(?:/(log))?", url.path)
                if not m:
                    api.unhandled.append(f"{method} {self.path}")
                    return self._not_found(url.path)
                ns, kind, name, sub = m.groups()
                if kind == "events" and method == "GET" and not name:
                    return self._events(ns, q)
                if kind == "pods" and not name and method == "GET" and q.get("watch", "").lower() not in ("true", "1"):
                    return self._list(ns, q)
                if kind == "pods" and not name and method == "POST":
                    return self._create(ns)
                if kind == "pods" and name and not sub and method in ("GET", "PATCH", "DELETE"):
                    return self._one(method, ns, name)
                if kind == "pods" and name and sub == "log" and method == "GET":
                    return self._logs(ns, name, q)
                api.unhandled.append(f"{method} {self.path}")
                self._not_found(url.path)

            do_GET = lambda self: self._route("GET")  # noqa: E731
            do_POST = lambda self: self._route("POST")  # noqa: E731
            do_PATCH = lambda self: self._route("PATCH")  # noqa: E731
            do_DELETE = lambda self: self._route("DELETE")  # noqa: E731

            def _list(self, ns: str, q: dict) -> None:
                with api._cond:
                    items = [r.pod for (n, _), r in api.pods.items()
                             if n == ns and _match_selector(r.pod["metadata"].get("labels") or {}, q.get("labelSelector"))]
                    self._send(200, {"apiVersion": "v1", "kind": "PodList",
                                     "metadata": {"resourceVersion": str(api._rv)}, "items": items})

            def _create(self, ns: str) -> None:
                body = self._body()
                api.created.append(json.loads(json.dumps(body)))
                meta = body.setdefault("metadata", {})
                if (ns, meta.get("name")) in api.pods:
                    return self._send(409, {"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 409,
                                            "reason": "AlreadyExists", "message": "pod exists"})
                meta.update(namespace=ns, uid=str(uuid.uuid4()), creationTimestamp=_ts(_now()))
                body["status"] = {"phase": "Pending", "qosClass": "Burstable"}
                run = _Running(pod=body, script=api.script)
                with api._cond:
                    api.pods[(ns, meta["name"])] = run
                    api._touch(run)
                    self._send(201, body)
                threading.Thread(target=api._run_pod, args=(run,), daemon=True).start()

            def _one(self, method: str, ns: str, name: str) -> None:
                with api._cond:
                    run = api.pods.get((ns, name))
                    if run is None:
                        return self._not_found(f'pods "{name}"')
                    if method == "PATCH":
                        patch = self._body()
                        if isinstance(patch, list):  # JSON patch: only "add"/"replace" of labels is used
                            for op in patch:
                                key = op["path"].rsplit("/", 1)[-1].replace("~1", "/")
                                run.pod["metadata"].setdefault("labels", {})[key] = op["value"]
                        else:
                            _merge(run.pod, patch)
                        api._touch(run)
                    if method == "DELETE":
                        del api.pods[(ns, name)]
                        api.deleted.append(name)
                        run.pod["metadata"]["deletionTimestamp"] = _ts(_now())
                        api._cond.notify_all()
                    self._send(200, run.pod)
                if method == "DELETE" and api.podman_run_root:
                    api._podman_down(name)

            def _logs(self, ns: str, name: str, q: dict) -> None:
                with api._cond:
                    run = api.pods.get((ns, name))
                if run is None:
                    return self._not_found(f'pods "{name}"')
                if q.get("container", "base") != "base":
                    return self._send(400, {"kind": "Status", "code": 400, "message": "only base logs here"})
                follow, stamps = (q.get(k, "").lower() == "true" for k in ("follow", "timestamps"))
                since = _now() - dt.timedelta(seconds=int(q["sinceSeconds"])) if "sinceSeconds" in q else None
                self.send_response(200)
                self.send_header("Content-Type", "text/plain")
                self.end_headers()
                sent = 0
                while True:
                    with api._cond:
                        while follow and sent == len(run.log) and not run.base_done and (ns, name) in api.pods:
                            api._cond.wait(timeout=1)
                        fresh, sent = run.log[sent:], len(run.log)
                        done = run.base_done or not follow or (ns, name) not in api.pods
                    for t, line in fresh:
                        if since and t < since:
                            continue
                        stamp = t.strftime("%Y-%m-%dT%H:%M:%S.%f000Z ") if stamps else ""
                        self.wfile.write(f"{stamp}{line}\n".encode())
                    self.wfile.flush()
                    if done and sent == len(run.log):
                        return

            def _events(self, ns: str, q: dict) -> None:
                wanted = (q.get("fieldSelector") or "").removeprefix("involvedObject.name=")
                with api._cond:
                    items = [e for e in api.events
                             if e["metadata"]["namespace"] == ns and (not wanted or e["involvedObject"]["name"] == wanted)]
                    self._send(200, {"apiVersion": "v1", "kind": "EventList",
                                     "metadata": {"resourceVersion": str(api._rv)}, "items": items})

        return Handler
