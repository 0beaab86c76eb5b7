"""python -m tasks.snapshot --config cpu_demo --run-dir DIR [--set dataset_source=PATH]

Stage 1: take a snapshot of Databricks Dolly 15k, from the Hugging Face hub at a pinned revision
(through `datasets`), from a local JSONL/JSON/Parquet file, or from the sample bundled in tasks/data.
Writes `snapshot/records.jsonl` (Dolly's four fields plus a stable record id, one canonical JSON
object a line) and `snapshot/manifest.json` (source, revision, row count, sha256 of the content,
per-category counts). Offline, the hub path fails within seconds and says how to use a file instead.
"""

from __future__ import annotations

import collections
import hashlib
import json
import logging
import os
import socket
from pathlib import Path
from urllib.parse import urlparse

from tasks import storage
from tasks.cli import stage_main
from tasks.config import BUNDLED_DOLLY, Config, fingerprint

log = logging.getLogger("gemma_pipeline")

STAGE = "snapshot"
FIELDS = ("instruction", "context", "response", "category")
CATEGORIES = (
    "open_qa",
    "general_qa",
    "classification",
    "closed_qa",
    "brainstorming",
    "information_extraction",
    "summarization",
    "creative_writing",
)


class SnapshotError(RuntimeError):
    """The dataset could not be read; the message names the source, record and field."""


def record_id(rec: dict) -> str:
    """Stable across snapshots: the same text gives the same id, whatever the row order."""
    key = "\x1f".join(rec[f] for f in ("instruction", "context", "response"))
    return hashlib.sha1(key.encode("utf-8")).hexdigest()[:12]


def normalise(raw: object, where: str) -> dict:
    if not isinstance(raw, dict):
        raise SnapshotError(f"{where}: expected a JSON object, got {type(raw).__name__}")
    rec = {}
    for field in FIELDS:
        value = raw.get(field, "" if field == "context" else None)
        if value is None:
            raise SnapshotError(f"{where}: missing field '{field}'")
        if not isinstance(value, str):
            raise SnapshotError(f"{where}: field '{field}' must be a string, got {type(value).__name__}")
        rec[field] = value
    rec["id"] = record_id(rec)
    return rec


def read_local(path: Path) -> list[dict]:
    if not path.is_file():
        raise SnapshotError(f"dataset file not found: {path}")
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq  # comes with `datasets`

        rows = pq.read_table(path).to_pylist()
        return [normalise(r, f"{path} row {i + 1}") for i, r in enumerate(rows)]
    records = []
    with path.open("rb") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                raw = json.loads(line.decode("utf-8"))
            except UnicodeDecodeError as e:
                raise SnapshotError(f"{path} line {lineno}: not valid UTF-8 ({e.reason})") from e
            except json.JSONDecodeError as e:
                raise SnapshotError(f"{path} line {lineno}: malformed JSON ({e.msg})") from e
            records.append(normalise(raw, f"{path} line {lineno}"))
    return records


def hub_endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co")


def check_hub_reachable(timeout_s: float) -> None:
    """Fail in seconds, not minutes: `datasets` retries an unreachable hub for a long time."""
    hint = "set dataset_source to a local .jsonl/.parquet file (e.g. --set dataset_source=PATH) or 'bundled'"
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


def read_hub(cfg: Config) -> tuple[list[dict], str]:
    check_hub_reachable(cfg.hub_timeout_s)
    os.environ.setdefault("HF_HUB_ETAG_TIMEOUT", str(int(cfg.hub_timeout_s)))
    os.environ.setdefault("HF_HUB_DOWNLOAD_TIMEOUT", str(int(cfg.hub_timeout_s)))
    import datasets
    import huggingface_hub

    # Resolve a branch or tag to the commit it points at now, so the manifest names what was read.
    info = huggingface_hub.HfApi().dataset_info(cfg.dataset_hub_id, revision=cfg.dataset_revision)
    commit = info.sha or cfg.dataset_revision
    log.info("snapshot: downloading %s at commit %s", cfg.dataset_hub_id, commit)
    ds = datasets.load_dataset(cfg.dataset_hub_id, revision=commit, split="train")
    records = [normalise(r, f"{cfg.dataset_hub_id}@{commit} row {i + 1}") for i, r in enumerate(ds)]
    return records, commit


def content_sha256(records: list[dict]) -> str:
    h = hashlib.sha256()
    for rec in records:
        h.update(json.dumps({f: rec[f] for f in FIELDS}, sort_keys=True, ensure_ascii=False).encode("utf-8"))
        h.update(b"\n")
    return h.hexdigest()


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def source_of(cfg: Config) -> tuple[str, Path | None]:
    if cfg.dataset_source == "hub":
        return "hub", None
    if cfg.dataset_source == "bundled":
        return "bundled", BUNDLED_DOLLY
    return "file", Path(cfg.dataset_source).resolve()


def run(cfg: Config, run_dir: Path, force: bool = False) -> dict:
    kind, path = source_of(cfg)
    # A local file is identified by its bytes; a hub snapshot by the pinned revision.
    ident = file_sha256(path) if path else f"{cfg.dataset_hub_id}@{cfg.dataset_revision}"

    def body(out: Path) -> dict:
        if kind == "hub":
            records, revision = read_hub(cfg)
            source = f"hf://datasets/{cfg.dataset_hub_id}"
        else:
            log.info("snapshot: reading %s", path)
            records = read_local(path)
            revision = f"file-sha256:{ident[:16]}"
            source = str(path)
        if not records:
            raise SnapshotError(f"dataset source {source} holds no records")
        storage.write_jsonl(out / "records.jsonl", records)
        cats = collections.Counter(r["category"] for r in records)
        manifest = {
            "dataset": cfg.dataset_hub_id,
            "source_kind": kind,
            "source": source,
            "revision": revision,
            "row_count": len(records),
            "sha256": content_sha256(records),
            "category_counts": dict(sorted(cats.items())),
            "rows_with_context": sum(1 for r in records if r["context"].strip()),
        }
        storage.write_json(out / "manifest.json", manifest)
        log.info(
            "snapshot: %d records, sha256 %s, categories %s", len(records), manifest["sha256"][:16], manifest["category_counts"]
        )
        return {k: manifest[k] for k in ("source", "revision", "row_count", "sha256")}

    return storage.run_stage(run_dir, STAGE, fingerprint(STAGE, kind, ident), body, force)


def main(argv=None) -> dict:
    return stage_main(STAGE, __doc__, run, argv)


if __name__ == "__main__":
    main()
