import json
import subprocess
import sys
from pathlib import Path

import pytest

import tasks
from tasks.pipeline.config import FIELD_TYPES, Config, ConfigError, load_config, parse_overrides

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]
STAGES = ["snapshot", "preprocess", "finetune", "generate", "report"]


def test_tasks_package_is_this_repo():
    # `tasks` is a generic name: make sure the installed package is this checkout, not another one.
    assert Path(tasks.__file__).resolve().is_relative_to(REPO)


def test_seed_recipe_is_the_production_default():
    cfg = load_config("gemma_2b_lora")
    assert (cfg.model_preset, cfg.lora_rank, cfg.sequence_length, cfg.learning_rate, cfg.weight_decay) == (
        "gemma_2b_en", 4, 256, 5e-5, 0.01)
    assert (cfg.epochs, cfg.batch_size, cfg.num_examples, cfg.sampler, cfg.top_k, cfg.sampler_seed) == (
        1, 1, 1000, "top_k", 5, 2)
    assert cfg.dataset_source == "hub"


def test_overrides_are_typed_from_text():
    cfg = load_config("tiny_test", parse_overrides(["lora_rank=8", "learning_rate=5e-5", "jit_compile=true"]))
    assert cfg.lora_rank == 8 and cfg.learning_rate == 5e-5 and cfg.jit_compile is True


@pytest.mark.parametrize(
    "overrides, words",
    [
        ({"lora_rnak": "4"}, ["unknown config key", "lora_rnak"]),
        ({"lora_rank": "four"}, ["lora_rank", "expected int"]),
        ({"lora_rank": "0"}, ["lora_rank", "outside"]),
        ({"learning_rate": "-1"}, ["learning_rate", "outside"]),
        ({"epochs": "true"}, ["epochs", "expected int", "bool"]),
        ({"sampler": "beam"}, ["sampler", "beam"]),
        ({"dataset_source": "/no/such/file.jsonl"}, ["dataset_source", "/no/such/file.jsonl"]),
        ({"prompt_suite": "v999"}, ["prompt_suite", "v999"]),
    ],
)
def test_bad_values_name_the_key(overrides, words):
    with pytest.raises(ConfigError) as e:
        load_config("tiny_test", overrides)
    for w in words:
        assert w in str(e.value)


def test_unknown_key_in_file_and_missing_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("lora_rank: 4\nwarmup_steps: 10\n")
    with pytest.raises(ConfigError, match="warmup_steps"):
        load_config(str(bad))
    with pytest.raises(ConfigError, match="not found"):
        load_config(str(tmp_path / "missing.yaml"))
    with pytest.raises(ConfigError, match="unknown config 'nope'"):
        load_config("nope")


def test_config_is_frozen():
    cfg = Config()
    with pytest.raises(Exception):
        cfg.lora_rank = 8  # type: ignore[misc]


@pytest.mark.parametrize("stage", STAGES)
def test_stage_help(stage):
    out = subprocess.run([sys.executable, "-m", f"tasks.{stage}", "--help"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert f"python -m tasks.{stage}" in out.stdout and "--run-dir" in out.stdout and "--set" in out.stdout


def test_cli_rejects_bad_value_with_its_name(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "tasks.snapshot", "--config", "tiny_test", "--run-dir", str(tmp_path), "--set", "lora_rank=0"],
        capture_output=True, text=True,
    )
    assert out.returncode == 2
    assert "lora_rank" in out.stderr and "outside" in out.stderr
    assert not (tmp_path / "snapshot").exists()


def test_kaggle_preset_fails_fast_without_credentials(monkeypatch, tmp_path):
    """Fast means before any network attempt (offline, one would wait on timeouts and retries):
    every connection is recorded and refused, and none is tried."""
    import socket

    from tasks.modeling.presets import ModelSourceError, load_tokenizer, preflight

    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("network refused by the test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.delenv("KAGGLE_USERNAME", raising=False)
    monkeypatch.delenv("KAGGLE_KEY", raising=False)
    monkeypatch.setenv("KAGGLE_CONFIG_DIR", str(tmp_path))
    for call in (lambda: preflight("gemma_2b_en"), lambda: load_tokenizer("gemma_2b_en")):
        with pytest.raises(ModelSourceError, match="KAGGLE_USERNAME"):
            call()
    with pytest.raises(ModelSourceError, match="not a keras-hub preset"):
        preflight("gemma_99b_en")
    assert attempts == []


FLOAT_KEYS = [k for k, t in FIELD_TYPES.items() if t is float]


@pytest.mark.parametrize("key", FLOAT_KEYS)
@pytest.mark.parametrize("value", ["nan", "NaN", "inf", "-inf", float("nan"), json.loads("NaN"), json.loads("-Infinity")],
                         ids=["nan", "NaN", "inf", "-inf", "float nan", "JSON NaN", "JSON -Infinity"])
def test_nan_and_infinity_are_refused_for_every_float_key(key, value):
    """NaN passes every range check (each comparison is False), and Airflow's `-c` parses JSON with
    NaN and Infinity: every float key refuses them, naming the key."""
    with pytest.raises(ConfigError, match=rf"config key '{key}' .*not a finite number"):
        load_config("tiny_test", {key: value})
