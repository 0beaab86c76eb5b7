import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tasks.pipeline import artifacts
from tasks.pipeline.config import load_config, read_config_file

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]
DAG_FILE = REPO / "dags" / "gemma_lora_finetune.py"
STAGES = list(artifacts.STAGES)
# A leaf beside the chain: emits the dataset's Asset event only when the snapshot changed.
LEAVES = {"snapshot_changed": "snapshot"}
# A person's step inside the chain, not a stage: between report and promote.
APPROVE = "approve"
ML_LIBS = ("tensorflow", "keras", "keras_hub", "keras_nlp", "datasets", "kagglehub", "jax", "torch")


@pytest.fixture(scope="module")
def dag(airflow_db):
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(DAG_FILE))
    assert bag.import_errors == {}
    return bag.get_dag("gemma_lora_finetune")


def test_edges_are_exactly_the_stage_chain(dag):
    assert sorted(t.task_id for t in dag.tasks) == sorted(STAGES + list(LEAVES) + [APPROVE])
    edges = {(t.task_id, d) for t in dag.tasks for d in t.downstream_task_ids}
    chain = STAGES[:-1] + [APPROVE, STAGES[-1]]
    # generate also reads the sweep's plan (the mapped group's input); the report also waits for the
    # variants themselves, so it runs when export fails or is skipped.
    assert edges == (set(zip(chain, chain[1:])) | {(up, leaf) for leaf, up in LEAVES.items()}
                     | {("sweep", "generate"), ("generate", "report")})
    # promote runs after an approval and after an approve task skipped as not needed
    assert dag.get_task("promote").trigger_rule == "none_failed"


def test_only_snapshot_changed_produces_the_dataset_asset(dag):
    from tasks.pipeline.artifacts import asset_uri

    outlets = {t.task_id: [a.uri for a in t.outlets] for t in dag.tasks if t.outlets}
    assert outlets == {"snapshot_changed": [asset_uri(load_config("tiny_test").dataset_hub_id)]}


def test_schedule_timeouts_and_params(dag):
    assert dag.schedule == "@weekly" or str(getattr(dag, "timetable", "")).find("weekly") >= 0 or dag.timetable.summary == "@weekly"
    assert all(t.execution_timeout is not None for t in dag.tasks)
    defaults = read_config_file("tiny_test")  # conftest sets GEMMA_CONFIG=tiny_test
    params = dag.params.dump()
    for key in ("dataset_source", "num_examples", "sequence_length", "lora_rank", "learning_rate", "weight_decay",
                "epochs", "batch_size", "model_preset", "prompt_suite", "bad_record_policy", "max_bad_share"):
        assert key in params
        if key in defaults:
            assert params[key] == defaults[key], key
    cfg = load_config("tiny_test")  # keys the config file leaves out: the Config default, as in the task
    assert (params["bad_record_policy"], params["max_bad_share"]) == (cfg.bad_record_policy, cfg.max_bad_share) == ("skip", 0.05)


@pytest.mark.parametrize("setting, schedule", [("0 3 * * 1", "0 3 * * 1"), ("none", None)])
def test_the_schedule_is_a_setting(airflow_db, monkeypatch, setting, schedule):
    """[gemma] schedule: a cron expression or preset, or `none` for manual and API triggers only."""
    from airflow.dag_processing.dagbag import DagBag

    monkeypatch.setenv("GEMMA_SCHEDULE", setting)
    bag = DagBag(dag_folder=str(DAG_FILE))
    assert bag.import_errors == {}
    dag = bag.get_dag("gemma_lora_finetune")
    assert dag.schedule == schedule and type(dag.timetable).__name__ == ("NullTimetable" if schedule is None else "CronTriggerTimetable")


def test_param_schema_rejects_out_of_range(dag):
    from airflow.sdk.exceptions import ParamValidationError

    for key, bad in (("lora_rank", 0), ("learning_rate", -1.0), ("prompt_suite", "v999"), ("sampler", "beam"),
                     ("bad_record_policy", "ignore"), ("max_bad_share", 1.5)):
        with pytest.raises(ParamValidationError, match=key):
            params = copy.deepcopy(dag.params)
            params[key] = bad
            params.validate()


def test_every_param_is_a_config_key(dag):
    cfg_keys = set(load_config("tiny_test").to_dict())
    assert set(dag.params.keys()) <= cfg_keys


def run_parse(env_extra: dict) -> dict:
    code = (
        "import json, runpy, sys, time; t = time.time();"
        f"ns = runpy.run_path({str(DAG_FILE)!r}); took = time.time() - t;"
        f"print(json.dumps({{'ml': [m for m in {ML_LIBS!r} if m in sys.modules], 'seconds': took,"
        "'defaults': {k: v.value for k, v in ns['PARAMS'].items()}, 'config': ns['CONFIG'], 'runner': ns['RUNNER']}))"
    )
    env = {**os.environ, **env_extra}
    for k, v in env_extra.items():
        if v is None:
            env.pop(k)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_parse_imports_no_ml_library():
    result = run_parse({})
    assert result["ml"] == []
    print(f"DAG file parsed in {result['seconds']:.2f} s")


def test_embedded_default_is_local_cpu_demo():
    result = run_parse({"GEMMA_CONFIG": None, "GEMMA_RUNNER": None})
    assert result["runner"] == "local" and result["config"] == "cpu_demo"
    demo = read_config_file("cpu_demo")
    assert result["defaults"]["model_preset"] == demo["model_preset"] == "gguf:gemma3-270m"
    assert result["defaults"]["num_examples"] == demo["num_examples"]


def test_unknown_runner_is_an_import_error():
    env = {**os.environ, "GEMMA_RUNNER": "slurm"}
    out = subprocess.run([sys.executable, str(DAG_FILE)], capture_output=True, text=True, env=env)
    assert out.returncode != 0 and "slurm" in out.stderr and "GEMMA_RUNNER" in out.stderr
