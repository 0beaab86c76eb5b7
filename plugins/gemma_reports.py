"""Airflow UI plugin: the quality report of each run of `gemma_lora_finetune`, behind Airflow's login.

- a FastAPI app mounted at /gemma-reports in the API server; every request must carry Airflow's own
  credentials (the UI's session cookie or a bearer token) and read access to the DAG's runs;
- a "Quality report" tab on each DAG-run page (an external view) that shows that run's report;
- a "Quality report" extra link on the `report` task instance.
"""

from __future__ import annotations

import re
from pathlib import Path

from airflow.plugins_manager import AirflowPlugin
from airflow.sdk import BaseOperatorLink
from fastapi import Depends, FastAPI, HTTPException
from fastapi.responses import FileResponse, HTMLResponse

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
                "<p style='font:15px system-ui;margin:2em'>This run has no quality report yet: "
                "the <code>report</code> task has not finished.</p>",
                status_code=404,
            )
        return FileResponse(path, media_type="text/html; charset=utf-8")

    return app


def report_file(run_id: str) -> Path | None:
    """The run's report, or None when the id would lead anywhere but a run folder inside the run
    root's runs/ (never trust a path built from a request, even after sanitizing)."""
    runs = runs_dir().resolve()
    # Folders made before run ids were hashed when sanitized: the plain sanitized id.
    legacy = re.sub(r"[^A-Za-z0-9_.-]", "_", run_id)
    for folder in (run_dir_for(run_id), runs / legacy):
        resolved = folder.resolve()
        if resolved.parent != runs or resolved.name in ("", ".", ".."):
            continue
        path = report_path(resolved)
        if path.is_file():
            return path
    return None


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
