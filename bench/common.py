"""What every benchmark records: the machine, device, libraries, model shape, memory and FLOPs.

Plain Python, no test framework: each benchmark prints its results as JSON (and writes them under
bench/results/) and ends with a one-line summary.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"

# Dense peak TFLOP/s per GPU for MFU (vendor datasheets; bf16/fp16 tensor cores without sparsity,
# fp32 for the float32 policy). Matched against TensorFlow's device name.
GPU_PEAK_TFLOPS = {
    "H200": {"bfloat16": 989.0, "float32": 67.0},
    "H100": {"bfloat16": 989.0, "float32": 67.0},  # SXM; the PCIe card is ~756 / 51
    "A100": {"bfloat16": 312.0, "float32": 19.5},
    "L40S": {"bfloat16": 362.0, "float32": 91.6},
    "L4": {"bfloat16": 121.0, "float32": 30.3},
    "A10": {"bfloat16": 125.0, "float32": 31.2},
    "T4": {"float16": 65.0, "float32": 8.1},
    "V100": {"float16": 125.0, "float32": 15.7},
}


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _mem_total_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 1024 / 1024, 1)
    except OSError:
        pass
    return None


def _git() -> dict:
    def out(*args):
        try:
            return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    return {"commit": out("rev-parse", "HEAD") or None, "dirty": bool(out("status", "--porcelain"))}


def library_versions() -> dict:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for name in ("tensorflow", "keras", "keras-hub", "numpy", "sentencepiece"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = None
    return out


def gpus() -> list[dict]:
    import tensorflow as tf

    out = []
    for gpu in tf.config.list_physical_devices("GPU"):
        d = tf.config.experimental.get_device_details(gpu)
        out.append({"name": d.get("device_name", gpu.name), "compute_capability": d.get("compute_capability")})
    return out


def environment(shared_note: str | None = None) -> dict:
    """Machine, device and library versions, recorded with every figure."""
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:
        affinity = os.cpu_count()
    devices = gpus()
    return {
        "machine": {
            "platform": platform.platform(),
            "arch": platform.machine(),
            "cpu": _cpu_model(),
            "cpu_cores_usable": affinity,
            "memory_gib": _mem_total_gib(),
            "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
            "shared": shared_note,
        },
        "device": ", ".join(g["name"] for g in devices) if devices else f"CPU ({_cpu_model()}, {affinity} cores)",
        "gpus": devices,
        "libraries": library_versions(),
        "git": _git(),
        "env": {k: os.environ[k] for k in ("TF_XLA_FLAGS", "XLA_FLAGS", "TF_ENABLE_ONEDNN_OPTS", "CUDA_VISIBLE_DEVICES")
                if k in os.environ},
        "command": " ".join([Path(sys.executable).name, "-m", *sys.argv]) if sys.argv else None,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def model_shape(backbone) -> dict:
    """The hyper-parameters the FLOP formula needs, read off a keras-hub Gemma backbone."""
    shape = {"class": type(backbone).__name__, "parameters": int(backbone.count_params())}
    for key in ("num_layers", "hidden_dim", "intermediate_dim", "num_query_heads", "num_key_value_heads", "head_dim",
                "vocabulary_size"):
        shape[key] = int(getattr(backbone, key))
    # Width of each half of the gated MLP: Gemma 1/2 split intermediate_dim in two, Gemma 3 does not.
    shape["mlp_dim"] = shape["intermediate_dim"] if "Gemma3" in shape["class"] else shape["intermediate_dim"] // 2
    return shape


def lora_train_flops_per_token(shape: dict, context: float) -> dict:
    """Model FLOPs per trained token of a LoRA fine-tune, and the formula.

    Matrix parameters N = every weight a token passes through as a matmul: the attention and MLP
    kernels plus the (tied) output embedding (vocabulary x hidden); the input lookup is free. With the
    base weights frozen, backward needs gradients with respect to activations (one more 2N) but not
    weights (the LoRA adapters' are negligible), so a token costs ~4N, not the 6N of a full
    fine-tune; attention scores and mixing add 4 x layers x query heads x head_dim x context forward,
    3x that with backward. `context` is the attended length (real tokens for model FLOPs). For
    Gemma-2B this is ~10 GFLOP per token, the figure in the issue.
    """
    d, f, L = shape["hidden_dim"], shape["mlp_dim"], shape["num_layers"]
    h, kv, hd, v = shape["num_query_heads"], shape["num_key_value_heads"], shape["head_dim"], shape["vocabulary_size"]
    per_layer = d * h * hd + 2 * d * kv * hd + h * hd * d + 3 * d * f  # q, k+v, o, gate+up+down
    n_matmul = L * per_layer + v * d
    attention = 4 * L * h * hd * context
    return {
        "matmul_parameters": n_matmul,
        "flops_per_token": 4 * n_matmul + 3 * attention,
        "formula": "4 x N_matmul + 3 x (4 x layers x q_heads x head_dim x context); N_matmul = layers x "
                   "(q,k,v,o + gated MLP) + vocab x hidden (tied output layer); frozen base, LoRA grads ignored",
    }


def peak_tflops(device_name: str, dtype: str) -> float | None:
    for key, peaks in GPU_PEAK_TFLOPS.items():
        if key in device_name:
            return peaks.get(dtype) or peaks.get("bfloat16" if dtype == "float16" else "float16")
    return None


class PeakRss:
    """Peak resident memory of this process while the block runs (psutil sampled every 50 ms, and
    getrusage's lifetime maximum as a cross-check)."""

    def __enter__(self):
        try:
            import psutil

            self._proc = psutil.Process()
        except ImportError:
            self._proc = None
        self.peak = self._rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _rss(self) -> int:
        return self._proc.memory_info().rss if self._proc else 0

    def _run(self):
        while not self._stop.wait(0.05):
            self.peak = max(self.peak, self._rss())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())
        self.result = {
            "peak_rss_gib": round(self.peak / 2**30, 2) if self._proc else None,
            "process_max_rss_gib_so_far": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
        }
        return False


def write_results(name: str, data: dict, out: str | None = None) -> Path:
    path = Path(out) if out else RESULTS / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=False, default=str) + "\n", encoding="utf-8")
    return path


def quiet_tensorflow() -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def dolly_path(arg: str | None) -> str | None:
    """The full Dolly file: --dataset, else $DOLLY_FULL_JSONL; None means the bundled sample."""
    return arg or os.environ.get("DOLLY_FULL_JSONL") or None


def quiet() -> None:
    """Quiet TensorFlow, pipeline logs at WARNING (imports no ML library)."""
    quiet_tensorflow()
    import logging

    from tasks.infra.cli import setup_logging

    setup_logging()
    logging.getLogger("gemma_pipeline").setLevel(logging.WARNING)


def start(shared_note: str | None = None) -> dict:
    """What every benchmark does first: `quiet`, then the environment (which imports TensorFlow)."""
    quiet()
    return environment(shared_note)
