"""A planted credential never reaches a log, an XCom-sized result, an artifact or the report.

Each stage runs through its command (`tasks.<stage>.main`, the argv a task or a pod gets) in this
process, with the credentials in its environment; what it logs and prints is captured at the file
descriptors and from the log records, so a value in either is found."""

import importlib
import json

import pytest

pytestmark = pytest.mark.model

SECRET_USER = "planted-user-7f3a9c"
SECRET_KEY = "planted-key-c0ffee1234567890"
STAGES = ["snapshot", "preprocess", "finetune", "generate", "report", "promote"]


def test_planted_kaggle_secret_appears_nowhere(tmp_path, monkeypatch, capfd, caplog):
    monkeypatch.setenv("KAGGLE_USERNAME", SECRET_USER)
    monkeypatch.setenv("KAGGLE_KEY", SECRET_KEY)
    run_dir = tmp_path / "runs" / "secret"
    outputs = []
    for stage in STAGES:
        caplog.clear()
        with caplog.at_level("DEBUG"):
            result = importlib.import_module(f"tasks.{stage}").main(
                ["--config", "tiny_test", "--run-dir", str(run_dir), "--set", "num_examples=16",
                 "--set", "heldout_generate_examples=4"])
        out, err = capfd.readouterr()
        outputs.append(out + err + caplog.text + json.dumps(result))  # the result is the stage's XCom
    assert all(text.strip() for text in outputs)  # each stage said something, so the check sees it
    files = [p for p in run_dir.rglob("*") if p.is_file()]
    assert any(p.name == "report.html" for p in files)
    for secret in (SECRET_USER, SECRET_KEY):
        assert all(secret not in text for text in outputs)
        for p in files:
            assert secret.encode() not in p.read_bytes(), p
