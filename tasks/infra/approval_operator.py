"""The DAG's `approve` task: a person approves (or rejects) the promotion of a run that the quality gate
alone cannot vouch for (tasks.pipeline.approval says which runs).

An Airflow human-in-the-loop task (`HITLOperator` of the standard provider, Airflow 3.1+). Its page
under "Required actions" shows the gate's verdict, what the run changed and links the run's report tab;
the answer is given there or through the REST API (`PATCH .../taskInstances/approve/-1/hitlDetails`).
A run that needs no approval skips the task at once. The answer is recorded in the run folder
(`approval.json`), where `promote` reads it: the approver must not be the user who triggered the run.
"""

from __future__ import annotations

import datetime as dt
from urllib.parse import quote

from airflow.providers.standard.operators.hitl import HITLOperator
from airflow.sdk import Param

from tasks.infra.settings import approval_timeout_h, run_dir_for
from tasks.pipeline import approval, artifacts

TASK_ID = "approve"


def body(dag_id: str, run_id: str, metrics: dict, triggered_by: str | None) -> str:
    """The page's Markdown: the verdict, why a person is asked, who triggered the run, the report."""
    promo, gate = metrics["promotion"], metrics["gate"]
    rows = "\n".join(f"| {c['name']} | {c['rule']} | {c['base']} | {c['tuned']} | {'pass' if c['passed'] else 'FAIL'} |"
                     for c in gate["checks"])
    run = quote(run_id, safe="")
    variant = f" (variant `{metrics['variant']}`)" if metrics.get("variant") else ""
    return (
        f"**Quality gate: {'PASSED' if gate['passed'] else 'FAILED'}**{variant}.\n\n"
        f"| check | rule | base | tuned | result |\n|---|---|---|---|---|\n{rows}\n\n"
        f"**Why a person is asked:** {promo['why']}.\n\n"
        f"**Triggered by:** {triggered_by or 'the scheduler'} (who may not approve it).\n\n"
        f"Read the [report tab](/dags/{dag_id}/runs/{run}/plugin/gemma-quality-report) before answering: its held-out "
        "examples, answers and intervals are what the gate measured.\n\n"
        "**Approve** promotes the run's adapter as the champion; **Reject** keeps the current champion. "
        "The comment is recorded with the decision."
    )


class PromotionApproval(HITLOperator):
    def __init__(self, **kwargs) -> None:
        # The DAG passes its own Params to every task; this form has only the reviewer's comment.
        kwargs.pop("params", None)
        super().__init__(
            task_id=TASK_ID,
            subject="Promote the adapter of run {{ run_id }}?",
            options=[approval.APPROVE, approval.REJECT],
            params={"comment": Param("", type="string", title="Comment",
                                     description="why you approve or reject (recorded with the decision)")},
            response_timeout=dt.timedelta(hours=approval_timeout_h()),
            # Reading the report and asking: the wait itself is response_timeout's.
            execution_timeout=dt.timedelta(minutes=5),
            **kwargs,
        )

    def execute(self, context):
        from airflow.sdk.exceptions import AirflowSkipException

        run_dir = run_dir_for(context["run_id"])
        metrics = artifacts.read_metrics(run_dir)
        promo = metrics.get("promotion")
        if not promo or not promo["approval_required"]:
            raise AirflowSkipException(f"no approval needed: {promo['why'] if promo else 'the report predates approvals'}")
        triggered_by = context["dag_run"].triggering_user_name
        self.body = body(context["dag"].dag_id, context["run_id"], metrics, triggered_by)
        self.log.info("waiting for a person to approve or reject the promotion (%s); triggered by %s, who may not",
                      promo["why"], triggered_by)
        return super().execute(context)

    def execute_complete(self, context, event: dict):
        run_dir = run_dir_for(context["run_id"])
        triggered_by = context["dag_run"].triggering_user_name
        if "error" in event or event.get("timedout"):
            rec = approval.record(run_dir, answer=None, by=None, triggered_by=triggered_by, timed_out=True)
        else:
            answer = super().execute_complete(context, event)
            user = answer["responded_by_user"] or {}
            rec = approval.record(run_dir, answer=answer["chosen_options"][0], by=user.get("name") or user.get("id"),
                                  triggered_by=triggered_by, comment=str((answer["params_input"] or {}).get("comment", "")),
                                  at=answer["responded_at"].isoformat())
        (self.log.info if rec["approved"] else self.log.warning)("promotion: %s", rec["reason"])
        return rec
