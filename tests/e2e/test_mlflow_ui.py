"""A person's view of the tracking store: the MLflow UI (what `make mlflow` starts) on a store the
pipeline logged to, opened in headless Chromium: the run, its loss curve, the registered champion."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tasks.infra import tracking
from tasks.pipeline.config import load_config
from tests.e2e.airflow_api import free_port
from tests.e2e.browser import chromium, require_chromium, waiting

pytestmark = pytest.mark.e2e

MLFLOW = str(Path(sys.executable).parent / "mlflow")


@pytest.fixture(scope="module")
def mlflow_ui(tiny_run, tmp_path_factory):
    require_chromium()
    root = tmp_path_factory.mktemp("mlflow-ui")
    run = root / "runs" / "weekly-run"
    shutil.copytree(tiny_run, run, ignore=shutil.ignore_patterns(tracking.STATE_DIR))
    env_uri = os.environ.pop("GEMMA_MLFLOW_TRACKING_URI", None)
    try:
        tracking.log_finetune(str(run), "fp", load_config("tiny_test").to_dict())
        tracking.log_report(str(run), "fp")
        tracking.register_champion(str(run), str(run), "fp", None)
    finally:
        if env_uri is not None:
            os.environ["GEMMA_MLFLOW_TRACKING_URI"] = env_uri
    port = free_port()
    # The command `make mlflow` runs, on this store.
    server = subprocess.Popen([MLFLOW, "ui", "--host", "127.0.0.1", "--port", str(port), "--backend-store-uri",
                               tracking.tracking_uri(run)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while True:
        try:
            urllib.request.urlopen(f"{base}/health", timeout=2)
            break
        except OSError:
            if time.time() > deadline or server.poll() is not None:
                server.kill()
                pytest.fail("the MLflow UI did not come up")
            time.sleep(1)
    yield base, run, tracking.status(run)
    server.terminate()
    server.wait(timeout=30)


def test_mlflow_ui_shows_the_run_its_loss_curve_and_the_champion(mlflow_ui):
    from selenium.webdriver.common.by import By
    import mlflow

    base, run, status = mlflow_ui
    client = mlflow.MlflowClient(tracking.tracking_uri(run))
    exp = client.get_experiment_by_name(tracking.EXPERIMENT)
    driver = chromium("1400,1000")
    try:
        wait = waiting(driver, 90)
        driver.get(f"{base}/#/experiments/{exp.experiment_id}/runs/{status['run_id']}/model-metrics")
        box = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "input[placeholder*='metric']"))
        box.send_keys("loss")
        # The chart of the per-step training loss: its title, its x axis and a plotted line.
        wait.until(lambda d: "Step" in d.find_element(By.TAG_NAME, "body").text)
        text = driver.find_element(By.TAG_NAME, "body").text
        assert "weekly-run" in text and "\nloss\n" in f"\n{text}\n"
        assert driver.find_elements(By.CSS_SELECTOR, "svg path.js-line, svg .scatterlayer path, svg path")
        if os.environ.get("GEMMA_SCREENSHOTS"):
            driver.save_screenshot(os.path.join(os.environ["GEMMA_SCREENSHOTS"], "mlflow-run.png"))
        driver.get(f"{base}/#/models/{tracking.REGISTERED_MODEL}")
        wait.until(lambda d: "champion" in d.find_element(By.TAG_NAME, "body").text)
        assert "Version 1" in driver.find_element(By.TAG_NAME, "body").text
    finally:
        driver.quit()
