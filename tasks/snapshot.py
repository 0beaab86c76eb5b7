"""python -m tasks.snapshot --config cpu_demo --run-dir DIR [--set dataset_source=PATH]

Stage 1: take a snapshot of the dataset (Databricks Dolly 15k by default), from the Hugging Face hub
at a pinned revision and split (through `datasets`), from a local .jsonl/.json/.parquet/.csv file,
or from the Dolly sample bundled in tasks/data. Runs the preflight checks first. Reads the records in
their `dataset_format` (dolly, alpaca, messages, columns, or auto) and normalizes each to the one
record shape of tasks.text.records (a conversation, a context and a category), validating every record
(bad_record_policy: skip and count, or fail on the first bad one). Writes `snapshot/records.jsonl`
(one canonical JSON object a line, with a stable record id) and `snapshot/manifest.json` (source,
revision, format, row count, sha256 of the content, per-category counts, multi-turn and context
counts, bad records by reason, preflight result, and whether the
content changed since the dataset's latest snapshot in the shared store, with rows added, removed
and changed). Offline, the hub path fails within seconds and says how to use a file instead.
"""

from __future__ import annotations

import collections
import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import time
from pathlib import Path
from typing import Iterable, Iterator
from urllib.parse import urlparse

from tasks.text import records as records_lib
from tasks.pipeline import artifacts, storage
from tasks.modeling import preflight
from tasks.pipeline.artifacts import SNAPSHOT as STAGE
from tasks.infra.cli import stage_main
from tasks.pipeline.config import BUNDLED_DOLLY, Config, fingerprint, stage_keys
from tasks.text.records import DOLLY_CATEGORIES as CATEGORIES, BadRecord, FormatError

log = logging.getLogger("gemma_pipeline")

# Config keys that change what the snapshot reads or keeps, so a change redoes it.
CONFIG_KEYS = stage_keys(STAGE)
MAX_BAD_EXAMPLES = 10  # bad records listed in the manifest (where and why, never their text)
CHANGE_EXAMPLES = 5  # example ids per kind of change vs the previous snapshot
REF_MARK = re.compile(r"\[(?:\d+|[a-z])\]")


class SnapshotError(storage.PermanentError):
    """The dataset could not be read; the message names the source, record and field."""


def jsonl_rows(path: Path, max_bytes: int) -> Iterator[tuple[str, object]]:
    """(where, parsed object or BadRecord) for each non-blank line."""
    with path.open("rb") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue  # a blank line (e.g. a trailing newline) is not a record
            yield f"line {lineno}", parse_line(line, max_bytes)


def parse_line(line: bytes, max_bytes: int) -> object:
    size = len(line.rstrip(b"\r\n"))
    if size > max_bytes:
        return BadRecord("too_large", f"{size:,} bytes, more than max_record_bytes ({max_bytes:,})")
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as e:
        return BadRecord("invalid_utf8", f"not valid UTF-8 ({e.reason} at byte {e.start})")
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        return BadRecord("malformed_json", f"malformed JSON ({e.msg} at column {e.colno})")


def object_rows(rows: Iterable[object], max_bytes: int) -> Iterator[tuple[str, object]]:
    """(where, row or BadRecord) for rows that arrive parsed (Parquet, the hub); size = as JSON."""
    for i, raw in enumerate(rows, start=1):
        size = len(json.dumps(raw, ensure_ascii=False, default=str).encode("utf-8", "surrogatepass"))
        if size > max_bytes:
            raw = BadRecord("too_large", f"{size:,} bytes as JSON, more than max_record_bytes ({max_bytes:,})")
        yield f"row {i}", raw


def collect(rows: Iterable[tuple[str, object]], source: str, cfg: Config,
            columns: list[str] | None = None) -> tuple[list[dict], dict]:
    """Normalize and validate every record under `bad_record_policy`; the good records (the shape of
    tasks.text.records) and a validation summary, which names the format (and says when `auto` chose it).

    `columns` are the source's columns where it has a schema (Parquet, CSV, the hub); for JSON the
    first record's fields stand in. A `dataset_columns` mapping is checked against them before any
    record is read. Duplicates (the same id) are bad records here, and so are empty instructions,
    responses and turns: the snapshot is the one place that counts them, each under one reason.
    """
    records: list[dict] = []
    first_seen: dict[str, str] = {}
    bad: collections.Counter = collections.Counter()
    styles: collections.Counter = collections.Counter()
    examples: list[dict] = []
    rows_read = 0
    fmt, norm = cfg.dataset_format, None
    for where, raw in rows:
        rows_read += 1
        if norm is None and isinstance(raw, dict):
            try:
                fmt = records_lib.detect(raw) if cfg.dataset_format == "auto" else cfg.dataset_format
                if fmt == "columns":
                    records_lib.check_columns(cfg.dataset_columns, columns if columns is not None else list(raw), source)
            except records_lib.FormatError as e:
                raise SnapshotError(f"{source} {where}: {e}" if cfg.dataset_format == "auto" else str(e)) from None
            if cfg.dataset_format == "auto":
                log.info("snapshot: dataset_format auto: %s %s looks like %r", source, where, fmt)
            norm = records_lib.normalizer(fmt, cfg.dataset_columns)
        try:
            if isinstance(raw, BadRecord):
                raise raw
            if not isinstance(raw, dict):
                raise BadRecord("wrong_type", f"expected a JSON object, got {type(raw).__name__}")
            rec = norm(raw)
            if rec["id"] in first_seen:
                raise BadRecord("duplicate", f"same instruction, context and response as {first_seen[rec['id']]}")
        except BadRecord as e:
            if cfg.bad_record_policy == "fail":
                raise SnapshotError(
                    f"{source} {where}: {e.detail} [{e.reason}] (dataset_format {fmt}; bad_record_policy=fail stops at "
                    "the first bad record; 'skip' drops and counts them)"
                ) from None
            bad[e.reason] += 1
            if len(examples) < MAX_BAD_EXAMPLES:
                examples.append({"where": where, "reason": e.reason, "detail": e.detail})
            continue
        if fmt == "messages":
            styles[records_lib.chat_style(raw)] += 1
        first_seen[rec["id"]] = where
        records.append(rec)
    n_bad = sum(bad.values())
    share = n_bad / rows_read if rows_read else 0.0
    summary = {
        "format": fmt,
        "format_detected": cfg.dataset_format == "auto",
        "chat_styles": dict(sorted(styles.items())),
        "policy": cfg.bad_record_policy,
        "max_bad_share": cfg.max_bad_share,
        "max_record_bytes": cfg.max_record_bytes,
        "rows_read": rows_read,
        "rows_bad": n_bad,
        "bad_share": round(share, 6),
        "bad_by_reason": dict(sorted(bad.items())),
        "bad_examples": examples,
    }
    if share > cfg.max_bad_share:
        counts = ", ".join(f"{reason} {n}" for reason, n in bad.most_common())
        first = "; ".join(f"{x['where']}: {x['detail']} [{x['reason']}]" for x in examples[:3])
        raise SnapshotError(
            f"{source}: {n_bad} of {rows_read} records are bad ({share:.1%}), more than max_bad_share "
            f"({cfg.max_bad_share:.1%}), read as dataset_format {fmt}. By reason: {counts}. First: {first}. Fix the source "
            "(or dataset_format), or raise max_bad_share if skipping them is right"
        )
    if n_bad:
        log.warning("snapshot: skipped %d bad records of %d (%.2f%%): %s", n_bad, rows_read, 100 * share, summary["bad_by_reason"])
    return records, summary


LOCAL_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")


def read_local(path: Path, cfg: Config) -> tuple[list[dict], dict]:
    """A local file by its suffix: JSON lines (.jsonl, and .json unless it holds one JSON array, as
    `datasets`' to_json writes lines), Parquet or CSV (every cell text; a chat list as JSON text)."""
    if not path.is_file():
        raise SnapshotError(f"dataset file not found: {path}")
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        import pyarrow.parquet as pq  # comes with `datasets`

        try:
            table = pq.read_table(path)
        except Exception as e:  # pyarrow raises several types for a broken file
            raise SnapshotError(f"{path}: not a readable Parquet file ({e})") from e
        return collect(object_rows(table.to_pylist(), cfg.max_record_bytes), str(path), cfg, table.column_names)
    if suffix == ".csv":
        import csv

        try:
            with path.open(encoding="utf-8", newline="") as f:
                reader = csv.DictReader(f)
                rows = list(reader)
                columns = list(reader.fieldnames or [])
        except (UnicodeDecodeError, csv.Error) as e:
            raise SnapshotError(f"{path}: not a readable UTF-8 CSV file ({e})") from e
        return collect(object_rows(rows, cfg.max_record_bytes), str(path), cfg, columns)
    if suffix == ".json" and _starts_with(path, b"["):
        try:
            rows = json.loads(path.read_bytes().decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise SnapshotError(f"{path}: a JSON array that does not parse ({e}); JSON lines are read too") from e
        return collect(object_rows(rows, cfg.max_record_bytes), str(path), cfg)
    return collect(jsonl_rows(path, cfg.max_record_bytes), str(path), cfg)


def _starts_with(path: Path, prefix: bytes) -> bool:
    with path.open("rb") as f:
        head = f.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
    return head.startswith(prefix)


def hub_endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co")


def check_hub_reachable(timeout_s: float) -> None:
    """Fail in seconds, not minutes: `datasets` retries an unreachable hub for a long time."""
    hint = "set dataset_source to a local .jsonl/.json/.parquet/.csv file (e.g. --set dataset_source=PATH) or 'bundled'"
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes") or os.environ.get(
        "HF_DATASETS_OFFLINE", ""
    ).lower() in ("1", "true", "yes"):
        raise SnapshotError(f"the Hugging Face hub is switched off here (HF_HUB_OFFLINE/HF_DATASETS_OFFLINE); {hint}")
    url = urlparse(hub_endpoint())
    host, port = url.hostname or "huggingface.co", url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((host, port), timeout=min(timeout_s, 10)).close()
    except OSError as e:
        raise SnapshotError(f"the Hugging Face hub at {host}:{port} is unreachable ({e}); {hint}") from e


def read_hub(cfg: Config) -> tuple[list[dict], dict, str]:
    check_hub_reachable(cfg.hub_timeout_s)
    os.environ.setdefault("HF_HUB_ETAG_TIMEOUT", str(int(cfg.hub_timeout_s)))
    os.environ.setdefault("HF_HUB_DOWNLOAD_TIMEOUT", str(int(cfg.hub_timeout_s)))
    import datasets
    import huggingface_hub

    # Resolve a branch or tag to the commit it points at now, so the manifest names what was read.
    info = huggingface_hub.HfApi().dataset_info(cfg.dataset_hub_id, revision=cfg.dataset_revision)
    commit = info.sha or cfg.dataset_revision
    log.info("snapshot: downloading %s at commit %s", cfg.dataset_hub_id, commit)
    ds = datasets.load_dataset(cfg.dataset_hub_id, revision=commit, split=cfg.dataset_split)
    records, validation = collect(object_rows(ds, cfg.max_record_bytes), f"{cfg.dataset_hub_id}@{commit}:{cfg.dataset_split}",
                                  cfg, list(ds.column_names))
    return records, validation, commit


def content_sha256(records: list[dict]) -> str:
    h = hashlib.sha256()
    for rec in records:
        h.update(json.dumps(records_lib.content(rec), sort_keys=True, ensure_ascii=False).encode("utf-8"))
        h.update(b"\n")
    return h.hexdigest()




def source_of(cfg: Config) -> tuple[str, Path | None]:
    if cfg.dataset_source == "hub":
        return "hub", None
    if cfg.dataset_source == "bundled":
        return "bundled", BUNDLED_DOLLY
    return "file", Path(cfg.dataset_source).resolve()


# -- the snapshot store: one folder per dataset beside the run folders, shared by all runs ----------
#
# <run root>/runs/snapshots/<dataset slug>/
#     LATEST.json            the latest snapshot: id, sha256, what changed vs the one before, which run
#     <sha256[:16]>/         one published snapshot: records.jsonl, manifest.json, _SUCCESS (last)
#
# A snapshot folder is named by its content, so content seen before (A -> B -> A) reuses its folder.


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


def run(cfg: Config, run_dir: Path, force: bool = False) -> dict:
    # Seconds-long checks first (model source, Kaggle credentials, prompt suite, sequence length):
    # a run that cannot finish stops here, before any reading and before any GPU pod is requested.
    # They run on every attempt, also when the snapshot itself is already done.
    checked = preflight.check(cfg)
    kind, path = source_of(cfg)
    # A local file is identified by its bytes; a hub snapshot by the pinned revision.
    ident = storage.sha256_file(path) if path else f"{cfg.dataset_hub_id}@{cfg.dataset_revision}"
    store = artifacts.snapshot_store(run_dir, cfg.dataset_hub_id)

    def body(out: Path) -> dict:
        if kind == "hub":
            records, validation, revision = read_hub(cfg)
            source = f"hf://datasets/{cfg.dataset_hub_id}"
        else:
            log.info("snapshot: reading %s", path)
            records, validation = read_local(path, cfg)
            revision = f"file-sha256:{ident[:16]}"
            source = str(path)
        if not records:
            raise SnapshotError(f"dataset source {source} holds no usable records ({validation['bad_by_reason']})")
        storage.write_jsonl(out / artifacts.RECORDS, records)
        cats = collections.Counter(r["category"] for r in records if r["category"])
        manifest = {
            "dataset": cfg.dataset_hub_id,
            "source_kind": kind,
            "source": source,
            "revision": revision,
            "row_count": len(records),
            "sha256": content_sha256(records),
            "dataset_format": validation["format"],
            "format_detected": validation["format_detected"],
            "chat_styles": validation["chat_styles"],
            "category_counts": dict(sorted(cats.items())),
            "rows_with_context": sum(1 for r in records if r["context"].strip()),
            "rows_multi_turn": sum(1 for r in records if len(records_lib.turns(r)) > 2),
            "rows_with_system": sum(1 for r in records if records_lib.system(r)),
            "validation": validation,
            "preflight": checked,
        }
        # The store last: everything before can fail without touching what other runs read.
        manifest.update(refresh_store(store, out / artifacts.RECORDS, records, manifest, run_dir), store=str(store))
        storage.write_json(out / artifacts.MANIFEST, manifest)
        log.info(
            "snapshot: %d records, sha256 %s, categories %s", len(records), manifest["sha256"][:16], manifest["category_counts"]
        )
        result = {k: manifest[k] for k in ("dataset", "source", "revision", "row_count", "sha256", "changed", "snapshot_id")}
        return dict(result, rows_bad=validation["rows_bad"], **{k: v for k, v in manifest["changes"].items() if k != "examples"})

    fp = fingerprint(STAGE, kind, ident, cfg.subset(CONFIG_KEYS))
    return storage.run_stage(run_dir, STAGE, fp, body, force)


def main(argv=None) -> dict:
    return stage_main(STAGE, __doc__, run, argv)


if __name__ == "__main__":
    main()
