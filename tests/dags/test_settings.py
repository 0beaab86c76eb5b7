"""One reader of the `[gemma]` settings (tasks.infra.settings), one precedence: Airflow's config, then
GEMMA_<KEY>, then the default; an empty value is unset. The DAG's, the pods' and tracking's values
come from it, so a worker and a pod never read two different values of one setting."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tasks.infra import settings, tracking
from tasks.infra.pod_settings import pod_settings

pytestmark = pytest.mark.unit

TASKS = Path(__file__).resolve().parents[2] / "tasks"
AIRFLOW, ENV = "AIRFLOW__GEMMA__MLFLOW_TRACKING_URI", "GEMMA_MLFLOW_TRACKING_URI"


@pytest.mark.parametrize("airflow, env, expected", [
    ("http://from-airflow:5000", "http://from-env:5000", "http://from-airflow:5000"),
    (None, "http://from-env:5000", "http://from-env:5000"),
    ("", "http://from-env:5000", "http://from-env:5000"),  # empty is unset: falls through
    ("  ", None, ""),  # blank too, down to the default
    (None, None, ""),
])
def test_every_reader_agrees(monkeypatch, tmp_path, airflow, env, expected):
    for name, value in ((AIRFLOW, airflow), (ENV, env)):
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)
    monkeypatch.setenv("GEMMA_RUN_ROOT", str(tmp_path))
    run_dir = tmp_path / "runs" / "r"
    assert settings.setting("mlflow_tracking_uri") == expected
    assert pod_settings().mlflow_tracking_uri == expected
    assert tracking.tracking_uri(run_dir) == (expected or f"sqlite:///{tmp_path / 'mlflow.db'}")
    where = settings.read("mlflow_tracking_uri")[1]
    assert where == ("[gemma] mlflow_tracking_uri" if airflow and airflow.strip() else ENV if env else "default of [gemma] mlflow_tracking_uri")


def test_the_run_root_the_dag_and_the_pods_mount_is_one_value(monkeypatch, tmp_path):
    monkeypatch.setenv("AIRFLOW__GEMMA__RUN_ROOT", str(tmp_path / "from-airflow"))
    monkeypatch.setenv("GEMMA_RUN_ROOT", str(tmp_path / "from-env"))
    assert settings.run_root() == tmp_path / "from-airflow"
    assert pod_settings().run_root == str(tmp_path / "from-airflow")


def test_no_other_module_reads_the_gemma_section_or_its_env():
    """The old readers (the DAG's, the pods', tracking's, each with its own precedence) are gone."""
    readers = []
    for path in sorted(TASKS.rglob("*.py")):
        text = path.read_text(encoding="utf-8")
        if re.search(r"conf\.get\(\s*\"gemma\"|environ(\.get\(|\[)\s*(f\"GEMMA_\{|\"GEMMA_(RUN_ROOT|MLFLOW|RETR|SCHEDULE|RUNNER|CONFIG))", text):
            readers.append(str(path.relative_to(TASKS)))
    assert readers == ["infra/settings.py"]


@pytest.mark.parametrize("key, value, message", [
    ("retries", "11", "[gemma] retries / GEMMA_RETRIES must be a whole number from 0 to 10, not '11'"),
    ("retry_delay_s", "0", "[gemma] retry_delay_s / GEMMA_RETRY_DELAY_S must be a whole number from 1 to 3,600, not '0'"),
    ("approval_timeout_h", "a week", "[gemma] approval_timeout_h / GEMMA_APPROVAL_TIMEOUT_H must be a whole number from 1 to 8,760"),
    ("max_source_rows", "-5", "[gemma] max_source_rows / GEMMA_MAX_SOURCE_ROWS must be a whole number of at least 1, not '-5'"),
])
def test_a_whole_number_setting_out_of_range_is_named_with_its_bounds(monkeypatch, key, value, message):
    monkeypatch.setenv(f"GEMMA_{key.upper()}", value)
    with pytest.raises(ValueError) as e:
        {"retries": settings.retries, "retry_delay_s": settings.retries, "approval_timeout_h": settings.approval_timeout_h,
         "max_source_rows": settings.source_limits}[key]()
    assert str(e.value).startswith(message)


def test_a_whole_number_setting_may_group_its_digits(monkeypatch):
    monkeypatch.setenv("GEMMA_MAX_SOURCE_ROWS", "1_000_000")
    assert settings.source_limits().max_rows == 1_000_000
