"""The run directory: each stage publishes one sub-folder atomically, its `_SUCCESS` file last.

A stage builds its outputs in a hidden temp folder beside the final one and publishes them with one
rename, so a reader (the next stage, the report, a person) never sees half-written artifacts. The
`_SUCCESS` file records the stage's result dict and a fingerprint of its inputs; a rerun with the same
fingerprint does nothing and returns the recorded result.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable

log = logging.getLogger("gemma_pipeline")

SUCCESS = "_SUCCESS"


class StageInputError(RuntimeError):
    """An upstream stage's outputs are missing or incomplete."""


def write_json(path: Path, data: Any) -> None:
    """Write JSON through a temp file and a rename, so the file is whole or absent."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def write_jsonl(path: Path, rows: list[dict]) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with tmp.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False, sort_keys=True) + "\n")
    os.replace(tmp, path)


def read_jsonl(path: Path) -> list[dict]:
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def stage_dir(run_dir: Path, stage: str) -> Path:
    return Path(run_dir) / stage


def completed(run_dir: Path, stage: str) -> dict | None:
    """The `_SUCCESS` record of a published stage, or None."""
    marker = stage_dir(run_dir, stage) / SUCCESS
    return read_json(marker) if marker.is_file() else None


def require(run_dir: Path, stage: str, needed_by: str) -> dict:
    """The `_SUCCESS` record of an upstream stage; a clear error when it has not run."""
    done = completed(run_dir, stage)
    if done is None:
        raise StageInputError(
            f"stage '{needed_by}' needs the outputs of stage '{stage}' in {stage_dir(run_dir, stage)}, "
            f"but that stage has not completed there: run `python -m tasks.{stage}` first"
        )
    return done


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temps(directory: Path, pattern: str) -> None:
    """Temp folders (named `...-<pid>`) of attempts that were killed: never read, so remove."""
    for tmp in Path(directory).glob(pattern):
        pid = tmp.name.rsplit("-", 1)[-1]
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            log.info("removing %s left by a killed attempt", tmp)
            shutil.rmtree(tmp, ignore_errors=True)


def run_stage(
    run_dir: Path,
    stage: str,
    inputs_fingerprint: str,
    body: Callable[[Path], dict],
    force: bool = False,
) -> dict:
    """Run `body(tmp_dir) -> result` and publish tmp_dir as run_dir/stage, unless already done."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    final = stage_dir(run_dir, stage)
    done = completed(run_dir, stage)
    if done and done.get("fingerprint") == inputs_fingerprint and not force:
        log.info("stage %s: outputs in %s are complete and inputs unchanged; nothing to do", stage, final)
        return done["result"]

    remove_stale_temps(run_dir, f".{stage}.*-*")
    tmp = run_dir / f".{stage}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    started = time.time()
    try:
        result = body(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    result = dict(result, stage_dir=str(final), seconds=round(time.time() - started, 3))
    write_json(
        tmp / SUCCESS,
        {"stage": stage, "fingerprint": inputs_fingerprint, "result": result, "finished_at": time.time()},
    )
    if final.exists():
        # Move the old outputs aside first: os.rename cannot replace a non-empty folder.
        old = run_dir / f".{stage}.old-{os.getpid()}"
        os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, final)
    log.info("stage %s: published %s in %.1f s", stage, final, result["seconds"])
    return result
