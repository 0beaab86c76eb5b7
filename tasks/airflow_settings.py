"""Settings the DAG and the UI plugin share: the `[gemma]` section of Airflow's config.

Each key is read from `[gemma] <key>` in airflow.cfg (or AIRFLOW__GEMMA__<KEY>), else from the
environment as GEMMA_<KEY>, else its default. The DAG processor, the workers and the API server must
see the same values, so keep them in airflow.cfg or in the environment of all three.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

DAG_ID = "gemma_lora_finetune"


def setting(key: str, default: str) -> str:
    from airflow.configuration import conf

    return conf.get("gemma", key, fallback=None) or os.environ.get(f"GEMMA_{key.upper()}") or default


def run_root() -> Path:
    default = Path(os.environ.get("AIRFLOW_HOME", "~/airflow")).expanduser() / "gemma_runs"
    return Path(setting("run_root", str(default))).expanduser()


def run_dir_for(run_id: str) -> Path:
    # Run ids hold ':' and '+' (manual__2026-11-28T04:29:00+00:00); keep folder names portable,
    # which also keeps a run id from naming anything outside the run root.
    return run_root() / "runs" / re.sub(r"[^A-Za-z0-9_.-]", "_", run_id)
