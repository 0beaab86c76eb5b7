"""Where and how training runs on this machine: the devices (GPUs, or logical CPU devices for data
parallel), the engine `train_mode` gets on them (XLA or a TensorFlow graph, the dtype policy, the
most batch widths), the tf.distribute strategy, and what the result records about the device.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Iterator

from tasks.pipeline.config import Config

log = logging.getLogger("gemma_pipeline")


def describe_device() -> dict:
    import os
    import platform

    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    names = [tf.config.experimental.get_device_details(g).get("device_name", g.name) for g in gpus]
    return {"gpus": names, "cpu_count": os.cpu_count(), "machine": platform.machine(), "tensorflow": tf.__version__}


def gpus_with_bfloat16() -> list[str]:
    """GPUs with native bfloat16 (compute capability 8.0 or newer: A100, L4, H100, ...)."""
    import tensorflow as tf

    out = []
    for gpu in tf.config.list_physical_devices("GPU"):
        details = tf.config.experimental.get_device_details(gpu)
        if tuple(details.get("compute_capability") or (0, 0)) >= (8, 0):
            out.append(details.get("device_name", gpu.name))
    return out


def cpu_has_bfloat16() -> bool:
    """AMX-BF16 on this CPU: oneDNN then runs bfloat16 matmuls ~2.5x faster than float32 (measured
    on the 2-core Xeon of the CPU benchmark); without it bfloat16 only emulates."""
    try:
        return "amx_bf16" in Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False


def has_gpu() -> bool:
    import tensorflow as tf

    return bool(tf.config.list_physical_devices("GPU"))


def engine_for(cfg: Config) -> dict:
    """How training runs on this device: XLA or not, the dtype policy and the most batch widths.

    tutorial: XLA as `jit_compile` says, one width. fast: on a GPU, and on a CPU with `cpu_engine:
    xla`, XLA (each batch width is one compilation, so at most `bucket_shapes` widths); on a CPU
    with `cpu_engine: graph` a plain TensorFlow graph, which Keras traces once for batches of any
    width (the dataset's width is None), so every batch takes the next multiple of
    `bucket_multiple` (max_widths 0 = no limit). Mixed bfloat16: see the config key
    mixed_precision. Data parallel (`replica_devices`) runs as graphs. A resumed run resumes only a
    checkpoint made with the same engine (the number of devices aside).
    """
    if cfg.train_mode == "fast":
        gpu = has_gpu()
        xla = gpu or cfg.cpu_engine == "xla"
        native_bf16 = bool(gpus_with_bfloat16()) if gpu else cpu_has_bfloat16()
        max_widths = cfg.bucket_shapes if xla else 0
    else:
        xla, native_bf16, max_widths = cfg.jit_compile, False, 1
    if cfg.mixed_precision == "bfloat16" or (cfg.mixed_precision == "auto" and native_bf16):
        policy = "mixed_bfloat16"
    else:
        policy = "float32"
    devices = replica_devices(cfg)
    if devices:
        # Data parallel runs as TensorFlow graphs (any batch width): XLA-compiled steps under
        # MirroredStrategy failed here, reading a variable of one replica from another's device.
        xla, max_widths = False, 0 if cfg.train_mode == "fast" else 1
    return {"jit_compile": xla, "dtype_policy": policy, "max_widths": max_widths, "devices": devices}


def replica_devices(cfg: Config) -> list[str]:
    """The devices training is split over (data parallel, tf.distribute.MirroredStrategy), or [] for
    one device. `data_parallel: auto` takes every GPU when there are two or more, else every logical
    CPU device when TensorFlow was configured with several (tests do that); `off` takes one. The
    global batch stays `batch_size`, so the replicas must divide it: when they do not, as many as
    do are used, and the log says so (the seed's batch_size 1 trains on one GPU)."""
    import tensorflow as tf

    if cfg.data_parallel == "off":
        return []
    devices = [d.name for d in tf.config.list_logical_devices("GPU")] or [d.name for d in tf.config.list_logical_devices("CPU")]
    if len(devices) < 2:
        return []
    n = max(k for k in range(1, len(devices) + 1) if cfg.batch_size % k == 0)
    if n < len(devices):
        log.warning("finetune: data_parallel: batch_size %d is not a multiple of the %d devices; training on %d of them "
                    "(make batch_size a multiple of %d to use all)", cfg.batch_size, len(devices), n, len(devices))
    return devices[:n] if n > 1 else []


def strategy(engine: dict):
    """The tf.distribute strategy for the engine's devices: MirroredStrategy over them (build the model,
    LoRA and the optimizer inside its scope), or the default one-device strategy."""
    import tensorflow as tf

    return tf.distribute.MirroredStrategy(engine["devices"]) if engine.get("devices") else tf.distribute.get_strategy()


@contextlib.contextmanager
def dtype_policy(name: str) -> Iterator[None]:
    """Keras's global dtype policy set to `name` for the block (models built inside take it)."""
    import keras

    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(name)
    try:
        yield
    finally:
        keras.config.set_dtype_policy(previous)
