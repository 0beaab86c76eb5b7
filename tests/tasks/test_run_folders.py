"""Run ids name run folders: never `.`/`..`, never a separator, never two ids in one folder, never
past the 255-byte name limit; and the report app serves nothing outside <run root>/runs/<folder>."""

import importlib.util
import os

import pytest

from tasks.pipeline import artifacts
from tasks.infra.settings import run_dir_for, run_folder_name, runs_dir

pytestmark = pytest.mark.unit

REPO = __import__("pathlib").Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("run_id", ["..", ".", "...", "%2E%2E", "../report", "a/b", "a\\b", ".hidden", "", "x" * 400,
                                    "é" * 200, "manual__2026-11-28T04:29:00+00:00"])
def test_a_folder_name_is_one_plain_portable_component(run_id):
    name = run_folder_name(run_id)
    assert name not in ("", ".", "..") and not name.startswith(".")
    assert "/" not in name and "\\" not in name and len(name.encode()) <= 255
    assert run_dir_for(run_id).parent == runs_dir()


def test_plain_ids_keep_their_name_and_changed_ones_never_collide():
    assert run_folder_name("scheduled__2026-11-28T00_00_00") == "scheduled__2026-11-28T00_00_00"
    # Both sanitize to manual__2026-11-28T04_29_00_00_00: the hash of the original keeps them apart.
    pair = ["manual__2026-11-28T04:29:00+00:00", "manual__2026-11-28T04_29_00_00_00"]
    assert len({run_folder_name(r) for r in pair}) == 2
    long = ["y" * 300 + "a", "y" * 300 + "b"]
    assert len({run_folder_name(r) for r in long}) == 2


def plugin():
    spec = importlib.util.spec_from_file_location("gemma_reports_under_test", REPO / "plugins" / "gemma_reports.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_report_app_resolves_only_run_folders(tmp_path, monkeypatch):
    monkeypatch.setenv("GEMMA_RUN_ROOT", str(tmp_path))
    app = plugin()
    planted = [tmp_path / "report", tmp_path / "runs" / "report"]
    for folder in planted:
        folder.mkdir(parents=True)
        (folder / artifacts.REPORT_HTML).write_text("planted")
    for run_id in ("..", ".", "../..", "report/..", "%2E%2E"):
        assert app.report_file(run_id) is None, run_id
    good = run_dir_for("manual__2026-11-28T04:29:00+00:00")
    artifacts.report_path(good).parent.mkdir(parents=True)
    artifacts.report_path(good).write_text("the run's report")
    assert app.report_file("manual__2026-11-28T04:29:00+00:00") == artifacts.report_path(good).resolve()
    # A folder made before ids were hashed (the plain sanitized id) is still found.
    legacy = tmp_path / "runs" / "manual__2026-11-27T04_29_00_00_00"
    artifacts.report_path(legacy).parent.mkdir(parents=True)
    artifacts.report_path(legacy).write_text("an older run's report")
    assert app.report_file("manual__2026-11-27T04:29:00+00:00") == artifacts.report_path(legacy).resolve()
    assert os.path.commonpath([app.report_file("manual__2026-11-27T04:29:00+00:00"), tmp_path / "runs"]) == str(tmp_path / "runs")


def test_the_report_app_serves_no_symlink(tmp_path, monkeypatch):
    """A report.html (or report/ folder) inside a run folder that is a symlink is not served: the
    app would otherwise read whatever it points at (/etc/hostname was)."""
    monkeypatch.setenv("GEMMA_RUN_ROOT", str(tmp_path))
    app = plugin()
    secret = tmp_path / "outside.txt"
    secret.write_text("not a report")
    linked_file, linked_dir = run_dir_for("linked-file"), run_dir_for("linked-dir")
    artifacts.report_path(linked_file).parent.mkdir(parents=True)
    artifacts.report_path(linked_file).symlink_to(secret)
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / artifacts.REPORT_HTML).write_text("a report elsewhere")
    linked_dir.mkdir(parents=True)
    artifacts.report_path(linked_dir).parent.symlink_to(tmp_path / "elsewhere")
    assert app.report_file("linked-file") is None and app.report_file("linked-dir") is None
    real = run_dir_for("real")
    artifacts.report_path(real).parent.mkdir(parents=True)
    artifacts.report_path(real).write_text("the run's report")
    assert app.report_file("real") == artifacts.report_path(real)


def test_the_report_goes_out_with_a_strict_policy():
    """Its own inline style and script are allowed by their sha256 and nothing else runs or loads;
    the page is sandboxed, framed only by the Airflow UI, never sniffed or cached."""
    import base64
    import hashlib

    app = plugin()
    style, script = "body { color: red }", "document.title = 'x';"
    headers = app.security_headers(f"<html><style>{style}</style><p>hi</p><script>{script}</script></html>")
    digest = {k: base64.b64encode(hashlib.sha256(v.encode()).digest()).decode() for k, v in (("style", style), ("script", script))}
    csp = dict(d.strip().split(" ", 1) for d in headers["Content-Security-Policy"].split(";"))
    assert csp["default-src"] == "'none'" and csp["frame-ancestors"] == "'self'" and csp["sandbox"] == "allow-scripts"
    assert csp["script-src"] == f"'sha256-{digest['script']}'" and csp["style-src"] == f"'sha256-{digest['style']}'"
    assert headers["X-Content-Type-Options"] == "nosniff" and headers["Cache-Control"] == "no-store"
    assert "'none'" == dict(d.strip().split(" ", 1) for d in app.security_headers("<p>no script</p>")["Content-Security-Policy"].split(";"))["script-src"]


@pytest.mark.parametrize("run_id", [artifacts.CHAMPION, artifacts.CHAMPION_LOG, artifacts.SNAPSHOT_STORE, "Snapshots", "CHAMPION.JSON"])
def test_a_run_id_named_like_a_shared_file_gets_a_folder_of_its_own(run_id, tmp_path, monkeypatch):
    """champion.json, the champion log and the snapshot store sit beside the run folders: a run named
    like one of them must not become a folder in its place (every later promote would fail) or
    inside the store."""
    monkeypatch.setenv("GEMMA_RUN_ROOT", str(tmp_path))
    name = run_folder_name(run_id)
    assert name.lower() not in {artifacts.CHAMPION, artifacts.CHAMPION_LOG, artifacts.SNAPSHOT_STORE}
    assert name.split("+")[0] == run_id and "+" in name  # the id, then the hash of it
    run_dir = run_dir_for(run_id)
    assert artifacts.champion_path(run_dir) == runs_dir() / artifacts.CHAMPION != run_dir
    assert artifacts.snapshot_store(run_dir, "databricks/databricks-dolly-15k").parent != run_dir
