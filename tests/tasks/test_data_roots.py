"""Whoever may trigger the DAG chooses `dataset_source`: the first task reads only a file inside
`[gemma] data_roots` (symlinks followed, the opened file the checked one, supported suffixes only)
and only the hub datasets `[gemma] hub_datasets` allows. A refused file's content and field names
appear nowhere: not in the error, the log, the run folder or the snapshot store."""

from __future__ import annotations

import json
import os

import pytest

from tasks import snapshot
from tasks.infra import settings
from tasks.pipeline import sources
from tasks.pipeline.config import BUNDLED_DOLLY, load_config
from tasks.pipeline.sources import SnapshotError

pytestmark = pytest.mark.unit

SECRET_USER, SECRET_KEY = "user-7f3a9c", "key-0d41e8b26c"


@pytest.fixture
def roots(tmp_path, monkeypatch):
    """A run root whose only data root is <run root>/data (the default), with a kaggle.json beside it."""
    monkeypatch.delenv("GEMMA_DATA_ROOTS", raising=False)
    monkeypatch.setenv("GEMMA_RUN_ROOT", str(tmp_path / "root"))
    (tmp_path / "root" / "data").mkdir(parents=True)
    kaggle = tmp_path / "home" / ".kaggle" / "kaggle.json"
    kaggle.parent.mkdir(parents=True)
    kaggle.write_text(json.dumps({"username": SECRET_USER, "key": SECRET_KEY}))
    return tmp_path / "root" / "data", kaggle


def test_a_file_outside_the_data_roots_is_refused_and_nothing_of_it_appears(roots, tmp_path, caplog, capfd):
    data, kaggle = roots
    assert settings.data_roots() == [BUNDLED_DOLLY.parent, data]
    cfg = load_config("tiny_test", {"dataset_source": str(kaggle), "dataset_format": "columns",
                                    "dataset_columns": {"instruction": "username", "response": "key"}, "max_bad_share": 1.0})
    run_dir = tmp_path / "root" / "runs" / "r1"
    with caplog.at_level("DEBUG"), pytest.raises(SnapshotError) as e:
        snapshot.run(cfg, run_dir)
    assert f"dataset_source {str(kaggle)!r} is outside the data roots ([gemma] data_roots" in str(e.value)
    out, err = capfd.readouterr()
    written = "".join(p.read_text(errors="replace") for p in (tmp_path / "root").rglob("*") if p.is_file())
    for text in (str(e.value), caplog.text, out, err, written):
        assert SECRET_USER not in text and SECRET_KEY not in text and '"username"' not in text
    assert not (run_dir / "snapshot").exists() and not (tmp_path / "root" / "runs" / "snapshots").exists()


def test_a_symlink_in_a_root_to_a_file_outside_is_refused(roots):
    data, kaggle = roots
    (data / "innocent.jsonl").symlink_to(kaggle)
    with pytest.raises(SnapshotError, match="outside the data roots"):
        sources.check_file(data / "innocent.jsonl", settings.data_roots(), settings.source_limits())


def test_only_supported_suffixes_are_read(roots):
    data, _ = roots
    for name in ("notes.txt", "passwd", "model.h5"):
        (data / name).write_text("x")
        with pytest.raises(SnapshotError, match="is not read; the formats are .jsonl, .json, .parquet, .csv"):
            sources.check_file(data / name, settings.data_roots(), settings.source_limits())


def test_a_file_swapped_after_its_check_is_not_read(roots):
    data, kaggle = roots
    good = data / "d.jsonl"
    good.write_text(BUNDLED_DOLLY.read_text(encoding="utf-8").splitlines(keepends=True)[0])
    path, checked = sources.check_file(good, settings.data_roots(), settings.source_limits())
    other = data / "other.jsonl"
    other.write_text("{}\n")
    os.replace(other, good)  # another file at the checked path
    with pytest.raises(SnapshotError, match="changed between its check and its reading"):
        sources.read_local(path, load_config("tiny_test"), checked, settings.source_limits())
    good.unlink()
    good.symlink_to(kaggle)  # a symlink swapped in: never followed
    with pytest.raises(SnapshotError, match="could not be opened as the file checked"):
        sources.read_local(path, load_config("tiny_test"), checked, settings.source_limits())


def test_a_file_in_a_root_is_read_and_a_root_can_be_added(roots, tmp_path, monkeypatch):
    data, _ = roots
    lines = BUNDLED_DOLLY.read_text(encoding="utf-8").splitlines(keepends=True)[:30]
    (data / "mine.jsonl").write_text("".join(lines))
    assert snapshot.run(load_config("tiny_test", {"dataset_source": str(data / "mine.jsonl")}), tmp_path / "root" / "runs" / "r1")["row_count"] == 30
    mounted = tmp_path / "mnt" / "datasets"
    mounted.mkdir(parents=True)
    (mounted / "theirs.jsonl").write_text("".join(lines))
    cfg = load_config("tiny_test", {"dataset_source": str(mounted / "theirs.jsonl")})
    with pytest.raises(SnapshotError, match="outside the data roots"):
        snapshot.run(cfg, tmp_path / "root" / "runs" / "r2")
    monkeypatch.setenv("GEMMA_DATA_ROOTS", os.pathsep.join([str(data), str(mounted)]))
    assert snapshot.run(cfg, tmp_path / "root" / "runs" / "r2")["row_count"] == 30


def test_only_allowed_hub_datasets(roots, tmp_path, monkeypatch):
    cfg = load_config("tiny_test", {"dataset_source": "hub", "dataset_hub_id": "someone/private-data"})
    with pytest.raises(SnapshotError, match=r"'someone/private-data' is not one of the hub datasets .*\[gemma\] hub_datasets"):
        snapshot.run(cfg, tmp_path / "root" / "runs" / "r1")
    assert settings.hub_datasets() == ["databricks/databricks-dolly-15k"]
    monkeypatch.setenv("GEMMA_HUB_DATASETS", "databricks/databricks-dolly-15k, someone/private-data")
    assert settings.hub_datasets() == ["databricks/databricks-dolly-15k", "someone/private-data"]


# -- bounded sources: [gemma] max_source_bytes / max_source_rows, streamed reading ----------------

def dolly_lines(n: int) -> list[str]:
    return BUNDLED_DOLLY.read_text(encoding="utf-8").splitlines(keepends=True)[:n]


def write_as(path, lines: list[str]):
    rows = [json.loads(x) for x in lines]
    if path.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=2)
    elif path.suffix == ".csv":
        import csv

        with path.open("w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    else:
        path.write_text("".join(lines), encoding="utf-8")
    return path


def test_a_source_larger_than_max_source_bytes_is_refused_before_it_is_read(roots, tmp_path, monkeypatch):
    data, _ = roots
    src = write_as(data / "big.jsonl", dolly_lines(20))
    monkeypatch.setenv("GEMMA_MAX_SOURCE_BYTES", "1000")
    with pytest.raises(SnapshotError, match=rf"is {src.stat().st_size:,} bytes, more than 1,000, the largest source read "
                                            r"\(\[gemma\] max_source_bytes / GEMMA_MAX_SOURCE_BYTES\)"):
        snapshot.run(load_config("tiny_test", {"dataset_source": str(src)}), tmp_path / "root" / "runs" / "r1")
    monkeypatch.setenv("GEMMA_MAX_SOURCE_BYTES", "lots")
    with pytest.raises(ValueError, match="max_source_bytes / GEMMA_MAX_SOURCE_BYTES must be a whole number of at least 1, not 'lots'"):
        settings.source_limits()


@pytest.mark.parametrize("suffix", [".jsonl", ".csv", ".parquet", ".json"])
def test_a_source_with_more_rows_than_max_source_rows_is_refused_in_every_format(roots, tmp_path, monkeypatch, suffix):
    data, _ = roots
    src = write_as(data / f"rows{suffix}", dolly_lines(6))
    cfg = load_config("tiny_test", {"dataset_source": str(src)})
    monkeypatch.setenv("GEMMA_MAX_SOURCE_ROWS", "6")
    assert snapshot.run(cfg, tmp_path / "root" / "runs" / "ok")["row_count"] == 6
    monkeypatch.setenv("GEMMA_MAX_SOURCE_ROWS", "4")
    with pytest.raises(SnapshotError, match=r"more than 4 records \((5|6) or more\), the most a source may hold "
                                            r"\(\[gemma\] max_source_rows / GEMMA_MAX_SOURCE_ROWS\)"):
        snapshot.run(cfg, tmp_path / "root" / "runs" / "r1")
    assert not (tmp_path / "root" / "runs" / "r1" / "snapshot").exists()


def test_a_huge_line_is_one_bad_record_read_in_bounded_memory(tmp_path):
    """A 30 MB line is skipped in pieces (its size counted, never held whole) and the records after
    it are read as usual."""
    import tracemalloc

    lines = dolly_lines(3)
    src = tmp_path / "huge.jsonl"
    with src.open("wb") as f:
        f.write(lines[0].encode())
        f.write(b'{"instruction": "' + b"x" * 30_000_000 + b'"}\n')
        f.write("".join(lines[1:]).encode())
    tracemalloc.start()
    with src.open("rb") as f:
        rows = list(sources.jsonl_rows(f, 100_000))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert [w for w, _ in rows] == ["line 1", "line 2", "line 3", "line 4"]
    bad = rows[1][1]
    assert isinstance(bad, sources.BadRecord) and bad.reason == "too_large" and "30,000,019 bytes" in bad.detail
    assert all(isinstance(r, dict) for _, r in rows[:1] + rows[2:])
    assert peak < 4_000_000, f"peak {peak:,} bytes while skipping a 30 MB line"


# -- [gemma] model_roots: a local model_preset directory --------------------------------------------

def test_a_model_preset_outside_the_model_roots_is_refused_by_the_first_task(tmp_path, monkeypatch):
    from tasks.modeling import presets

    models = tmp_path / "models"
    (models / "mine").mkdir(parents=True)
    (models / "mine" / "config.json").write_text("{}")
    elsewhere = tmp_path / "team-b" / "checkpoint"
    elsewhere.mkdir(parents=True)
    (elsewhere / "config.json").write_text('{"secret_field": 1}')
    (models / "linked").symlink_to(elsewhere)
    monkeypatch.setenv("GEMMA_MODELS_DIR", str(models))
    monkeypatch.delenv("GEMMA_MODEL_ROOTS", raising=False)
    assert presets.model_roots() == [models.resolve()]
    presets.preflight(str(models / "mine"))  # inside: fine
    for outside in (str(elsewhere), str(models / "linked"), "/etc"):
        with pytest.raises(presets.ModelSourceError, match=r"is outside the model roots \(\[gemma\] model_roots / "
                                                           r"GEMMA_MODEL_ROOTS") as e:
            presets.preflight(outside)
        assert "secret_field" not in str(e.value)
    with pytest.raises(presets.ModelSourceError, match="outside the model roots"):
        snapshot.run(load_config("tiny_test", {"model_preset": str(elsewhere)}), tmp_path / "runs" / "r1")
    assert not (tmp_path / "runs" / "r1" / "snapshot").exists()
    monkeypatch.setenv("GEMMA_MODEL_ROOTS", os.pathsep.join([str(models), str(tmp_path / "team-b")]))
    presets.preflight(str(elsewhere))
    with pytest.raises(presets.ModelSourceError, match="holds no keras-hub preset"):
        presets.preflight(str(tmp_path / "team-b"))
