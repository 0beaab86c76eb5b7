"""python -m tests.tasks.two_cpus ARGV_JSON: TensorFlow with two logical CPU devices (set before it
initialises, so only in a fresh process), then `python -m tasks.finetune` once per argv in the JSON
list: how the tests give data-parallel training two devices on a machine without GPUs."""

import json
import sys

if __name__ == "__main__":
    from tasks.cli import setup_logging

    setup_logging()  # before TensorFlow, whose absl handler would otherwise take the root logger
    import tensorflow as tf

    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    from tasks import finetune

    for argv in json.loads(sys.argv[1]):
        finetune.main(argv)
