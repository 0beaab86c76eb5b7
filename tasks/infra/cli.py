"""The command line every stage shares: `python -m tasks.<stage> --config NAME --run-dir DIR [--set k=v]`.

The DAG builds exactly this argv for the local runner and for the Kubernetes pod, so a stage behaves
the same whichever runs it, and a person can rerun one stage by hand with the argv from the task log.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Callable, Sequence

from tasks.pipeline.config import Config, ConfigError, load_config, parse_overrides
from tasks.pipeline.storage import error_path
from tasks.pipeline.variants import parse_spec, variant_dir

log = logging.getLogger("gemma_pipeline")

# Where a KubernetesPodOperator's XCom sidecar reads a pod's result from.
XCOM_RETURN = Path("/airflow/xcom/return.json")


def setup_logging() -> None:
    log.setLevel(logging.INFO)
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(
            level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
        )


def stage_argv(stage: str, config: str, run_dir: str, overrides: dict | None = None, variant: str | None = None) -> list[str]:
    """The argv after `python -m tasks.<stage>`; overrides in a stable order, then the variant (a
    sweep's spec as JSON, see tasks.pipeline.variants), whose overrides come last and win."""
    argv = ["--config", config, "--run-dir", str(run_dir)]
    for key in sorted(overrides or {}):
        value = overrides[key]
        text = json.dumps(value) if isinstance(value, (bool, list, tuple, dict)) else str(value)
        argv += ["--set", f"{key}={text}"]
    if variant is not None:
        argv += ["--variant", variant]
    return argv


def stage_main(
    stage: str,
    doc: str | None,
    run: Callable[[Config, Path, bool], dict],
    argv: Sequence[str] | None = None,
    *,
    with_configured: bool = False,
) -> dict:
    ap = argparse.ArgumentParser(
        prog=f"python -m tasks.{stage}",
        description=(doc or "").strip().split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--config", required=True, help="config name in tasks/configs (e.g. cpu_demo) or a .yaml path")
    ap.add_argument("--run-dir", required=True, type=Path, help="the run directory shared by all stages")
    ap.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override one config key (repeatable)"
    )
    ap.add_argument("--force", action="store_true", help="redo the stage even if its outputs are up to date")
    ap.add_argument(
        "--variant", default=None, metavar="JSON",
        help="a sweep variant's spec (see tasks.pipeline.variants): its overrides win over --set, its outputs go to "
        "<run dir>/variants/<name>",
    )
    args = ap.parse_args(argv)
    setup_logging()
    run_dir = args.run_dir
    try:
        overrides = parse_overrides(args.set)
        if args.variant is not None:
            spec = parse_spec(args.variant)
            overrides = {k: v for k, v in overrides.items() if k != "variants"}
            overrides.update(spec["overrides"])
        cfg = load_config(args.config, overrides)
    except ConfigError as e:
        ap.exit(2, f"python -m tasks.{stage}: error: {e}\n")
    if args.variant is not None:
        run_dir = variant_dir(run_dir, spec["name"])
        log.info("stage %s: variant %s (%s)", stage, spec["name"] or "default", spec.get("label") or "as configured")
    log.info("stage %s: run dir %s, config %s", stage, run_dir, args.config)
    # A failure leaves its reason beside the outputs, where the report (also for a pod) finds it.
    failure = error_path(run_dir, stage)
    failure.unlink(missing_ok=True)
    try:
        if os.environ.get("GEMMA_REQUIRE_GPU") == "1":
            from tasks.infra.gpu_check import require_gpu

            require_gpu()
        # The stages that judge a run's trust get the config as the DAG configured it (no --set).
        extra = {"configured": load_config(args.config)} if with_configured else {}
        result = run(cfg, run_dir, args.force, **extra)
    except Exception as e:
        # Only beside outputs that exist: a stage that failed before writing anything leaves nothing.
        if run_dir.is_dir():
            failure.write_text(json.dumps({"stage": stage, "error": f"{type(e).__name__}: {e}"[:4000]}), encoding="utf-8")
        raise
    if os.environ.get("GEMMA_WRITE_XCOM") == "1":
        XCOM_RETURN.parent.mkdir(parents=True, exist_ok=True)
        XCOM_RETURN.write_text(json.dumps(result))
    print(json.dumps(result, sort_keys=True))
    return result
