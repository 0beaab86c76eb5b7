"""A person approves what the gate cannot vouch for, on the shared scheduler (tests/e2e/conftest.py):
alice (role user) triggers runs that change a judged key; each passes the gate (the server's margins
are wide) and its `approve` task waits. Her own approval through the REST API is refused; bob's,
through the API and once in the UI (headless Chromium), promotes. carol may not see this DAG (the
per-DAG rule of tests/e2e/per_dag_auth.py): its report tab answers her 403."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from urllib.parse import quote

import pytest

from tasks.pipeline import artifacts
from tasks.infra.settings import run_folder_name
from tests.conftest import REPO
from tests.e2e.airflow_api import DAG_ID, airflow_process, call, task_instances, token_for, trigger, wait_finished, wait_for
from tests.e2e.browser import answer_required_action
from tests.e2e.conftest import run_dir

pytestmark = [pytest.mark.e2e, pytest.mark.xdist_group("airflow-standalone")]

# max_bad_share is judged (it decides which data the run is judged on); here it changes nothing read.
JUDGED = {"max_bad_share": 0.06, "num_examples": 16}


def hitl_url(server: dict, run_id: str) -> str:
    return f"{server['base']}/api/v2/dags/{DAG_ID}/dagRuns/{quote(run_id, safe='')}/taskInstances/approve/-1/hitlDetails"


def states(server: dict, run_id: str) -> dict:
    return {t["task_id"]: t["state"] for t in task_instances(server, run_id)}


def waiting_for_approval(server: dict, token: str) -> str:
    run_id = trigger(server, JUDGED, token)

    def parked():
        now = states(server, run_id)
        assert now.get("report") not in ("failed", "upstream_failed"), now
        return now.get("approve") == "awaiting_input"

    wait_for(f"run {run_id} to wait for approval", parked, timeout=600, every=2)
    # A person answers after seconds, not within the same second: Airflow 3.3's LocalExecutor then
    # still reports the parked process's exit, and an answer that lands before it is lost (the task
    # is marked for retry and asks again). Wait until the scheduler has seen the task parked.
    time.sleep(5)
    assert states(server, run_id)["approve"] == "awaiting_input"
    return run_id


def answer(server: dict, run_id: str, token: str, option: str, comment: str) -> tuple[int, dict]:
    return call(hitl_url(server, run_id), "PATCH", {"chosen_options": [option], "params_input": {"comment": comment}}, token)


def approve_task(server: dict, run_id: str) -> dict:
    return next(t for t in task_instances(server, run_id) if t["task_id"] == "approve")


def until_answered(server: dict, run_id: str, give, attempts: int = 3):
    """`give()` answers the request; if Airflow lost the answer (the race above, on a loaded machine
    later than the 5 s allow: the task is marked for retry and asks again, with a higher try number),
    the person sees the request again and answers again. The last answer's result."""
    for attempt in range(attempts):
        if attempt:  # parked again: answer as before, seconds after it parked
            time.sleep(5)
        asked = approve_task(server, run_id)["try_number"]
        given = give()

        def settled():
            ti = approve_task(server, run_id)
            if ti["state"] in ("success", "failed", "skipped", "upstream_failed"):
                return "answered"
            return "asked again" if ti["state"] == "awaiting_input" and ti["try_number"] > asked else None

        if wait_for(f"run {run_id}'s approve task to take the answer", settled, timeout=600, every=2) == "answered":
            return given
    raise AssertionError(f"run {run_id}: Airflow lost the answer {attempts} times")


@pytest.fixture(scope="module")
def approvals(airflow_server, tmp_path_factory):
    server = airflow_server
    alice, bob = token_for(server, "alice"), token_for(server, "bob")
    champion = server["home"] / "gemma_runs" / "runs" / artifacts.CHAMPION
    shot = Path(os.environ.get("GEMMA_APPROVAL_SCREENSHOT", tmp_path_factory.mktemp("approval") / "approval.png"))
    out = {"alice": alice, "bob": bob, "screenshot": shot}

    selfish = waiting_for_approval(server, alice)
    out["request_seen_by_bob"] = call(hitl_url(server, selfish), token=bob)
    out["self_answer"] = until_answered(server, selfish, lambda: answer(server, selfish, alice, "Approve", "my own run, trust me"))
    out["selfish"], out["selfish_state"] = selfish, wait_finished(server, selfish)
    out["champion_after_selfish"] = champion.read_text() if champion.exists() else None

    by_api = waiting_for_approval(server, alice)
    out["api_answer"] = until_answered(server, by_api, lambda: answer(server, by_api, bob, "Approve", "read the held-out answers: fine"))
    out["by_api"], out["by_api_state"] = by_api, wait_finished(server, by_api)
    out["champion_after_api"] = json.loads(champion.read_text())

    in_ui = waiting_for_approval(server, alice)
    until_answered(server, in_ui, lambda: answer_required_action(server, bob, in_ui, "Approve",
                                                                 "approved in the UI after reading the report", shot))
    out["in_ui"], out["in_ui_state"] = in_ui, wait_finished(server, in_ui)
    out["champion_after_ui"] = json.loads(champion.read_text())
    return out


def test_a_run_that_changed_a_judged_key_waits_for_a_person_who_sees_the_verdict(airflow_server, approvals):
    status, detail = approvals["request_seen_by_bob"]
    assert status == 200 and detail["options"] == ["Approve", "Reject"] and not detail["response_received"]
    assert detail["subject"] == f"Promote the adapter of run {approvals['selfish']}?"
    body = detail["body"]
    assert "**Quality gate: PASSED**" in body and "| held-out ROUGE-L |" in body
    assert "this run changed max_bad_share from the DAG's configured value" in body
    assert "**Triggered by:** alice" in body
    assert f"(/dags/{DAG_ID}/runs/{quote(approvals['selfish'], safe='')}/plugin/gemma-quality-report)" in body
    metrics = artifacts.read_metrics(run_dir(airflow_server, approvals["selfish"]))
    assert metrics["promotion"]["approval_required"] is True and metrics["promotion"]["judged_changes"] == ["max_bad_share"]


def test_self_approval_is_refused_and_nothing_is_promoted(airflow_server, approvals):
    status, _ = approvals["self_answer"]
    assert status == 200  # Airflow records her answer; the pipeline refuses it
    assert approvals["selfish_state"] == "success"
    assert states(airflow_server, approvals["selfish"])["promote"] == "skipped"
    folder = run_dir(airflow_server, approvals["selfish"])
    decision = json.loads(artifacts.path(folder, artifacts.PROMOTE, artifacts.DECISION).read_text())
    assert decision["promoted"] is False
    assert decision["why"] == "self-approval refused: alice triggered this run and cannot approve its promotion"
    assert decision["approval"]["by"] == decision["approval"]["triggered_by"] == "alice"
    champion = approvals["champion_after_selfish"]
    assert champion is None or json.loads(champion)["run_id"] != run_folder_name(approvals["selfish"])


def test_another_users_approval_through_the_api_promotes_and_is_recorded(airflow_server, approvals):
    import mlflow

    assert approvals["api_answer"][0] == 200 and approvals["by_api_state"] == "success"
    assert states(airflow_server, approvals["by_api"])["promote"] == "success"
    champion = approvals["champion_after_api"]
    assert champion["run_id"] == run_folder_name(approvals["by_api"])
    assert (champion["approval"]["by"], champion["approval"]["triggered_by"]) == ("bob", "alice")
    assert champion["approval"]["comment"] == "read the held-out answers: fine" and champion["approval"]["at"]
    decision = json.loads(artifacts.path(run_dir(airflow_server, approvals["by_api"]), artifacts.PROMOTE,
                                         artifacts.DECISION).read_text())
    assert decision["promoted"] is True and decision["why"] == "approved by bob: read the held-out answers: fine"
    reg = champion["registry"]
    assert reg["status"] == "logged", reg
    version = mlflow.MlflowClient(reg["tracking_uri"]).get_model_version(reg["registered_model"], str(reg["version"]))
    assert version.tags["gemma.approved_by"] == "bob" and version.tags["gemma.triggered_by"] == "alice"


def test_an_approval_in_the_ui_promotes_and_the_history_shows_who_approved(airflow_server, approvals):
    assert approvals["in_ui_state"] == "success" and approvals["screenshot"].stat().st_size > 10_000
    champion = approvals["champion_after_ui"]
    assert champion["run_id"] == run_folder_name(approvals["in_ui"])
    assert champion["approval"]["by"] == "bob"
    assert champion["approval"]["comment"] == "approved in the UI after reading the report"
    # The third run's report (rendered after the second was promoted) lists it in the run history.
    html = artifacts.report_path(run_dir(airflow_server, approvals["in_ui"])).read_text()
    assert "promoted (approved by bob: read the held-out answers: fine," in html


def test_a_user_without_this_dags_permission_gets_403_from_the_report_tab(airflow_server, approvals):
    """A second API server on the same Airflow home, with an auth manager that grants DAGs one by one
    (tests/e2e/per_dag_auth.py; `airflow standalone` always runs the simple one, which has roles only):
    carol, a viewer refused this DAG, gets 403 from the report tab, the DAG and its approval; dave, a
    viewer it does not restrict, reads the report. Under the simple auth manager alone every viewer
    reads every DAG's reports: what a deployment on it gets."""
    env = {**airflow_server["env"], "AIRFLOW__CORE__AUTH_MANAGER": "tests.e2e.per_dag_auth.PerDagAuthManager",
           "GEMMA_TEST_NO_DAG_ACCESS": "carol",
           "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)}
    with airflow_process(["api-server"], airflow_server["home"], env, "api-server-per-dag.log") as server:
        report = f"{server['base']}/gemma-reports/runs/{DAG_ID}/{quote(approvals['by_api'], safe='')}"
        carol, dave = token_for(server, "carol"), token_for(server, "dave")
        assert call(report, token=carol)[0] == 403
        assert call(f"{server['base']}/api/v2/dags/{DAG_ID}", token=carol)[0] == 403
        assert call(hitl_url(server, approvals["by_api"]), token=carol)[0] == 403
        status, body = call(report, token=dave)
        assert status == 200 and "Quality gate" in body
    # The shared server (simple auth manager): carol is a viewer like any other.
    assert call(f"{airflow_server['base']}/gemma-reports/runs/{DAG_ID}/{quote(approvals['by_api'], safe='')}",
                token=token_for(airflow_server, "carol"))[0] == 200
