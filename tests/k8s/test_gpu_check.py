"""The GPU pod's start-up check, and its wiring into every stage's CLI behind GEMMA_REQUIRE_GPU=1."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import types

import pytest

from tasks.infra.gpu_check import GpuUnavailableError, require_gpu
from tests.k8s.conftest import REPO

pytestmark = pytest.mark.unit


def fake_tensorflow(gpus: list[str]) -> types.ModuleType:
    """Just the TensorFlow calls the check makes, answering as a CUDA build on a node with `gpus`."""
    tf = types.ModuleType("tensorflow")
    tf.__version__ = "2.21.0"
    devices = [types.SimpleNamespace(name=f"/physical_device:GPU:{i}", device_type="GPU") for i in range(len(gpus))]
    tf.sysconfig = types.SimpleNamespace(
        get_build_info=lambda: {"is_cuda_build": True, "cuda_version": "12.5.1", "cudnn_version": "9"}
    )
    tf.config = types.SimpleNamespace(
        list_physical_devices=lambda kind: list(devices) if kind == "GPU" else [],
        experimental=types.SimpleNamespace(
            get_device_details=lambda d: {"device_name": gpus[devices.index(d)], "compute_capability": (9, 0)}
        ),
    )
    return tf


@pytest.fixture
def tensorflow_sees(monkeypatch):
    def install(gpus: list[str]) -> None:
        monkeypatch.setitem(sys.modules, "tensorflow", fake_tensorflow(gpus))

    monkeypatch.delenv("GEMMA_ALLOW_CPU", raising=False)
    return install


def test_gpu_found_is_logged(tensorflow_sees, caplog):
    tensorflow_sees(["NVIDIA H100 80GB HBM3"])
    with caplog.at_level(logging.INFO, logger="gemma_pipeline"):
        assert require_gpu() == ["NVIDIA H100 80GB HBM3"]
    assert "NVIDIA H100 80GB HBM3, compute capability (9, 0)" in caplog.text
    assert "TensorFlow 2.21.0 (CUDA 12.5.1, cuDNN 9) sees 1 GPU(s)" in caplog.text


def test_no_gpu_stops_the_stage_and_says_how_to_allow_cpu(tensorflow_sees):
    tensorflow_sees([])
    with pytest.raises(GpuUnavailableError) as err:
        require_gpu()
    assert "no GPU visible to TensorFlow 2.21.0" in str(err.value)
    assert "[gemma] allow_cpu" in str(err.value) and "GEMMA_ALLOW_CPU=1" in str(err.value)


def test_no_gpu_continues_on_cpu_when_allowed(tensorflow_sees, monkeypatch, caplog):
    tensorflow_sees([])
    monkeypatch.setenv("GEMMA_ALLOW_CPU", "1")
    with caplog.at_level(logging.WARNING, logger="gemma_pipeline"):
        assert require_gpu() == []
    assert "Continuing on the CPU because GEMMA_ALLOW_CPU=1" in caplog.text


def test_stage_cli_runs_the_check_only_when_required(tensorflow_sees, monkeypatch, tmp_path):
    from tasks.infra.cli import stage_main

    tensorflow_sees([])
    calls = []

    def run(cfg, run_dir, force):
        calls.append(run_dir)
        return {"ok": True}

    argv = ["--config", "tiny_test", "--run-dir", str(tmp_path)]
    monkeypatch.delenv("GEMMA_REQUIRE_GPU", raising=False)
    assert stage_main("finetune", None, run, argv) == {"ok": True}
    monkeypatch.setenv("GEMMA_REQUIRE_GPU", "1")
    with pytest.raises(GpuUnavailableError):
        stage_main("finetune", None, run, argv)
    assert len(calls) == 1  # the stage did not start without its GPU


def test_with_the_real_tensorflow():
    """The TensorFlow calls exist as used; on a machine without a GPU it stops unless allowed."""
    code = "from tasks.infra.cli import setup_logging; from tasks.infra.gpu_check import require_gpu; setup_logging(); require_gpu()"
    env = {**os.environ, "GEMMA_ALLOW_CPU": "0", "TF_CPP_MIN_LOG_LEVEL": "3", "CUDA_VISIBLE_DEVICES": ""}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert "gpu check: TensorFlow 2.21" in out.stderr, out.stderr[-2000:]
    assert out.returncode != 0 and "GpuUnavailableError: no GPU visible to TensorFlow" in out.stderr
