"""python -m tasks.sweep --config cpu_demo --run-dir DIR [--set variants='[{"lora_rank": 8}]']

Stage 3 of 8: plans the run's LoRA variants from the config key `variants` (a list of overrides over
tasks.pipeline.config.VARIANT_KEYS) and writes `sweep/plan.json`. The DAG maps `finetune` and `generate` over
this plan: variant i runs both stages with `--variant '<its spec as JSON>'`, which applies its overrides
on top of the run's config and puts its outputs in `<run dir>/variants/v<i>/` (tasks.pipeline.variants).
With no variants the plan is one unnamed variant without overrides, whose outputs stay in the run
directory itself, as in a single run.
"""

from __future__ import annotations

import logging
from pathlib import Path

from tasks.pipeline import artifacts, storage
from tasks.pipeline.artifacts import SWEEP as STAGE
from tasks.infra.cli import stage_main
from tasks.pipeline.config import Config, fingerprint, stage_keys
from tasks.pipeline.variants import plan_variants, variant_path

log = logging.getLogger("gemma_pipeline")

CONFIG_KEYS = stage_keys(STAGE)


def run(cfg: Config, run_dir: Path, force: bool = False) -> dict:
    plan = plan_variants(cfg)

    def body(out: Path) -> dict:
        storage.write_json(out / artifacts.PLAN, plan)
        if cfg.variants:
            log.info("sweep: %d variants", len(plan))
            for spec in plan:
                log.info("sweep: %s: %s -> %s", spec["name"], spec["label"], variant_path(run_dir, spec["name"]))
        else:
            log.info("sweep: no variants: one fine-tune with the run's config")
        return {"variants": plan}

    return storage.run_stage(run_dir, STAGE, fingerprint(STAGE, plan, cfg.subset(CONFIG_KEYS)), body, force)


def main(argv=None) -> dict:
    return stage_main(STAGE, __doc__, run, argv)


if __name__ == "__main__":
    main()
