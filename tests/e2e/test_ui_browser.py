"""A person's view: Airflow on 127.0.0.1 with the two runs of tests/e2e/conftest.py's
`scheduler_runs`: the sweep triggered from the trigger form, and a plain run (triggered through the
REST API) whose report tab is opened in headless Chromium (Debian's chromium + chromium-driver).
"""

from __future__ import annotations

import os
import urllib.request
from pathlib import Path

import pytest

from tests.e2e.airflow_api import DAG_ID, call, task_instances
from tests.e2e.browser import logged_in_chromium, waiting
from tests.e2e.conftest import SWEEP

pytestmark = [pytest.mark.e2e, pytest.mark.xdist_group("airflow-standalone")]


@pytest.fixture(scope="module")
def finished_run(scheduler_runs) -> str:
    """A run with one fine-tune (no sweep), finished."""
    assert scheduler_runs["killed_state"] == "success"
    return scheduler_runs["killed"]


def open_report_tab(base: str, token: str, run_id: str, screenshot: Path | None = None) -> dict:
    """Open the run's report tab as a logged-in user; return what the page shows."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec

    driver = logged_in_chromium(base, token)
    try:
        driver.get(f"{base}/dags/{DAG_ID}/runs/{run_id}/plugin/gemma-quality-report")
        wait = waiting(driver)
        frame = wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "iframe")))
        tab_text = driver.find_element(By.TAG_NAME, "body").text
        driver.switch_to.frame(frame)
        wait.until(ec.presence_of_element_located((By.ID, "verdict")))
        seen = {
            "tab_text": tab_text,
            "verdict": driver.find_element(By.ID, "verdict").text,
            "metrics": driver.find_element(By.CSS_SELECTOR, "table.metrics").text,
            "first_card": driver.find_element(By.CSS_SELECTOR, "#cards .card").text,
            "cards": len(driver.find_elements(By.CSS_SELECTOR, "#cards .card")),
        }
        # Filter by category, as a reader would: only that category's cards stay visible.
        from selenium.webdriver.support.ui import Select

        Select(driver.find_element(By.ID, "filter-category")).select_by_value("creative_writing")
        seen["visible_after_filter"] = sum(c.is_displayed() for c in driver.find_elements(By.CSS_SELECTOR, "#cards .card"))
        Select(driver.find_element(By.ID, "filter-category")).select_by_value("")
        if screenshot:
            driver.execute_script("window.scrollTo(0, 0)")  # the reader starts at the verdict
            driver.switch_to.default_content()
            driver.save_screenshot(str(screenshot))
        return seen
    finally:
        driver.quit()


def test_report_needs_airflow_login(airflow_server, finished_run):
    status, _ = call(f"{airflow_server['base']}/gemma-reports/runs/{DAG_ID}/{finished_run}")
    assert status in (401, 403)
    status, body = call(f"{airflow_server['base']}/gemma-reports/runs/{DAG_ID}/{finished_run}", token=airflow_server["token"])
    assert status == 200 and "Quality gate" in body
    # Served with its policy (the report tab test shows the page still works under it).
    req = urllib.request.Request(f"{airflow_server['base']}/gemma-reports/runs/{DAG_ID}/{finished_run}",
                                 headers={"Authorization": f"Bearer {airflow_server['token']}"})
    with urllib.request.urlopen(req, timeout=30) as r:
        headers = r.headers
    assert "sandbox allow-scripts" in headers["Content-Security-Policy"] and "default-src 'none'" in headers["Content-Security-Policy"]
    assert "script-src 'sha256-" in headers["Content-Security-Policy"] and "frame-ancestors 'self'" in headers["Content-Security-Policy"]
    assert headers["X-Content-Type-Options"] == "nosniff" and headers["Cache-Control"] == "no-store"


def test_a_run_id_cannot_reach_outside_the_run_folders(airflow_server, finished_run):
    """`..`, `.` and their encodings name the run root or runs/ itself, never a run: the app refuses
    them even when a report.html waits there (it once served <run root>/report/report.html)."""
    root = airflow_server["home"] / "gemma_runs"
    for folder in (root / "report", root / "runs" / "report"):
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "report.html").write_text("<p>PLANTED outside any run folder</p>")
    for run_id in ("..", ".", "%2E%2E", "%2e", "..%2F..%2Freport", "%2E%2E%2F"):
        status, body = call(f"{airflow_server['base']}/gemma-reports/runs/{DAG_ID}/{run_id}", token=airflow_server["token"])
        assert status == 404 and "PLANTED" not in str(body), (run_id, status, body)


def test_report_tab_in_the_airflow_ui(airflow_server, finished_run, tmp_path):
    shot = Path(os.environ.get("GEMMA_UI_SCREENSHOT", tmp_path / "report-tab.png"))
    seen = open_report_tab(airflow_server["base"], airflow_server["token"], finished_run, shot)
    assert "Quality report" in seen["tab_text"]  # the tab's name in the run page
    assert seen["verdict"].startswith("Quality gate: PASSED") or seen["verdict"].startswith("Quality gate: FAILED")
    assert "held-out ROUGE-L" in seen["verdict"] and "EOS-stop rate" in seen["verdict"]
    for row in ("ROUGE-L vs reference responses", "response perplexity", "template leak (rate)", "new tokens/s"):
        assert row in seen["metrics"]
    assert "What should I do on a trip to Europe?" in seen["first_card"]
    assert "BASE" in seen["first_card"] and "TUNED" in seen["first_card"]  # the headings are upper-cased by CSS
    assert seen["cards"] == 26 and seen["visible_after_filter"] == 3
    assert shot.stat().st_size > 10_000


def test_report_extra_link_on_the_report_task(airflow_server, finished_run):
    base, token = airflow_server["base"], airflow_server["token"]
    status, links = call(f"{base}/api/v2/dags/{DAG_ID}/dagRuns/{finished_run}/taskInstances/report/links", token=token)
    assert status == 200, links
    assert links["extra_links"]["Quality report"] == f"/gemma-reports/runs/{DAG_ID}/{finished_run}", links
    # The link is the report task's only: other tasks show none.
    status, links = call(f"{base}/api/v2/dags/{DAG_ID}/dagRuns/{finished_run}/taskInstances/snapshot/links", token=token)
    assert status == 200 and not links["extra_links"].get("Quality report"), links




def test_trigger_a_sweep_from_the_trigger_form(airflow_server, scheduler_runs):
    """What the README tells a user: Trigger -> the `variants` field -> a JSON list -> Trigger
    (tests/e2e/browser.py drives it). The scheduler then runs one finetune and one generate per
    variant, named by its overrides."""
    base, token, run_id = airflow_server["base"], airflow_server["token"], scheduler_runs["sweep"]
    run = call(f"{base}/api/v2/dags/{DAG_ID}/dagRuns/{run_id}", token=token)[1]
    assert run["conf"]["variants"] == SWEEP
    assert scheduler_runs["form_screenshot"].stat().st_size > 10_000
    assert scheduler_runs["sweep_state"] == "success"
    tis = task_instances(airflow_server, run_id)
    mapped = sorted((t["task_id"], t["map_index"], t["rendered_map_index"], t["state"]) for t in tis if t["map_index"] >= 0)
    assert mapped == [(task, i, label, "success") for task in ("finetune", "generate")
                      for i, label in enumerate(("lora_rank=2", "learning_rate=0.003, lora_rank=4"))]
