"""The run's quality numbers: metrics of every answer, per-model aggregates, deltas and the gate.

Reads what `finetune` and `generate` wrote; used by the `report` stage, which stores the result as
`report/metrics.json` (what `promote` and later runs' "earlier runs" sections read).
"""

from __future__ import annotations

import json
from pathlib import Path

from tasks.pipeline import artifacts, storage
from tasks.evaluate import metrics
from tasks.pipeline.config import Config
from tasks.pipeline.variants import variant_config, variant_path

MODELS = ("base", "tuned")
# A sweep variant's own stages: it finished when both published and neither recorded an error.
VARIANT_STAGES = (artifacts.FINETUNE, artifacts.GENERATE)


def evaluate(cfg: Config, run_dir: Path, correction: dict | None = None) -> dict:
    """The run's (or one variant's) metrics, intervals, verdict words and gate. `correction`
    (evaluate_sweep, for one of several variants): {"compared": m, "rouge_l"/"perplexity":
    {"level": ..., "adjusted_p": ...}}: each interval at the level Holm's procedure tests it at, and
    significant only with its adjusted p-value below 5%."""
    def level(metric: str) -> float:
        return correction[metric]["level"] if correction else 0.95

    def corrected(ci: dict | None, metric: str) -> dict | None:
        return metrics.corrected(ci, correction[metric]["adjusted_p"], correction["compared"]) if correction else ci

    answers = artifacts.read_answers(run_dir)
    finetune = artifacts.read_finetune_result(run_dir)

    per_prompt = []
    for b, t in zip(answers["models"]["base"], answers["models"]["tuned"]):
        per_prompt.append({"id": b["id"], "base": metrics.answer_metrics(b, cfg.prompt_template),
                           "tuned": metrics.answer_metrics(t, cfg.prompt_template)})
    suite = {m: metrics.aggregate([p[m] for p in per_prompt], answers["models"][m]) for m in MODELS}

    held = answers.get("heldout", {"base": [], "tuned": []})
    heldout_metrics = {m: [metrics.answer_metrics(a, cfg.prompt_template) for a in held[m]] for m in MODELS}
    rouge = {m: metrics.rouge_l_many([a["text"] for a in held[m]], [a["reference"] for a in held[m]]) for m in MODELS}
    heldout = {
        "n": len(held["base"]),
        "aggregate": {m: metrics.aggregate(heldout_metrics[m], held[m]) for m in MODELS} if held["base"] else {},
        "rouge_l": {m: round(sum(rouge[m]) / len(rouge[m]), 5) if rouge[m] else None for m in MODELS},
        "rouge_l_delta_ci": corrected(metrics.bootstrap_delta_ci(rouge["base"], rouge["tuned"], level=level("rouge_l")), "rouge_l")
        if rouge["base"] else None,
        "per_example": [
            {"id": b["id"], "rouge_l": {"base": round(rb, 4), "tuned": round(rt, 4)}}
            for b, rb, rt in zip(held["base"], rouge["base"], rouge["tuned"])
        ],
    }

    def eos_rate(model: str) -> float:
        flags = [a["stopped_at_eos"] for a in answers["models"][model] + held[model]]
        return round(sum(flags) / max(len(flags), 1), 4)

    per_example = {m: finetune[f"heldout_{m}"].get("per_example") for m in MODELS}
    ppl_ci = corrected(metrics.bootstrap_perplexity_ci(per_example["base"], per_example["tuned"], level=level("perplexity")),
                       "perplexity") if per_example["base"] and per_example["tuned"] else None
    result = {
        "suite": suite,
        "per_prompt": per_prompt,
        "heldout": heldout,
        "eos_stop_rate": {m: eos_rate(m) for m in MODELS},
        "perplexity": {
            "base": finetune["heldout_base"].get("response_perplexity"),
            "tuned": finetune["heldout_tuned"].get("response_perplexity"),
            "examples": finetune["heldout_base"].get("examples"),
            "delta_ci": ppl_ci,
        },
        # Each headline change in words, from its paired-bootstrap interval over held-out examples
        # (95%; with several variants, corrected for how many were compared).
        "significance": {
            "rouge_l": metrics.significance(heldout["rouge_l_delta_ci"], higher_is_better=True),
            "perplexity": metrics.significance(ppl_ci, higher_is_better=False),
        },
        "heldout_loss": {"base": finetune["heldout_base"].get("loss"), "tuned": finetune["heldout_tuned"].get("loss")},
    }
    result["gate"] = gate(cfg, result)
    return result


def gate(cfg: Config, m: dict) -> dict:
    """The quality gate: every check must pass for the tuned adapter to be promoted."""
    rb, rt = m["heldout"]["rouge_l"]["base"], m["heldout"]["rouge_l"]["tuned"]
    eb, et = m["eos_stop_rate"]["base"], m["eos_stop_rate"]["tuned"]
    pb, pt = m["perplexity"]["base"], m["perplexity"]["tuned"]
    checks = [
        {
            "name": "held-out ROUGE-L",
            "rule": f"tuned >= base - {cfg.gate_rouge_l_margin}",
            "base": rb,
            "tuned": rt,
            "passed": rb is not None and rt is not None and rt >= rb - cfg.gate_rouge_l_margin,
        },
        {
            "name": "EOS-stop rate",
            "rule": f"tuned >= base - {cfg.gate_eos_rate_margin}",
            "base": eb,
            "tuned": et,
            "passed": et >= eb - cfg.gate_eos_rate_margin,
        },
        {
            "name": "held-out response perplexity",
            "rule": f"tuned <= base x (1 + {cfg.gate_perplexity_margin})",
            "base": pb,
            "tuned": pt,
            "passed": pb is not None and pt is not None and pt <= pb * (1 + cfg.gate_perplexity_margin),
        },
    ]
    if cfg.gate_require_significant:
        # The margins allow "no worse than"; this asks for evidence of better.
        for check, ci, better in ((checks[0], m["heldout"]["rouge_l_delta_ci"], 1), (checks[2], m["perplexity"]["delta_ci"], -1)):
            significant = metrics.direction(ci) == better
            check["rule"] += " and significantly better (95% interval of the change" + (
                ", Holm-corrected for the variants compared)" if ci and "adjusted_p" in ci else ")")
            check["passed"] = check["passed"] and significant
            if not significant:
                check["note"] = "not significantly better: gate_require_significant asks for the interval to exclude zero"
    for c in checks:
        if c["base"] is None or c["tuned"] is None:
            c["note"] = "not measured in this run (no held-out examples): counts as failed"
    return {"passed": all(c["passed"] for c in checks), "checks": checks}


def promotion_summary(run_dir: Path) -> str:
    """One line for the run history: promoted or not, and who approved or refused it, when and why."""
    path = artifacts.path(run_dir, artifacts.PROMOTE, artifacts.DECISION)
    if not storage.completed(run_dir, artifacts.PROMOTE) or not path.is_file():
        return "–"
    decision = json.loads(path.read_text(encoding="utf-8"))
    line = "promoted" if decision.get("promoted") else "not promoted"
    appr = decision.get("approval")
    if appr:
        line += f" ({appr['reason']}, {appr['at']})" if appr.get("at") else f" ({appr['reason']})"
    return line


def earlier_runs(run_dir: Path, limit: int = 20) -> list[dict]:
    """Key metrics of earlier runs beside this one (same run root), newest first."""
    rows = []
    for other in Path(run_dir).parent.iterdir():
        if other.resolve() == Path(run_dir).resolve():
            continue
        done = storage.completed(other, artifacts.REPORT)
        if not done or not artifacts.path(other, artifacts.REPORT, artifacts.METRICS).is_file():
            continue
        m = artifacts.read_metrics(other)
        rows.append(
            {
                "run_id": other.name,
                "finished_at": done.get("finished_at", 0),
                "model_preset": m.get("model_preset"),
                "rouge_l_tuned": m["heldout"]["rouge_l"]["tuned"],
                "rouge_l_delta": m["heldout"]["rouge_l_delta_ci"]["mean"] if m["heldout"].get("rouge_l_delta_ci") else None,
                "perplexity_tuned": m["perplexity"]["tuned"],
                "eos_stop_rate_tuned": m["eos_stop_rate"]["tuned"],
                "gate_passed": m["gate"]["passed"],
                "promotion": promotion_summary(other),
            }
        )
    rows.sort(key=lambda r: r["finished_at"], reverse=True)
    return rows[:limit]


def variant_states(run_dir: Path, plan: list[dict]) -> list[dict]:
    """Each planned variant: finished (both stages published, no error recorded) or failed, why."""
    out = []
    for spec in plan:
        vdir = variant_path(run_dir, spec["name"])
        state = {**spec, "dir": str(vdir), "status": "ok", "error": None, "failed_stage": None}
        for stage in VARIANT_STAGES:
            err = artifacts.read_error(vdir, stage)
            if err is not None:
                state.update(status="failed", failed_stage=stage, error=err["error"])
                break
            if storage.completed(vdir, stage) is None:
                state.update(status="failed", failed_stage=stage,
                             error=f"stage {stage} did not finish and recorded no error (killed, or never started: see its task log)")
                break
        out.append(state)
    return out


def rank_key(ev: dict) -> tuple:
    """Best variant first: highest held-out ROUGE-L, then lowest response perplexity."""
    rouge = ev["heldout"]["rouge_l"]["tuned"]
    ppl = ev["perplexity"]["tuned"]
    return (rouge if rouge is not None else -1.0, -(ppl if ppl is not None else float("inf")))


def evaluate_sweep(cfg: Config, states: list[dict]) -> dict:
    """Every finished variant (`variant_states`) evaluated and gated; which one is shown and which is
    promoted."""
    for s in states:
        s["ev"] = evaluate(variant_config(cfg, s), Path(s["dir"])) if s["status"] == "ok" else None
    done = [s for s in states if s["ev"]]
    if not done:
        raise storage.StageInputError(
            "no variant finished: " + "; ".join(f"{s['name'] or 'default'}: {s['error']}" for s in states)
        )
    if len(done) > 1:
        # The best of several variants tested on the same held-out split looks better than it is:
        # each variant's intervals and verdicts are corrected for how many were compared (Holm).
        corrections: list[dict] = [{"compared": len(done)} for _ in done]
        for metric, ci_of in (("rouge_l", lambda ev: ev["heldout"]["rouge_l_delta_ci"]),
                              ("perplexity", lambda ev: ev["perplexity"]["delta_ci"])):
            ps = [(ci_of(s["ev"]) or {}).get("p", 1.0) for s in done]
            for c, adjusted, lvl in zip(corrections, metrics.holm(ps), metrics.holm_levels(ps)):
                c[metric] = {"adjusted_p": adjusted, "level": lvl}
        for s, c in zip(done, corrections):
            s["ev"] = evaluate(variant_config(cfg, s), Path(s["dir"]), c)
    passing = [s for s in done if s["ev"]["gate"]["passed"]]
    shown = max(passing or done, key=lambda s: rank_key(s["ev"]))
    return {"states": states, "shown": shown, "promotable": shown["name"] if passing else None}
