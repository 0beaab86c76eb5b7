"""Sweep planning and the `--variant` argument every mapped stage gets (no model needed here; the
whole sweep runs in tests/e2e/test_sweep_dag.py)."""

import json

import pytest

from tasks.pipeline import variants
from tasks.infra.cli import stage_main
from tasks.pipeline.storage import error_path
from tasks.pipeline.config import ConfigError, load_config

pytestmark = pytest.mark.unit


def test_no_variants_is_one_unnamed_variant_that_writes_to_the_run_dir(tmp_path):
    plan = variants.plan_variants(load_config("tiny_test"))
    assert plan == [{"index": 0, "name": "", "label": "as configured", "overrides": {}}]
    assert variants.variant_dir(tmp_path, "") == tmp_path and not (tmp_path / "variants").exists()


def test_variants_are_validated_with_the_config_and_named_in_errors():
    cfg = load_config("tiny_test", {"variants": '[{"lora_rank": 8}, {"learning_rate": "2e-4", "train_mode": "fast"}, {}]'})
    plan = variants.plan_variants(cfg)
    assert [v["name"] for v in plan] == ["v0", "v1", "v2"]
    assert plan[1]["overrides"] == {"learning_rate": 0.0002, "train_mode": "fast"}
    assert [v["label"] for v in plan] == ["lora_rank=8", "learning_rate=0.0002, train_mode=fast", "as configured"]
    cases = {
        '[{"model_preset": "gemma_7b_en"}]': r"variants\[0\].*\['model_preset'\] cannot vary",
        '[{"lora_rank": 4}, {"lora_rank": -1}]': r"'lora_rank' \(override, variants\[1\]\).*outside",
        '[{"lora_rank": "eight"}]': r"'lora_rank' \(override, variants\[0\]\): expected int",
        '[{"lora_rank": 4}, {"lora_rank": 4}]': r"variants\[1\].*same overrides as variants\[0\]",
        '{"lora_rank": 4}': r"expected a list of mappings",
        json.dumps([{}] * 17): r"at most 16",
    }
    for text, message in cases.items():
        with pytest.raises(ConfigError, match=message):
            load_config("tiny_test", {"variants": text})


def test_variant_overrides_win_and_outputs_go_to_the_variant_folder(tmp_path):
    run = tmp_path / "run"
    seen = []
    spec = {"index": 1, "name": "v1", "label": "lora_rank=16", "overrides": {"lora_rank": 16}}
    argv = ["--config", "tiny_test", "--run-dir", str(run), "--set", "lora_rank=2", "--set", "learning_rate=0.5",
            "--set", 'variants=[{"lora_rank": 16}]', "--variant", json.dumps(spec)]
    stage_main("finetune", None, lambda cfg, run_dir, force: seen.append((cfg, run_dir)) or {}, argv)
    (cfg, run_dir), = seen
    assert (cfg.lora_rank, cfg.learning_rate, cfg.variants) == (16, 0.5, ())
    assert run_dir == run / "variants" / "v1"
    for shared in variants.SHARED_STAGES:
        link = run_dir / shared
        assert link.is_symlink() and not link.readlink().is_absolute()
        assert link.resolve() == (run / shared).resolve()


@pytest.mark.parametrize("bad", ['{"name": "../../etc", "overrides": {}}', '{"name": "v1", "overrides": {"sampler": "greedy"}}',
                                 '{"name": "v1", "extra": 1}', "not json"])
def test_a_bad_variant_argument_is_a_usage_error(tmp_path, bad, capsys):
    with pytest.raises(SystemExit) as e:
        stage_main("finetune", None, lambda *a: {}, ["--config", "tiny_test", "--run-dir", str(tmp_path), "--variant", bad])
    assert e.value.code == 2 and "--variant" in capsys.readouterr().err
    assert not (tmp_path / "variants").exists()


def test_a_failing_stage_leaves_its_error_beside_its_outputs_and_a_rerun_clears_it(tmp_path):
    spec = json.dumps({"name": "v0", "overrides": {}})
    argv = ["--config", "tiny_test", "--run-dir", str(tmp_path), "--variant", spec]

    def broken(cfg, run_dir, force):
        raise RuntimeError("CUDA out of memory in layer 7")

    with pytest.raises(RuntimeError):
        stage_main("generate", None, broken, argv)
    err = error_path(tmp_path / "variants" / "v0", "generate")
    assert json.loads(err.read_text()) == {"stage": "generate", "error": "RuntimeError: CUDA out of memory in layer 7"}
    stage_main("generate", None, lambda *a: {}, argv)
    assert not err.exists()
