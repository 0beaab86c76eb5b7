"""`[gemma]` pod settings: defaults, where values come from, and errors that name the setting."""

from __future__ import annotations

import datetime as dt
import re

import pytest

from tasks.infra.pod_operator import gpu_stage_operator
from tasks.infra.pod_settings import SETTINGS, PodSettingError, pod_settings
from tests.k8s.conftest import REPO

pytestmark = pytest.mark.unit


@pytest.fixture(autouse=True)
def clean_settings(monkeypatch):
    """Every setting at its default, whatever the developer's shell exports."""
    import os

    for key in SETTINGS:
        monkeypatch.delenv(f"GEMMA_{key.upper()}", raising=False)
        monkeypatch.delenv(f"AIRFLOW__GEMMA__{key.upper()}", raising=False)
    assert os.environ["GEMMA_RUN_ROOT"].startswith("/")


def operator(task_id: str = "finetune"):
    return gpu_stage_operator(task_id, ["--config", "gemma_2b_lora"], dt.timedelta(hours=12))


def test_defaults():
    s = pod_settings()
    assert s.image == "gemma-lora-pipeline:0.1.0" and s.namespace == "gemma"
    assert s.requests == {"cpu": "4", "memory": "32Gi"}
    assert s.limits == {"cpu": "8", "memory": "32Gi", "nvidia.com/gpu": "1", "ephemeral-storage": "20Gi"}
    assert s.tolerations == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    assert s.node_selector == {} and s.pvc == "gemma-runs" and s.kaggle_secret == "kaggle-credentials"
    assert (s.startup_timeout, s.on_finish_action, s.allow_cpu) == (900, "delete_pod", False)
    assert s.timeouts == {}


def test_environment_and_airflow_config(monkeypatch):
    monkeypatch.setenv("GEMMA_IMAGE", "from-env:1")
    monkeypatch.setenv("GEMMA_GPU_COUNT", "2")
    monkeypatch.setenv("GEMMA_NODE_SELECTOR", '{"cloud.google.com/gke-accelerator": "nvidia-l4"}')
    monkeypatch.setenv("GEMMA_TOLERATIONS", "[]")
    assert pod_settings().image == "from-env:1"
    # Airflow's config ([gemma] image, here as AIRFLOW__GEMMA__IMAGE) comes before GEMMA_IMAGE.
    monkeypatch.setenv("AIRFLOW__GEMMA__IMAGE", "registry.example.com/gemma-lora:0.1.0")
    op = operator()
    assert op.image == "registry.example.com/gemma-lora:0.1.0"
    assert op.container_resources.limits["nvidia.com/gpu"] == "2"
    assert op.node_selector == {"cloud.google.com/gke-accelerator": "nvidia-l4"} and op.tolerations == []


def test_none_turns_optional_items_off_and_an_empty_value_is_unset(monkeypatch):
    monkeypatch.setenv("GEMMA_CPU_LIMIT", "none")
    monkeypatch.setenv("GEMMA_KAGGLE_SECRET", "None")
    monkeypatch.setenv("GEMMA_MEMORY_LIMIT", "")  # unset: the default
    assert pod_settings().limits["memory"] == "32Gi"
    op = operator()
    assert "cpu" not in op.container_resources.limits and op.container_resources.requests["cpu"] == "4"
    assert op.secrets == []


def test_cpu_only_pod_when_allowed(monkeypatch):
    monkeypatch.setenv("GEMMA_GPU_COUNT", "0")
    monkeypatch.setenv("GEMMA_ALLOW_CPU", "true")
    op = operator("generate")
    assert not any("gpu" in k for k in op.container_resources.limits)
    assert {e.name: e.value for e in op.env_vars}["GEMMA_ALLOW_CPU"] == "1"


def test_stage_timeouts_and_deadline(monkeypatch):
    monkeypatch.setenv("GEMMA_FINETUNE_TIMEOUT", "90")
    op = operator("finetune")
    assert op.execution_timeout == dt.timedelta(minutes=90)
    assert op.active_deadline_seconds == 90 * 60 + 900
    assert operator("generate").execution_timeout == dt.timedelta(hours=12)  # the DAG's value, passed in


@pytest.mark.parametrize(
    "key, value",
    [
        ("gpu_count", "two"), ("gpu_count", "0"), ("gpu_count", "-1"), ("gpu_resource", "gpu"),
        ("memory_request", "lots"), ("memory_limit", "1Gi"), ("cpu_limit", "1"), ("cpu_request", "0"),
        ("node_selector", "[1]"), ("node_selector", "{not json"), ("node_selector", '{"pool": 3}'),
        ("tolerations", '[{"key": "a", "operator": "Sometimes"}]'), ("tolerations", '[{"colour": "red"}]'),
        ("on_finish_action", "delete_everything"), ("image_pull_policy", "Sometimes"), ("image", "my image"),
        ("namespace", "Gemma_NS"), ("pvc", "Bad_Claim"), ("kaggle_secret", "not a name"),
        ("startup_timeout", "-1"), ("allow_cpu", "maybe"), ("finetune_timeout", "0"),
        ("run_as_user", "0"),
    ],
)
def test_invalid_setting_is_named(monkeypatch, key, value):
    monkeypatch.setenv(f"GEMMA_{key.upper()}", value)
    with pytest.raises(PodSettingError) as err:
        pod_settings()
    message = str(err.value)
    assert f"pod setting {key} (GEMMA_{key.upper()})" in message and repr(value) in message


def test_run_root_must_be_absolute(monkeypatch):
    monkeypatch.setenv("GEMMA_RUN_ROOT", "relative/runs")
    with pytest.raises(PodSettingError, match="run_root"):
        pod_settings()


def test_the_production_page_documents_every_setting_with_its_default():
    section = (REPO / "docs" / "production.md").read_text(encoding="utf-8")
    for key, (default, _) in SETTINGS.items():
        row = re.search(rf"^\s*\| `{key}` \| ([^|]*) \|", section, re.M)
        assert row, f"docs/production.md's settings table lacks {key}"
        shown = row.group(1).strip().strip("`")
        assert shown == (default or "(empty)"), (key, shown, default)
