"""Gemma LoRA fine-tune: snapshot -> preprocess -> sweep -> [finetune -> generate] -> report -> promote.

`sweep` plans the LoRA variants (Param `variants`, a list of overrides; empty: one fine-tune);
`finetune` and `generate` are mapped over them (one mapped instance per variant, each variant in its
own folder); `report` compares every variant with the base model and `promote` promotes the best
one that passes the quality gate. A failed variant is shown as failed; the others go on.
`snapshot_changed`, a leaf beside `preprocess`, emits the dataset's Asset event only when the
snapshot's content changed (skipped otherwise).

This file only wires. Each task runs `python -m tasks.<stage> --config C --run-dir D --set k=v ...`
(the same argv whichever runner runs it); the stages live in the `tasks` package. `promote` is
skipped when the quality gate fails: the report says why. Parsing imports no
ML library: tensorflow, keras, keras_hub and datasets load inside the tasks.
"""

from __future__ import annotations

import datetime as dt
import json

from airflow.sdk import Asset, Param, dag, get_current_context, task, task_group

from tasks.airflow_settings import DAG_ID, run_dir_for, run_root, setting
from tasks.cli import stage_argv
from tasks.config import CHOICES, MAX_VARIANTS, PROMPT_SUITE_DIR, RANGES, VARIANT_KEYS, Config, read_config_file
from tasks.snapshot import asset_uri


RUNNER = setting("runner", "local")
if RUNNER not in ("local", "kubernetes"):
    raise ValueError(f"[gemma] runner / GEMMA_RUNNER must be 'local' or 'kubernetes', not {RUNNER!r}")
CONFIG = setting("config", "cpu_demo" if RUNNER == "local" else "gemma_2b_lora")
RUN_ROOT = str(run_root())
DEFAULTS = read_config_file(CONFIG)
STAGES = ("snapshot", "preprocess", "sweep", "finetune", "generate", "report", "promote")
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
        description="tutorial: pad every example to sequence_length (the Keras tutorial); fast: length-bucketed batches, XLA on GPUs, bf16 where native (bench/README.md)",
    ),
    "variants": Param(
        list(DEFAULTS.get("variants") or []), type="array", items={"type": "object"}, maxItems=MAX_VARIANTS,
        description=(
            "a sweep: a list of LoRA variants, each a JSON object of overrides, e.g. "
            '[{"lora_rank": 4}, {"lora_rank": 8, "learning_rate": 0.0001}]; each is fine-tuned and '
            "compared in one report, the best that passes the gate is promoted. Empty: one fine-tune. "
            f"Keys a variant may set: {', '.join(VARIANT_KEYS)}"
        ),
    ),
}
# What the variant's --variant argument (its overrides) replaces for finetune and generate.
VARIANT_PARAMS = ("variants",)


def argv_for(stage: str, spec: dict | None = None) -> list[str]:
    """The stage's argv from the run's Params; with a variant's spec, its `--variant` too."""
    ctx = get_current_context()
    skip = VARIANT_PARAMS if spec is not None else ()
    overrides = {k: v for k, v in ctx["params"].items() if k in PARAMS and k not in skip}
    variant = json.dumps(spec, sort_keys=True) if spec is not None else None
    return stage_argv(stage, CONFIG, str(run_dir_for(ctx["run_id"])), overrides, variant)


# The mapped instance's spec, from the plan `sweep` returned (rendered in the pod's argv).
SPEC_TEMPLATE = "{{ ti.xcom_pull(task_ids='sweep')[ti.map_index] | tojson }}"
LABEL_TEMPLATE = "{{ ti.xcom_pull(task_ids='sweep')[ti.map_index]['label'] }}"


def templated_argv(stage: str) -> list[str]:
    """The same argv as `argv_for(stage, spec)`, as Jinja templates that an operator renders at run
    time (the pod of a mapped instance gets its own variant's spec)."""
    overrides = {k: "{{ params.%s }}" % k for k in PARAMS if k not in VARIANT_PARAMS}
    return stage_argv(stage, CONFIG, "{{ run_id | run_dir }}", overrides, SPEC_TEMPLATE)


def run_locally(stage: str, spec: dict | None = None) -> dict:
    """The local runner: the stage's own CLI, in-process, with the argv a pod would get."""
    import importlib

    argv = argv_for(stage, spec)
    print(f"running: python -m tasks.{stage} {' '.join(argv)}")
    return importlib.import_module(f"tasks.{stage}").main(argv)


TIMEOUTS = {
    "snapshot": dt.timedelta(minutes=30),
    "preprocess": dt.timedelta(minutes=30),
    "sweep": dt.timedelta(minutes=5),
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

    @task(execution_timeout=TIMEOUTS["sweep"])
    def sweep() -> list[dict]:
        return run_locally("sweep")["variants"]

    # Local runner: the variants one after the other (in-process, they would only share the CPU).
    @task(execution_timeout=TIMEOUTS["finetune"], max_active_tis_per_dag=1, map_index_template="{{ variant_label }}")
    def finetune(spec: dict) -> dict:
        get_current_context()["variant_label"] = spec["label"]
        return run_locally("finetune", spec)

    @task(execution_timeout=TIMEOUTS["generate"], max_active_tis_per_dag=1, map_index_template="{{ variant_label }}")
    def generate(spec: dict) -> dict:
        get_current_context()["variant_label"] = spec["label"]
        return run_locally("generate", spec)

    # One mapped group: generate[i] waits for finetune[i] only, so a failed variant stops its own
    # chain and no other. Task ids stay "finetune" and "generate".
    @task_group(group_id="variant", prefix_group_id=False)
    def variant(spec: dict):
        if RUNNER == "kubernetes":
            # Production: the GPU stages run the same argv in a GPU pod (image and pod settings: [gemma]),
            # at most [gemma] max_parallel_pods variants at a time, in [gemma] pool.
            from tasks.k8s_pod import gpu_stage_operator

            tuned = gpu_stage_operator("finetune", templated_argv("finetune"), TIMEOUTS["finetune"], LABEL_TEMPLATE)
            answered = gpu_stage_operator("generate", templated_argv("generate"), TIMEOUTS["generate"], LABEL_TEMPLATE)
            # Its argv pulls the plan too (the local `generate` gets it as an argument).
            planned >> answered
        else:
            tuned, answered = finetune(spec), generate(spec)
        tuned >> answered

    # Runs once every variant has finished or failed, if at least one got through: the report shows
    # the failed ones with their errors.
    @task(execution_timeout=TIMEOUTS["report"], trigger_rule="all_done_min_one_success")
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

    snap = snapshot()
    snapshot_changed(snap)
    planned = sweep()
    snap >> preprocess() >> planned
    variant.expand(spec=planned) >> report() >> promote()


gemma_lora_finetune()
