"""Bad input: bad dataset records (skip and count, or fail on the first), bad Params and preflight.

Every case checks the message names what is wrong (line, field, setting) and that nothing already
written is lost: the run's published snapshot and the shared snapshot store stay as they were.
"""

import copy
import json
import shutil
import time
from pathlib import Path

import pytest

from tasks import snapshot
from tasks.pipeline import artifacts
from tasks.infra.cli import stage_argv
from tasks.pipeline.config import BUNDLED_DOLLY, ConfigError, load_config
from tasks.pipeline.sources import SnapshotError
from tests.conftest import REPO

pytestmark = pytest.mark.model

SECRET_TEXT = "PLEASE-DO-NOT-COPY-ME"  # in every bad record: none of it may reach the manifest


def rec(**fields) -> bytes:
    base = {"instruction": f"Question {SECRET_TEXT}?", "context": "", "response": f"Answer {SECRET_TEXT}.", "category": "open_qa"}
    base.update(fields)
    return json.dumps({k: v for k, v in base.items() if v is not ...}).encode()


# One bad line per reason, and words its message must hold (besides the line number).
BAD = {
    "malformed_json": (b'{"instruction": "' + SECRET_TEXT.encode() + b'", "response": "b"', ["malformed JSON"]),
    "invalid_utf8": (rec(instruction="\udcff").replace(b"\\udcff", b"\xff\xfe"), ["UTF-8"]),
    "lone_surrogate": (rec(response="\ud800"), ["'response'", "UTF-8"]),
    "missing_field": (rec(response=...), ["missing field 'response'"]),
    "wrong_type": (rec(instruction=7), ["'instruction'", "int"]),
    "not_an_object": (b'["' + SECRET_TEXT.encode() + b'"]', ["JSON object", "list"]),
    "empty_instruction": (rec(instruction="  \n"), ["'instruction'", "empty"]),
    "empty_response": (rec(response=""), ["'response'", "empty"]),
    "too_large": (rec(response="x" * 100_001), ["max_record_bytes"]),
    "too_deep": (b"[" * 5_000 + b"]" * 5_000, ["nested deeper"]),  # 10 KB
    "duplicate": (None, ["same instruction, context and response as line 1"]),  # a copy of line 1
    "unknown_category": (rec(category="poetry"), ["'category'", "poetry"]),
}
REASON = {"lone_surrogate": "invalid_utf8", "not_an_object": "wrong_type"}


def good_lines(n: int) -> list[bytes]:
    return [x.encode() for x in BUNDLED_DOLLY.read_text(encoding="utf-8").splitlines()[:n]]


def cfg_for(source, **kw):
    return load_config("tiny_test", {"dataset_source": str(source), **{k: str(v) for k, v in kw.items()}})


def write_source(path: Path, good: list[bytes], bad: list[bytes], every: int) -> Path:
    """Good lines with a bad one after every `every` good ones; returns the path."""
    lines, queue = [], list(bad)
    for i, line in enumerate(good, start=1):
        lines.append(line)
        if queue and i % every == 0:
            lines.append(queue.pop(0))
    path.write_bytes(b"\n".join(lines + queue) + b"\n")
    return path


def bad_line(case: str, good: list[bytes]) -> bytes:
    return good[0] if case == "duplicate" else BAD[case][0]


def test_skip_counts_every_reason_keeps_examples_without_text(tmp_path):
    good = good_lines(300)
    bad = [bad_line(case, good) for case in BAD]
    src = write_source(tmp_path / "d.jsonl", good, bad, every=25)
    result = snapshot.run(cfg_for(src), tmp_path / "runs" / "r1")
    manifest = artifacts.read_snapshot_manifest(tmp_path / "runs" / "r1")
    v = manifest["validation"]
    assert result["row_count"] == manifest["row_count"] == 300 and result["rows_bad"] == len(BAD)
    assert (v["rows_read"], v["rows_bad"], v["policy"]) == (300 + len(BAD), len(BAD), "skip")
    expected = {}
    for case in BAD:
        expected[REASON.get(case, case)] = expected.get(REASON.get(case, case), 0) + 1
    assert v["bad_by_reason"] == dict(sorted(expected.items()))
    assert v["bad_share"] == pytest.approx(len(BAD) / (300 + len(BAD)), abs=1e-6)
    # Examples: where and why, in file order; line numbers are the file's own.
    lines = src.read_bytes().split(b"\n")
    assert [x["reason"] for x in v["bad_examples"]] == [REASON.get(c, c) for c in BAD][:10]
    for x, case in zip(v["bad_examples"], BAD):
        lineno = int(x["where"].removeprefix("line "))
        assert lines[lineno - 1] == bad_line(case, good)
        for word in BAD[case][1]:
            assert word in x["detail"]
    text = json.dumps(manifest)
    assert SECRET_TEXT not in text and "x" * 100 not in text  # never the record's text
    records = (tmp_path / "runs" / "r1" / "snapshot" / artifacts.RECORDS).read_text()
    assert SECRET_TEXT not in records and len(records.splitlines()) == 300


@pytest.mark.parametrize("case", list(BAD))
def test_fail_policy_stops_at_the_first_bad_record(tmp_path, case):
    good = good_lines(5)
    src = write_source(tmp_path / "d.jsonl", good, [bad_line(case, good)], every=3)  # the bad one is line 4
    with pytest.raises(SnapshotError) as e:
        snapshot.run(cfg_for(src, bad_record_policy="fail"), tmp_path / "runs" / "r1")
    message = str(e.value)
    assert f"{src} line 4: " in message and f"[{REASON.get(case, case)}]" in message and "bad_record_policy=fail" in message
    for word in BAD[case][1]:
        assert word in message
    assert SECRET_TEXT not in message
    assert not (tmp_path / "runs" / "r1" / "snapshot").exists() and not (tmp_path / "runs" / "snapshots").exists()


def test_parquet_rows_are_checked_and_named_by_row(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [json.loads(x) for x in good_lines(4)]
    rows[2]["response"] = "   "
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    with pytest.raises(SnapshotError, match=r"d\.parquet row 3: field 'response' is empty \[empty_response\]"):
        snapshot.run(cfg_for(tmp_path / "d.parquet", bad_record_policy="fail"), tmp_path / "runs" / "r1")
    result = snapshot.run(cfg_for(tmp_path / "d.parquet", max_bad_share=0.25), tmp_path / "runs" / "r1")
    assert result["row_count"] == 3 and result["rows_bad"] == 1


def test_share_threshold_names_the_share_and_counts_by_reason(tmp_path):
    good = good_lines(100)
    bad = [BAD["malformed_json"][0]] * 4 + [BAD["empty_response"][0]] * 2  # 6 of 106 = 5.7%
    src = write_source(tmp_path / "d.jsonl", good, bad, every=10)
    with pytest.raises(SnapshotError) as e:
        snapshot.run(cfg_for(src), tmp_path / "runs" / "r1")
    message = str(e.value)
    assert "6 of 106 records are bad (5.7%), more than max_bad_share (5.0%)" in message
    assert "malformed_json 4, empty_response 2" in message and "line 11: malformed JSON" in message
    # The limit is a setting: at 6% the same file is taken, the bad records skipped and counted.
    result = snapshot.run(cfg_for(src, max_bad_share=0.06), tmp_path / "runs" / "r1")
    assert result["row_count"] == 100 and result["rows_bad"] == 6


def test_a_failing_snapshot_loses_nothing_already_written(tmp_path):
    runs = tmp_path / "runs"
    data = tmp_path / "data.jsonl"  # one source file, good, then broken upstream: one store
    store = artifacts.snapshot_store(runs / "r1", load_config("tiny_test").dataset_hub_id, data)
    good = write_source(data, good_lines(50), [], every=1)
    first = snapshot.run(cfg_for(good), runs / "r1")
    before_run = {p.name: p.read_bytes() for p in (runs / "r1" / "snapshot").iterdir()}
    before_store = {str(p.relative_to(store)): p.read_bytes() for p in store.rglob("*") if p.is_file()}

    broken = write_source(data, good_lines(60), [BAD["malformed_json"][0]] * 10, every=5)
    for policy in ("skip", "fail"):  # over max_bad_share / at the first bad line
        with pytest.raises(SnapshotError, match="data.jsonl"):
            snapshot.run(cfg_for(broken, bad_record_policy=policy), runs / "r1")  # the same run folder again
        with pytest.raises(SnapshotError):
            snapshot.run(cfg_for(broken, bad_record_policy=policy), runs / "r2")  # a new run

    assert {p.name: p.read_bytes() for p in (runs / "r1" / "snapshot").iterdir()} == before_run
    assert {str(p.relative_to(store)): p.read_bytes() for p in store.rglob("*") if p.is_file()} == before_store
    assert sorted(p.name for p in runs.iterdir()) == ["r1", "r2", "snapshots"]
    assert list((runs / "r2").iterdir()) == []  # no partial files, not even hidden ones
    assert [p.name for p in (runs / "r1").iterdir()] == ["snapshot"]
    good = write_source(data, good_lines(50), [], every=1)  # the good content back upstream
    assert snapshot.run(cfg_for(good), runs / "r1") == first  # still complete: a rerun does nothing


# -- bad Params and settings: the trigger form where its schema can tell, else the first task -------

@pytest.fixture(scope="module")
def dag(airflow_db):
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(REPO / "dags" / "gemma_lora_finetune.py"))
    assert bag.import_errors == {}
    return bag.get_dag("gemma_lora_finetune")


@pytest.mark.parametrize("key, bad", [("bad_record_policy", "ignore"), ("max_bad_share", 1.5), ("num_examples", 0)])
def test_trigger_form_rejects_what_its_schema_can(dag, key, bad):
    from airflow.sdk.exceptions import ParamValidationError

    params = copy.deepcopy(dag.params)
    with pytest.raises(ParamValidationError, match=key):
        params[key] = bad  # the form checks each value as it is set
        params.validate()


def test_first_task_rejects_what_the_schema_cannot_naming_the_param(dag, tmp_path):
    from tasks.modeling.presets import ModelSourceError

    # A string the form takes; no keras-hub preset has that name.
    params = copy.deepcopy(dag.params)
    params["model_preset"] = "gemma_99b_en"
    values = params.validate()
    argv = stage_argv("snapshot", "tiny_test", str(tmp_path / "runs" / "r1"), values)  # what the DAG's task runs
    with pytest.raises(ModelSourceError, match="model_preset 'gemma_99b_en' is not a keras-hub preset"):
        snapshot.main(argv)
    assert not (tmp_path / "runs").exists()  # stopped before reading or writing anything


def test_bad_input_fails_the_task_at_once_and_a_crash_is_retried(dag, tmp_path, monkeypatch):
    """Every task gets the default retries (a killed task resumes); an error a retry would only repeat
    fails the task without them (AirflowFailException), anything else stays retryable."""
    import importlib.util

    from airflow.sdk.exceptions import AirflowFailException

    assert {t.retries for t in dag.tasks} == {2}
    spec = importlib.util.spec_from_file_location("gemma_dag_under_test", REPO / "dags" / "gemma_lora_finetune.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    bad = stage_argv("snapshot", "tiny_test", str(tmp_path / "runs" / "r1"), {"model_preset": "gemma_99b_en"})
    monkeypatch.setattr(module, "argv_for", lambda stage, spec=None: bad)
    with pytest.raises(AirflowFailException, match="ModelSourceError: model_preset 'gemma_99b_en'"):
        module.run_locally("snapshot")
    monkeypatch.setattr(module, "argv_for", lambda stage, spec=None: ["--config", "tiny_test", "--run-dir",
                                                                      str(tmp_path / "r2"), "--set", "lora_rank=0"])
    with pytest.raises(AirflowFailException, match="exited 2"):
        module.run_locally("snapshot")
    monkeypatch.setattr(snapshot, "run", lambda *a: (_ for _ in ()).throw(MemoryError("killed")))
    monkeypatch.setattr(module, "argv_for", lambda stage, spec=None: ["--config", "tiny_test", "--run-dir", str(tmp_path / "r3")])
    with pytest.raises(MemoryError):  # not one of NOT_RETRIED: Airflow retries it
        module.run_locally("snapshot")


def test_cli_rejects_a_bad_setting_naming_it(tmp_path):
    with pytest.raises(SystemExit) as e:
        snapshot.main(["--config", "tiny_test", "--run-dir", str(tmp_path / "r1"), "--set", "bad_record_policy=ignore"])
    assert e.value.code == 2
    with pytest.raises(ConfigError, match="'max_record_bytes'"):
        load_config("tiny_test", {"max_record_bytes": "0"})


def test_preflight_missing_kaggle_credentials_fails_in_seconds(tmp_path, monkeypatch):
    from tasks.modeling.presets import ModelSourceError

    monkeypatch.delenv("KAGGLE_USERNAME", raising=False)
    monkeypatch.delenv("KAGGLE_KEY", raising=False)
    monkeypatch.setenv("KAGGLE_CONFIG_DIR", str(tmp_path / "no-kaggle"))
    started = time.time()
    with pytest.raises(ModelSourceError, match="Kaggle credentials are missing"):
        snapshot.run(load_config("tiny_test", {"model_preset": "gemma_2b_en"}), tmp_path / "runs" / "r1")
    assert time.time() - started < 30  # keras-hub's preset list is imported, nothing is downloaded
    assert not (tmp_path / "runs").exists()


def test_preflight_rejects_an_invalid_prompt_suite(tmp_path):
    suite = tmp_path / "suite.yaml"
    suite.write_text("name: broken\nprompts: []\n")
    with pytest.raises(ConfigError, match="non-empty 'prompts' list"):
        snapshot.run(load_config("tiny_test", {"prompt_suite": str(suite)}), tmp_path / "runs" / "r1")
    assert not (tmp_path / "runs").exists()


def test_report_shows_skipped_records_by_reason(tiny_run, tmp_path):
    from tasks import report
    from tasks.evaluate.evaluation import evaluate

    run_dir = tmp_path / "run"
    shutil.copytree(tiny_run, run_dir)
    path = run_dir / "snapshot" / artifacts.MANIFEST
    manifest = json.loads(path.read_text())
    manifest["validation"].update(rows_read=1712, rows_bad=12, bad_share=12 / 1712,
                                  bad_by_reason={"duplicate": 5, "malformed_json": 7})
    path.write_text(json.dumps(manifest))
    cfg = load_config("tiny_test")
    html = report.render(report.gather(cfg, run_dir, evaluate(cfg, run_dir)))
    for row in ("<td>skipped: duplicate</td><td>5</td>", "<td>skipped: malformed_json</td><td>7</td>",
                "12 of 1712 skipped (0.70%)", manifest["snapshot_id"]):
        assert row in html
