"""Airflow as `make ui` runs it (`airflow standalone` on 127.0.0.1: API server, scheduler, DAG
processor, triggerer), for the end-to-end tests, and a small client of its REST API."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

from tests.conftest import airflow_bin

DAG_ID = "gemma_lora_finetune"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def call(url: str, method: str = "GET", body: dict | None = None, token: str | None = None) -> tuple[int, dict | str]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method)
    req.add_header("Content-Type", "application/json")
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            text = r.read().decode()
            status = r.status
    except urllib.error.HTTPError as e:
        text, status = e.read().decode(), e.code
    except (urllib.error.URLError, ConnectionError) as e:  # not listening yet
        return 0, str(e)
    try:
        return status, json.loads(text)
    except json.JSONDecodeError:
        return status, text


def wait_for(what: str, fn, timeout: float, every: float = 2.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = fn()
        if value:
            return value
        time.sleep(every)
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")


def server_env(home: Path, port: int, extra_env: dict | None = None) -> dict:
    return {
        **os.environ,
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__API__HOST": "127.0.0.1",
        "AIRFLOW__API__PORT": str(port),
        "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://127.0.0.1:{port}/execution/",
        "AIRFLOW__CORE__PARALLELISM": "2",
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "5",
        "GEMMA_RUN_ROOT": str(home / "gemma_runs"),
        # standalone starts its components as `airflow ...` from PATH
        "PATH": f"{Path(airflow_bin()).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        **(extra_env or {}),
    }


@contextlib.contextmanager
def airflow_process(args: list[str], home: Path, extra_env: dict | None = None, log_name: str = "standalone.log"):
    """`airflow <args>` (standalone, or one api-server) with its home in `home` and the run root in
    `home/gemma_runs`; yields {"base", "token" (admin's), "home", "proc"}, and stops the whole
    process group at the end."""
    port = free_port()
    log = (home / log_name).open("w")
    proc = subprocess.Popen([airflow_bin(), *args], env=server_env(home, port, extra_env), stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        def healthy():
            if proc.poll() is not None:
                raise RuntimeError(f"airflow {args[0]} exited {proc.returncode}; see {home / log_name}")
            return call(f"{base}/api/v2/monitor/health")[0] == 200

        wait_for("the API server", healthy, timeout=180)
        pw_file = home / "simple_auth_manager_passwords.json.generated"
        wait_for("the admin password file", pw_file.is_file, timeout=60, every=1)
        password = json.loads(pw_file.read_text())["admin"]
        status, body = call(f"{base}/auth/token", "POST", {"username": "admin", "password": password})
        assert status in (200, 201), body
        yield {"base": base, "token": body["access_token"], "home": home, "proc": proc}
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()


def standalone(home: Path, extra_env: dict | None = None):
    """`airflow standalone` (API server, scheduler, DAG processor, triggerer; it always runs the simple
    auth manager)."""
    return airflow_process(["standalone"], home, extra_env)


def unpause_when_parsed(server: dict) -> None:
    base, token = server["base"], server["token"]
    wait_for("the DAG to be parsed", lambda: call(f"{base}/api/v2/dags/{DAG_ID}", token=token)[0] == 200, timeout=180)
    status, body = call(f"{base}/api/v2/dags/{DAG_ID}", "PATCH", {"is_paused": False}, token)
    assert status == 200, body


def token_for(server: dict, user: str) -> str:
    """A user's API token (the simple auth manager's generated password file has every user's)."""
    password = json.loads((server["home"] / "simple_auth_manager_passwords.json.generated").read_text())[user]
    status, body = call(f"{server['base']}/auth/token", "POST", {"username": user, "password": password})
    assert status in (200, 201), body
    return body["access_token"]


def trigger(server: dict, conf: dict, token: str | None = None) -> str:
    # The test server keeps Airflow's metadata in SQLite: while the scheduler writes, the API server's
    # insert can fail with "database is locked" (a 500 "Database error", nothing created); try again.
    for attempt in range(5):
        status, run = call(f"{server['base']}/api/v2/dags/{DAG_ID}/dagRuns", "POST", {"logical_date": None, "conf": conf},
                           token or server["token"])
        if not (status >= 500 and "Database error" in str(run)):
            break
        time.sleep(2 * (attempt + 1))
    assert status in (200, 201), run
    return run["dag_run_id"]


def dag_run(server: dict, run_id: str) -> dict:
    return call(f"{server['base']}/api/v2/dags/{DAG_ID}/dagRuns/{run_id}", token=server["token"])[1]


def task_instances(server: dict, run_id: str) -> list[dict]:
    return call(f"{server['base']}/api/v2/dags/{DAG_ID}/dagRuns/{run_id}/taskInstances", token=server["token"])[1]["task_instances"]


def wait_finished(server: dict, run_id: str, timeout: float = 900) -> str:
    def finished():
        state = dag_run(server, run_id)["state"]
        return state if state in ("success", "failed") else None

    return wait_for(f"run {run_id} to finish", finished, timeout=timeout, every=5)
