"""MLflow tracking and the registry on the embedded SQLite store: what is logged, once; the champion
alias; a store that cannot be written; secrets. (The sweep through the DAG: tests/e2e/test_sweep_dag.py;
the MLflow UI in Chromium: tests/e2e/test_mlflow_ui.py.)"""

import json
import shutil
from pathlib import Path

import pytest

from tasks import promote, report, track
from tasks.pipeline import artifacts
from tasks.infra import tracking
from tasks.pipeline.config import load_config

pytestmark = pytest.mark.model


def copy_run(tiny_run: Path, root: Path, name: str) -> Path:
    """The session's tiny run under another run root (its own MLflow store), as run `name`."""
    run = root / "runs" / name
    shutil.copytree(tiny_run, run, ignore=shutil.ignore_patterns(tracking.STATE_DIR))
    return run


def client_for(run: Path):
    import mlflow

    return mlflow.MlflowClient(tracking.tracking_uri(run))


def only_run(client, key: str):
    exp = client.get_experiment_by_name(tracking.EXPERIMENT)
    [run] = client.search_runs([exp.experiment_id], filter_string=f"tags.`gemma.run_key` = '{key}'")
    return run


def test_a_run_is_logged_once_with_params_curves_metrics_and_files(tiny_run, tmp_path, monkeypatch):
    monkeypatch.delenv("GEMMA_MLFLOW_TRACKING_URI", raising=False)
    run = copy_run(tiny_run, tmp_path, "r1")
    cfg = load_config("tiny_test")
    for _ in range(2):  # a rerun (a retried task) logs nothing twice
        tracking.log_finetune(str(run), "fp-ft", cfg.to_dict())
        tracking.log_generate(str(run), "fp-gen")
        tracking.log_report(str(run), "fp-rep")
    client = client_for(run)
    r = only_run(client, "r1")
    assert tracking.tracking_uri(run) == f"sqlite:///{tmp_path / 'mlflow.db'}"
    history = artifacts.read_history(run)
    assert len(client.get_metric_history(r.info.run_id, "loss")) == len(history)
    assert [m.value for m in client.get_metric_history(r.info.run_id, "loss")] == pytest.approx([h["loss"] for h in history])
    assert len(client.get_metric_history(r.info.run_id, "real_tokens_per_s")) == len(history)
    assert r.data.params == {k: (json.dumps(v) if isinstance(v, (list, tuple, dict)) else str(v)) for k, v in cfg.to_dict().items()}
    m = artifacts.read_metrics(run)
    assert r.data.metrics["rouge_l.tuned"] == pytest.approx(m["heldout"]["rouge_l"]["tuned"])
    ci = m["heldout"]["rouge_l_delta_ci"]
    assert (r.data.metrics["rouge_l_delta.ci_low"], r.data.metrics["rouge_l_delta.ci_high"]) == pytest.approx((ci["low"], ci["high"]))
    assert r.data.metrics["gate.passed"] == float(m["gate"]["passed"])
    assert r.data.tags["gemma.train_mode"] == "tutorial" and r.data.tags["gemma.snapshot_sha256"] == \
        artifacts.read_snapshot_manifest(run)["sha256"]
    files = {a.path for a in client.list_artifacts(r.info.run_id)}
    assert {"report.html", "metrics.json", "history.json", "answers.json", "adapter"} <= files
    assert [a.path for a in client.list_artifacts(r.info.run_id, "adapter")] == ["adapter/" + artifacts.ADAPTER]
    status = tracking.status(run)
    assert status["run_id"] == r.info.run_id and status["pending"] == []


def test_promote_registers_the_champion_and_moves_the_alias(tiny_run, tmp_path, monkeypatch):
    monkeypatch.delenv("GEMMA_MLFLOW_TRACKING_URI", raising=False)
    versions = []
    for name in ("week1", "week2"):
        run = copy_run(tiny_run, tmp_path, name)
        tracking.log_finetune(str(run), "fp", load_config("tiny_test").to_dict())
        versions.append(tracking.register_champion(str(run), str(run), f"fp-{name}", None))
    assert [v["status"] for v in versions] == ["logged", "logged"]
    assert [v["version"] for v in versions] == [1, 2] and versions[1]["previous_version"] == 1
    client = client_for(run)
    champion = client.get_model_version_by_alias(tracking.REGISTERED_MODEL, tracking.CHAMPION_ALIAS)
    previous = client.get_model_version_by_alias(tracking.REGISTERED_MODEL, tracking.PREVIOUS_ALIAS)
    assert (int(champion.version), int(previous.version)) == (2, 1)
    assert champion.run_id == only_run(client, "week2").info.run_id
    assert champion.source.endswith("/adapter")
    # Registering the same promotion again (a retried task) adds no version.
    again = tracking.register_champion(str(run), str(run), "fp-week2", None)
    assert again["version"] == 2 and len(client.search_model_versions(f"name='{tracking.REGISTERED_MODEL}'")) == 2


def test_an_unwritable_store_costs_nothing_and_track_fills_it_in_later(tiny_run, tmp_path, monkeypatch):
    run = copy_run(tiny_run, tmp_path, "offline")
    blocked = tmp_path / "blocked"
    blocked.write_text("a file where the store's folder should be")
    monkeypatch.setenv("GEMMA_MLFLOW_TRACKING_URI", f"sqlite:///{blocked}/sub/mlflow.db")
    cfg = load_config("tiny_test")
    tracking.log_finetune(str(run), "fp-ft", cfg.to_dict())
    result = report.run(cfg, run, force=True)  # the stage itself runs and succeeds
    assert result["report"] and artifacts.report_path(run).is_file()
    promote.run(cfg, run, force=True)
    status = tracking.status(run)
    assert {p["piece"] for p in status["pending"]} >= {"finetune", "report"} and status["run_id"] is None
    state = json.loads((run / tracking.STATE_DIR / "finetune.json").read_text())
    assert state["status"] == "pending" and state["call"]["kwargs"]["params"] == json.loads(json.dumps(cfg.to_dict()))
    # The report says so.
    html = report.render(report.gather(cfg, run, artifacts.read_metrics(run)))
    assert "tracking incomplete" in html and "python -m tasks.track --run-dir" in html

    monkeypatch.delenv("GEMMA_MLFLOW_TRACKING_URI")
    assert track.main(["--run-dir", str(run)]) == 0
    assert tracking.status(run)["pending"] == []
    client = client_for(run)
    r = only_run(client, "offline")
    steps = len(client.get_metric_history(r.info.run_id, "loss"))
    assert steps == len(artifacts.read_history(run)) and "report.html" in {a.path for a in client.list_artifacts(r.info.run_id)}
    assert track.main(["--run-dir", str(run)]) == 0  # nothing left: nothing logged twice
    assert len(client.get_metric_history(r.info.run_id, "loss")) == steps


def test_no_secret_reaches_mlflow(tiny_run, tmp_path, monkeypatch):
    secret = "KGL-SECRET-7f3a9c"
    monkeypatch.setenv("KAGGLE_KEY", secret)
    monkeypatch.setenv("KAGGLE_USERNAME", "someone-" + secret)
    monkeypatch.delenv("GEMMA_MLFLOW_TRACKING_URI", raising=False)
    run = copy_run(tiny_run, tmp_path, "secret")
    tracking.log_finetune(str(run), "fp", load_config("tiny_test").to_dict())
    tracking.log_generate(str(run), "fp")
    tracking.log_report(str(run), "fp")
    tracking.register_champion(str(run), str(run), "fp", None)
    client = client_for(run)
    r = only_run(client, "secret")
    seen = json.dumps([r.data.params, r.data.tags, sorted(r.data.metrics)])
    assert secret not in seen
    for path in [tmp_path / "mlflow.db", *(tmp_path / "mlartifacts").rglob("*")]:
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), path


def test_a_pending_file_written_before_the_library_moved_still_replays(tiny_run, tmp_path):
    """Tracking files name the function to call again; one written when tracking was tasks/tracking.py
    (kept in tests/tasks/data) still logs, and a file naming anything else is refused by name."""
    run = copy_run(tiny_run, tmp_path, "before-the-move")
    template = (Path(__file__).parent / "data" / "pending_report_before_the_move.json").read_text(encoding="utf-8")
    state = json.loads(template.replace("{run_dir}", str(run)).replace("{run_key}", run.name).replace("{blocked}", str(tmp_path)))
    (run / tracking.STATE_DIR).mkdir()
    (run / tracking.STATE_DIR / "report.json").write_text(json.dumps(state), encoding="utf-8")
    assert track.main(["--run-dir", str(run)]) == 0
    assert tracking.status(run)["pending"] == []
    r = only_run(client_for(run), "before-the-move")
    assert "report.html" in {a.path for a in client_for(run).list_artifacts(r.info.run_id)}

    state["call"]["fn"] = "replay"
    (run / tracking.STATE_DIR / "report.json").write_text(json.dumps(state), encoding="utf-8")
    with pytest.raises(ValueError, match="'replay', which is not one of the functions a pending piece may call"):
        tracking.replay(run)


def test_credentials_in_the_tracking_uri_are_shown_nowhere(tiny_run, tmp_path, monkeypatch, caplog, capfd):
    """A tracking server's URI may carry a user and password: the report, the tracking files and
    the warnings show it with `***` in their place."""
    from tasks.infra.settings import redact

    assert redact("https://alice:pw@mlflow.example.com/x and postgresql://bob@db:5432/m") == \
        "https://***@mlflow.example.com/x and postgresql://***@db:5432/m"
    assert redact("sqlite:////srv/runs/mlflow.db") == "sqlite:////srv/runs/mlflow.db"
    run = copy_run(tiny_run, tmp_path, "with-credentials")
    monkeypatch.setenv("GEMMA_MLFLOW_TRACKING_URI", "http://alice:s3cr3t-pw@127.0.0.1:9/mlflow")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "3")
    cfg = load_config("tiny_test")
    state = tracking.log_finetune(str(run), "fp-ft", cfg.to_dict())
    assert state["status"] == "pending"
    html = report.render(report.gather(cfg, run, artifacts.read_metrics(run)))
    assert "http://***@127.0.0.1:9/mlflow" in html
    written = "".join(p.read_text() for p in (run / tracking.STATE_DIR).glob("*.json"))
    out, err = capfd.readouterr()
    for where, text in (("status", json.dumps(tracking.status(run))), ("report", html), ("tracking files", written),
                        ("log", caplog.text + out + err)):
        assert "s3cr3t-pw" not in text and "alice" not in text, where
