"""A person's approval of a promotion: when one is needed, what was answered, and whether it counts.

The gate compares the base and the tuned model on the run's own held-out split, prompts and margins.
Whoever changes those (a judged config key, see tasks.pipeline.config) chose the test as well as the
candidate, so the gate alone cannot vouch for the run: a person other than the one who triggered it
approves the promotion (the DAG's `approve` task records the answer here; `promote` reads it).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from tasks.pipeline import storage
from tasks.pipeline.artifacts import approval_path

APPROVE, REJECT = "Approve", "Reject"


def request(policy: str, judged_changes: list[str], gate_passed: bool) -> dict:
    """What the promotion of this run needs: {"policy", "judged_changes", "approval_required", "why"}."""
    if not gate_passed:
        required, why = False, "the quality gate failed: nothing to promote"
    elif policy == "always":
        required, why = True, "every promotion waits for a person ([gemma] promotion_approval = always)"
    elif policy == "untrusted" and judged_changes:
        required, why = True, (f"this run changed {', '.join(judged_changes)} from the DAG's configured value(s): "
                               "the gate judged it on a test of its own choosing")
    elif policy == "never":
        required, why = False, "promoted on the gate alone ([gemma] promotion_approval = never)"
    else:
        required, why = False, "a trusted run (only training keys changed): promoted on the gate alone"
    return {"policy": policy, "judged_changes": list(judged_changes), "approval_required": required, "why": why}


def verdict(record: dict | None) -> tuple[bool, str]:
    """(whether the recorded answer lets the run be promoted, why)."""
    if record is None:
        return False, "waiting for a person's approval (the approve task has no answer yet)"
    if record.get("timed_out"):
        return False, "no one answered before the approval timed out"
    by, triggered_by = record.get("by"), record.get("triggered_by")
    if not by:
        return False, "the answer names no reviewer"
    if triggered_by and by == triggered_by:
        return False, f"self-approval refused: {by} triggered this run and cannot approve its promotion"
    if record.get("answer") != APPROVE:
        return False, f"rejected by {by}" + (f": {record['comment']}" if record.get("comment") else "")
    return True, f"approved by {by}" + (f": {record['comment']}" if record.get("comment") else "")


def record(run_dir: Path, *, answer: str | None, by: str | None, triggered_by: str | None, comment: str = "",
           at: str | None = None, timed_out: bool = False) -> dict:
    """Write the person's answer (or the timeout) beside the run's stages; returns it with its verdict."""
    rec = {"answer": answer, "by": by, "triggered_by": triggered_by, "comment": comment,
           "at": at or time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "timed_out": timed_out}
    rec["approved"], rec["reason"] = verdict(rec)
    storage.write_json(approval_path(run_dir), rec)
    return rec


def read(run_dir: Path) -> dict | None:
    path = approval_path(run_dir)
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
