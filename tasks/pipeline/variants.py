"""A sweep's variants: their specs, their folders and their configs.

The config key `variants` lists overrides over the training keys (`config.VARIANT_KEYS`). The
`sweep` stage writes one spec per variant (index, name, label, overrides) to its plan; `finetune`
and `generate` take one spec as `--variant JSON` (tasks.infra.cli), apply its overrides on top of the run's
config and work in the variant's folder `<run dir>/variants/v<i>/`, where the run's snapshot and
preprocess are relative links. With no variants the plan is one unnamed variant without overrides,
whose folder is the run folder itself, as in a single run.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path

from tasks.pipeline import artifacts, storage
from tasks.pipeline.artifacts import PREPROCESS, SNAPSHOT, SWEEP
from tasks.pipeline.config import Config, ConfigError, check_validation, coerce_variants

VARIANTS_DIR = "variants"
# The base model's answers, shared by a sweep's variants (see tasks.generate).
BASE_ANSWERS_DIR = "base_answers"
# Stages a variant shares with its run (links in its folder); the others are its own.
SHARED_STAGES = (SNAPSHOT, PREPROCESS)
_NAME = re.compile(r"^(v[0-9]{1,2})?$")


def label(overrides: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(overrides.items())) or "as configured"


def plan_variants(cfg: Config) -> list[dict]:
    """One spec per variant: index, name (its folder), label and overrides."""
    if not cfg.variants:
        return [{"index": 0, "name": "", "label": "as configured", "overrides": {}}]
    return [
        {"index": i, "name": f"v{i}", "label": label(ov), "overrides": dict(ov)}
        for i, ov in enumerate(cfg.variants)
    ]


def run_plan(cfg: Config, run_dir: Path) -> list[dict]:
    """The run's published sweep plan; without one (stages run by hand), the config's."""
    return artifacts.read_plan(run_dir) if storage.completed(run_dir, SWEEP) else plan_variants(cfg)


def parse_spec(text: str) -> dict:
    """A variant spec from the command line (`--variant JSON`), checked like the config key."""
    try:
        spec = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"--variant: not JSON: {e}") from e
    if not isinstance(spec, dict) or not isinstance(spec.get("name", ""), str):
        raise ConfigError(f"--variant: expected an object with 'name' and 'overrides', got {text[:200]!r}")
    unknown = sorted(set(spec) - {"index", "name", "label", "overrides"})
    if unknown:
        raise ConfigError(f"--variant: unknown field(s) {unknown}")
    name = spec.get("name", "")
    if not _NAME.match(name):
        raise ConfigError(f"--variant: name {name!r} must be empty or v<number>")
    (overrides,) = coerce_variants([spec.get("overrides") or {}], f"--variant {name or 'default'}")
    return {**spec, "name": name, "overrides": overrides}


def variant_config(cfg: Config, spec: dict) -> Config:
    """The run's config with one variant's overrides (and no sweep of its own)."""
    vcfg = dataclasses.replace(cfg, **spec["overrides"], variants=())
    check_validation(vcfg)
    return vcfg


def variant_path(run_dir: Path, name: str) -> Path:
    """The folder of a variant's own stages: the run folder itself for the unnamed one."""
    return Path(run_dir) / VARIANTS_DIR / name if name else Path(run_dir)


def variant_dir(run_dir: Path, name: str) -> Path:
    """`variant_path`, created, with links to the shared stages."""
    vdir = variant_path(run_dir, name)
    if not name:
        return vdir
    vdir.mkdir(parents=True, exist_ok=True)
    for stage in SHARED_STAGES:
        link = vdir / stage
        if not link.is_symlink() and not link.exists():
            # Relative, so the link holds wherever the run root is mounted (worker or pod).
            os.symlink(Path("..") / ".." / stage, link)
    return vdir


def base_answers_dir(stage_run_dir: Path) -> Path | None:
    """Where the variants of a sweep share the base model's answers; None outside a sweep (the
    folder a stage runs in is then the run folder itself)."""
    stage_run_dir = Path(stage_run_dir)
    if stage_run_dir.parent.name != VARIANTS_DIR:
        return None
    return stage_run_dir.parent / BASE_ANSWERS_DIR
