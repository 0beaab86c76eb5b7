"""Validation while training (tasks.training.validation): examples outside the training set and the
held-out split, scored during training; early stopping; `keep: best` saves the best step's adapter,
which generate and export then use, also after a kill and a resume."""

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tasks import finetune, preprocess, snapshot
from tasks.pipeline import artifacts
from tasks.pipeline.config import ConfigError, load_config
from tests.conftest import copy_run, read_json
from tests.tasks import two_cpus
from tests.tasks.test_faults import kill_after_checkpoint, lora_weights

DATA = Path(__file__).parent / "data"

# A planted overfit: a tiny random model, a high learning rate, many epochs, few examples.
OVERFIT = {"validation_examples": "8", "eval_every_steps": "4", "keep": "best", "epochs": "30",
           "learning_rate": "0.1", "early_stopping_patience": "4"}
OPEN_GATE = {"gate_rouge_l_margin": "1.0", "gate_eos_rate_margin": "1.0", "gate_perplexity_margin": "100"}


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.mark.unit
@pytest.mark.parametrize("setting", [{"keep": "best"}, {"early_stopping_patience": "3"}])
def test_best_or_early_stopping_without_validation_examples_is_refused(setting):
    (name,) = setting
    with pytest.raises(ConfigError, match=rf"'{name}'.*needs validation_examples > 0"):
        load_config("tiny_test", setting)
    with pytest.raises(ConfigError, match=rf"'{name}'.*needs validation_examples > 0"):
        from tasks.pipeline.variants import variant_config

        variant_config(load_config("tiny_test"), {"overrides": {name: "best" if name == "keep" else 3}})


@pytest.mark.model
def test_without_validation_the_preprocess_outputs_are_byte_identical_to_before(trained_run):
    """The seed's recipe draws no validation examples: train.jsonl, heldout.jsonl and the manifest are
    byte for byte what the stage wrote before validation existed (hashes recorded then)."""
    before = json.loads((DATA / "preprocess_before_validation.json").read_text())["sha256"]
    run = trained_run("preprocess")
    assert {name: sha256(artifacts.path(run, artifacts.PREPROCESS, name)) for name in before} == before
    assert not artifacts.path(run, artifacts.PREPROCESS, artifacts.VALIDATION).exists()


@pytest.mark.model
def test_validation_examples_are_outside_training_and_held_out_and_move_neither(trained_run):
    plain, drawn = trained_run("preprocess"), trained_run("preprocess", validation_examples=24)
    for name in (artifacts.TRAIN, artifacts.HELDOUT):
        assert sha256(artifacts.path(drawn, artifacts.PREPROCESS, name)) == sha256(artifacts.path(plain, artifacts.PREPROCESS, name))
    validation = artifacts.read_validation(drawn)
    ids = {r["id"] for r in validation}
    assert len(ids) == 24
    assert not ids & {r["id"] for r in artifacts.read_train(drawn)}
    assert not ids & {r["id"] for r in artifacts.read_heldout(drawn)}
    assert artifacts.read_preprocess_manifest(drawn)["validation_examples"] == 24


@pytest.fixture(scope="module")
def overfit(trained_run):
    # The keras-hub preset is enough to see which adapter export merged; the formats' parity is
    # test_export's (a model this overfit is all near-ties, which a float16 GGUF's greedy answer flips).
    return trained_run("export", **OVERFIT, **OPEN_GATE, export_formats='["keras"]')


@pytest.mark.e2e
def test_a_planted_overfit_stops_early_and_keeps_the_best_step(overfit):
    from tasks.evaluate.heldout_eval import score_heldout
    from tasks.modeling.presets import load_causal_lm
    from tasks.training import adapter

    result = artifacts.read_finetune_result(overfit)
    v = result["validation"]
    assert v["stopped_early_at"] is not None and v["stopped_early_at"] < result["planned_steps"]
    assert result["steps"] == v["stopped_early_at"]
    assert v["kept_step"] == v["best_step"] < v["stopped_early_at"]
    after = [s["loss"] for s in v["scores"] if s["step"] > v["best_step"]]
    assert len(after) == int(OVERFIT["early_stopping_patience"]) and min(after) >= v["best_loss"]
    assert after[-1] > v["best_loss"]  # it rose after the best step
    history = artifacts.read_history(overfit)
    assert [h["step"] for h in history if "validation_loss" in h] == [s["step"] for s in v["scores"]][1:]

    # The saved adapter scores the best step's validation loss, not the last step's.
    cfg = load_config("tiny_test", {**OVERFIT, **OPEN_GATE})
    rows = artifacts.read_validation(overfit)
    lm = load_causal_lm(cfg.model_preset, cfg.models_dir, cfg.sequence_length)
    adapter.load(lm, artifacts.adapter_path(overfit), adapter.placement(cfg))
    assert score_heldout(lm, rows, cfg.sequence_length)["loss"] == pytest.approx(v["best_loss"], abs=2e-4)

    # Generate answered with that adapter, and export merged it: its keras preset scores the same.
    digest = sha256(artifacts.adapter_path(overfit))
    assert artifacts.read_answers(overfit)["adapter_sha256"] == digest
    manifest = artifacts.read_export_manifest(overfit)
    assert manifest["adapter_sha256"] == digest
    import keras_hub

    merged = keras_hub.models.CausalLM.from_preset(str(artifacts.path(overfit, artifacts.EXPORT, artifacts.EXPORT_KERAS)))
    assert score_heldout(merged, rows, cfg.sequence_length)["loss"] == pytest.approx(v["best_loss"], abs=2e-4)


@pytest.mark.e2e
def test_the_report_shows_the_validation_curve_and_the_best_step(overfit, tmp_path):
    from tasks import report

    run = copy_run(overfit, tmp_path / "runs" / "run")
    report.run(load_config("tiny_test", {**OVERFIT, **OPEN_GATE}), run)
    html = artifacts.report_path(run).read_text()
    v = artifacts.read_finetune_result(overfit)["validation"]
    assert 'id="validation"' in html and "Validation loss" in html
    assert f"best: step {v['best_step']}" in html
    assert f"step {v['best_step']} · {v['best_loss']}" in html
    assert f"keep: best: the adapter of step {v['kept_step']}" in html
    assert f"stopped at step {v['stopped_early_at']}" in html


# The kill test: no early stopping, so training goes on well past the best step.
KILL = {"validation_examples": "8", "eval_every_steps": "4", "keep": "best", "epochs": "30", "learning_rate": "0.1",
        "eval_examples": "0", "checkpoint_every_steps": "4", "log_every_steps": "40"}


def prepared(run_dir: Path) -> Path:
    cfg = load_config("tiny_test", KILL)
    snapshot.run(cfg, run_dir)
    preprocess.run(cfg, run_dir)
    return run_dir


@pytest.mark.e2e
def test_a_kill_after_the_best_step_keeps_it(tmp_path, caplog):
    """SIGKILLed after a checkpoint later than the best step (which a retry never reaches again: the
    validation loss only rose after it), the retry still saves the best step's adapter: the
    checkpoint carried it."""
    clean = prepared(tmp_path / "clean" / "runs" / "run")
    finetune.main(two_cpus.finetune_argv(clean, KILL))
    best = read_json(artifacts.path(clean, artifacts.FINETUNE, artifacts.RESULT))["validation"]
    total = artifacts.read_finetune_result(clean)["planned_steps"]
    kill_at = best["best_step"] + 2 * int(KILL["checkpoint_every_steps"])
    assert kill_at + 16 < total, "the planted run's best step came too late to kill after it"

    run_dir = prepared(tmp_path / "killed" / "runs" / "run")
    proc = subprocess.Popen([sys.executable, "-m", "tasks.finetune", *two_cpus.finetune_argv(run_dir, KILL)],
                            cwd=two_cpus.REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    killed_at = kill_after_checkpoint(proc, run_dir, step=kill_at)
    assert best["best_step"] < killed_at < total

    caplog.clear()
    with caplog.at_level("INFO", logger="gemma_pipeline"):
        finetune.main(two_cpus.finetune_argv(run_dir, KILL))
    assert f"RESUMING from the checkpoint at step {killed_at}/{total}" in caplog.text
    resumed = artifacts.read_finetune_result(run_dir)["validation"]
    assert resumed["kept_step"] == resumed["best_step"] == best["best_step"]
    assert resumed["best_loss"] == best["best_loss"]
    a, b = lora_weights(artifacts.adapter_path(run_dir)), lora_weights(artifacts.adapter_path(clean))
    assert a.keys() == b.keys() and a
    for name in a:
        np.testing.assert_allclose(a[name], b[name], atol=1e-5, err_msg=name)
    shutil.rmtree(tmp_path / "clean", ignore_errors=True)


@pytest.mark.e2e
def test_the_validation_curve_and_placement_reach_mlflow(overfit, tmp_path, monkeypatch):
    import mlflow

    from tasks.infra import tracking

    monkeypatch.delenv("GEMMA_MLFLOW_TRACKING_URI", raising=False)
    run = copy_run(overfit, tmp_path / "runs" / "run")
    cfg = load_config("tiny_test", {**OVERFIT, **OPEN_GATE})
    tracking.log_finetune(str(run), "fp-ft", cfg.to_dict())
    client = mlflow.MlflowClient(tracking.tracking_uri(run))
    exp = client.get_experiment_by_name(tracking.EXPERIMENT)
    [r] = client.search_runs([exp.experiment_id])
    v = artifacts.read_finetune_result(run)["validation"]
    curve = sorted((m.step, m.value) for m in client.get_metric_history(r.info.run_id, "validation_loss"))
    assert curve == pytest.approx([(s["step"], s["loss"]) for s in v["scores"]])
    assert r.data.tags["gemma.kept_step"] == str(v["kept_step"]) and r.data.tags["gemma.lora_targets"] == "attention_qv"
    assert r.data.params["lora_targets"] == "attention_qv" and r.data.params["keep"] == "best"
    assert r.data.metrics["trainable_weights"] == artifacts.read_finetune_result(run)["trainable_parameters"]
