"""A person's view: Airflow on 127.0.0.1, a run triggered through the REST API, the run's report tab
opened in headless Chromium (Debian's chromium + chromium-driver), and what the page shows.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from tests.e2e.airflow_api import DAG_ID, call, wait_for

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"


pytestmark = [pytest.mark.e2e, pytest.mark.xdist_group("airflow-standalone")]


@pytest.fixture(scope="module")
def browser():
    if not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()):
        pytest.fail("Chromium and chromedriver are needed: apt-get install chromium chromium-driver (make test does)")


@pytest.fixture(scope="module")
def finished_run(airflow_server, browser):
    """A run triggered through the REST API on the shared server (tests/e2e/conftest.py), finished."""
    base, token = airflow_server["base"], airflow_server["token"]
    status, run = call(f"{base}/api/v2/dags/{DAG_ID}/dagRuns", "POST",
                       {"logical_date": None, "conf": {"num_examples": 16}}, token)
    assert status in (200, 201), run
    run_id = run["dag_run_id"]

    def finished():
        state = call(f"{base}/api/v2/dags/{DAG_ID}/dagRuns/{run_id}", token=token)[1]["state"]
        return state if state in ("success", "failed") else None

    state = wait_for("the triggered run to finish", finished, timeout=900, every=5)
    tis = call(f"{base}/api/v2/dags/{DAG_ID}/dagRuns/{run_id}/taskInstances", token=token)[1]["task_instances"]
    states = {t["task_id"]: t["state"] for t in tis}
    assert state == "success", states
    return run_id


def logged_in_chromium(base: str, token: str, window: str = "1400,1800"):
    """Headless Chromium with Airflow's session cookie set, as after a login."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", f"--window-size={window}"):
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    driver.get(f"{base}/api/v2/monitor/health")  # a page on the origin, to set Airflow's session cookie
    driver.add_cookie({"name": "_token", "value": token, "path": "/"})
    return driver


def open_report_tab(base: str, token: str, run_id: str, screenshot: Path | None = None) -> dict:
    """Open the run's report tab as a logged-in user; return what the page shows."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    driver = logged_in_chromium(base, token)
    try:
        driver.get(f"{base}/dags/{DAG_ID}/runs/{run_id}/plugin/gemma-quality-report")
        wait = WebDriverWait(driver, 60)
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



SWEEP = [{"lora_rank": 2}, {"lora_rank": 4, "learning_rate": 0.003}]


def test_trigger_a_sweep_from_the_trigger_form(airflow_server, finished_run, tmp_path):
    """What the README tells a user: Trigger -> the `variants` field -> a JSON list -> Trigger. The
    scheduler then runs one finetune and one generate per variant, named by its overrides."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    base, token = airflow_server["base"], airflow_server["token"]
    driver = logged_in_chromium(base, token, "1400,1400")
    try:
        driver.get(f"{base}/dags/{DAG_ID}")
        wait = WebDriverWait(driver, 60)
        wait.until(lambda d: [b for b in d.find_elements(By.TAG_NAME, "button") if b.text == "Trigger"])[0].click()
        field = wait.until(lambda d: d.find_element(By.ID, "element_variants"))
        driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", field)
        field.click()
        # The field is a JSON editor (Monaco) that completes brackets as one types: paste, as people do.
        ActionChains(driver).key_down(Keys.CONTROL).send_keys("a").key_up(Keys.CONTROL).perform()
        driver.execute_script(
            "const dt = new DataTransfer(); dt.setData('text/plain', arguments[1]);"
            "arguments[0].dispatchEvent(new ClipboardEvent('paste', {clipboardData: dt, bubbles: true, cancelable: true}));",
            field.find_element(By.CSS_SELECTOR, "[role=textbox]"), json.dumps(SWEEP),
        )
        wait.until(lambda d: "learning_rate" in field.find_element(By.CSS_SELECTOR, ".view-lines").text)
        driver.save_screenshot(str(os.environ.get("GEMMA_TRIGGER_SCREENSHOT", tmp_path / "trigger-form.png")))
        before = {r["dag_run_id"] for r in call(f"{base}/api/v2/dags/{DAG_ID}/dagRuns", token=token)[1]["dag_runs"]}
        [b for b in driver.find_elements(By.TAG_NAME, "button") if b.text.strip() == "Trigger"][-1].click()

        def new_run():
            runs = call(f"{base}/api/v2/dags/{DAG_ID}/dagRuns", token=token)[1]["dag_runs"]
            return next((r for r in runs if r["dag_run_id"] not in before), None)

        run = wait_for("the run the form triggered", new_run, timeout=60, every=1)
    finally:
        driver.quit()
    assert run["conf"]["variants"] == SWEEP

    def finished():
        state = call(f"{base}/api/v2/dags/{DAG_ID}/dagRuns/{run['dag_run_id']}", token=token)[1]["state"]
        return state if state in ("success", "failed") else None

    assert wait_for("the sweep to finish", finished, timeout=900, every=5) == "success"
    tis = call(f"{base}/api/v2/dags/{DAG_ID}/dagRuns/{run['dag_run_id']}/taskInstances", token=token)[1]["task_instances"]
    mapped = sorted((t["task_id"], t["map_index"], t["rendered_map_index"], t["state"]) for t in tis if t["map_index"] >= 0)
    assert mapped == [(task, i, label, "success") for task in ("finetune", "generate")
                      for i, label in enumerate(("lora_rank=2", "learning_rate=0.003, lora_rank=4"))]
