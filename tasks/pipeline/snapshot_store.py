"""The snapshot store: one folder per dataset beside the run folders, shared by every run.

    <run root>/runs/snapshots/<dataset slug>/
        LATEST.json            the latest snapshot: id, sha256, what changed vs the one before, which run
        <sha256[:16]>/         one published snapshot: records.jsonl, manifest.json, _SUCCESS (last)

A snapshot folder is named by its content, so content seen before (A -> B -> A) reuses its folder.
A run publishes under a file lock, LATEST.json last; a damaged or unfinished folder is never reused.
"""

from __future__ import annotations

import collections
import contextlib
import fcntl
import hashlib
import json
import logging
import re
import shutil
import time
from pathlib import Path

from tasks.pipeline import artifacts, storage
from tasks.text import records as records_lib

log = logging.getLogger("gemma_pipeline")

CHANGE_EXAMPLES = 5  # example ids per kind of change vs the previous snapshot
REF_MARK = re.compile(r"\[(?:\d+|[a-z])\]")


def content_sha256(records: list[dict]) -> str:
    h = hashlib.sha256()
    for rec in records:
        h.update(json.dumps(records_lib.content(rec), sort_keys=True, ensure_ascii=False).encode("utf-8"))
        h.update(b"\n")
    return h.hexdigest()




@contextlib.contextmanager
def store_lock(store: Path):
    """Two runs snapshotting at once must not both decide they are the first to see new content."""
    store.mkdir(parents=True, exist_ok=True)
    with (store / ".lock").open("a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def change_key(rec: dict) -> str:
    """What makes a removed and an added record "the same record, changed": the same (first) instruction,
    ignoring whitespace and Wikipedia reference marks such as [16] or [a] (Dolly's May 2023 revision
    removed those marks, from 5 instructions too). The category is not part of the key: that
    revision also moved 128 records to open_qa when it dropped their context."""
    return " ".join(REF_MARK.sub("", records_lib.turns(rec)[0]["content"]).split())


def diff(previous: list[dict], current: list[dict]) -> dict:
    """Rows added, removed and changed between two snapshots, with a few example ids.

    Ids are content hashes of instruction, context and response, so an edited record appears as one
    id removed and one id added; pairing those by `change_key` counts it once, as changed. A record
    whose category alone changed keeps its id and counts as changed too.
    """
    before = {r["id"]: r for r in previous}
    after = {r["id"]: r for r in current}
    removed = [i for i in before if i not in after]
    added = [i for i in after if i not in before]
    changed = [(i, i) for i in after if i in before and after[i]["category"] != before[i]["category"]]
    candidates = collections.defaultdict(list)
    for i in removed:
        candidates[change_key(before[i])].append(i)
    for i in added:
        olds = candidates.get(change_key(after[i]))
        if olds:
            changed.append((olds.pop(0), i))
    paired_old, paired_new = {a for a, _ in changed}, {b for _, b in changed}
    removed = [i for i in removed if i not in paired_old]
    added = [i for i in added if i not in paired_new]
    return {
        "rows_added": len(added),
        "rows_removed": len(removed),
        "rows_changed": len(changed),
        "examples": {
            "added": added[:CHANGE_EXAMPLES],
            "removed": removed[:CHANGE_EXAMPLES],
            "changed": [{"from": a, "to": b} for a, b in changed[:CHANGE_EXAMPLES]],
        },
    }


def store_problem(folder: Path, sha: str) -> str | None:
    """Why the store's snapshot `folder` (content sha256 `sha`) cannot be used, or None: unfinished,
    or its records.jsonl no longer what was published (a truncated or edited file is never reused)."""
    done = folder / storage.SUCCESS
    if not done.is_file():
        return "it was never finished"
    try:
        recorded = storage.read_json(done)
        records_file = folder / artifacts.RECORDS
        if "records_sha256" in recorded:
            ok = storage.sha256_file(records_file) == recorded["records_sha256"]
        else:  # published before the file's own hash was recorded
            ok = content_sha256(storage.read_jsonl(records_file)) == sha
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"it cannot be read ({type(exc).__name__}: {exc})"
    return None if ok else f"its {artifacts.RECORDS} no longer matches the sha256 recorded when it was published"


def publish_snapshot(target: Path, records_file: Path, manifest: dict, run: str) -> None:
    with storage.publishing(target) as tmp:
        shutil.copyfile(records_file, tmp / artifacts.RECORDS)
        storage.write_json(tmp / artifacts.MANIFEST, {**manifest, "published_by_run": run})
        storage.write_json(tmp / storage.SUCCESS, {"sha256": manifest["sha256"], "finished_at": time.time(),
                                                   "records_sha256": storage.sha256_file(tmp / artifacts.RECORDS)})


def refresh_store(store: Path, records_file: Path, records: list[dict], manifest: dict, run_dir: Path) -> dict:
    """Reuse the latest snapshot when the content is the same; else publish a new one and point
    LATEST.json at it. Returns what the run's manifest says about it."""
    run = str(Path(run_dir).resolve())
    sha = manifest["sha256"]
    with store_lock(store):
        storage.remove_stale_temps(store)
        latest_file = store / artifacts.STORE_LATEST
        latest = storage.read_json(latest_file) if latest_file.is_file() else None
        problem = store_problem(store / latest["snapshot_id"], latest["sha256"]) if latest else None
        if problem:
            log.warning("snapshot: the store's latest snapshot %s is not reused: %s; publishing this content anew",
                        latest["snapshot_id"], problem)
        if latest and latest["sha256"] == sha:
            if problem:
                # Same content as the latest: republish the damaged folder, the content did not change.
                publish_snapshot(store / latest["snapshot_id"], records_file, manifest, run)
            if latest["updated_by_run"] == run:
                # This run published it and then died before its own stage was published: a retry
                # must still report "changed", or the Asset event would be lost.
                log.info("snapshot: %s was published by an earlier attempt of this run", latest["snapshot_id"])
                return {**{k: latest[k] for k in ("snapshot_id", "previous_snapshot_id", "changes")}, "changed": True}
            log.info("snapshot: content unchanged (sha256 %s): reusing snapshot %s", sha[:16], latest["snapshot_id"])
            return {
                "changed": False,
                "snapshot_id": latest["snapshot_id"],
                "previous_snapshot_id": latest["snapshot_id"],
                "changes": {"rows_added": 0, "rows_removed": 0, "rows_changed": 0, "examples": {}},
            }
        snapshot_id = sha[:16]
        previous_id = latest["snapshot_id"] if latest else None
        if previous_id and problem:
            # Pruned or damaged: nothing trustworthy to compare with, so count this one as the first.
            log.warning("snapshot: previous snapshot %s in %s is unusable (%s); not comparing", previous_id, store, problem)
            previous_id = None
        previous = storage.read_jsonl(store / previous_id / artifacts.RECORDS) if previous_id else []
        changes = diff(previous, records)
        target = store / snapshot_id
        # Content published before (A -> B -> A) is reused only while intact; an unfinished or damaged
        # folder there is replaced whole.
        damaged = store_problem(target, sha)
        if damaged:
            if target.exists():
                log.warning("snapshot: replacing %s in the store: %s", target, damaged)
            publish_snapshot(target, records_file, manifest, run)
        # LATEST.json last, replaced in one rename: readers see the old or the new pointer, whole.
        storage.write_json(
            latest_file,
            {
                "snapshot_id": snapshot_id,
                "sha256": sha,
                "row_count": manifest["row_count"],
                "previous_snapshot_id": previous_id,
                "changes": changes,
                "updated_by_run": run,
                "updated_at": time.time(),
            },
        )
        log.info(
            "snapshot: published %s (previous %s): %d rows added, %d removed, %d changed",
            target, previous_id, changes["rows_added"], changes["rows_removed"], changes["rows_changed"],
        )
        return {"changed": True, "snapshot_id": snapshot_id, "previous_snapshot_id": previous_id, "changes": changes}
