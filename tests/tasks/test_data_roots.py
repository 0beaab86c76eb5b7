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
        sources.check_file(data / "innocent.jsonl", settings.data_roots())


def test_only_supported_suffixes_are_read(roots):
    data, _ = roots
    for name in ("notes.txt", "passwd", "model.h5"):
        (data / name).write_text("x")
        with pytest.raises(SnapshotError, match="is not read; the formats are .jsonl, .json, .parquet, .csv"):
            sources.check_file(data / name, settings.data_roots())


def test_a_file_swapped_after_its_check_is_not_read(roots):
    data, kaggle = roots
    good = data / "d.jsonl"
    good.write_text(BUNDLED_DOLLY.read_text(encoding="utf-8").splitlines(keepends=True)[0])
    path, checked = sources.check_file(good, settings.data_roots())
    other = data / "other.jsonl"
    other.write_text("{}\n")
    os.replace(other, good)  # another file at the checked path
    with pytest.raises(SnapshotError, match="changed between its check and its reading"):
        sources.read_local(path, load_config("tiny_test"), checked)
    good.unlink()
    good.symlink_to(kaggle)  # a symlink swapped in: never followed
    with pytest.raises(SnapshotError, match="could not be opened as the file checked"):
        sources.read_local(path, load_config("tiny_test"), checked)


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
