"""A planted credential never reaches a log, an XCom-sized result, an artifact or the report."""

import os
import subprocess
import sys

SECRET_USER = "planted-user-7f3a9c"
SECRET_KEY = "planted-key-c0ffee1234567890"
STAGES = ["snapshot", "preprocess", "finetune", "generate", "report", "promote"]


def test_planted_kaggle_secret_appears_nowhere(tmp_path):
    env = dict(os.environ, KAGGLE_USERNAME=SECRET_USER, KAGGLE_KEY=SECRET_KEY)
    run_dir = tmp_path / "runs" / "secret"
    outputs = []
    for stage in STAGES:
        out = subprocess.run(
            [sys.executable, "-m", f"tasks.{stage}", "--config", "tiny_test", "--run-dir", str(run_dir),
             "--set", "num_examples=16", "--set", "heldout_generate_examples=4"],
            capture_output=True, text=True, env=env, timeout=600,
        )
        assert out.returncode == 0, out.stderr[-3000:]
        outputs.append(out.stdout + out.stderr)  # stdout's last line is the stage's XCom result
    files = [p for p in run_dir.rglob("*") if p.is_file()]
    assert any(p.name == "report.html" for p in files)
    for secret in (SECRET_USER, SECRET_KEY):
        assert all(secret not in text for text in outputs)
        for p in files:
            assert secret.encode() not in p.read_bytes(), p
