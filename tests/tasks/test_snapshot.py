import json
import os
import socket
import subprocess
import sys
import time

import pytest

from tasks import snapshot
from tasks.config import load_config
from tasks.snapshot import CATEGORIES, SnapshotError


def cfg_for(source, **kw):
    return load_config("tiny_test", {"dataset_source": str(source), **kw})


def test_bundled_snapshot_manifest(tmp_path):
    result = snapshot.run(load_config("tiny_test"), tmp_path)
    manifest = json.loads((tmp_path / "snapshot" / "manifest.json").read_text())
    records = [json.loads(x) for x in (tmp_path / "snapshot" / "records.jsonl").read_text().splitlines()]
    assert manifest["row_count"] == len(records) == 1700 == result["row_count"]
    assert set(manifest["category_counts"]) == set(CATEGORIES)
    assert sum(manifest["category_counts"].values()) == 1700
    assert manifest["rows_with_context"] == sum(1 for r in records if r["context"].strip())
    assert manifest["sha256"] == snapshot.content_sha256(records) and len(manifest["sha256"]) == 64
    assert (tmp_path / "snapshot" / "_SUCCESS").is_file()


def test_full_dolly_file(tmp_path, dolly_full):
    started = time.time()
    result = snapshot.run(cfg_for(dolly_full), tmp_path)
    manifest = json.loads((tmp_path / "snapshot" / "manifest.json").read_text())
    assert result["row_count"] == 14996
    # Figures from the data set's own README.
    assert manifest["category_counts"]["open_qa"] == 3738
    assert manifest["category_counts"]["creative_writing"] == 707
    assert manifest["rows_with_context"] == 4461
    print(f"full Dolly snapshot in {time.time() - started:.1f} s")


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
def test_bad_records_name_line_and_field(tmp_path, line, words):
    good = json.dumps({"instruction": "q", "context": "", "response": "a", "category": "open_qa"}).encode()
    src = tmp_path / "bad.jsonl"
    src.write_bytes(good + b"\n" + good + b"\n" + line + b"\n")
    with pytest.raises(SnapshotError) as e:
        snapshot.run(cfg_for(src), tmp_path / "run")
    for w in words:
        assert w in str(e.value)
    assert not (tmp_path / "run" / "snapshot").exists()
    assert not list((tmp_path / "run").glob(".snapshot.tmp-*"))


def test_hub_fails_fast_when_switched_off(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    started = time.time()
    with pytest.raises(SnapshotError) as e:
        snapshot.run(load_config("gemma_2b_lora", {"model_preset": "tiny:gemma"}), tmp_path)
    assert time.time() - started < 5
    assert "hub" in str(e.value) and "dataset_source" in str(e.value)


def test_hub_unreachable_fails_fast_via_cli(tmp_path):
    # A loopback port nobody listens on stands in for a hub that cannot be reached.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, HF_ENDPOINT=f"http://127.0.0.1:{port}")
    env.pop("HF_HUB_OFFLINE", None)
    started = time.time()
    out = subprocess.run(
        [sys.executable, "-m", "tasks.snapshot", "--config", "gemma_2b_lora", "--run-dir", str(tmp_path)],
        capture_output=True, text=True, env=env,
    )
    assert out.returncode != 0
    assert time.time() - started < 20
    assert "unreachable" in out.stderr and "dataset_source" in out.stderr
