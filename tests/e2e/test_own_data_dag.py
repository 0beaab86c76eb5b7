"""The whole DAG (`dag.test()`, tiny model) on a team's own data: an Alpaca Parquet file, and a
multi-turn chat-messages file in Gemma's chat turn format."""

import datetime as dt
import os
from pathlib import Path

import pytest

from bench import own_data
from tasks.pipeline import artifacts

pytestmark = pytest.mark.e2e

SMALL = {"num_examples": 24, "heldout_examples": 8, "eval_examples": 4, "heldout_generate_examples": 4,
         "export_formats": ["keras"]}


def run_dag(conf: dict, day: int):
    from airflow.dag_processing.dagbag import DagBag

    from tasks.infra.settings import run_dir_for

    dag = DagBag(dag_folder=os.environ["AIRFLOW__CORE__DAGS_FOLDER"]).get_dag("gemma_lora_finetune")
    when = dt.datetime(2026, 4, day, 12, 0, tzinfo=dt.timezone.utc)
    # These runs choose their own data (judged keys): by default a person would approve their
    # promotion, and dag.test() would wait for the answer. Here the team's own data is trusted (the
    # approval itself is tested on the shared scheduler, tests/e2e/test_approval.py).
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("GEMMA_PROMOTION_APPROVAL", "never")
        dag_run = dag.test(run_after=when, logical_date=when, run_conf={**SMALL, **conf})
    return dag_run, run_dir_for(dag_run.run_id)


def assert_green(dag_run):
    from airflow.utils.state import DagRunState

    failed = {ti.task_id: ti.state for ti in dag_run.get_task_instances() if ti.state not in ("success", "skipped")}
    assert dag_run.state == DagRunState.SUCCESS and not failed, failed


@pytest.fixture(scope="module")
def alpaca_run(airflow_db, tmp_path_factory):
    src = own_data.write(own_data.alpaca(own_data.dolly(300)), tmp_path_factory.mktemp("alpaca") / "alpaca.parquet")
    return run_dag({"dataset_source": str(src), "dataset_format": "alpaca", "dataset_hub_id": "acme/alpaca-style"}, 1)


@pytest.fixture(scope="module")
def chat_run(airflow_db, tmp_path_factory):
    src = own_data.write(own_data.messages(own_data.dolly(400)), tmp_path_factory.mktemp("chat") / "chat.jsonl")
    return run_dag({"dataset_source": str(src), "dataset_format": "auto", "prompt_template": "gemma_chat",
                    "dataset_hub_id": "acme/support-chats"}, 2)


def test_alpaca_file_runs_through_the_dag(alpaca_run):
    dag_run, run_dir = alpaca_run
    assert_green(dag_run)
    snap = artifacts.read_snapshot_manifest(run_dir)
    assert snap["dataset_format"] == "alpaca" and snap["dataset"] == "acme/alpaca-style"
    assert snap["category_counts"] == {}  # Alpaca rows have no category
    # A file has a snapshot store of its own, never Dolly's, and no Asset of the configured dataset.
    assert Path(snap["store"]).name.startswith("file--alpaca.parquet--") and snap["asset_uri"] is None
    # The DAG's Asset is the configured dataset's (Dolly): a run on another dataset emits no event.
    assert {ti.task_id: ti.state for ti in dag_run.get_task_instances()}["snapshot_changed"] == "skipped"
    html = artifacts.report_path(run_dir).read_text()
    assert "<code>alpaca</code>" in html and "rows by category" not in html
    # The run chose its data: judged, even where the policy lets it through without a person.
    promotion = artifacts.read_metrics(run_dir)["promotion"]
    assert {"dataset_source", "dataset_format", "heldout_examples"} <= set(promotion["judged_changes"])
    assert promotion["policy"] == "never" and promotion["approval_required"] is False
    assert artifacts.read_train(run_dir)[0]["text"].startswith("Instruction:\n")


def test_multi_turn_chat_file_runs_through_the_dag_in_gemma_chat(chat_run):
    dag_run, run_dir = chat_run
    assert_green(dag_run)
    snap = artifacts.read_snapshot_manifest(run_dir)
    assert snap["dataset_format"] == "messages" and snap["format_detected"] and snap["chat_styles"] == {"openai": snap["row_count"]}
    assert snap["rows_multi_turn"] == snap["row_count"] and snap["rows_with_system"] > 0
    train = artifacts.read_train(run_dir)
    assert all(t["text"].startswith("<start_of_turn>user\n") and len(t["spans"]) == 2 for t in train)
    held = artifacts.read_heldout(run_dir)
    answers = artifacts.read_answers(run_dir)
    # Held-out prompts are the conversation so far, in the chat format; the answers keep those turns.
    for a, h in zip(answers["heldout"]["tuned"], held):
        assert h["prompt"].endswith("<start_of_turn>model\n") and h["prompt"].count("<start_of_turn>user") == 2
        assert [t["role"] for t in a["earlier_turns"]] == ["user", "assistant"] and a["reference"] == h["response"]
    html = artifacts.report_path(run_dir).read_text()
    assert "<code>gemma_chat</code>" in html and '<ol class="earlier-turns">' in html
    assert "&lt;start_of_turn&gt;user" in html  # the rendered example, escaped
    export = artifacts.read_export_manifest(run_dir)
    if export:  # exported when the gate passed: the serving files carry the chat format
        assert export["template"] == "gemma_chat" and export["prompt_template"].startswith("<start_of_turn>user\n")
