"""Gemma LoRA fine-tune: snapshot -> preprocess -> finetune -> generate -> report -> promote.

`snapshot_changed`, a leaf beside `preprocess`, emits the dataset's Asset event only when the
snapshot's content changed (skipped otherwise).

This file only wires. Each task runs `python -m tasks.<stage> --config C --run-dir D --set k=v ...`
(the same argv whichever runner runs it); the stages live in the `tasks` package. `promote` is
skipped when the quality gate fails: the report says why. Parsing imports no
ML library: tensorflow, keras, keras_hub and datasets load inside the tasks.
"""

from __future__ import annotations

import datetime as dt

from airflow.sdk import Asset, Param, dag, get_current_context, task

from tasks.airflow_settings import DAG_ID, run_dir_for, run_root, setting
from tasks.cli import stage_argv
from tasks.config import CHOICES, PROMPT_SUITE_DIR, RANGES, Config, read_config_file
from tasks.snapshot import asset_uri


RUNNER = setting("runner", "local")
if RUNNER not in ("local", "kubernetes"):
    raise ValueError(f"[gemma] runner / GEMMA_RUNNER must be 'local' or 'kubernetes', not {RUNNER!r}")
CONFIG = setting("config", "cpu_demo" if RUNNER == "local" else "gemma_2b_lora")
RUN_ROOT = str(run_root())
DEFAULTS = read_config_file(CONFIG)
STAGES = ("snapshot", "preprocess", "finetune", "generate", "report", "promote")
# Gets an event when a run's snapshot differs from the dataset's latest one (see snapshot_changed).
SNAPSHOT_ASSET = Asset(asset_uri(DEFAULTS.get("dataset_hub_id", Config.dataset_hub_id)))


def _number(key: str, kind: str, description: str) -> Param:
    lo, hi = RANGES[key]
    # Keys a config file leaves out take the Config class's default, as the task does.
    return Param(DEFAULTS.get(key, getattr(Config, key)), type=kind, minimum=lo, maximum=hi, description=description)


def _suites() -> list[str]:
    return sorted(p.stem for p in PROMPT_SUITE_DIR.glob("*.yaml"))


PARAMS = {
    "dataset_source": Param(
        DEFAULTS.get("dataset_source", "bundled"), type="string", minLength=1,
        description="'hub' (Dolly from the Hugging Face hub, pinned revision), 'bundled' (the sample in the image) or a path to a .jsonl/.parquet file",
    ),
    "bad_record_policy": Param(
        DEFAULTS.get("bad_record_policy", Config.bad_record_policy), type="string", enum=list(CHOICES["bad_record_policy"]),
        description="bad dataset records: 'skip' drops and counts them (the run fails above max_bad_share), 'fail' stops at the first one",
    ),
    "max_bad_share": _number("max_bad_share", "number", "with 'skip': the largest share of bad records (0-1) a snapshot accepts"),
    "num_examples": _number("num_examples", "integer", "training examples drawn (seeded) from the usable rows"),
    "heldout_examples": _number("heldout_examples", "integer", "held-out examples kept for evaluation, disjoint from training"),
    "sequence_length": _number("sequence_length", "integer", "tokens per training example; longer ones are truncated"),
    "lora_rank": _number("lora_rank", "integer", "LoRA rank"),
    "learning_rate": _number("learning_rate", "number", "AdamW learning rate"),
    "weight_decay": _number("weight_decay", "number", "AdamW weight decay (bias and scale excluded)"),
    "epochs": _number("epochs", "integer", "passes over the training examples"),
    "batch_size": _number("batch_size", "integer", "examples per training step"),
    "model_preset": Param(
        DEFAULTS["model_preset"], type="string", minLength=1,
        description="keras-hub preset (e.g. gemma_2b_en, via Kaggle), a local preset directory, or gguf:gemma3-270m",
    ),
    "prompt_suite": Param(DEFAULTS.get("prompt_suite", "v1"), type="string", enum=_suites(), description="versioned prompt suite both models answer"),
    "max_length": _number("max_length", "integer", "generation length in tokens, prompt included"),
    "sampler": Param(DEFAULTS.get("sampler", "top_k"), type="string", enum=list(CHOICES["sampler"]), description="generation sampler"),
    "train_mode": Param(
        DEFAULTS.get("train_mode", "tutorial"), type="string", enum=list(CHOICES["train_mode"]),
        description="tutorial: pad every example to sequence_length (the Keras tutorial); fast: length-bucketed batches, XLA, bf16 on capable GPUs (bench/README.md)",
    ),
}


def argv_for(stage: str) -> list[str]:
    ctx = get_current_context()
    overrides = {k: v for k, v in ctx["params"].items() if k in PARAMS}
    return stage_argv(stage, CONFIG, str(run_dir_for(ctx["run_id"])), overrides)


def templated_argv(stage: str) -> list[str]:
    """The same argv as `argv_for`, as Jinja templates that an operator renders at run time (the pod)."""
    overrides = {k: "{{ params.%s }}" % k for k in PARAMS}
    return stage_argv(stage, CONFIG, "{{ run_id | run_dir }}", overrides)


def run_locally(stage: str) -> dict:
    """The local runner: the stage's own CLI, in-process, with the argv a pod would get."""
    import importlib

    argv = argv_for(stage)
    print(f"running: python -m tasks.{stage} {' '.join(argv)}")
    return importlib.import_module(f"tasks.{stage}").main(argv)


TIMEOUTS = {
    "snapshot": dt.timedelta(minutes=30),
    "preprocess": dt.timedelta(minutes=30),
    "finetune": dt.timedelta(hours=12),
    "generate": dt.timedelta(hours=2),
    "report": dt.timedelta(minutes=10),
    "promote": dt.timedelta(minutes=5),
}


@dag(
    dag_id=DAG_ID,
    schedule="@weekly",
    start_date=dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc),
    catchup=False,
    max_active_runs=1,
    params=PARAMS,
    tags=["gemma", "lora", "keras-hub"],
    doc_md=__doc__ + f"\n\nRunner: **{RUNNER}** · config: **{CONFIG}** · run root: `{RUN_ROOT}`",
    default_args={"retries": 0},
    user_defined_filters={"run_dir": lambda run_id: str(run_dir_for(run_id))},
)
def gemma_lora_finetune():
    @task(execution_timeout=TIMEOUTS["snapshot"])
    def snapshot() -> dict:
        return run_locally("snapshot")

    @task(outlets=[SNAPSHOT_ASSET], execution_timeout=dt.timedelta(minutes=5))
    def snapshot_changed(snap: dict) -> dict:
        """A task with outlets emits its Asset event on every success; skipped, it emits none."""
        from airflow.sdk.exceptions import AirflowSkipException

        if not snap["changed"]:
            raise AirflowSkipException(
                f"dataset unchanged (sha256 {snap['sha256'][:16]}): snapshot {snap['snapshot_id']} reused, no asset event"
            )
        extra = {k: snap[k] for k in ("sha256", "row_count", "revision", "snapshot_id", "rows_added", "rows_removed", "rows_changed")}
        get_current_context()["outlet_events"][SNAPSHOT_ASSET].extra = extra
        return extra

    @task(execution_timeout=TIMEOUTS["preprocess"])
    def preprocess() -> dict:
        return run_locally("preprocess")

    @task(execution_timeout=TIMEOUTS["finetune"])
    def finetune() -> dict:
        return run_locally("finetune")

    @task(execution_timeout=TIMEOUTS["generate"])
    def generate() -> dict:
        return run_locally("generate")

    @task(execution_timeout=TIMEOUTS["report"])
    def report() -> dict:
        return run_locally("report")

    @task(execution_timeout=TIMEOUTS["promote"])
    def promote() -> dict:
        from airflow.sdk.exceptions import AirflowSkipException

        decision = run_locally("promote")
        if not decision["promoted"]:
            # Skipped, not failed: the gate did its job; the grid marks the run, the report explains.
            raise AirflowSkipException(f"quality gate failed ({', '.join(decision['failed_checks'])}): not promoted")
        return decision

    if RUNNER == "kubernetes":
        # Production: the GPU stages run the same argv in a GPU pod (image and pod settings: [gemma]).
        from tasks.k8s_pod import gpu_stage_operator

        tuned = gpu_stage_operator("finetune", templated_argv("finetune"), TIMEOUTS["finetune"])
        answered = gpu_stage_operator("generate", templated_argv("generate"), TIMEOUTS["generate"])
    else:
        tuned, answered = finetune(), generate()
    snap = snapshot()
    snapshot_changed(snap)
    snap >> preprocess() >> tuned >> answered >> report() >> promote()


gemma_lora_finetune()
