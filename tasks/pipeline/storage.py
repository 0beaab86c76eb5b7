"""The run directory: each stage publishes one sub-folder atomically, its `_SUCCESS` file last.

Every folder or file the pipeline publishes (a stage's outputs, a snapshot in the store, a
checkpoint, an imported or tiny model, a JSON file) is built under one temp name beside its final
place, `.<name>.tmp-<pid>`, and published with one rename (`publishing`), so a reader (the next
stage, the report, a person) never sees half-written artifacts. Temps of killed attempts are
recognised by that name and removed (`remove_stale_temps`). The `_SUCCESS` file records the stage's
result dict and a fingerprint of its inputs; a rerun with the same fingerprint does nothing and
returns the recorded result.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import hashlib
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Iterator

log = logging.getLogger("gemma_pipeline")

SUCCESS = "_SUCCESS"
# The one temp-naming rule: `.<final name>.<kind>-<pid>`; kind "tmp" is being built, "old" is a
# published version moved aside while its replacement is renamed in.
_TEMP_KINDS = ("tmp", "old")


class PermanentError(RuntimeError):
    """An error a retry of the task would only repeat (bad input, a missing upstream stage, a full
    disk, an unusable model source): Airflow fails the task at once instead of retrying it. Bad
    configuration and bad data raise ValueErrors, which count as permanent too (NOT_RETRIED)."""


class StageInputError(PermanentError):
    """An upstream stage's outputs are missing or incomplete."""


class DiskFullError(PermanentError):
    """A publish ran out of disk space (ENOSPC, or a quota): names where, and what is left."""

    def __init__(self, message: str, cause: OSError):
        super().__init__(message)
        self.cause = cause


def _disk_full(final: Path, exc: OSError) -> DiskFullError:
    where = final.parent
    try:
        stat = shutil.disk_usage(where)
        free = f"{stat.free / 2**20:.1f} MiB free of {stat.total / 2**20:.0f} MiB"
    except OSError:
        free = "free space unknown"
    return DiskFullError(
        f"the disk is full: publishing {final} failed ({exc.strerror}: {exc.filename or where}); {free} on the "
        f"filesystem of {where}. The previously published outputs are intact and the temp folder is removed: "
        f"free some space there (or point the run root elsewhere) and retry", exc,
    )


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for block in iter(lambda: handle.read(4 * 1024 * 1024), b""):
            digest.update(block)
    return digest.hexdigest()


def file_hashes(directory: Path, exclude: tuple[str, ...] = ()) -> dict[str, dict]:
    """{relative path: {"bytes", "sha256"}} of every file under `directory` (but `exclude`d names)."""
    directory = Path(directory)
    return {
        str(p.relative_to(directory)): {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
        for p in sorted(directory.rglob("*")) if p.is_file() and p.name not in exclude
    }


def hash_problems(directory: Path, recorded: dict[str, dict]) -> list[str]:
    """What differs between the files under `directory` and their `file_hashes` record: one line per
    missing, truncated or changed file (empty when all match)."""
    problems = []
    for rel, want in sorted(recorded.items()):
        p = Path(directory) / rel
        if not p.is_file():
            problems.append(f"{p} is missing")
        elif p.stat().st_size != want["bytes"]:
            problems.append(f"{p} has {p.stat().st_size} bytes, {want['bytes']} were written")
        elif sha256_file(p) != want["sha256"]:
            problems.append(f"{p} changed since it was written (sha256 differs)")
    return problems


NOT_RETRIED = (PermanentError, ValueError)


def temp_path(final: Path, kind: str = "tmp") -> Path:
    final = Path(final)
    return final.with_name(f".{final.name}.{kind}-{os.getpid()}")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


@contextlib.contextmanager
def publishing(final: Path, *, directory: bool = True, keep_existing: Callable[[Path], bool] | None = None) -> Iterator[Path]:
    """Build `final` under its temp name, then publish it with one rename.

    Yields the temp path (an empty folder, or with directory=False a file path not yet created).
    When the block raises, the temp is removed and `final` is left as it was; a full disk (ENOSPC)
    becomes a DiskFullError that says where and how much is free. A published folder is
    replaced by moving it aside first (os.rename cannot replace a non-empty folder). With
    `keep_existing`, a `final` for which it returns True is kept and the new build dropped (another
    process finished the same work first).
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(final.parent, final.name)
    tmp = temp_path(final)
    _remove(tmp)
    if directory:
        tmp.mkdir()
    try:
        yield tmp
        if keep_existing is not None and final.exists() and keep_existing(final):
            _remove(tmp)
        elif directory and final.exists():
            old = temp_path(final, "old")
            os.rename(final, old)
            os.rename(tmp, final)
            _remove(old)
        else:
            os.replace(tmp, final)
    except OSError as exc:
        _remove(tmp)
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise _disk_full(final, exc) from exc
        raise
    except DiskFullError as exc:
        # From a file published inside this folder: name the folder (the outermost publish wins).
        _remove(tmp)
        raise _disk_full(final, exc.cause) from exc.cause
    except BaseException:
        _remove(tmp)
        raise


def write_json(path: Path, data: Any) -> None:
    """Write JSON through a temp file and a rename, so the file is whole or absent."""
    with publishing(path, directory=False) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n", encoding="utf-8")


def read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def write_jsonl(path: Path, rows: list[dict]) -> None:
    with publishing(path, directory=False) as tmp, tmp.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False, sort_keys=True) + "\n")


def read_jsonl(path: Path) -> list[dict]:
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def stage_dir(run_dir: Path, stage: str) -> Path:
    return Path(run_dir) / stage


def error_path(run_dir: Path, stage: str) -> Path:
    """Where a failed stage leaves its reason, beside its outputs (also for a pod, on the volume)."""
    return Path(run_dir) / f"{stage}.error.json"


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


def remove_stale_temps(directory: Path, name: str = "*") -> None:
    """Temps (see `temp_path`) of `name` (default: of anything) in `directory` that attempts which
    were killed left behind: never read, so remove. A live process's temps are left alone."""
    for kind in _TEMP_KINDS:
        for tmp in Path(directory).glob(f".{name if name == '*' else glob.escape(name)}.{kind}-*"):
            pid = tmp.name.rsplit("-", 1)[-1]
            if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
                log.info("removing %s left by a killed attempt", tmp)
                _remove(tmp)


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

    started = time.time()
    with publishing(final) as tmp:
        result = body(tmp)
        result = dict(result, stage_dir=str(final), seconds=round(time.time() - started, 3))
        write_json(
            tmp / SUCCESS,
            {"stage": stage, "fingerprint": inputs_fingerprint, "result": result, "finished_at": time.time()},
        )
    log.info("stage %s: published %s in %.1f s", stage, final, result["seconds"])
    return result
