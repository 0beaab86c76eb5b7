"""Gemma LoRA fine-tune: snapshot -> preprocess -> sweep -> [finetune -> generate] -> export -> report -> approve -> promote.

`sweep` plans the LoRA variants (Param `variants`, a list of overrides; empty: one fine-tune);
`finetune` and `generate` are mapped over them (one mapped instance per variant, each variant in its
own folder); `export` writes the serving formats of the variant that passes the quality gate;
`report` compares every variant with the base model and `promote` promotes that one. A failed variant is shown as failed; the others go on.
`approve` waits for a person (not the one who triggered the run) where the gate alone cannot vouch
for it: a run that changed the data, model, prompts, split or gate (`[gemma] promotion_approval`);
every other run skips it.
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

from tasks.infra.approval_operator import PromotionApproval
from tasks.infra.settings import DAG_ID, retries, run_dir_for, run_root, schedule, setting
from tasks.pipeline.artifacts import asset_uri
from tasks.infra.cli import stage_argv
from tasks.pipeline.config import Config, read_config_file, trigger_form
from tasks.pipeline.storage import NOT_RETRIED


RUNNER = setting("runner", "local")
if RUNNER not in ("local", "kubernetes"):
    raise ValueError(f"[gemma] runner / GEMMA_RUNNER must be 'local' or 'kubernetes', not {RUNNER!r}")
CONFIG = setting("config", "cpu_demo" if RUNNER == "local" else "gemma_2b_lora")
RETRIES, RETRY_DELAY_S = retries()
RUN_ROOT = str(run_root())
DEFAULTS = read_config_file(CONFIG)
# Gets an event when a run's snapshot differs from the dataset's latest one (see snapshot_changed).
SNAPSHOT_ASSET = Asset(asset_uri(DEFAULTS.get("dataset_hub_id", Config.dataset_hub_id)))
# Every Param is a config key: its schema, range and description come from tasks.pipeline.config.
PARAMS = {k: Param(spec.pop("default"), **spec) for k, spec in trigger_form(DEFAULTS).items()}
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


def templated_argv(stage: str, mapped: bool = True) -> list[str]:
    """The same argv as `argv_for(stage, spec)` (or `argv_for(stage)`), as Jinja templates that an
    operator renders at run time (the pod of a mapped instance gets its own variant's spec)."""
    skip = VARIANT_PARAMS if mapped else ()
    # Lists and mappings render as JSON, as the local runner writes them (str() of a dict is Python's
    # repr: its quotes and backslashes would arrive changed).
    overrides = {k: ("{{ params.%s | tojson }}" if isinstance(PARAMS[k].value, (list, dict)) else "{{ params.%s }}") % k
                 for k in PARAMS if k not in skip}
    return stage_argv(stage, CONFIG, "{{ run_id | run_dir }}", overrides, SPEC_TEMPLATE if mapped else None)


def run_locally(stage: str, spec: dict | None = None) -> dict:
    """The local runner: the stage's own CLI, in-process, with the argv a pod would get. An error a
    retry would only repeat (bad input, config or setting, a full disk) fails the task at once."""
    import importlib

    from airflow.sdk.exceptions import AirflowFailException

    argv = argv_for(stage, spec)
    print(f"running: python -m tasks.{stage} {' '.join(argv)}")
    try:
        return importlib.import_module(f"tasks.{stage}").main(argv)
    except NOT_RETRIED as e:
        raise AirflowFailException(f"{type(e).__name__}: {e}"[:4000]) from e
    except SystemExit as e:  # argparse's exit on a bad --set
        raise AirflowFailException(f"python -m tasks.{stage} exited {e.code}: see the log above") from e


TIMEOUTS = {
    "snapshot": dt.timedelta(minutes=30),
    "preprocess": dt.timedelta(minutes=30),
    "sweep": dt.timedelta(minutes=5),
    "finetune": dt.timedelta(hours=12),
    "generate": dt.timedelta(hours=2),
    "export": dt.timedelta(hours=2),
    "report": dt.timedelta(minutes=10),
    "promote": dt.timedelta(minutes=5),
}


def local_stage(stage: str, *, mapped: bool = False, **task_kwargs):
    """The task that runs one stage with the local runner. Mapped (one instance per sweep variant):
    the variants one after the other (in-process they would only share the CPU), each named in the
    grid by its overrides."""
    if not mapped:
        @task(task_id=stage, execution_timeout=TIMEOUTS[stage], **task_kwargs)
        def run_stage() -> dict:
            return run_locally(stage)

        return run_stage

    @task(task_id=stage, execution_timeout=TIMEOUTS[stage], max_active_tis_per_dag=1,
          map_index_template="{{ variant_label }}", **task_kwargs)
    def run_variant(spec: dict) -> dict:
        get_current_context()["variant_label"] = spec["label"]
        return run_locally(stage, spec)

    return run_variant


@task(execution_timeout=dt.timedelta(minutes=5), outlets=[SNAPSHOT_ASSET])
def snapshot_changed(snap: dict) -> dict:
    """A task with outlets emits its Asset event on every success; skipped, it emits none."""
    from airflow.sdk.exceptions import AirflowSkipException

    # The snapshot says which Asset it may move: none for a file of the trigger's own, another one for
    # another hub dataset (results written before it said so: the dataset's).
    if snap.get("asset_uri", asset_uri(snap["dataset"])) != SNAPSHOT_ASSET.uri:
        raise AirflowSkipException(f"this run read {snap['source']} (dataset {snap['dataset']!r}), which has a snapshot "
                                   f"store of its own: the DAG's Asset {SNAPSHOT_ASSET.uri} is the configured dataset's, "
                                   "no asset event")
    if not snap["changed"]:
        raise AirflowSkipException(
            f"dataset unchanged (sha256 {snap['sha256'][:16]}): snapshot {snap['snapshot_id']} reused, no asset event"
        )
    extra = {k: snap[k] for k in ("sha256", "row_count", "revision", "snapshot_id", "rows_added", "rows_removed", "rows_changed")}
    get_current_context()["outlet_events"][SNAPSHOT_ASSET].extra = extra
    return extra


@task(execution_timeout=TIMEOUTS["sweep"])
def sweep() -> list[dict]:
    return run_locally("sweep")["variants"]


@task(execution_timeout=TIMEOUTS["export"], trigger_rule="all_done_min_one_success")
def export() -> dict:
    from airflow.sdk.exceptions import AirflowSkipException

    result = run_locally("export")
    if not result["exported"]:
        raise AirflowSkipException(f"nothing exported: {result['reason']}")
    return result


# none_failed: it runs after an approval and after an `approve` skipped as not needed.
@task(execution_timeout=TIMEOUTS["promote"], trigger_rule="none_failed")
def promote() -> dict:
    from airflow.sdk.exceptions import AirflowSkipException

    decision = run_locally("promote")
    if not decision["promoted"]:
        # Skipped, not failed: the gate (or the reviewer) did its job; the grid marks the run, the report explains.
        why = (f"quality gate failed ({', '.join(decision['failed_checks'])})" if decision["failed_checks"]
               else decision["why"])
        raise AirflowSkipException(f"{why}: not promoted")
    return decision


@dag(
    dag_id=DAG_ID,
    schedule=schedule(),
    start_date=dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc),
    catchup=False,
    max_active_runs=1,
    params=PARAMS,
    tags=["gemma", "lora", "keras-hub"],
    doc_md=__doc__ + f"\n\nRunner: **{RUNNER}** · config: **{CONFIG}** · run root: `{RUN_ROOT}`",
    # A killed or preempted task (OOM killer, node drain, a crash) is retried and resumes from its
    # checkpoint, with no one clicking; errors a retry would repeat are not retried (run_locally).
    default_args={"retries": RETRIES, "retry_delay": dt.timedelta(seconds=RETRY_DELAY_S)},
    user_defined_filters={"run_dir": lambda run_id: str(run_dir_for(run_id))},
)
def gemma_lora_finetune():
    snap = local_stage("snapshot")()
    snapshot_changed(snap)
    planned = sweep()
    snap >> local_stage("preprocess")() >> planned

    # One mapped group: generate[i] waits for finetune[i] only, so a failed variant stops its own
    # chain and no other. Task ids stay "finetune" and "generate".
    @task_group(group_id="variant", prefix_group_id=False)
    def variant(spec: dict):
        if RUNNER == "kubernetes":
            # Production: the GPU stages run the same argv in a GPU pod (image and pod settings: [gemma]),
            # at most [gemma] max_parallel_pods variants at a time, in [gemma] pool.
            from tasks.infra.pod_operator import gpu_stage_operator

            tuned = gpu_stage_operator("finetune", templated_argv("finetune"), TIMEOUTS["finetune"], LABEL_TEMPLATE)
            answered = gpu_stage_operator("generate", templated_argv("generate"), TIMEOUTS["generate"], LABEL_TEMPLATE)
            # Its argv pulls the plan too (the local `generate` gets it as an argument).
            planned >> answered
        else:
            tuned = local_stage("finetune", mapped=True)(spec)
            answered = local_stage("generate", mapped=True)(spec)
        tuned >> answered

    # Export and report run once every variant has finished or failed, if at least one got through.
    # Export writes the champion (the variant that passes the gate) in the serving formats; the
    # report shows the failed variants with their errors and, when export ran, how to use the model.
    variants = variant.expand(spec=planned)
    if RUNNER == "kubernetes":
        # The merge needs the model in memory (~10 GB for Gemma-2B): a pod like the GPU stages'.
        from tasks.infra.pod_operator import gpu_stage_operator

        exported = gpu_stage_operator("export", templated_argv("export", mapped=False), TIMEOUTS["export"],
                                      trigger_rule="all_done_min_one_success")
    else:
        exported = export()
    # all_done, not all_done_min_one_success: that rule skips a task whose upstream was skipped (an
    # export with nothing to export). A run where no variant finished fails in report, which says so.
    reported = local_stage("report", trigger_rule="all_done")()
    variants >> exported >> reported >> PromotionApproval() >> promote()
    variants >> reported


gemma_lora_finetune()
