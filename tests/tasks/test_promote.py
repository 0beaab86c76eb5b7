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


def test_a_run_that_chose_its_own_test_is_promoted_only_after_someone_elses_approval(tiny_run, tmp_path, monkeypatch):
    """A run that changed a judged key (here max_bad_share) passes the gate, but its report says it
    waits for a person, and promote promotes nothing until someone other than the triggering user
    approves; who, when and why go into decision.json, champion.json and the run history."""
    from tasks import report
    from tasks.evaluate.evaluation import promotion_summary
    from tasks.pipeline import approval

    monkeypatch.delenv("GEMMA_PROMOTION_APPROVAL", raising=False)
    root = tmp_path / "runs"
    run = root / "untrusted"
    shutil.copytree(tiny_run, run)
    shutil.rmtree(run / "promote", ignore_errors=True)
    configured = load_config("tiny_test")
    cfg = load_config("tiny_test", {"max_bad_share": "0.5"})
    set_verdict(run, True)
    shutil.rmtree(run / "report", ignore_errors=True)
    shutil.copytree(tiny_run / "report", run / "report")
    report.run(cfg, run, force=True, configured=configured)
    metrics = artifacts.read_metrics(run)
    promo = metrics["promotion"]
    assert promo["judged_changes"] == ["max_bad_share"] and promo["approval_required"] is metrics["gate"]["passed"]
    html = artifacts.report_path(run).read_text()
    assert ("approval required" in html) == promo["approval_required"]
    set_verdict(run, True)  # from here on the gate passes, whatever the tiny model scored

    def decide():
        return promote.run(cfg, run, configured=configured)

    waiting = decide()
    assert waiting["promoted"] is False and "waiting for a person" in waiting["why"]
    assert not (root / artifacts.CHAMPION).exists()

    approval.record(run, answer=approval.APPROVE, by="alice", triggered_by="alice", comment="mine, trust me")
    selfish = decide()
    assert selfish["promoted"] is False and selfish["why"].startswith("self-approval refused: alice")
    assert not (root / artifacts.CHAMPION).exists()

    approval.record(run, answer=approval.REJECT, by="bob", triggered_by="alice", comment="held-out split too small")
    rejected = decide()
    assert rejected["promoted"] is False and rejected["why"] == "rejected by bob: held-out split too small"
    assert "rejected by bob" in promotion_summary(run)

    approval.record(run, answer=approval.APPROVE, by="bob", triggered_by="alice", comment="checked the examples",
                    at="2026-12-07T12:00:00+00:00")
    approved = decide()
    assert approved["promoted"] is True and approved["approval"]["by"] == "bob"
    champion = json.loads((root / artifacts.CHAMPION).read_text())
    assert champion["approval"]["by"] == "bob" and champion["approval"]["comment"] == "checked the examples"
    assert champion["trust"]["judged_changes"] == ["max_bad_share"]
    decision = json.loads(artifacts.path(run, artifacts.PROMOTE, artifacts.DECISION).read_text())
    assert decision["approval"]["triggered_by"] == "alice"
    assert promotion_summary(run) == "promoted (approved by bob: checked the examples, 2026-12-07T12:00:00+00:00)"


@pytest.mark.parametrize("policy, overrides, needs", [
    ("never", {"max_bad_share": "0.5"}, False),  # one trusted user: the gate alone, as before approvals
    ("always", {}, True),  # a person before every promotion
    ("untrusted", {"learning_rate": "0.01", "num_examples": "8"}, False),  # training keys only: trusted
])
def test_the_approval_policy_setting(tiny_run, tmp_path, monkeypatch, policy, overrides, needs):
    monkeypatch.setenv("GEMMA_PROMOTION_APPROVAL", policy)
    run = tmp_path / "runs" / "r"
    shutil.copytree(tiny_run, run)
    shutil.rmtree(run / "promote", ignore_errors=True)
    set_verdict(run, True)
    decision = promote.run(load_config("tiny_test", overrides), run, configured=load_config("tiny_test"))
    assert decision["promoted"] is (not needs)


def test_a_wrong_policy_setting_is_named(monkeypatch):
    from tasks.infra.settings import promotion_approval

    monkeypatch.setenv("GEMMA_PROMOTION_APPROVAL", "sometimes")
    with pytest.raises(ValueError, match="promotion_approval / GEMMA_PROMOTION_APPROVAL .* not 'sometimes'"):
        promotion_approval()
