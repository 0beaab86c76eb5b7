"""Headless Chromium (Debian's chromium + chromium-driver) driven by Selenium, as a person uses the
Airflow UI: logged in with Airflow's session cookie, the trigger form filled in and submitted."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.e2e.airflow_api import DAG_ID, call, wait_for

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"


def require_chromium() -> None:
    if not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()):
        pytest.fail("Chromium and chromedriver are needed: apt-get install chromium chromium-driver (make test does)")


def chromium(window: str = "1400,1800"):
    """Headless Chromium with the flags this closed network needs (no background connections)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    require_chromium()
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", f"--window-size={window}"):
        opts.add_argument(flag)
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)


def logged_in_chromium(base: str, token: str, window: str = "1400,1800"):
    """Chromium with Airflow's session cookie set, as after a login."""
    driver = chromium(window)
    driver.get(f"{base}/api/v2/monitor/health")  # a page on the origin, to set Airflow's session cookie
    driver.add_cookie({"name": "_token", "value": token, "path": "/"})
    return driver


def waiting(driver, seconds: float = 60):
    """A WebDriverWait that retries while the page re-renders an element it just found."""
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, seconds, ignored_exceptions=(StaleElementReferenceException,))


def trigger_from_form(server: dict, variants: list[dict], screenshot: Path) -> dict:
    """What the README tells a user: the DAG's page -> Trigger -> the `variants` field -> a JSON list
    -> Trigger. Returns the run the form created (from the REST API)."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    base, token = server["base"], server["token"]
    before = {r["dag_run_id"] for r in call(f"{base}/api/v2/dags/{DAG_ID}/dagRuns", token=token)[1]["dag_runs"]}
    driver = logged_in_chromium(base, token, "1400,1400")
    try:
        driver.get(f"{base}/dags/{DAG_ID}")
        wait = waiting(driver)
        wait.until(lambda d: [b for b in d.find_elements(By.TAG_NAME, "button") if b.text == "Trigger"])[0].click()
        field = wait.until(lambda d: d.find_element(By.ID, "element_variants"))
        driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", field)
        field.click()
        # The field is a JSON editor (Monaco) that completes brackets as one types: paste, as people do.
        ActionChains(driver).key_down(Keys.CONTROL).send_keys("a").key_up(Keys.CONTROL).perform()
        driver.execute_script(
            "const dt = new DataTransfer(); dt.setData('text/plain', arguments[1]);"
            "arguments[0].dispatchEvent(new ClipboardEvent('paste', {clipboardData: dt, bubbles: true, cancelable: true}));",
            field.find_element(By.CSS_SELECTOR, "[role=textbox]"), json.dumps(variants),
        )
        keys = {k for v in variants for k in v}
        wait.until(lambda d: all(k in d.find_element(By.ID, "element_variants").find_element(
            By.CSS_SELECTOR, ".view-lines").text for k in keys))
        driver.save_screenshot(str(screenshot))
        [b for b in driver.find_elements(By.TAG_NAME, "button") if b.text.strip() == "Trigger"][-1].click()

        def new_run():
            runs = call(f"{base}/api/v2/dags/{DAG_ID}/dagRuns", token=token)[1]["dag_runs"]
            return next((r for r in runs if r["dag_run_id"] not in before and (r["conf"] or {}).get("variants") == variants), None)

        return wait_for("the run the form triggered", new_run, timeout=60, every=1)
    finally:
        driver.quit()


def answer_required_action(server: dict, token: str, run_id: str, option: str, comment: str, screenshot: Path) -> None:
    """What a reviewer does: the run's `approve` task -> Required Action -> a comment -> Approve (or
    Reject). Returns once the answer is recorded (read back through the REST API)."""
    from urllib.parse import quote

    from selenium.webdriver.common.by import By

    base = server["base"]
    driver = logged_in_chromium(base, token, "1400,1100")
    try:
        driver.get(f"{base}/dags/{DAG_ID}/runs/{run_id}/tasks/approve/required_actions")
        wait = waiting(driver)
        wait.until(lambda d: d.find_element(By.ID, "element_comment")).send_keys(comment)
        button = wait.until(lambda d: (b := d.find_element(By.CSS_SELECTOR, f'[data-testid="hitl-option-{option}"]'))
                            .is_enabled() and b)
        driver.save_screenshot(str(screenshot))
        button.click()
        url = f"{base}/api/v2/dags/{DAG_ID}/dagRuns/{quote(run_id, safe='')}/taskInstances/approve/-1/hitlDetails"
        wait_for("the answer to be recorded", lambda: call(url, token=token)[1].get("response_received"), timeout=60, every=1)
    finally:
        driver.quit()
