"""The `[gemma]` settings, read in one place by the DAG, the UI plugin, the pods' settings
(tasks.infra.pod_settings) and tracking, with one precedence:

1. `[gemma] <key>` in Airflow's config (airflow.cfg, or the env variable AIRFLOW__GEMMA__<KEY>);
2. the env variable GEMMA_<KEY>;
3. the key's default.

An empty value is unset: it falls through to the next place. (Where an optional item has a default,
the value `none` turns it off, e.g. a pod's `cpu_limit`.) Where Airflow is not installed (a bench
script, a pod's image without it) only 2 and 3 apply. The DAG processor, the workers, the API server
and the pods must see the same values: keep them in airflow.cfg or in the environment of all of
them; the pods get theirs from the operator as env.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

from tasks.pipeline.artifacts import CHAMPION, CHAMPION_LOG, SNAPSHOT_STORE
from tasks.pipeline.config import BUNDLED_DOLLY, Config
from tasks.pipeline.sources import SourceLimits

DAG_ID = "gemma_lora_finetune"
# Longest folder name kept as the run id itself (filesystems allow 255 bytes).
_MAX_NAME = 200
# What lives beside the run folders: a run id with one of these names gets the hashed form, or it
# would be a folder in the champion's place or inside the snapshot store (compared without case,
# for case-insensitive filesystems).
RESERVED_NAMES = frozenset(n.lower() for n in (CHAMPION, CHAMPION_LOG, SNAPSHOT_STORE))


def read(key: str, default: str = "") -> tuple[str, str]:
    """(value, where it came from) of `[gemma] <key>`, by the precedence above."""
    value = _airflow_config(key)
    if value:
        return value, f"[gemma] {key}"
    value = os.environ.get(f"GEMMA_{key.upper()}", "").strip()
    if value:
        return value, f"GEMMA_{key.upper()}"
    return default, f"default of [gemma] {key}"


def setting(key: str, default: str = "") -> str:
    return read(key, default)[0]


_URI_CREDENTIALS = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*://)[^/?#@\s]+@")


def redact(text: str) -> str:
    """`text` with the user and password of every URI in it replaced by `***` (a tracking server's
    URI may carry them): what is shown, logged or written goes through this."""
    return _URI_CREDENTIALS.sub(r"\1***@", text)


def _airflow_config(key: str) -> str:
    try:
        from airflow.configuration import conf
    except ImportError:
        return ""
    return (conf.get("gemma", key, fallback="") or "").strip()


# [gemma] retries: what every task of a run gets, locally and in pods. A killed or preempted task
# (OOM killer, node drain, crash) is retried and resumes from its checkpoint with no one clicking;
# an error a retry would repeat is not retried (tasks.pipeline.storage.NOT_RETRIED).
RETRIES_DEFAULT = "2"
RETRY_DELAY_DEFAULT_S = "15"


def whole_number(key: str, default: str, lo: int, hi: int | None = None) -> int:
    """A `[gemma]` setting that is a whole number in [lo, hi] (`_` may group digits); the error names
    the setting, both its names and the value."""
    raw = setting(key, default).strip()
    digits = raw.replace("_", "")
    if not digits.isdigit() or int(digits) < lo or (hi is not None and int(digits) > hi):
        bounds = f"from {lo:,} to {hi:,}" if hi is not None else f"of at least {lo:,}"
        raise ValueError(f"[gemma] {key} / GEMMA_{key.upper()} must be a whole number {bounds}, not {raw!r}")
    return int(digits)


def retries() -> tuple[int, int]:
    """([gemma] retries, [gemma] retry_delay_s), checked: 0-10 retries, 1-3600 s apart."""
    return whole_number("retries", RETRIES_DEFAULT, 0, 10), whole_number("retry_delay_s", RETRY_DELAY_DEFAULT_S, 1, 3600)


SCHEDULE_DEFAULT = "@weekly"


def schedule() -> str | None:
    """[gemma] schedule: when Airflow starts a run on its own, as a cron expression or preset
    (`@weekly`, `@daily`, `0 3 * * 1`); `none`: manual and API triggers only."""
    value = setting("schedule", SCHEDULE_DEFAULT).strip()
    return None if value.lower() == "none" else value


PROMOTION_APPROVAL = ("untrusted", "always", "never")
APPROVAL_TIMEOUT_DEFAULT_H = "168"


def promotion_approval() -> str:
    """[gemma] promotion_approval: when a run that passes the gate waits for a person before it is
    promoted. `untrusted` (default): when it changed a judged config key from the DAG's configured
    value; `always`: every run; `never`: no run (one trusted user, as before approvals existed)."""
    value = setting("promotion_approval", "untrusted").strip().lower()
    if value not in PROMOTION_APPROVAL:
        raise ValueError(f"[gemma] promotion_approval / GEMMA_PROMOTION_APPROVAL must be one of "
                         f"{', '.join(PROMOTION_APPROVAL)}, not {value!r}")
    return value


def approval_timeout_h() -> int:
    """[gemma] approval_timeout_h: hours a promotion waits for a person; then it is not promoted."""
    return whole_number("approval_timeout_h", APPROVAL_TIMEOUT_DEFAULT_H, 1, 8760)


MAX_SOURCE_BYTES_DEFAULT = str(4 * 1024**3)
MAX_SOURCE_ROWS_DEFAULT = "5000000"


def source_limits() -> SourceLimits:
    """[gemma] max_source_bytes (default 4 GiB) and [gemma] max_source_rows (default 5,000,000): the
    largest dataset source a run reads (Dolly 15k: 13 MB, 15,011 rows)."""
    return SourceLimits(whole_number("max_source_bytes", MAX_SOURCE_BYTES_DEFAULT, 1),
                        whole_number("max_source_rows", MAX_SOURCE_ROWS_DEFAULT, 1))


def run_root() -> Path:
    default = Path(os.environ.get("AIRFLOW_HOME", "~/airflow")).expanduser() / "gemma_runs"
    return Path(setting("run_root", str(default))).expanduser()


def run_folder_name(run_id: str) -> str:
    """The run's folder name: the run id when it is already a plain, portable name; otherwise the
    id with every other character replaced, plus `+` and a hash of the original id. So a folder name
    is never `.` or `..`, never hidden, never the name of a shared file beside the run folders
    (RESERVED_NAMES), never holds a separator, stays under the 255-byte name limit,
    and two run ids never share a folder (a plain name has no `+`, and the hash tells changed ones
    apart)."""
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", run_id)
    if (safe == run_id and run_id and not run_id.startswith(".") and len(run_id) <= _MAX_NAME
            and run_id.lower() not in RESERVED_NAMES):
        return run_id
    digest = hashlib.sha256(run_id.encode("utf-8", "surrogatepass")).hexdigest()[:16]
    return f"{safe.lstrip('.')[:_MAX_NAME - 17]}+{digest}"


def data_roots() -> list[Path]:
    """[gemma] data_roots: the folders a `dataset_source` file may lie in (os.pathsep-separated,
    like PATH); by default the bundled data and `<run root>/data`. A deployment adds the volume its
    datasets are mounted on; the worker's own files (credentials, the Airflow home, logs) stay out."""
    default = os.pathsep.join([str(BUNDLED_DOLLY.parent), str(run_root() / "data")])
    return [Path(p).expanduser() for p in setting("data_roots", default).split(os.pathsep) if p.strip()]


def hub_datasets() -> list[str]:
    """[gemma] hub_datasets: the hub datasets a run may read (comma-separated); by default the
    configured Dolly 15k."""
    return [d.strip() for d in setting("hub_datasets", Config.dataset_hub_id).split(",") if d.strip()]


def runs_dir() -> Path:
    return run_root() / "runs"


def run_dir_for(run_id: str) -> Path:
    return runs_dir() / run_folder_name(run_id)
