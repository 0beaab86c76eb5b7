"""Reading a dataset source into records: a local .jsonl/.json/.parquet/.csv file or the Hugging
Face hub (through `datasets`, at a pinned revision), each row normalized by tasks.text.records and
validated one by one (bad_record_policy: skip and count, or fail on the first bad one, naming its
line or row and field). What the `snapshot` stage reads; the shared store is
tasks.pipeline.snapshot_store.
"""

from __future__ import annotations

import collections
import contextlib
import io
import json
import logging
import os
import socket
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterable, Iterator
from urllib.parse import urlparse

from tasks.pipeline import storage
from tasks.pipeline.config import BUNDLED_DOLLY, Config
from tasks.text import records as records_lib
from tasks.text.records import BadRecord

log = logging.getLogger("gemma_pipeline")

MAX_BAD_EXAMPLES = 10  # bad records listed in the manifest (where and why, never their text)


class SnapshotError(storage.PermanentError):
    """The dataset could not be read; the message names the source, record and field."""


@dataclass(frozen=True)
class SourceLimits:
    """The most a source may hold, checked before it is read where its size is known ahead (a file's
    bytes, a Parquet file's or a hub split's rows) and while it is read otherwise. Deployment
    settings (`[gemma] max_source_bytes`, `max_source_rows`), not Params: whoever triggers a run
    cannot raise them."""
    max_bytes: int
    max_rows: int

    def too_many_rows(self, source: str, rows: int) -> SnapshotError:
        return SnapshotError(f"{source}: more than {self.max_rows:,} records ({rows:,} or more), the most a source may "
                             "hold ([gemma] max_source_rows / GEMMA_MAX_SOURCE_ROWS); use a smaller file or have the "
                             "deployment raise the limit")


def jsonl_rows(f: BinaryIO, max_bytes: int) -> Iterator[tuple[str, object]]:
    """(where, parsed object or BadRecord) for each non-blank line of an open binary file. A line is
    read up to max_bytes (+ its line end) at a time: a longer one is a bad record whose rest is
    skipped unread, so no line takes more memory than a good record could."""
    lineno = 0
    while line := f.readline(max_bytes + 2):
        lineno += 1
        if len(line) == max_bytes + 2 and not line.endswith(b"\n"):
            size = len(line)
            while (rest := f.readline(1 << 20)) and not rest.endswith(b"\n"):
                size += len(rest)
            size += len(rest.rstrip(b"\r\n"))
            yield f"line {lineno}", BadRecord("too_large", f"{size:,} bytes, more than max_record_bytes ({max_bytes:,})")
            continue
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
    except RecursionError:
        # A short line of nested brackets exhausts the parser's recursion: one bad record, not a
        # crash that Airflow would retry.
        return BadRecord("too_deep", "JSON nested deeper than the parser's recursion limit")


def object_rows(rows: Iterable[object], max_bytes: int) -> Iterator[tuple[str, object]]:
    """(where, row or BadRecord) for rows that arrive parsed (Parquet, the hub); size = as JSON."""
    for i, raw in enumerate(rows, start=1):
        size = len(json.dumps(raw, ensure_ascii=False, default=str).encode("utf-8", "surrogatepass"))
        if size > max_bytes:
            raw = BadRecord("too_large", f"{size:,} bytes as JSON, more than max_record_bytes ({max_bytes:,})")
        yield f"row {i}", raw


def collect(rows: Iterable[tuple[str, object]], source: str, cfg: Config, columns: list[str] | None = None,
            limits: SourceLimits | None = None) -> tuple[list[dict], dict]:
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
        if limits and rows_read > limits.max_rows:
            raise limits.too_many_rows(source, rows_read)
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


SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")


def check_file(given: Path, roots: list[Path], limits: SourceLimits) -> tuple[Path, os.stat_result]:
    """The dataset file `given` (as the setting names it), resolved (symlinks followed), checked
    before a byte of it is read: a supported suffix, inside one of `roots`, a regular file, no larger
    than `limits.max_bytes`. Returns
    the resolved path and its stat, which the file later opened must still match. The errors name
    the setting and the value, never anything read from the file."""
    resolved = Path(os.path.realpath(given))
    if resolved.suffix.lower() not in SUFFIXES:
        raise SnapshotError(f"dataset_source {str(given)!r}: a '{resolved.suffix or '(no suffix)'}' file is not read; "
                            f"the formats are {', '.join(SUFFIXES)}")
    if not any(resolved.is_relative_to(os.path.realpath(root)) for root in roots):
        raise SnapshotError(f"dataset_source {str(given)!r} is outside the data roots ([gemma] data_roots / "
                            f"GEMMA_DATA_ROOTS: {os.pathsep.join(str(r) for r in roots)}): put the file in one of "
                            "them, or have the deployment add its folder")
    try:
        st = os.stat(resolved)
    except OSError:
        raise SnapshotError(f"dataset file not found: {given}") from None
    if not stat.S_ISREG(st.st_mode):
        raise SnapshotError(f"dataset_source {str(given)!r} is not a regular file")
    if st.st_size > limits.max_bytes:
        raise SnapshotError(f"dataset_source {str(given)!r} is {st.st_size:,} bytes, more than {limits.max_bytes:,}, the "
                            "largest source read ([gemma] max_source_bytes / GEMMA_MAX_SOURCE_BYTES)")
    return resolved, st


@contextlib.contextmanager
def open_checked(path: Path, checked: os.stat_result) -> Iterator[BinaryIO]:
    """The checked file itself: opened without following a symlink swapped in since the check, and
    refused when what is open is another file than the one checked."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError as e:
        raise SnapshotError(f"dataset file {path} could not be opened as the file checked ({e.strerror})") from None
    with os.fdopen(fd, "rb") as f:
        now = os.fstat(fd)
        if (now.st_dev, now.st_ino) != (checked.st_dev, checked.st_ino):
            raise SnapshotError(f"dataset file {path} changed between its check and its reading; not read")
        yield f


def read_local(path: Path, cfg: Config, checked: os.stat_result, limits: SourceLimits) -> tuple[list[dict], dict]:
    """A local file checked by `check_file`, by its suffix: JSON lines (.jsonl, and .json unless it
    holds one JSON array, as `datasets`' to_json writes lines), Parquet or CSV (every cell text; a
    chat list as JSON text). Read as a stream (lines, Parquet batches, CSV rows): only a JSON array
    is parsed whole, and check_file has bounded its size."""
    suffix = path.suffix.lower()
    source, size = str(path), cfg.max_record_bytes
    with open_checked(path, checked) as f:
        if suffix == ".parquet":
            import pyarrow.parquet as pq  # comes with `datasets`

            try:
                pf = pq.ParquetFile(f)
            except Exception as e:  # pyarrow raises several types for a broken file
                raise SnapshotError(f"{path}: not a readable Parquet file ({e})") from e
            if pf.metadata.num_rows > limits.max_rows:
                raise limits.too_many_rows(source, pf.metadata.num_rows)
            return collect(object_rows(parquet_rows(pf, path), size), source, cfg, pf.schema_arrow.names, limits)
        if suffix == ".csv":
            import csv

            reader = csv.DictReader(io.TextIOWrapper(f, encoding="utf-8", newline=""))
            try:
                columns = list(reader.fieldnames or [])
            except (UnicodeDecodeError, csv.Error) as e:
                raise SnapshotError(f"{path}: not a readable UTF-8 CSV file ({e})") from e
            return collect(object_rows(csv_rows(reader, path), size), source, cfg, columns, limits)
        if suffix == ".json" and _starts_with(f, b"["):
            try:
                rows = json.loads(f.read().decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
                raise SnapshotError(f"{path}: a JSON array that does not parse ({type(e).__name__}); JSON lines are "
                                    "read too") from None
            return collect(object_rows(rows, size), source, cfg, None, limits)
        return collect(jsonl_rows(f, size), source, cfg, None, limits)


def parquet_rows(pf, path: Path, batch_rows: int = 1024) -> Iterator[dict]:
    try:
        for batch in pf.iter_batches(batch_size=batch_rows):
            yield from batch.to_pylist()
    except OSError as e:
        raise SnapshotError(f"{path}: not a readable Parquet file ({e})") from e


def csv_rows(reader, path: Path) -> Iterator[dict]:
    import csv

    try:
        yield from reader
    except (UnicodeDecodeError, csv.Error) as e:
        raise SnapshotError(f"{path}: not a readable UTF-8 CSV file ({e})") from e


def _starts_with(f: BinaryIO, prefix: bytes) -> bool:
    head = f.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
    f.seek(0)
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


def read_hub(cfg: Config, limits: SourceLimits) -> tuple[list[dict], dict, str]:
    check_hub_reachable(cfg.hub_timeout_s)
    os.environ.setdefault("HF_HUB_ETAG_TIMEOUT", str(int(cfg.hub_timeout_s)))
    os.environ.setdefault("HF_HUB_DOWNLOAD_TIMEOUT", str(int(cfg.hub_timeout_s)))
    import datasets
    import huggingface_hub

    # Resolve a branch or tag to the commit it points at now, so the manifest names what was read.
    info = huggingface_hub.HfApi().dataset_info(cfg.dataset_hub_id, revision=cfg.dataset_revision, files_metadata=True)
    commit = info.sha or cfg.dataset_revision
    # The repository's files as the hub lists them: a bound on the download, before it starts.
    total = sum(f.size or 0 for f in info.siblings or [])
    if total > limits.max_bytes:
        raise SnapshotError(f"{cfg.dataset_hub_id}@{commit}: its files are {total:,} bytes, more than {limits.max_bytes:,}, "
                            "the largest source read ([gemma] max_source_bytes / GEMMA_MAX_SOURCE_BYTES)")
    log.info("snapshot: downloading %s at commit %s", cfg.dataset_hub_id, commit)
    ds = datasets.load_dataset(cfg.dataset_hub_id, revision=commit, split=cfg.dataset_split)
    source = f"{cfg.dataset_hub_id}@{commit}:{cfg.dataset_split}"
    if ds.num_rows > limits.max_rows:
        raise limits.too_many_rows(source, ds.num_rows)
    records, validation = collect(object_rows(ds, cfg.max_record_bytes), source, cfg, list(ds.column_names), limits)
    return records, validation, commit


def source_of(cfg: Config) -> tuple[str, Path | None]:
    if cfg.dataset_source == "hub":
        return "hub", None
    if cfg.dataset_source == "bundled":
        return "bundled", BUNDLED_DOLLY
    return "file", Path(cfg.dataset_source).resolve()
