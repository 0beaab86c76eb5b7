"""Checks that take seconds and save hours: run by the first task, before any GPU pod is requested.

A run that cannot finish (an unknown preset, Kaggle credentials missing for a Kaggle preset, a
prompt suite that does not load, a sequence length the model cannot take) or that plans more work
than `[gemma] max_run_tokens` allows fails here with a message naming the setting, not hours later
in a pod.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from tasks.infra.settings import whole_number
from tasks.pipeline.config import Config, ConfigError
from tasks.pipeline.variants import plan_variants, variant_config

log = logging.getLogger("gemma_pipeline")


def max_sequence_length(preset: str) -> int | None:
    """The longest sequence the model was built for, where the preset says so without loading weights."""
    from tasks.modeling.presets import is_kaggle_preset, kaggle_handle

    if is_kaggle_preset(preset):
        # keras-hub's preset metadata does not carry it; Gemma 1/2/3 text models take 8192.
        return 8192 if "gemma" in kaggle_handle(preset) else None
    if preset.startswith(("tiny:", "gguf:")):
        return 8192 if preset.startswith("tiny:") else 32768
    config = Path(preset).expanduser() / "config.json"
    if config.is_file():
        cfg = json.loads(config.read_text()).get("config", {})
        return cfg.get("max_sequence_length")
    return None


# [gemma] max_run_tokens: the most token positions one run may plan (about 270x the seed's recipe,
# ~370k); a deployment sets it for its GPU pool, since whoever may trigger the DAG chooses the Params.
MAX_RUN_TOKENS_DEFAULT = "100000000"


def planned_tokens(cfg: Config, suite_prompts: int) -> dict[str, int]:
    """Token positions a run plans: training (per variant: epochs x examples x sequence length),
    held-out scoring (base and tuned, per variant), validation scoring (before the first step, every
    eval_every_steps and after the last, per variant) and generation (the base once, each variant's
    tuned model once, on the suite and the held-out prompts, up to max_length each)."""
    variants = [variant_config(cfg, spec) for spec in plan_variants(cfg)]
    training = sum(v.epochs * v.num_examples * v.sequence_length for v in variants)
    scoring = sum(2 * v.eval_examples * v.sequence_length for v in variants)
    validation = sum(v.validation_examples * v.sequence_length * (validation_scores(v) + 1) for v in variants)
    generation = (suite_prompts + cfg.heldout_generate_examples) * cfg.max_length * (1 + len(variants))
    return {"training": training, "scoring": scoring, "validation": validation, "generation": generation,
            "total": training + scoring + validation + generation}


def validation_scores(cfg: Config) -> int:
    """Validation scores after the first step: one every eval_every_steps, and the last step's."""
    steps = cfg.epochs * -(-cfg.num_examples // cfg.batch_size)
    return -(-steps // cfg.eval_every_steps) if cfg.validation_examples else 0


def check_budget(cfg: Config, suite_prompts: int) -> dict[str, int]:
    try:
        budget = whole_number("max_run_tokens", MAX_RUN_TOKENS_DEFAULT, 1)
    except ValueError as e:  # a ConfigError fails the first task at once
        raise ConfigError(str(e)) from None
    tokens = planned_tokens(cfg, suite_prompts)
    if tokens["total"] > budget:
        raise ConfigError(
            f"this run plans {tokens['total']:,} tokens (training {tokens['training']:,}, held-out scoring "
            f"{tokens['scoring']:,}, validation {tokens['validation']:,}, generation {tokens['generation']:,}), more than [gemma] max_run_tokens "
            f"({budget:,}): lower epochs, num_examples, sequence_length or the number of variants, or ask for a "
            "higher max_run_tokens")
    return {**tokens, "max_run_tokens": budget}


def check(cfg: Config) -> dict:
    from tasks.modeling.presets import preflight as model_preflight
    from tasks.pipeline.prompt_suite import load_suite

    model_preflight(cfg.model_preset)
    suite = load_suite(cfg.prompt_suite)
    limit = max_sequence_length(cfg.model_preset)
    for key in ("sequence_length", "max_length"):
        value = getattr(cfg, key)
        if limit is not None and value > limit:
            raise ConfigError(f"config key '{key}' ({value}) exceeds what model_preset {cfg.model_preset!r} takes ({limit})")
    budget = check_budget(cfg, len(suite["prompts"]))
    log.info("preflight: model %s, suite %s (%d prompts), %s planned tokens of %s allowed: ok", cfg.model_preset,
             suite["name"], len(suite["prompts"]), f"{budget['total']:,}", f"{budget['max_run_tokens']:,}")
    return {"model_preset": cfg.model_preset, "prompt_suite": suite["name"], "max_sequence_length": limit,
            "planned_tokens": budget}
