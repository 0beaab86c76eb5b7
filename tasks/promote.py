"""python -m tasks.promote --config cpu_demo --run-dir DIR

Stage 8 of 8: apply the quality gate's verdict (computed by `report`, stored in report/metrics.json; in
a sweep, for the best variant that passed), and a person's approval where the gate alone cannot
vouch for the run (see tasks.pipeline.approval: a run that changed a judged key, or every run with
`[gemma] promotion_approval = always`). Without an approval that counts, nothing is promoted.
A passing run becomes the champion: `champion.json` beside the run folders names its adapter, run
id and key metrics (the previous champion is kept in `champion_log.jsonl`). A failing run
promotes nothing; in the DAG the `promote` task is then marked *skipped*, so the run's grid shows
at a glance which runs did not pass, while the report of a failed gate stays readable.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from tasks.pipeline import approval, artifacts, storage
from tasks.infra import tracking
from tasks.infra.settings import promotion_approval
from tasks.pipeline.artifacts import PROMOTE as STAGE
from tasks.pipeline.artifacts import champion_path
from tasks.infra.cli import stage_main
from tasks.pipeline.config import Config, fingerprint, judged_changes
from tasks.pipeline.variants import variant_path

log = logging.getLogger("gemma_pipeline")


def export_record(run_dir: Path, name: str) -> dict | None:
    """Where the champion's exported formats are (the export stage ran before the report)."""
    manifest = artifacts.read_export_manifest(run_dir)
    if manifest is None or (manifest["variant"] or "") != name:
        return None
    folder = storage.stage_dir(run_dir, artifacts.EXPORT)
    return {
        "dir": str(folder),
        "formats": manifest["formats"],
        "keras": str(folder / artifacts.EXPORT_KERAS) if "keras" in manifest["formats"] else None,
        "hf": str(folder / artifacts.EXPORT_HF) if "hf" in manifest["formats"] else None,
        "gguf": [f["path"] for f in manifest["files"] if f["path"].endswith(".gguf")],
        "parity_passed": {k: v.get("passed") for k, v in manifest["parity"].items()},
    }


def run(cfg: Config, run_dir: Path, force: bool = False, configured: Config | None = None) -> dict:
    """`configured`: the config as the DAG configured it (without the run's overrides); None: `cfg`."""
    rep = storage.require(run_dir, artifacts.REPORT, STAGE)
    # Judged here again, not read from the report: promote is where the rule is enforced.
    policy, changes = promotion_approval(), judged_changes(cfg, configured or cfg)
    answer = approval.read(run_dir)

    def body(out: Path) -> dict:
        m = artifacts.read_metrics(run_dir)
        verdict = m["gate"]
        failed = [c["name"] for c in verdict["checks"] if not c["passed"]]
        # In a sweep the report picked the variant: the best one that passed the gate (see report).
        name = m.get("variant", "")
        needs = approval.request(policy, changes, verdict["passed"])
        approved, why = approval.verdict(answer) if needs["approval_required"] else (True, needs["why"])
        given = dict(answer, reason=why) if needs["approval_required"] and answer else None
        if not verdict["passed"]:
            log.warning("promote: quality gate FAILED (%s%s); the champion stays as it is",
                        ", ".join(failed), " for every variant" if name else "")
            record = {"promoted": False, "failed_checks": failed}
        elif not approved:
            log.warning("promote: quality gate passed, but %s (%s); the champion stays as it is", why, needs["why"])
            record = {"promoted": False, "failed_checks": [], "approval_required": True, "why": why,
                      "approval": given or {"reason": why}}
        else:
            tune = storage.require(variant_path(run_dir, name), artifacts.FINETUNE, STAGE)
            overrides = next((v["overrides"] for v in m.get("variants", []) if v["name"] == name), {})
            champion = {
                "run_id": Path(run_dir).name,
                "variant": name or None,
                "variant_overrides": overrides,
                "adapter": tune["result"]["adapter"],
                "model_preset": cfg.model_preset,
                "prompt_template": cfg.prompt_template,
                "lora_rank": overrides.get("lora_rank", cfg.lora_rank),
                "metrics": {
                    "rouge_l": m["heldout"]["rouge_l"],
                    "eos_stop_rate": m["eos_stop_rate"],
                    "perplexity": m["perplexity"],
                },
                "promoted_at": time.time(),
                "approval": given,
                "trust": {"policy": policy, "judged_changes": changes},
                "export": export_record(run_dir, name),
            }
            # The registry's new version (or why it is pending: `python -m tasks.track` registers it later).
            manifest = artifacts.path(run_dir, artifacts.EXPORT, artifacts.MANIFEST) if champion["export"] else None
            reg = tracking.register_champion(str(run_dir), str(variant_path(run_dir, name)), rep["fingerprint"],
                                             str(manifest) if manifest else None, approval=given)
            champion["registry"] = {k: reg.get(k) for k in ("status", "registered_model", "version", "previous_version",
                                                           "tracking_uri")}
            path = champion_path(run_dir)
            if path.is_file():
                with (path.parent / artifacts.CHAMPION_LOG).open("a", encoding="utf-8") as f:
                    f.write(path.read_text(encoding="utf-8").strip().replace("\n", " ") + "\n")
            storage.write_json(path, champion)
            log.info("promote: quality gate passed (%s); %s is the champion adapter (%s)", why, champion["run_id"], path)
            record = {"promoted": True, "champion": str(path), "approval_required": needs["approval_required"],
                      "why": why, "approval": given}
        storage.write_json(out / artifacts.DECISION, record)
        return record

    # A new answer (or none yet) is a new input: the decision is taken again.
    return storage.run_stage(run_dir, STAGE, fingerprint(STAGE, rep["fingerprint"], policy, changes, answer), body, force)


def main(argv=None) -> dict:
    return stage_main(STAGE, __doc__, run, argv, with_configured=True)


if __name__ == "__main__":
    main()

