"""The auth manager of the shared test server: Airflow's simple auth manager (roles only, every DAG
alike) plus one per-DAG rule, as a deployment's FAB or Keycloak auth manager grants DAGs one by one:
the users named in GEMMA_TEST_NO_DAG_ACCESS (comma-separated) may not access the DAG
`gemma_lora_finetune` at all, whatever their role. Everything else is the simple auth manager's."""

from __future__ import annotations

import os

from airflow.api_fastapi.auth.managers.simple.simple_auth_manager import SimpleAuthManager

DAG_ID = "gemma_lora_finetune"


class PerDagAuthManager(SimpleAuthManager):
    def is_authorized_dag(self, *, method, user, access_entity=None, details=None) -> bool:
        blocked = {u.strip() for u in os.environ.get("GEMMA_TEST_NO_DAG_ACCESS", "").split(",") if u.strip()}
        if user.get_name() in blocked and (details is None or details.id in (None, DAG_ID)):
            return False
        return super().is_authorized_dag(method=method, user=user, access_entity=access_entity, details=details)
