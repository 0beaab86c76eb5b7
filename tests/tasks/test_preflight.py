"""The first task's budget check: a run that plans more tokens than `[gemma] max_run_tokens` fails at
once, naming the figure and the setting, before any data is read or any pod is requested."""

import pytest

from tasks import snapshot
from tasks.modeling import preflight
from tasks.pipeline import artifacts
from tasks.pipeline.config import ConfigError, load_config

pytestmark = pytest.mark.unit

SUITE_PROMPTS = 26


def test_the_shipped_configs_plan_what_their_recipe_says_and_fit_the_default():
    seed = preflight.planned_tokens(load_config("gemma_2b_lora"), SUITE_PROMPTS)
    # 1 epoch x 1000 examples x 256 tokens; 100 held-out scored twice; 126 prompts x 256 tokens, base and tuned.
    assert seed == {"training": 256_000, "scoring": 51_200, "validation": 0, "generation": 64_512, "total": 371_712}
    # Validation: 32 examples x 128 tokens, scored before the first step and after steps 16, 32, 48, 64.
    demo = preflight.planned_tokens(load_config("cpu_demo", {"validation_examples": "32", "eval_every_steps": "16"}), SUITE_PROMPTS)
    assert demo["validation"] == 32 * 128 * 5
    for name in ("gemma_2b_lora", "cpu_demo", "tiny_test"):
        assert preflight.check_budget(load_config(name), SUITE_PROMPTS)["total"] <= int(preflight.MAX_RUN_TOKENS_DEFAULT)


def test_a_run_over_the_budget_fails_naming_the_figure_and_the_setting(monkeypatch):
    greedy = load_config("gemma_2b_lora", {"epochs": "1000", "variants": [{"lora_rank": r} for r in (4, 8, 16, 32)]})
    with pytest.raises(ConfigError) as e:
        preflight.check_budget(greedy, SUITE_PROMPTS)
    assert "1,024," in str(e.value) and "[gemma] max_run_tokens (100,000,000)" in str(e.value)  # 4 x 1000 x 1000 x 256
    monkeypatch.setenv("GEMMA_MAX_RUN_TOKENS", "6000")
    with pytest.raises(ConfigError, match=r"plans 6,336 tokens .* more than \[gemma\] max_run_tokens \(6,000\)"):
        preflight.check_budget(load_config("tiny_test"), SUITE_PROMPTS)
    monkeypatch.setenv("GEMMA_MAX_RUN_TOKENS", "lots")
    with pytest.raises(ConfigError, match="max_run_tokens / GEMMA_MAX_RUN_TOKENS must be a whole number"):
        preflight.check_budget(load_config("tiny_test"), SUITE_PROMPTS)


def test_the_first_task_stops_before_reading_anything(tmp_path, monkeypatch):
    monkeypatch.setenv("GEMMA_MAX_RUN_TOKENS", "1000")
    run_dir = tmp_path / "runs" / "over-budget"
    with pytest.raises(ConfigError, match="max_run_tokens"):
        snapshot.run(load_config("tiny_test"), run_dir)
    assert not (run_dir / artifacts.SNAPSHOT).exists()
    assert not artifacts.snapshot_store(run_dir, load_config("tiny_test").dataset_hub_id).exists()
