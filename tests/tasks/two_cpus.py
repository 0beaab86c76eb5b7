"""python -m tests.tasks.two_cpus ARGV_JSON: TensorFlow with two logical CPU devices (set before it
initialises, so only in a fresh process), then `python -m tasks.finetune` once per argv in the JSON
list: how the tests give data-parallel training two devices on a machine without GPUs. Imported, it
gives the tests the helpers that start it."""

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def finetune_argv(run_dir, settings: dict) -> list[str]:
    argv = ["--config", "tiny_test", "--run-dir", str(run_dir)]
    for k, v in settings.items():
        argv += ["--set", f"{k}={v}"]
    return argv


def command(argvs: list[list[str]]) -> list[str]:
    return [sys.executable, "-m", "tests.tasks.two_cpus", json.dumps(argvs)]


def run(argvs: list[list[str]], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(command(argvs), cwd=REPO, capture_output=True, text=True, timeout=1200, **kw)


if __name__ == "__main__":
    from tasks.infra.cli import setup_logging

    setup_logging()  # before TensorFlow, whose absl handler would otherwise take the root logger
    import tensorflow as tf

    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    from tasks import finetune

    for argv in json.loads(sys.argv[1]):
        finetune.main(argv)
