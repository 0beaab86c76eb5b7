"""A sweep through the whole DAG with `dag.test()`: two tiny LoRA variants trained and compared, and a
third that fails without sinking the others."""

import datetime as dt
import json
import os
from pathlib import Path

from tasks.pipeline import artifacts
import pytest

pytestmark = pytest.mark.e2e

VARIANTS = [{"lora_rank": 2}, {"lora_rank": 4, "learning_rate": 0.003}, {"lora_rank": 3}]
LOGICAL_DATE = dt.datetime(2026, 3, 1, 12, 0, tzinfo=dt.timezone.utc)


def run_dir_for(run_id: str) -> Path:
    from tasks.infra.settings import run_dir_for as folder

    return folder(run_id)


@pytest.fixture(scope="module")
def sweep_run(airflow_db):
    from airflow.dag_processing.dagbag import DagBag

    dag = DagBag(dag_folder=os.environ["AIRFLOW__CORE__DAGS_FOLDER"]).get_dag("gemma_lora_finetune")
    run_id = f"manual__{LOGICAL_DATE.isoformat()}"
    # Variant v2 meets a broken input: its preprocess link is an empty folder, as if a copy had been
    # cut short. Its finetune fails with a StageInputError; v0 and v1 must not notice.
    broken = run_dir_for(run_id) / "variants" / "v2" / "preprocess"
    broken.mkdir(parents=True)
    dag_run = dag.test(run_after=LOGICAL_DATE, logical_date=LOGICAL_DATE, run_conf={"num_examples": 24, "variants": VARIANTS})
    assert dag_run.run_id == run_id
    return dag_run, run_dir_for(run_id)


def test_mapping_expands_one_instance_per_variant_with_its_overrides(sweep_run):
    dag_run, run_dir = sweep_run
    tis = {(ti.task_id, ti.map_index): ti for ti in dag_run.get_task_instances()}
    assert sorted(k for k in tis if k[0] in ("finetune", "generate")) == [
        (t, i) for t in ("finetune", "generate") for i in range(3)
    ]
    plan = artifacts.read_plan(run_dir)
    assert [v["overrides"] for v in plan] == VARIANTS and [v["name"] for v in plan] == ["v0", "v1", "v2"]
    for i in (0, 1):
        result = artifacts.read_finetune_result(run_dir / "variants" / f"v{i}")
        assert result["config"]["lora_rank"] == VARIANTS[i]["lora_rank"]
        assert result["config"]["learning_rate"] == VARIANTS[i].get("learning_rate", 0.01)  # else tiny_test's rate
        assert result["examples"] == 24
    # Each variant trains on the run's one preprocessed split (shared, not copied).
    assert (run_dir / "variants" / "v0" / "preprocess").resolve() == (run_dir / "preprocess").resolve()
    # The base model answers once per sweep: the first variant's generate leaves its answers, the other reuses them.
    answers = [artifacts.read_answers(run_dir / "variants" / f"v{i}") for i in (0, 1)]
    assert answers[0]["models"]["base"] == answers[1]["models"]["base"]
    assert sorted(str(a["base_answers_reused_from"]) for a in answers) in (["None", "v0"], ["None", "v1"])
    # The UI names each mapped instance by its variant.
    assert tis[("finetune", 1)].rendered_map_index == "learning_rate=0.003, lora_rank=4"


def test_a_failed_variant_does_not_sink_the_others(sweep_run):
    from airflow.utils.state import DagRunState

    dag_run, run_dir = sweep_run
    states = {(ti.task_id, ti.map_index): ti.state for ti in dag_run.get_task_instances()}
    assert [states[("finetune", i)] for i in range(3)] == ["success", "success", "failed"]
    assert [states[("generate", i)] for i in range(3)] == ["success", "success", "upstream_failed"]
    assert states[("report", -1)] == "success"
    gate = artifacts.read_metrics(run_dir)
    assert states[("promote", -1)] == ("success" if gate["promotable"] else "skipped")
    # Export runs despite the failed variant and exports the one that promote promotes.
    assert states[("export", -1)] == ("success" if gate["promotable"] else "skipped")
    if gate["promotable"]:
        assert artifacts.read_export_manifest(run_dir)["variant"] == gate["promotable"]
    assert dag_run.state == DagRunState.SUCCESS
    error = json.loads((run_dir / "variants" / "v2" / "finetune.error.json").read_text())["error"]
    assert error.startswith("StageInputError") and "variants/v2/preprocess" in error


def test_report_compares_the_variants_and_promotes_the_best_that_passes(sweep_run):
    _, run_dir = sweep_run
    m = artifacts.read_metrics(run_dir)
    rows = {v["name"]: v for v in m["variants"]}
    assert [rows[n]["status"] for n in ("v0", "v1", "v2")] == ["ok", "ok", "failed"]
    assert rows["v2"]["failed_stage"] == "finetune" and "StageInputError" in rows["v2"]["error"]
    finished = [rows["v0"], rows["v1"]]
    passing = [r for r in finished if r["gate_passed"]]
    best = max(passing or finished, key=lambda r: (r["rouge_l"], -r["perplexity"]))
    assert m["variant"] == best["name"] and m["promotable"] == (best["name"] if passing else None)
    assert m["heldout"]["rouge_l"]["tuned"] == best["rouge_l"]  # the detailed sections are the chosen variant's
    # Picked from two finished variants on one held-out split: its intervals are Holm-corrected for 2.
    rci = m["heldout"]["rouge_l_delta_ci"]
    assert rci["compared"] == 2 and rci["correction"] == "holm" and rci["level"] in (0.95, 0.975)
    assert rci["adjusted_p"] >= rci["p"] and "after Holm's correction for 2 variants compared" in m["significance"]["rouge_l"]

    html = artifacts.report_path(run_dir).read_text()
    assert "Sweep: 3 variants, 2 finished, " in html and "failed in finetune" in html
    assert "learning_rate=0.003, lora_rank=4" in html and "StageInputError" in html
    assert 'id="holm-correction"' in html and "corrected for 2 variants" in html
    section = html[html.index('id="sweep"'):html.index('id="verdict"')]
    # One metric row per variant plus the base model; one answer column per finished variant.
    assert section.count('<tr id="variant-') == 3
    assert 'class="group"><td>base</td>' in section
    assert section.count("<polyline") == 4  # both finished variants' curves, overlaid: per step and running mean
    header = section[section.index('<table class="columns">'):]
    header = header[: header.index("</tr>")]
    assert header.count("<th>") == 4  # prompt, base, v0, v1
    if m["promotable"]:
        champion = json.loads((run_dir.parent / artifacts.CHAMPION).read_text())
        assert champion["run_id"] == run_dir.name and champion["variant"] == m["promotable"]
        assert champion["adapter"] == str(artifacts.adapter_path(run_dir / "variants" / m["promotable"]))
        assert champion["lora_rank"] == rows[m["promotable"]]["overrides"]["lora_rank"]
        assert champion["export"]["dir"] == str(run_dir / artifacts.EXPORT)
        assert champion["export"]["parity_passed"] == {"keras": True, "hf": True, "gguf-f16": True, "gguf-q8_0": True}
        assert 'id="use"' in html and "ollama create gemma-lora -f Modelfile" in html


def test_the_sweep_is_tracked_in_mlflow_with_a_child_run_per_finished_variant(sweep_run):
    import mlflow

    from tasks.infra import tracking
    from tasks.pipeline.config import load_config
    from tasks.pipeline.variants import variant_config

    _, run_dir = sweep_run
    client = mlflow.MlflowClient(tracking.tracking_uri(run_dir))
    exp = client.get_experiment_by_name(tracking.EXPERIMENT)
    assert exp is not None
    [parent] = client.search_runs([exp.experiment_id], filter_string=f"tags.`gemma.run_key` = '{run_dir.name}'")
    assert "mlflow.parentRunId" not in parent.data.tags and parent.data.tags["airflow.run_folder"] == run_dir.name
    nested = client.search_runs([exp.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    children = {r.data.tags["gemma.variant"]: r for r in nested}
    assert sorted(children) == ["v0", "v1"]  # v2 failed before it had anything to log
    assert parent.data.tags["gemma.run_key"] == run_dir.name and "report.html" in {a.path for a in client.list_artifacts(parent.info.run_id)}
    base = load_config("tiny_test", {"num_examples": "24", "variants": json.dumps(VARIANTS)})
    plan = artifacts.read_plan(run_dir)
    for spec in plan[:2]:
        child = children[spec["name"]]
        want = variant_config(base, spec).to_dict()
        assert child.data.params == {k: (json.dumps(v) if isinstance(v, (list, tuple, dict)) else str(v)) for k, v in want.items()}
        history = artifacts.read_history(run_dir / "variants" / spec["name"])
        assert len(client.get_metric_history(child.info.run_id, "loss")) == len(history) > 0
        assert "rouge_l.tuned" in child.data.metrics and "adapter" in {a.path for a in client.list_artifacts(child.info.run_id)}
    m = artifacts.read_metrics(run_dir)
    if m["promotable"]:
        champion = client.get_model_version_by_alias(tracking.REGISTERED_MODEL, tracking.CHAMPION_ALIAS)
        assert champion.run_id == children[m["promotable"]].info.run_id
        local = json.loads((run_dir.parent / artifacts.CHAMPION).read_text())
        assert local["registry"]["version"] == int(champion.version) and local["registry"]["status"] == "logged"
