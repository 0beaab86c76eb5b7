import json
import shutil

from tasks import promote
from tasks.pipeline import artifacts
from tasks.pipeline.config import load_config
import pytest

pytestmark = pytest.mark.model


def set_verdict(run_dir, passed: bool):
    path = run_dir / "report" / artifacts.METRICS
    m = json.loads(path.read_text())
    m["gate"]["passed"] = passed
    for c in m["gate"]["checks"]:
        c["passed"] = passed
    path.write_text(json.dumps(m))


def test_passing_run_becomes_champion_and_failing_run_does_not(tiny_run, tmp_path):
    root = tmp_path / "runs"
    good, bad = root / "good", root / "bad"
    shutil.copytree(tiny_run, good)
    shutil.copytree(tiny_run, bad)
    for d in (good, bad):
        shutil.rmtree(d / "promote", ignore_errors=True)
    set_verdict(good, True)
    set_verdict(bad, False)
    cfg = load_config("tiny_test")

    assert promote.run(cfg, good)["promoted"] is True
    champion = json.loads((root / artifacts.CHAMPION).read_text())
    assert champion["run_id"] == "good" and champion["adapter"].endswith("adapter.lora.h5")
    assert set(champion["metrics"]) == {"rouge_l", "eos_stop_rate", "perplexity"}

    decision = promote.run(cfg, bad)
    assert decision["promoted"] is False and len(decision["failed_checks"]) == 3
    assert json.loads((root / artifacts.CHAMPION).read_text())["run_id"] == "good"  # unchanged
