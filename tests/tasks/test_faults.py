"""Faults a real run meets: a fine-tune SIGKILLed mid-run (a preempted pod, an OOM kill), retried.

One run is killed for real (SIGKILL, no cleanup) while it trains data-parallel on two logical CPU
devices, in its own process (`tests.tasks.two_cpus`). Each way of retrying it works on its own copy
of that killed run: on two devices again (a fresh two-device process), on one device, and after its
newest checkpoint was damaged (both through the stage's command in this process, which has one
device). Every retry must end where one uninterrupted one-device run, trained once, ends. The
in-process preemption test in test_train_modes covers each train mode and engine;
test_scheduler_faults kills under the scheduler.
"""

import json
import os
import shutil
import signal
import subprocess
import time

import numpy as np
import pytest

from tasks import finetune, preprocess, snapshot
from tasks.pipeline import artifacts
from tasks.pipeline.config import load_config
from tests.tasks import two_cpus

pytestmark = pytest.mark.e2e

# The settings of the single-process tests (and test_train_modes' in-process preemption). No held-out
# scoring: these tests compare training runs (steps, losses, weights), not their scores.
SETTINGS = {"num_examples": "64", "heldout_examples": "8", "eval_examples": "0", "batch_size": "2",
            "epochs": "2", "checkpoint_every_steps": "4", "sequence_length": "32", "log_every_steps": "4"}
TOTAL_STEPS = 64  # 64 examples / batch 2 x 2 epochs
# The killed run: the same plan, in fast mode on tiny Gemma 3 (the mode whose step plan must not depend
# on the number of devices it resumes on).
KILL_SETTINGS = {**SETTINGS, "model_preset": "tiny:gemma3", "train_mode": "fast",
                 "loss_tokens": "response"}


def finetune_here(run_dir, settings, caplog) -> str:
    """`python -m tasks.finetune` with these settings, run in this process (one device); what it
    logged."""
    caplog.clear()
    with caplog.at_level("INFO", logger="gemma_pipeline"):
        finetune.main(two_cpus.finetune_argv(run_dir, settings))
    return caplog.text


def prepare(run_dir, settings=SETTINGS):
    cfg = load_config("tiny_test", settings)
    snapshot.run(cfg, run_dir)
    preprocess.run(cfg, run_dir)


def lora_weights(path):
    import h5py

    out = {}
    with h5py.File(path, "r") as f:
        f.visititems(lambda name, obj: out.__setitem__(name, np.array(obj)) if hasattr(obj, "shape") else None)
    return out


def kill_after_checkpoint(proc: subprocess.Popen, run_dir, step: int = 12, timeout: float = 300) -> int:
    """SIGKILL the fine-tune `proc` (no cleanup: what a preempted node does) once `run_dir`'s newest
    checkpoint is at `step` or later; the step of the checkpoint it left."""
    latest = artifacts.checkpoint_dir(run_dir) / "latest.json"
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if latest.is_file() and json.loads(latest.read_text())["step"] >= step:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the fine-tune finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    return json.loads(latest.read_text())["step"]


@pytest.fixture(scope="module")
def killed(tmp_path_factory):
    """(run folder, step of its newest checkpoint): SIGKILLed on two devices after step 12."""
    run_dir = tmp_path_factory.mktemp("killed") / "run"
    prepare(run_dir, KILL_SETTINGS)
    proc = subprocess.Popen(two_cpus.command([two_cpus.finetune_argv(run_dir, {**KILL_SETTINGS, "data_parallel": "auto"})]),
                            cwd=two_cpus.REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return run_dir, kill_after_checkpoint(proc, run_dir, timeout=600)


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    """The same fine-tune, uninterrupted, on one device."""
    run_dir = tmp_path_factory.mktemp("clean") / "run"
    prepare(run_dir, KILL_SETTINGS)
    finetune.main(two_cpus.finetune_argv(run_dir, {**KILL_SETTINGS, "data_parallel": "off"}))
    return run_dir


def test_a_killed_fine_tune_leaves_only_its_checkpoints(killed):
    run_dir, killed_at = killed
    assert 12 <= killed_at < TOTAL_STEPS
    # Nothing half-written is visible: no finetune/ folder, only a temp folder of the dead attempt.
    assert not (run_dir / "finetune").exists()
    assert (run_dir / "preprocess" / "_SUCCESS").is_file()
    assert (artifacts.checkpoint_dir(run_dir) / "latest.json").is_file()


@pytest.mark.parametrize("resume_on, damage", [("auto", None), ("off", None), ("off", "truncate the newest checkpoint")],
                         ids=["resumed on two devices", "resumed on one device", "newest checkpoint damaged"])
def test_a_killed_fine_tune_resumes_to_the_uninterrupted_result(killed, clean, tmp_path, caplog, capfd, resume_on, damage):
    """The retry resumes from the newest checkpoint (on two devices again or on one: the step plan does
    not depend on the number of devices), or, when that one was damaged after it was written, from the
    one before it; either way it ends where an uninterrupted run does."""
    run_dir = tmp_path / "run"
    shutil.copytree(killed[0], run_dir, symlinks=True)
    killed_at = resume_at = killed[1]
    if damage:
        latest = artifacts.checkpoint_dir(run_dir) / "latest.json"
        newest = artifacts.checkpoint_dir(run_dir) / json.loads(latest.read_text())["dir"]
        adapter_file = newest / artifacts.ADAPTER
        adapter_file.write_bytes(adapter_file.read_bytes()[: adapter_file.stat().st_size // 2])
        resume_at = killed_at - int(KILL_SETTINGS["checkpoint_every_steps"])

    settings = {**KILL_SETTINGS, "data_parallel": resume_on}
    if resume_on == "auto":  # two devices: a fresh process
        retry = two_cpus.run([two_cpus.finetune_argv(run_dir, settings)])
        assert retry.returncode == 0, retry.stderr[-3000:]
        logged = retry.stderr
    else:
        logged = finetune_here(run_dir, settings, caplog) + "".join(capfd.readouterr())
    assert f"RESUMING from the checkpoint at step {resume_at}/{TOTAL_STEPS}" in logged
    assert "Traceback" not in logged
    if damage:
        assert f"checkpoint {newest} is unusable" in logged and "bytes" in logged
        assert f"resuming from the previous checkpoint, step-{resume_at:07d}" in logged
    result = artifacts.read_finetune_result(run_dir)
    history = artifacts.read_history(run_dir)
    assert result["steps"] == TOTAL_STEPS and result["resumed_from_step"] == resume_at
    assert result["training"]["replicas"] == (2 if resume_on == "auto" else 1)
    assert [h["step"] for h in history] == list(range(1, TOTAL_STEPS + 1))  # one continuous curve
    assert not list(run_dir.glob(".finetune.tmp-*")) and not (artifacts.checkpoint_dir(run_dir)).exists()

    a, b = lora_weights(artifacts.adapter_path(run_dir)), lora_weights(artifacts.adapter_path(clean))
    assert a.keys() == b.keys() and a
    for name in a:
        if a[name].dtype.kind == "f":
            np.testing.assert_allclose(a[name], b[name], atol=1e-5, err_msg=name)
    np.testing.assert_allclose([h["loss"] for h in history], [h["loss"] for h in artifacts.read_history(clean)], atol=1e-3)


def test_checkpoints_of_other_inputs_or_unreadable_are_not_resumed(tmp_path, caplog, capfd):
    """Another run's checkpoint is ignored; one whose state cannot be read is removed; with none left
    the run starts over, says so, and never shows a traceback."""
    run_dir = tmp_path / "runs" / "r"
    prepare(run_dir)
    ckpt = artifacts.checkpoint_dir(run_dir)
    (ckpt / "step-0000004").mkdir(parents=True)
    (ckpt / "step-0000004" / "state.json").write_text(json.dumps({"step": 4, "fingerprint": "other-inputs"}))
    (ckpt / "step-0000008").mkdir()
    (ckpt / "step-0000008" / "state.json").write_text('{"step": 8, "fingerp')  # truncated
    (ckpt / "latest.json").write_text(json.dumps({"dir": "step-0000008", "step": 8, "fingerprint": "x"}))
    logged = finetune_here(run_dir, SETTINGS, caplog) + "".join(capfd.readouterr())
    assert "ignoring checkpoint" in logged and "RESUMING" not in logged and "Traceback" not in logged
    assert "step-0000008 is unusable, removing it: state.json cannot be read" in logged
    assert "no usable checkpoint left (step-0000008 unusable): starting over from step 0" in logged
    result = artifacts.read_finetune_result(run_dir)
    assert result["resumed_from_step"] is None and result["checkpoints_skipped"] == ["step-0000008"]
    assert result["steps"] == TOTAL_STEPS
