"""A full disk while a stage publishes: the stage fails saying the disk is full and where, the outputs
published before stay intact, and no temp folder is left.

On a machine where the test may mount a filesystem (root, as CI runs here) the run folder is on a real
size-limited tmpfs that is filled up; elsewhere ENOSPC is raised by the write calls themselves
(`injected_enospc`), and the test says which in its id."""

import errno
import os
import shutil
import subprocess
import uuid

import pytest

from tasks import preprocess, snapshot
from tasks.pipeline import artifacts, storage
from tasks.pipeline.config import load_config

pytestmark = pytest.mark.e2e

SETTINGS = {"num_examples": "32", "heldout_examples": "8"}


def _mount_tmpfs(path, size="64m") -> bool:
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0 or not shutil.which("mount"):
        return False
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    return done.returncode == 0


@pytest.fixture(params=["tmpfs", "injected_enospc"])
def small_disk(request, tmp_path, monkeypatch):
    """(a folder, fill(): leave no space there, how): a real 64 MiB tmpfs filled up (where this test
    may mount one: root), or ENOSPC raised by every write under the folder."""
    root = tmp_path / f"disk-{uuid.uuid4().hex[:8]}"
    if request.param == "tmpfs":
        if not _mount_tmpfs(root):
            pytest.skip("mounting a tmpfs needs root; the injected_enospc case covers this machine")

        def fill():
            for name, block in (("filler", 1 << 20), ("filler2", 1024)):
                try:
                    with (root / name).open("wb") as f:
                        while True:
                            f.write(b"\0" * block)
                            f.flush()
                except OSError as exc:
                    assert exc.errno == errno.ENOSPC

        yield root, fill, "tmpfs"
        subprocess.run(["umount", "-l", str(root)], check=False)
        return

    root.mkdir()

    def fill():
        import builtins
        import io

        real_open = io.open

        def full_open(file, mode="r", *args, **kwargs):
            if str(file).startswith(str(root)) and any(c in mode for c in "wax+"):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(file))
            return real_open(file, mode, *args, **kwargs)

        # pathlib writes through io.open, json/shutil through the builtin: the same function, both names.
        monkeypatch.setattr(io, "open", full_open)
        monkeypatch.setattr(builtins, "open", full_open)

    yield root, fill, "injected_enospc"


def test_a_full_disk_fails_the_stage_clearly_and_keeps_what_was_published(small_disk):
    root, fill, how = small_disk
    run_dir = root / "runs" / "r1"
    cfg = load_config("tiny_test", SETTINGS)
    snapshot.run(cfg, run_dir)
    preprocess.run(cfg, run_dir)
    published = storage.file_hashes(run_dir / artifacts.PREPROCESS)
    assert published

    fill()
    with pytest.raises(storage.DiskFullError) as failure:
        preprocess.run(cfg, run_dir, force=True)
    message = str(failure.value)
    print(f"[{how}] {message}")
    assert message.startswith(f"the disk is full: publishing {run_dir / artifacts.PREPROCESS} failed (No space left on device")
    assert f"on the filesystem of {run_dir}." in message
    assert "previously published outputs are intact" in message
    if how == "tmpfs":
        assert "MiB free of 64 MiB" in message
    # What was published before is whole and unchanged; no temp of the failed attempt is left.
    assert storage.file_hashes(run_dir / artifacts.PREPROCESS) == published
    assert not [p.name for p in run_dir.iterdir() if ".tmp-" in p.name or ".old-" in p.name]
