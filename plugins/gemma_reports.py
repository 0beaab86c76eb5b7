"""Airflow UI plugin: the quality report of each run of `gemma_lora_finetune`, behind Airflow's login.

- a FastAPI app mounted at /gemma-reports in the API server; every request must carry Airflow's own
  credentials (the UI's session cookie or a bearer token) and read access to the DAG's runs;
- a "Quality report" tab on each DAG-run page (an external view) that shows that run's report;
- a "Quality report" extra link on the `report` task instance.

The report holds untrusted text (dataset records, model answers; escaped by Jinja) and is served on
the API server's own origin, so it goes out with a strict Content-Security-Policy: sandboxed (an
opaque origin: its script cannot use the session cookie), nothing loaded from anywhere, its own
inline style and filter script allowed by their sha256 only; framed by the Airflow UI alone; never
cached. Only a regular file at `<run root>/runs/<run folder>/report/report.html` is served: no
symlink, nothing outside the run folders.
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
import stat
from pathlib import Path

from airflow.plugins_manager import AirflowPlugin
from airflow.sdk import BaseOperatorLink
from fastapi import Depends, FastAPI, HTTPException
from fastapi.responses import HTMLResponse

from tasks.infra.settings import DAG_ID, run_dir_for, runs_dir
from tasks.pipeline.artifacts import report_path

PREFIX = "/gemma-reports"


def _authorized():
    # Imported lazily: these live in the API server, which is the only process that serves the app.
    from airflow.api_fastapi.auth.managers.models.resource_details import DagAccessEntity
    from airflow.api_fastapi.core_api.security import requires_access_dag

    return requires_access_dag("GET", DagAccessEntity.RUN, param_dag_id=DAG_ID)


def create_app() -> FastAPI:
    app = FastAPI(title="Gemma LoRA quality reports", docs_url=None, redoc_url=None, openapi_url=None)

    @app.get("/runs/{dag_id}/{run_id}", dependencies=[Depends(_authorized())])
    def report(dag_id: str, run_id: str):
        if dag_id != DAG_ID:
            raise HTTPException(status_code=404, detail=f"no reports for DAG {dag_id!r}")
        path = report_file(run_id)
        if path is None or not path.is_file():
            # Shown inside the run's tab while the run is still going or failed before `report`.
            return HTMLResponse(
                "<!DOCTYPE html><meta charset='utf-8'><title>No report yet</title>"
                "<p>This run has no quality report yet: the <code>report</code> task has not finished.</p>",
                status_code=404, headers=security_headers(""),
            )
        html = path.read_text(encoding="utf-8")
        return HTMLResponse(html, headers=security_headers(html))

    return app


def report_file(run_id: str) -> Path | None:
    """The run's report, or None when the id would lead anywhere but a run folder inside the run
    root's runs/ (never trust a path built from a request, even after sanitizing), or when the
    file there is not a regular file (a symlink planted in a run folder is not followed)."""
    runs = runs_dir().resolve()
    # Folders made before run ids were hashed when sanitized: the plain sanitized id.
    legacy = re.sub(r"[^A-Za-z0-9_.-]", "_", run_id)
    for folder in (run_dir_for(run_id), runs / legacy):
        resolved = folder.resolve()
        if resolved.parent != runs or resolved.name in ("", ".", ".."):
            continue
        path = report_path(resolved)
        try:
            mode = os.lstat(path).st_mode
        except OSError:
            continue
        if stat.S_ISREG(mode) and path.resolve() == path:  # no symlinked report.html, nor report/ folder
            return path
    return None


_INLINE = {"script": re.compile(r"<script>(.*?)</script>", re.S), "style": re.compile(r"<style>(.*?)</style>", re.S)}


def security_headers(html: str) -> dict[str, str]:
    """The headers a report goes out with; its inline <script> and <style> blocks by their sha256."""
    def hashes(kind: str) -> str:
        found = [base64.b64encode(hashlib.sha256(body.encode("utf-8")).digest()).decode() for body in _INLINE[kind].findall(html)]
        return " ".join(f"'sha256-{h}'" for h in found) or "'none'"

    csp = (f"default-src 'none'; script-src {hashes('script')}; style-src {hashes('style')}; img-src data:; "
           "base-uri 'none'; form-action 'none'; frame-ancestors 'self'; sandbox allow-scripts")
    return {"Content-Security-Policy": csp, "X-Content-Type-Options": "nosniff", "Cache-Control": "no-store",
            "Referrer-Policy": "no-referrer"}


def report_href(dag_id: str, run_id: str) -> str:
    return f"{PREFIX}/runs/{dag_id}/{run_id}"


class ReportLink(BaseOperatorLink):
    name = "Quality report"

    def get_link(self, operator, *, ti_key):
        if ti_key.dag_id != DAG_ID or ti_key.task_id != "report":
            return ""
        return report_href(ti_key.dag_id, ti_key.run_id)


class GemmaReportsPlugin(AirflowPlugin):
    name = "gemma_reports"
    fastapi_apps = [{"app": create_app(), "url_prefix": PREFIX, "name": "Gemma LoRA quality reports"}]
    external_views = [
        {
            "name": "Quality report",
            "href": PREFIX + "/runs/{DAG_ID}/{RUN_ID}",
            "destination": "dag_run",
            "url_route": "gemma-quality-report",
        }
    ]
    global_operator_extra_links = [ReportLink()]
