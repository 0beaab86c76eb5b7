"""python -m tasks.snapshot --config cpu_demo --run-dir DIR [--set dataset_source=PATH]

Stage 1 of 8: take a snapshot of the dataset (Databricks Dolly 15k by default), from the Hugging Face hub
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
import logging
import os
from pathlib import Path

from tasks.infra.cli import stage_main
from tasks.infra.settings import data_roots, hub_datasets, source_limits
from tasks.modeling import preflight
from tasks.pipeline import artifacts, sources, storage
from tasks.pipeline.artifacts import SNAPSHOT as STAGE
from tasks.pipeline.config import Config, fingerprint, stage_keys
from tasks.pipeline.snapshot_store import content_sha256, refresh_store
from tasks.pipeline.sources import SnapshotError
from tasks.text import records as records_lib

log = logging.getLogger("gemma_pipeline")

# Config keys that change what the snapshot reads or keeps, so a change redoes it.
CONFIG_KEYS = stage_keys(STAGE)


def run(cfg: Config, run_dir: Path, force: bool = False) -> dict:
    # Seconds-long checks first (model source, Kaggle credentials, prompt suite, sequence length):
    # a run that cannot finish stops here, before any reading and before any GPU pod is requested.
    # They run on every attempt, also when the snapshot itself is already done.
    checked = preflight.check(cfg)
    kind, path = sources.source_of(cfg)
    # Where a run may read from, checked before a byte is read: a file inside [gemma] data_roots
    # (whoever may trigger the DAG chooses dataset_source), a hub dataset in [gemma] hub_datasets.
    limits = source_limits()
    file_check = sources.check_file(Path(cfg.dataset_source), data_roots(), limits) if kind == "file" else None
    if kind == "hub" and cfg.dataset_hub_id not in hub_datasets():
        raise sources.SnapshotError(f"dataset_hub_id {cfg.dataset_hub_id!r} is not one of the hub datasets this deployment "
                                    f"allows ([gemma] hub_datasets / GEMMA_HUB_DATASETS: {', '.join(hub_datasets())})")
    # A local file is identified by its bytes; a hub snapshot by the pinned revision.
    ident = storage.sha256_file(path) if path else f"{cfg.dataset_hub_id}@{cfg.dataset_revision}"
    # Only the configured dataset (hub or the bundled sample) moves the dataset's latest snapshot and
    # its Asset; any other file has a store of its own.
    store = artifacts.snapshot_store(run_dir, cfg.dataset_hub_id, path if kind == "file" else None)
    asset = None if kind == "file" else artifacts.asset_uri(cfg.dataset_hub_id)

    def body(out: Path) -> dict:
        if kind == "hub":
            records, validation, revision = sources.read_hub(cfg, limits)
            source = f"hf://datasets/{cfg.dataset_hub_id}"
        else:
            log.info("snapshot: reading %s", path)
            records, validation = sources.read_local(path, cfg, file_check[1] if file_check else os.stat(path), limits)
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
            "asset_uri": asset,
        }
        # The store last: everything before can fail without touching what other runs read.
        manifest.update(refresh_store(store, out / artifacts.RECORDS, records, manifest, run_dir), store=str(store))
        storage.write_json(out / artifacts.MANIFEST, manifest)
        log.info(
            "snapshot: %d records, sha256 %s, categories %s", len(records), manifest["sha256"][:16], manifest["category_counts"]
        )
        result = {k: manifest[k] for k in ("dataset", "source", "revision", "row_count", "sha256", "changed", "snapshot_id",
                                           "asset_uri")}
        return dict(result, rows_bad=validation["rows_bad"], **{k: v for k, v in manifest["changes"].items() if k != "examples"})

    fp = fingerprint(STAGE, kind, ident, cfg.subset(CONFIG_KEYS))
    return storage.run_stage(run_dir, STAGE, fp, body, force)


def main(argv=None) -> dict:
    return stage_main(STAGE, __doc__, run, argv)


if __name__ == "__main__":
    main()
