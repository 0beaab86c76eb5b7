import collections
import difflib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tasks import snapshot
from tasks.pipeline import artifacts, snapshot_store
from tasks.infra.settings import run_dir_for
from tasks.pipeline.config import BUNDLED_DOLLY, load_config
from tasks.text import records
from tasks.pipeline.sources import SnapshotError
from tasks.text.records import DOLLY_CATEGORIES as CATEGORIES
from tests.conftest import DOLLY_OLDREV, REPO


def cfg_for(source, **kw):
    return load_config("tiny_test", {"dataset_source": str(source), **kw})


@pytest.mark.unit
def test_bundled_snapshot_manifest(tmp_path):
    result = snapshot.run(load_config("tiny_test"), tmp_path)
    manifest = artifacts.read_snapshot_manifest(tmp_path)
    records = [json.loads(x) for x in (tmp_path / "snapshot" / artifacts.RECORDS).read_text().splitlines()]
    assert manifest["row_count"] == len(records) == 1700 == result["row_count"]
    assert set(manifest["category_counts"]) == set(CATEGORIES)
    assert sum(manifest["category_counts"].values()) == 1700
    assert manifest["rows_with_context"] == sum(1 for r in records if r["context"].strip())
    assert manifest["sha256"] == snapshot_store.content_sha256(records) and len(manifest["sha256"]) == 64
    assert (tmp_path / "snapshot" / "_SUCCESS").is_file()


@pytest.mark.unit
def test_full_dolly_file(tmp_path, dolly_full):
    started = time.time()
    result = snapshot.run(cfg_for(dolly_full), tmp_path)
    manifest = artifacts.read_snapshot_manifest(tmp_path)
    assert result["row_count"] == 14996
    # Figures from the data set's own README.
    assert manifest["category_counts"]["open_qa"] == 3738
    assert manifest["category_counts"]["creative_writing"] == 707
    assert manifest["rows_with_context"] == 4461
    print(f"full Dolly snapshot in {time.time() - started:.1f} s")


@pytest.mark.unit
def test_content_hash_ignores_format_but_not_content(tmp_path, dolly_full):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [json.loads(x) for x in dolly_full.read_text().splitlines()[:200]]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    a = snapshot.run(cfg_for(tmp_path / "d.parquet"), tmp_path / "a")
    b = snapshot.run(cfg_for(tmp_path / "d.jsonl"), tmp_path / "b")
    assert a["sha256"] == b["sha256"] and a["row_count"] == 200
    rows[5]["response"] += " (edited)"
    (tmp_path / "e.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert snapshot.run(cfg_for(tmp_path / "e.jsonl"), tmp_path / "c")["sha256"] != a["sha256"]


@pytest.mark.unit
def test_rerun_is_a_no_op_and_a_changed_file_is_redone(tmp_path, dolly_full):
    src = tmp_path / "d.jsonl"
    src.write_text("".join(dolly_full.read_text().splitlines(keepends=True)[:50]))
    run_dir = tmp_path / "run"
    first = snapshot.run(cfg_for(src), run_dir)
    marker = run_dir / "snapshot" / "_SUCCESS"
    stamp = marker.stat().st_mtime_ns
    assert snapshot.run(cfg_for(src), run_dir) == first
    assert marker.stat().st_mtime_ns == stamp
    with src.open("a") as f:
        f.write(json.dumps({"instruction": "i", "context": "", "response": "r", "category": "open_qa"}) + "\n")
    assert snapshot.run(cfg_for(src), run_dir)["row_count"] == 51


@pytest.mark.unit
@pytest.mark.parametrize("policy", ["fail", "skip"])
@pytest.mark.parametrize(
    "line, words",
    [
        (b'{"instruction": "a", "response": "b"', ["line 3", "malformed JSON"]),
        (b'{"instruction": "a", "context": "", "category": "open_qa"}', ["line 3", "missing field 'response'"]),
        (b'{"instruction": 7, "context": "", "response": "b", "category": "open_qa"}', ["line 3", "'instruction'", "int"]),
        (b'{"instruction": "\xff\xfe", "context": "", "response": "b", "category": "open_qa"}', ["line 3", "UTF-8"]),
        (b'["a", "b"]', ["line 3", "JSON object"]),
    ],
)
def test_bad_records_name_line_and_field(tmp_path, line, words, policy):
    # "fail" stops at the bad line; "skip" drops it, but 1 bad record of 3 is over max_bad_share
    # (5%), and that error names the first bad records too. The two good records differ: identical
    # ones would be duplicates, bad records themselves.
    good = [json.dumps({"instruction": f"q{i}", "context": "", "response": "a", "category": "open_qa"}).encode() for i in (1, 2)]
    src = tmp_path / "bad.jsonl"
    src.write_bytes(good[0] + b"\n" + good[1] + b"\n" + line + b"\n")
    with pytest.raises(SnapshotError) as e:
        snapshot.run(cfg_for(src, bad_record_policy=policy), tmp_path / "run")
    for w in words:
        assert w in str(e.value)
    assert ("1 of 3 records are bad (33.3%)" in str(e.value)) == (policy == "skip")
    assert not (tmp_path / "run" / "snapshot").exists()
    assert not list((tmp_path / "run").glob(".snapshot.tmp-*"))
    assert not (tmp_path / "snapshots").exists()  # the shared store is not touched either


@pytest.mark.unit
def test_hub_fails_fast_when_switched_off(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    started = time.time()
    with pytest.raises(SnapshotError) as e:
        snapshot.run(load_config("gemma_2b_lora", {"model_preset": "tiny:gemma"}), tmp_path)
    assert time.time() - started < 5
    assert "hub" in str(e.value) and "dataset_source" in str(e.value)


@pytest.mark.unit
def test_hub_unreachable_fails_fast_via_cli(tmp_path):
    # A loopback port nobody listens on stands in for a hub that cannot be reached.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, HF_ENDPOINT=f"http://127.0.0.1:{port}")
    env.pop("HF_HUB_OFFLINE", None)
    started = time.time()
    # A model that needs no Kaggle credentials: the preflight (first) would otherwise stop on those.
    out = subprocess.run(
        [sys.executable, "-m", "tasks.snapshot", "--config", "gemma_2b_lora", "--run-dir", str(tmp_path),
         "--set", "model_preset=tiny:gemma"],
        capture_output=True, text=True, env=env,
    )
    assert out.returncode != 0
    assert time.time() - started < 20
    assert "unreachable" in out.stderr and "dataset_source" in out.stderr


# -- snapshot refresh: the shared store, "changed" vs the latest snapshot, the Asset event ----------

F = ("instruction", "context", "response", "category")
REF_MARK = re.compile(r"\[(?:\d+|[a-z])\]")


def _squeeze(text: str) -> str:
    return re.sub(r"\s+", "", REF_MARK.sub("", text))


@pytest.fixture(scope="session")
def dolly_second_revision(dolly_full, tmp_path_factory) -> tuple[Path, collections.Counter]:
    """The current Dolly with its April 2023 texts put back: a real "upstream changed" revision.

    Each old record replaces the current record it became (see the old revision's README): the same
    text once reference marks and whitespace are removed, or the same instruction (revised context or
    response); the one record with no current counterpart is appended.
    """
    if not DOLLY_OLDREV.is_file():
        pytest.skip(f"old Dolly revision not found at {DOLLY_OLDREV}")
    current = [json.loads(x) for x in dolly_full.read_text(encoding="utf-8").splitlines()]
    old = [json.loads(x) for x in DOLLY_OLDREV.read_text(encoding="utf-8").splitlines()]
    by_text, by_instruction = collections.defaultdict(list), collections.defaultdict(list)
    for i, r in enumerate(current):
        by_text[tuple(_squeeze(r[f]) for f in F)].append(i)
        by_instruction[r["instruction"]].append(i)
    revised, appended, relations, replaced = list(current), [], collections.Counter(), set()
    for o in old:
        relations[o["relation_to_current"]] += 1
        rec = {f: o[f] for f in F}
        if o["relation_to_current"] == "no_current_counterpart":
            appended.append(rec)
            continue
        if o["relation_to_current"] == "same_after_removing_refs_and_whitespace":
            candidates = by_text[tuple(_squeeze(o[f]) for f in F)]
        else:  # same_instruction_revised_context_or_response: the closest current text
            candidates = sorted(
                by_instruction[o["instruction"]],
                key=lambda i: (current[i]["category"] != o["category"],
                               -difflib.SequenceMatcher(None, current[i]["response"], o["response"]).ratio()),
            )
        assert candidates, o["instruction"][:80]
        replaced.add(candidates[0])
        revised[candidates[0]] = rec
    assert len(replaced) == len(old) - len(appended)  # every old record replaced a different one
    path = tmp_path_factory.mktemp("dolly-rev") / "dolly-april2023-texts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in revised + appended), encoding="utf-8")
    return path, relations


def store_of(runs: Path, source: Path | None = None) -> Path:
    """The store a snapshot of `source` (a file; None: the configured dataset) is published in."""
    return artifacts.snapshot_store(runs / "any", load_config("tiny_test").dataset_hub_id, source)


def published(store: Path) -> list[str]:
    return sorted(p.name for p in store.iterdir() if p.is_dir() and not p.name.startswith("."))


def manifest_of(run_dir: Path) -> dict:
    return artifacts.read_snapshot_manifest(run_dir)


def ids_of(path: Path) -> dict[str, dict]:
    return {r["id"]: r for r in map(json.loads, path.read_text(encoding="utf-8").splitlines())}


@pytest.mark.unit
def test_refresh_reuses_unchanged_and_diffs_the_real_old_revision(tmp_path, dolly_full, dolly_second_revision):
    revision2, relations = dolly_second_revision
    runs = tmp_path / "runs"  # run folders live in <run root>/runs/<run id>
    # One file whose content changes upstream: a store is keyed by the file that was read.
    dolly = tmp_path / "dolly.jsonl"
    store = store_of(runs, dolly)

    def upstream(revision: Path) -> Path:
        shutil.copyfile(revision, dolly)
        return dolly

    first = snapshot.run(cfg_for(upstream(dolly_full)), runs / "r1")
    assert first["changed"] and (first["rows_added"], first["rows_removed"], first["rows_changed"]) == (14996, 0, 0)
    assert manifest_of(runs / "r1")["previous_snapshot_id"] is None
    assert published(store) == [first["snapshot_id"]]
    assert (store / first["snapshot_id"] / "_SUCCESS").is_file()
    latest_stamp = (store / "LATEST.json").stat().st_mtime_ns

    # The same content again: reused, nothing published, LATEST.json untouched.
    second = snapshot.run(cfg_for(dolly), runs / "r2")
    m2 = manifest_of(runs / "r2")
    assert second["changed"] is False and m2["changed"] is False
    assert m2["snapshot_id"] == m2["previous_snapshot_id"] == first["snapshot_id"]
    assert (m2["changes"]["rows_added"], m2["changes"]["rows_removed"], m2["changes"]["rows_changed"]) == (0, 0, 0)
    assert published(store) == [first["snapshot_id"]]
    assert (store / "LATEST.json").stat().st_mtime_ns == latest_stamp
    assert (runs / "r2" / "snapshot" / artifacts.RECORDS).read_bytes() == (store / first["snapshot_id"] / artifacts.RECORDS).read_bytes()

    # The April 2023 texts: what the old revision's README implies.
    third = snapshot.run(cfg_for(upstream(revision2)), runs / "r3")
    m3 = manifest_of(runs / "r3")
    expect_changed = relations["same_after_removing_refs_and_whitespace"] + relations["same_instruction_revised_context_or_response"]
    assert (relations["same_after_removing_refs_and_whitespace"], relations["same_instruction_revised_context_or_response"],
            relations["no_current_counterpart"]) == (2440, 163, 1)
    assert third["changed"] and third["row_count"] == 14996 + relations["no_current_counterpart"]
    assert (third["rows_changed"], third["rows_added"], third["rows_removed"]) == (expect_changed, 1, 0) == (2603, 1, 0)
    assert m3["previous_snapshot_id"] == first["snapshot_id"] and m3["snapshot_id"] == third["snapshot_id"]
    assert published(store) == sorted([first["snapshot_id"], third["snapshot_id"]])
    assert json.loads((store / "LATEST.json").read_text())["snapshot_id"] == third["snapshot_id"]
    before, after = ids_of(store / first["snapshot_id"] / artifacts.RECORDS), ids_of(runs / "r3" / "snapshot" / artifacts.RECORDS)
    examples = m3["changes"]["examples"]
    assert len(examples["changed"]) == 5 and examples["removed"] == []
    for pair in examples["changed"]:
        old, new = before[pair["from"]], after[pair["to"]]
        assert pair["from"] not in after and pair["to"] not in before
        assert snapshot_store.change_key(old) == snapshot_store.change_key(new)
    [added] = examples["added"]
    # the pre-fix row that repeated its instruction
    assert records.response(after[added]) == records.instruction(after[added])

    # Back to the current texts: content seen before, so its folder is reused, yet it is a change.
    fourth = snapshot.run(cfg_for(upstream(dolly_full)), runs / "r4")
    assert fourth["changed"] and fourth["snapshot_id"] == first["snapshot_id"]
    assert (fourth["rows_changed"], fourth["rows_added"], fourth["rows_removed"]) == (2603, 0, 1)
    assert published(store) == sorted([first["snapshot_id"], third["snapshot_id"]])
    print(f"old-revision refresh: {third['rows_added']} added, {third['rows_removed']} removed, {third['rows_changed']} changed")


@pytest.mark.unit
def test_retry_after_the_store_was_updated_still_reports_the_change(tmp_path):
    src = tmp_path / "d.jsonl"
    src.write_text("".join(BUNDLED_DOLLY.read_text(encoding="utf-8").splitlines(keepends=True)[:30]))
    runs = tmp_path / "runs"
    first = snapshot.run(cfg_for(src), runs / "r1")
    # The first attempt died after it had updated the store but before its stage folder was published.
    shutil.rmtree(runs / "r1" / "snapshot")
    retry = snapshot.run(cfg_for(src), runs / "r1")
    assert retry["changed"] and retry["snapshot_id"] == first["snapshot_id"] and retry["rows_added"] == 30
    assert snapshot.run(cfg_for(src), runs / "r2")["changed"] is False  # another run: unchanged


@pytest.mark.unit
@pytest.mark.parametrize("damage", ["truncate", "edit"])
def test_a_damaged_snapshot_in_the_store_is_never_reused(tmp_path, caplog, damage):
    """The store records each snapshot's records.jsonl sha256; a truncated or edited file is detected,
    named, and published again from the source, both as the latest (same content: still unchanged)
    and as content seen before (A -> B -> A)."""
    lines = BUNDLED_DOLLY.read_text(encoding="utf-8").splitlines(keepends=True)
    src = tmp_path / "d.jsonl"

    def content(n: int) -> Path:  # the file's content upstream: its first n lines
        src.write_text("".join(lines[:n]))
        return src

    runs = tmp_path / "runs"
    store = store_of(runs, src)
    first = snapshot.run(cfg_for(content(30)), runs / "r1")
    good = (store / first["snapshot_id"] / artifacts.RECORDS).read_bytes()

    def spoil():
        path = store / first["snapshot_id"] / artifacts.RECORDS
        path.write_bytes(good[: len(good) // 2] if damage == "truncate" else good.replace(b"a", b"e", 1))

    spoil()
    with caplog.at_level("WARNING", logger="gemma_pipeline"):
        again = snapshot.run(cfg_for(src), runs / "r2")
    assert f"latest snapshot {first['snapshot_id']} is not reused: its records.jsonl no longer matches" in caplog.text
    assert again["changed"] is False and again["snapshot_id"] == first["snapshot_id"]
    assert (store / first["snapshot_id"] / artifacts.RECORDS).read_bytes() == good

    snapshot.run(cfg_for(content(31)), runs / "r3")
    spoil()
    caplog.clear()
    with caplog.at_level("WARNING", logger="gemma_pipeline"):
        back = snapshot.run(cfg_for(content(30)), runs / "r4")
    assert f"replacing {store / first['snapshot_id']} in the store: its records.jsonl no longer matches" in caplog.text
    assert back["changed"] and back["snapshot_id"] == first["snapshot_id"] and back["rows_removed"] == 1
    assert (store / first["snapshot_id"] / artifacts.RECORDS).read_bytes() == good


@pytest.mark.unit
def test_manifest_records_preflight_and_validation(tmp_path):
    snapshot.run(load_config("tiny_test"), tmp_path / "runs" / "r1")
    m = manifest_of(tmp_path / "runs" / "r1")
    assert {k: v for k, v in m["preflight"].items() if k != "planned_tokens"} == {
        "model_preset": "tiny:gemma", "prompt_suite": "v1", "max_sequence_length": 8192}
    assert m["preflight"]["planned_tokens"]["total"] == 6336 and m["asset_uri"] == artifacts.asset_uri(m["dataset"])
    v = m["validation"]
    assert (v["policy"], v["rows_read"], v["rows_bad"], v["bad_by_reason"]) == ("skip", 1700, 0, {})


@pytest.mark.unit
@pytest.mark.parametrize("phase", ["run folder", "store"])
def test_killed_while_writing_leaves_nothing_half_written(tmp_path, dolly_full, phase):
    runs = tmp_path / "runs"
    run_dir, store = runs / "r1", store_of(runs, dolly_full)
    argv = [sys.executable, "-m", "tasks.snapshot", "--config", "tiny_test", "--run-dir", str(run_dir),
            "--set", f"dataset_source={dolly_full}"]
    proc = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    # Kill it (SIGKILL: no cleanup) as soon as it writes into its temp folder there.
    where, pattern = (run_dir, ".snapshot.tmp-*/*") if phase == "run folder" else (store, "." + "?" * 16 + ".tmp-*")
    deadline = time.time() + 120
    while proc.poll() is None and time.time() < deadline and not list(where.glob(pattern)):
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "the snapshot finished before it could be killed"
    # What a reader can see is whole or absent: a folder is published by a rename, its marker inside.
    assert not (run_dir / "snapshot").exists() or (run_dir / "snapshot" / "_SUCCESS").is_file()
    if store.exists():
        assert all((store / name / "_SUCCESS").is_file() for name in published(store))
        if (store / "LATEST.json").exists():
            assert json.loads((store / "LATEST.json").read_text())["snapshot_id"] in published(store)

    result = snapshot.run(cfg_for(dolly_full), run_dir)  # the retry completes
    assert result["changed"] and result["row_count"] == 14996
    assert (run_dir / "snapshot" / "_SUCCESS").is_file() and published(store) == [result["snapshot_id"]]
    assert not list(store.glob(".*.tmp-*"))  # the killed attempt's temp folder is gone


@pytest.mark.e2e
def test_asset_event_only_when_the_snapshot_changed(airflow_db, tmp_path, monkeypatch):
    """The configured dataset's Asset gets an event when its latest snapshot changed, none when it
    did not, and none for a run that read a file of its own (that has a store of its own)."""
    from airflow.dag_processing.dagbag import DagBag
    from airflow.models.asset import AssetEvent, AssetModel
    from airflow.utils.session import create_session

    # A run root of its own, so the first snapshot of the configured (bundled) data is a change.
    monkeypatch.setenv("GEMMA_RUN_ROOT", str(tmp_path / "root"))
    dag = DagBag(dag_folder=str(REPO / "dags" / "gemma_lora_finetune.py")).get_dag("gemma_lora_finetune")

    def trigger(conf: dict | None = None) -> tuple[dict, list]:
        # Only snapshot and snapshot_changed run; the later stages are marked done.
        run = dag.test(run_conf=conf or {}, mark_success_pattern="preprocess|finetune|generate|report|approve|promote")
        states = {ti.task_id: ti.state for ti in run.get_task_instances()}
        with create_session() as session:
            events = [
                (uri, e.source_task_id, e.extra)
                for e, uri in session.query(AssetEvent, AssetModel.uri)
                .join(AssetModel, AssetModel.id == AssetEvent.asset_id)
                .filter(AssetEvent.source_run_id == run.run_id)
            ]
        return states, events, run.run_id

    states, events, run_id = trigger()
    assert states["snapshot"] == "success" and states["snapshot_changed"] == "success"
    manifest = manifest_of(run_dir_for(run_id))
    assert manifest["changed"] is True and manifest["source_kind"] == "bundled"
    assert events == [(
        artifacts.asset_uri(manifest["dataset"]), "snapshot_changed",
        {"sha256": manifest["sha256"], "row_count": manifest["row_count"], "revision": manifest["revision"],
         "snapshot_id": manifest["snapshot_id"], "rows_added": manifest["changes"]["rows_added"],
         "rows_removed": manifest["changes"]["rows_removed"], "rows_changed": manifest["changes"]["rows_changed"]},
    )]

    states, events, run_id = trigger()  # the same content again
    assert states["snapshot"] == "success" and states["snapshot_changed"] == "skipped"
    assert manifest_of(run_dir_for(run_id))["changed"] is False
    assert events == []

    src = tmp_path / "d.jsonl"  # a file of the trigger's own: new content, yet no event for the dataset
    src.write_text("".join(BUNDLED_DOLLY.read_text(encoding="utf-8").splitlines(keepends=True)[:40]))
    states, events, run_id = trigger({"dataset_source": str(src)})
    assert states["snapshot"] == "success" and states["snapshot_changed"] == "skipped"
    assert manifest_of(run_dir_for(run_id))["changed"] is True and events == []


@pytest.mark.unit
def test_a_file_snapshot_never_moves_the_configured_datasets_latest(tmp_path):
    """A trigger that points dataset_source at a file gets a store of its own: the configured
    dataset's latest snapshot (and so its Asset) only moves for the hub or the bundled sample."""
    runs = tmp_path / "runs"
    configured = snapshot.run(load_config("tiny_test"), runs / "r1")  # tiny_test reads the bundled sample
    latest = (store_of(runs) / "LATEST.json").read_bytes()
    assert configured["asset_uri"] == artifacts.asset_uri(load_config("tiny_test").dataset_hub_id)
    own = tmp_path / "mine.jsonl"
    own.write_text("".join(BUNDLED_DOLLY.read_text(encoding="utf-8").splitlines(keepends=True)[:20]))
    mine = snapshot.run(cfg_for(own), runs / "r2")
    assert mine["changed"] and mine["asset_uri"] is None
    assert (store_of(runs) / "LATEST.json").read_bytes() == latest
    assert json.loads((store_of(runs, own) / "LATEST.json").read_text())["snapshot_id"] == mine["snapshot_id"]
    assert store_of(runs, own).name.startswith("file--mine.jsonl--") and store_of(runs, own).parent == store_of(runs).parent
