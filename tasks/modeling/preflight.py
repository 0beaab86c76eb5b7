"""Checks that take seconds and save hours: run by the first task, before any GPU pod is requested.

A run that cannot finish (an unknown preset, Kaggle credentials missing for a Kaggle preset, a
prompt suite that does not load, a sequence length the model cannot take) fails here with a message
naming the setting, not hours later in a pod.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from tasks.pipeline.config import Config, ConfigError

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
    log.info("preflight: model %s, suite %s (%d prompts): ok", cfg.model_preset, suite["name"], len(suite["prompts"]))
    return {"model_preset": cfg.model_preset, "prompt_suite": suite["name"], "max_sequence_length": limit}
