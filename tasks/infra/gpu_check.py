"""Start-up check of a GPU pod: log what TensorFlow sees, and stop clearly when it sees no GPU.

`tasks.infra.cli.stage_main` calls `require_gpu()` when GEMMA_REQUIRE_GPU=1, which the kubernetes runner
sets in the `finetune` and `generate` pods. Without the check, a pod whose GPU is missing (no device
plugin, a CPU-only image, a driver mismatch) would silently train for hours on the CPU.
GEMMA_ALLOW_CPU=1 (`[gemma] allow_cpu`) lets the stage go on without a GPU.
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger("gemma_pipeline")


class GpuUnavailableError(RuntimeError):
    """The pod was meant to run on a GPU and TensorFlow sees none."""


def require_gpu() -> list[str]:
    """Names of the GPUs TensorFlow sees; raises GpuUnavailableError when none, unless GEMMA_ALLOW_CPU=1."""
    import tensorflow as tf

    build = dict(tf.sysconfig.get_build_info())
    cuda = (
        f"CUDA {build.get('cuda_version', '?')}, cuDNN {build.get('cudnn_version', '?')}"
        if build.get("is_cuda_build")
        else "not a CUDA build"
    )
    gpus = tf.config.list_physical_devices("GPU")
    names = []
    for gpu in gpus:
        details = tf.config.experimental.get_device_details(gpu) or {}
        names.append(str(details.get("device_name", gpu.name)))
        log.info("gpu check: %s = %s, compute capability %s", gpu.name, names[-1], details.get("compute_capability", "?"))
    log.info("gpu check: TensorFlow %s (%s) sees %d GPU(s)", tf.__version__, cuda, len(gpus))
    if gpus:
        return names

    visible = {k: os.environ[k] for k in ("CUDA_VISIBLE_DEVICES", "NVIDIA_VISIBLE_DEVICES") if k in os.environ}
    problem = (
        f"no GPU visible to TensorFlow {tf.__version__} ({cuda}; {visible or 'no *_VISIBLE_DEVICES set'}). "
        "Check that the pod got its GPU (the node's NVIDIA driver and device plugin, [gemma] gpu_count) "
        "and that the image is the CUDA build from docker/Dockerfile."
    )
    if os.environ.get("GEMMA_ALLOW_CPU") == "1":
        log.warning("gpu check: %s Continuing on the CPU because GEMMA_ALLOW_CPU=1 ([gemma] allow_cpu); this is slow.", problem)
        return []
    raise GpuUnavailableError(f"{problem} To run on the CPU anyway set [gemma] allow_cpu = true (GEMMA_ALLOW_CPU=1 in the pod).")
