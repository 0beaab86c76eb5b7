"""Faults a real run meets: a fine-tune killed mid-run (a preempted pod), retried."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from tasks import artifacts, preprocess, snapshot
from tasks.config import load_config

SETTINGS = {"num_examples": "64", "heldout_examples": "8", "eval_examples": "8", "batch_size": "2",
            "epochs": "2", "checkpoint_every_steps": "4", "sequence_length": "32", "log_every_steps": "4"}
TOTAL_STEPS = 64  # 64 examples / batch 2 x 2 epochs


def argv(run_dir):
    out = [sys.executable, "-m", "tasks.finetune", "--config", "tiny_test", "--run-dir", str(run_dir)]
    for k, v in SETTINGS.items():
        out += ["--set", f"{k}={v}"]
    return out


def prepare(run_dir):
    cfg = load_config("tiny_test", SETTINGS)
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


@pytest.mark.parametrize("damage", [None, "truncate the newest checkpoint"])
def test_killed_finetune_resumes_from_its_checkpoint(tmp_path, damage):
    """A kill (a preempted pod) then a retry: it resumes from the newest checkpoint, or, when that one
    was damaged after it was written, from the one before it; either way it ends where an
    uninterrupted run does."""
    killed, clean = tmp_path / "runs" / "killed", tmp_path / "runs" / "clean"
    prepare(killed)
    prepare(clean)
    latest = artifacts.checkpoint_dir(killed) / "latest.json"

    proc = subprocess.Popen(argv(killed), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    killed_at = kill_after_checkpoint(proc, killed)
    assert 12 <= killed_at < TOTAL_STEPS
    # Nothing half-written is visible: no finetune/ folder, only a temp folder of the dead attempt.
    assert not (killed / "finetune").exists()
    assert (killed / "preprocess" / "_SUCCESS").is_file()

    resume_at = killed_at
    if damage:
        newest = artifacts.checkpoint_dir(killed) / json.loads(latest.read_text())["dir"]
        adapter_file = newest / artifacts.ADAPTER
        adapter_file.write_bytes(adapter_file.read_bytes()[: adapter_file.stat().st_size // 2])
        resume_at = killed_at - int(SETTINGS["checkpoint_every_steps"])

    retry = subprocess.run(argv(killed), capture_output=True, text=True, timeout=600)
    assert retry.returncode == 0, retry.stderr[-3000:]
    assert f"RESUMING from the checkpoint at step {resume_at}/{TOTAL_STEPS}" in retry.stderr
    assert "Traceback" not in retry.stderr
    if damage:
        assert f"checkpoint {newest} is unusable" in retry.stderr and "bytes" in retry.stderr
        assert f"resuming from the previous checkpoint, step-{resume_at:07d}" in retry.stderr
        killed_at = resume_at
    result = artifacts.read_finetune_result(killed)
    history = artifacts.read_history(killed)
    assert result["steps"] == TOTAL_STEPS and result["resumed_from_step"] == killed_at
    assert [h["step"] for h in history] == list(range(1, TOTAL_STEPS + 1))  # one continuous curve
    assert not list(killed.glob(".finetune.tmp-*")) and not (artifacts.checkpoint_dir(killed)).exists()

    # The resumed run ends where an uninterrupted one does.
    subprocess.run(argv(clean), capture_output=True, check=True, timeout=600)
    a = lora_weights(artifacts.adapter_path(killed))
    b = lora_weights(artifacts.adapter_path(clean))
    assert a.keys() == b.keys() and a
    for name in a:
        np.testing.assert_allclose(a[name], b[name], atol=1e-5, err_msg=name)
    clean_history = artifacts.read_history(clean)
    np.testing.assert_allclose([h["loss"] for h in history], [h["loss"] for h in clean_history], atol=1e-3)


def test_checkpoints_of_other_inputs_or_unreadable_are_not_resumed(tmp_path):
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
    out = subprocess.run(argv(run_dir), capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "ignoring checkpoint" in out.stderr and "RESUMING" not in out.stderr and "Traceback" not in out.stderr
    assert "step-0000008 is unusable, removing it: state.json cannot be read" in out.stderr
    assert "no usable checkpoint left (step-0000008 unusable): starting over from step 0" in out.stderr
    result = artifacts.read_finetune_result(run_dir)
    assert result["resumed_from_step"] is None and result["checkpoints_skipped"] == ["step-0000008"]
    assert result["steps"] == TOTAL_STEPS
