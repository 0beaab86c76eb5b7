"""python -m tasks.sweep --config cpu_demo --run-dir DIR [--set variants='[{"lora_rank": 8}]']

Plans the run's LoRA variants from the config key `variants` (a list of overrides over
tasks.config.VARIANT_KEYS) and writes `sweep/plan.json`. The DAG maps `finetune` and `generate` over
this plan: variant i runs both stages with `--variant '<its spec as JSON>'`, which applies its overrides
on top of the run's config and puts its outputs in `<run dir>/variants/v<i>/` (the run's snapshot
and preprocess are shared through relative links). With no variants the plan is one unnamed
variant without overrides, whose outputs stay in the run directory itself, as in a single run.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path

from tasks import storage
from tasks.cli import stage_main
from tasks.config import Config, ConfigError, coerce_variants, fingerprint

log = logging.getLogger("gemma_pipeline")

STAGE = "sweep"
PLAN = "plan.json"
VARIANTS_DIR = "variants"
# Stages a variant shares with its run (links in its folder); the others are its own.
SHARED_STAGES = ("snapshot", "preprocess")
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


def read_plan(run_dir: Path) -> list[dict]:
    return storage.read_json(storage.stage_dir(run_dir, STAGE) / PLAN)


def run(cfg: Config, run_dir: Path, force: bool = False) -> dict:
    plan = plan_variants(cfg)

    def body(out: Path) -> dict:
        storage.write_json(out / PLAN, plan)
        if cfg.variants:
            log.info("sweep: %d variants", len(plan))
            for spec in plan:
                log.info("sweep: %s: %s -> %s", spec["name"], spec["label"], variant_path(run_dir, spec["name"]))
        else:
            log.info("sweep: no variants: one fine-tune with the run's config")
        return {"variants": plan}

    return storage.run_stage(run_dir, STAGE, fingerprint(STAGE, plan), body, force)


def main(argv=None) -> dict:
    return stage_main(STAGE, __doc__, run, argv)


if __name__ == "__main__":
    main()
