"""The run folder's contract: every stage's name and every artifact's file name, defined once.

A run folder `<run root>/runs/<run id>/` holds one sub-folder per stage (`storage.stage_dir`), each
published atomically with its `_SUCCESS` record last. Stages, report, promote, bench and tests find
an artifact through the names and readers here, never through a string of their own.

    snapshot/    records.jsonl, manifest.json
    preprocess/  train.jsonl, heldout.jsonl, manifest.json
    sweep/       plan.json
    finetune/    adapter.lora.h5, history.json, result.json   (+ finetune.checkpoints/ beside it while training)
    generate/    answers.json
    export/      keras/, hf/, gguf/ (model-f16.gguf, model-q8_0.gguf, Modelfile), manifest.json
    report/      report.html, metrics.json
    promote/     decision.json                                 (+ champion.json beside the run folders)
    <stage>.error.json                                         a failed stage's reason (storage.error_path)
    variants/v<i>/{finetune,generate}/ and variants/base_answers/   a sweep's variants (tasks.pipeline.variants)
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Any

from tasks.pipeline import storage

# Stage = module `tasks.<stage>` = task id = `python -m tasks.<stage>`, in pipeline order.
SNAPSHOT, PREPROCESS, SWEEP, FINETUNE, GENERATE, EXPORT, REPORT, PROMOTE = (
    "snapshot", "preprocess", "sweep", "finetune", "generate", "export", "report", "promote",
)
STAGES = (SNAPSHOT, PREPROCESS, SWEEP, FINETUNE, GENERATE, EXPORT, REPORT, PROMOTE)

MANIFEST = "manifest.json"  # snapshot and preprocess
RECORDS = "records.jsonl"  # snapshot: the validated records, one canonical JSON object a line
TRAIN = "train.jsonl"  # preprocess
HELDOUT = "heldout.jsonl"  # preprocess, with reference responses
VALIDATION = "validation.jsonl"  # preprocess, only with validation_examples > 0: scored while training
PLAN = "plan.json"  # sweep
ADAPTER = "adapter.lora.h5"  # finetune: the LoRA weights only
HISTORY = "history.json"  # finetune: per step
RESULT = "result.json"  # finetune: config, timings, held-out scores
CHECKPOINTS = "finetune.checkpoints"  # beside the finetune folder while training (retries resume there)
ANSWERS = "answers.json"  # generate
EXPORT_KERAS, EXPORT_HF, EXPORT_GGUF = "keras", "hf", "gguf"  # export: one folder per format
GGUF_FILE = "model-{fmt}.gguf"  # export/gguf: fmt f16 or q8_0
MODELFILE = "Modelfile"  # export/gguf: for `ollama create`
REPORT_HTML = "report.html"  # report
METRICS = "metrics.json"  # report: every metric and the gate's verdict
DECISION = "decision.json"  # promote
APPROVAL = "approval.json"  # in the run folder: a person's answer to the approve task (tasks.pipeline.approval)
CHAMPION = "champion.json"  # beside the run folders: the promoted adapter
CHAMPION_LOG = "champion_log.jsonl"  # beside it: every earlier champion
SNAPSHOT_STORE = "snapshots"  # beside the run folders: <slug>/<snapshot id>/ and LATEST.json
STORE_LATEST = "LATEST.json"


def path(run_dir: Path, stage: str, name: str) -> Path:
    return storage.stage_dir(run_dir, stage) / name


def adapter_path(run_dir: Path) -> Path:
    return path(run_dir, FINETUNE, ADAPTER)


def report_path(run_dir: Path) -> Path:
    return path(run_dir, REPORT, REPORT_HTML)


def checkpoint_dir(run_dir: Path) -> Path:
    return Path(run_dir) / CHECKPOINTS


def approval_path(run_dir: Path) -> Path:
    return Path(run_dir) / APPROVAL


def champion_path(run_dir: Path) -> Path:
    return Path(run_dir).resolve().parent / CHAMPION


def dataset_slug(hub_id: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "--", hub_id).strip("-.") or "dataset"


def asset_uri(hub_id: str) -> str:
    """The Airflow Asset that gets an event when this dataset's latest snapshot changes."""
    return f"gemma://snapshots/{dataset_slug(hub_id)}"


def snapshot_store(run_dir: Path, hub_id: str, source_file: Path | None = None) -> Path:
    """The store a snapshot is published in, keyed by what was read: the configured dataset's
    (`<slug of hub_id>`) for the hub and the bundled sample, and one of its own for any other file
    (`file--<its name>--<hash of its resolved path>`), so a file never becomes the dataset's latest.
    Run folders live in <run root>/runs/<run id>, so this is <run root>/runs/snapshots/<name>; the
    report's scan of earlier runs skips folders without report/_SUCCESS, so it ignores this one."""
    name = dataset_slug(hub_id)
    if source_file is not None:
        resolved = str(Path(source_file).resolve())
        name = f"file--{dataset_slug(Path(resolved).name)}--{hashlib.sha256(resolved.encode('utf-8', 'surrogatepass')).hexdigest()[:12]}"
    return Path(run_dir).resolve().parent / SNAPSHOT_STORE / name


# -- readers: one per artifact that another stage, the report, bench or a test reads ---------------

def read_records(run_dir: Path) -> list[dict]:
    return storage.read_jsonl(path(run_dir, SNAPSHOT, RECORDS))


def read_snapshot_manifest(run_dir: Path) -> dict:
    return storage.read_json(path(run_dir, SNAPSHOT, MANIFEST))


def read_train(run_dir: Path) -> list[dict]:
    return storage.read_jsonl(path(run_dir, PREPROCESS, TRAIN))


def read_heldout(run_dir: Path) -> list[dict]:
    return storage.read_jsonl(path(run_dir, PREPROCESS, HELDOUT))


def read_validation(run_dir: Path) -> list[dict]:
    """The validation examples; none when the run drew none (validation_examples: 0)."""
    file = path(run_dir, PREPROCESS, VALIDATION)
    return storage.read_jsonl(file) if file.is_file() else []


def read_preprocess_manifest(run_dir: Path) -> dict:
    return storage.read_json(path(run_dir, PREPROCESS, MANIFEST))


def read_plan(run_dir: Path) -> list[dict]:
    return storage.read_json(path(run_dir, SWEEP, PLAN))


def read_history(run_dir: Path) -> list[dict]:
    return storage.read_json(path(run_dir, FINETUNE, HISTORY))


def read_finetune_result(run_dir: Path) -> dict:
    return storage.read_json(path(run_dir, FINETUNE, RESULT))


def read_answers(run_dir: Path) -> dict:
    return storage.read_json(path(run_dir, GENERATE, ANSWERS))


def read_export_manifest(run_dir: Path) -> dict | None:
    manifest = path(run_dir, EXPORT, MANIFEST)
    return storage.read_json(manifest) if manifest.is_file() else None


def read_metrics(run_dir: Path) -> dict:
    return storage.read_json(path(run_dir, REPORT, METRICS))


def read_error(run_dir: Path, stage: str) -> dict[str, Any] | None:
    err = storage.error_path(run_dir, stage)
    return storage.read_json(err) if err.is_file() else None
