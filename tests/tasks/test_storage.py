"""storage.publishing: the one way every folder and file is published (stages, snapshot store,
checkpoints, imported and tiny models, JSON files)."""

import os
import subprocess
import sys

import pytest

from tasks.pipeline import storage

pytestmark = pytest.mark.unit


def dead_pid() -> int:
    """The pid of a process that has exited (a killed attempt's)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_folder_appears_whole_under_its_final_name(tmp_path):
    final = tmp_path / "stage"
    with storage.publishing(final) as tmp:
        assert tmp.name == f".stage.tmp-{os.getpid()}" and tmp.is_dir() and not final.exists()
        (tmp / "a.txt").write_text("new")
    assert (final / "a.txt").read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["stage"]


def test_a_failure_leaves_the_published_version_and_no_temp(tmp_path):
    final = tmp_path / "stage"
    with storage.publishing(final) as tmp:
        (tmp / "a.txt").write_text("old")
    with pytest.raises(storage.DiskFullError, match=f"the disk is full: publishing {final} failed"):
        with storage.publishing(final) as tmp:
            (tmp / "a.txt").write_text("half")
            raise OSError(28, "No space left on device")
    assert (final / "a.txt").read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["stage"]
    with pytest.raises(PermissionError):  # any other OSError stays itself, the temp removed all the same
        with storage.publishing(final) as tmp:
            raise PermissionError(13, "Permission denied", str(tmp / "a.txt"))
    assert (final / "a.txt").read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["stage"]


def test_a_published_folder_is_replaced_whole(tmp_path):
    final = tmp_path / "stage"
    for text in ("one", "two"):
        with storage.publishing(final) as tmp:
            (tmp / text).write_text(text)
    assert [p.name for p in final.iterdir()] == ["two"] and sorted(p.name for p in tmp_path.iterdir()) == ["stage"]


def test_a_file_is_published_by_one_rename(tmp_path):
    final = tmp_path / "x.json"
    storage.write_json(final, {"a": 1})
    storage.write_json(final, {"a": 2})
    assert storage.read_json(final) == {"a": 2} and [p.name for p in tmp_path.iterdir()] == ["x.json"]


def test_keep_existing_drops_the_new_build_when_another_process_finished_first(tmp_path):
    final = tmp_path / "model"
    with storage.publishing(final) as tmp:
        (tmp / "done").write_text("theirs")
    with storage.publishing(final, keep_existing=lambda d: (d / "done").is_file()) as tmp:
        (tmp / "done").write_text("mine")
    assert (final / "done").read_text() == "theirs" and sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_temps_of_killed_attempts_are_removed_and_live_ones_kept(tmp_path):
    gone = dead_pid()
    stale = [tmp_path / f".stage.tmp-{gone}", tmp_path / f".stage.old-{gone}", tmp_path / f".x.json.tmp-{gone}"]
    live = tmp_path / f".stage.tmp-{os.getppid()}"
    for p in stale[:2] + [live]:
        p.mkdir()
    stale[2].write_text("{")
    with storage.publishing(tmp_path / "stage"):
        pass
    # Publishing `stage` cleans up after `stage` only; the whole-folder sweep takes the rest.
    assert not stale[0].exists() and not stale[1].exists() and stale[2].exists() and live.exists()
    storage.remove_stale_temps(tmp_path)
    assert not stale[2].exists() and live.exists()
