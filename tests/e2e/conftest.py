"""The one `airflow standalone` (what `make ui` runs) that the scheduler tests share, and the two runs
they read.

Its config is tiny_test with a checkpoint every 10 steps and a progress line every 50 (neither
changes an output: every run on it trains and answers as on tiny_test itself, and the fault
test can kill a fine-tune between two checkpoints), wide gate margins (below), and the keras-hub export only: no test here is
about the Hugging Face or GGUF files, which tests/tasks/test_export.py and test_sweep_dag check in
their runtimes. Its retries wait 3 s, not 15. Tests that share it are in one xdist group and take
care not to depend on what ran before them. It has no schedule (`[gemma] schedule = none`): unpaused,
a weekly DAG would start a run of its own at once, which every test run here would wait for.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import yaml

from tasks.pipeline import artifacts
from tasks.infra.settings import run_folder_name
from tasks.pipeline.config import config_path
from tests.e2e.airflow_api import dag_run, standalone, task_instances, trigger, unpause_when_parsed, wait_finished, wait_for
from tests.e2e.browser import trigger_from_form

# The gate's margins are wide: every run here passes the gate, whatever the tiny random model scores,
# so a run that needs a person's approval really asks (the gate's rules: tests/tasks/test_report.py).
SERVER_SETTINGS = {"checkpoint_every_steps": 10, "log_every_steps": 50, "export_formats": ["keras"],
                   "gate_rouge_l_margin": 1.0, "gate_eos_rate_margin": 1.0, "gate_perplexity_margin": 100.0}
# Its users (simple auth manager roles): alice triggers, bob reviews, carol and dave are viewers
# (tests/e2e/test_approval.py refuses carol this DAG through an auth manager with per-DAG rules).
USERS = {"admin": "admin", "alice": "user", "bob": "user", "carol": "viewer", "dave": "viewer"}
# The sweep a person triggers from the trigger form (the README's example, two variants).
SWEEP = [{"lora_rank": 2}, {"lora_rank": 4, "learning_rate": 0.003}]
# The run whose fine-tune is killed: long enough to kill between two checkpoints (the server
# checkpoints every 10 steps), one example a step.
KILLED = {"num_examples": 200, "batch_size": 1}


@pytest.fixture(scope="session")
def airflow_server(tmp_path_factory):
    home = tmp_path_factory.mktemp("airflow-standalone")
    config = home / "standalone.yaml"
    config.write_text(yaml.safe_dump({**yaml.safe_load(config_path("tiny_test").read_text()), **SERVER_SETTINGS}))
    env = {"GEMMA_CONFIG": str(config), "GEMMA_RETRY_DELAY_S": "3", "GEMMA_SCHEDULE": "none",
           "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": ",".join(f"{u}:{r}" for u, r in USERS.items())}
    with standalone(home, env) as server:
        server["env"] = env
        unpause_when_parsed(server)
        yield server


def run_dir(server: dict, run_id: str) -> Path:
    return server["home"] / "gemma_runs" / "runs" / run_folder_name(run_id)


def task_process(ti_id: str) -> int | None:
    """The pid of the process running the task instance (its title: `airflow worker -- <ti id>`)."""
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if f"airflow worker -- {ti_id}" in (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"):
                    return int(proc.name)
            except OSError:
                continue
    return None


@pytest.fixture(scope="session")
def scheduler_runs(airflow_server, tmp_path_factory):
    """Two runs on the shared scheduler, as a team meets them. A person triggers a sweep from the
    trigger form (`sweep`); a second run triggered through the REST API meanwhile (`killed`) waits
    (max_active_runs=1), then runs, and its fine-tune's task process is SIGKILLed between two
    checkpoints, as the OOM killer or a node drain would, with no cleanup. Both are waited for.
    test_ui_browser reads the sweep (its report, its mapped tasks); test_scheduler_faults checks the
    wait, the retry and the resume."""
    server = airflow_server
    champion = server["home"] / "gemma_runs" / "runs" / artifacts.CHAMPION
    champion_before = champion.read_text() if champion.exists() else None
    form_shot = Path(os.environ.get("GEMMA_TRIGGER_SCREENSHOT", tmp_path_factory.mktemp("form") / "trigger-form.png"))
    sweep = trigger_from_form(server, SWEEP, form_shot)["dag_run_id"]
    wait_for("the sweep to start", lambda: dag_run(server, sweep)["state"] == "running", timeout=180, every=1)
    killed = trigger(server, KILLED)
    waited = dag_run(server, killed)["state"]  # while the sweep runs
    latest = artifacts.checkpoint_dir(run_dir(server, killed)) / "latest.json"

    def training_checkpointed():
        ti = next((t for t in task_instances(server, killed) if t["task_id"] == "finetune"), None)
        if ti and ti["state"] == "running" and latest.is_file() and json.loads(latest.read_text())["step"] >= 10:
            return ti
        return None

    ti = wait_for("the killed run's fine-tune to checkpoint", training_checkpointed, timeout=900, every=0.5)
    pid = wait_for("the fine-tune's task process", lambda: task_process(ti["id"]), timeout=30, every=0.5)
    os.kill(pid, signal.SIGKILL)
    killed_at = json.loads(latest.read_text())["step"]
    return {
        "sweep": sweep, "sweep_state": wait_finished(server, sweep), "form_screenshot": form_shot,
        "killed": killed, "killed_state": wait_finished(server, killed), "killed_at": killed_at,
        "killed_state_while_sweep_ran": waited, "champion_before": champion_before,
    }
