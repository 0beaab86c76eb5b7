"""python -m tasks.report --config cpu_demo --run-dir DIR

Stage 7 of 8: render `report/report.html`, one self-contained HTML file (inline CSS and SVG, no scripts
from elsewhere) that reads the run directory: run summary (config, dataset manifest, model, wall time
per stage), held-out scores before and after tuning, the training curve, and every prompt of the
suite with the base and the tuned answer side by side. Rendered with Jinja, autoescape on and
StrictUndefined: dataset text and model output are untrusted and always reach the HTML escaped.

In a sweep (see tasks.sweep) it first compares the variants: one metric table with a row per
variant and the base model, the training curves overlaid, every suite prompt's answers in columns,
failed variants with their errors. The gate is applied to every variant that finished; the best one
that passes (highest held-out ROUGE-L, then lowest perplexity) is the one `promote` promotes, and the
detailed sections below show it (or, when none passes, the best that finished).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import platform
from importlib import metadata
from pathlib import Path

from tasks.pipeline import approval, artifacts, storage
from tasks.infra import tracking
from tasks.infra.settings import promotion_approval
from tasks.pipeline.artifacts import EXPORT, FINETUNE, GENERATE, PREPROCESS, SNAPSHOT
from tasks.pipeline.artifacts import REPORT as STAGE
from tasks.infra.cli import stage_main
from tasks.pipeline.config import Config, fingerprint, judged_changes, stage_keys
from tasks.evaluate.evaluation import VARIANT_STAGES, evaluate_sweep, variant_states
from tasks.evaluate.evaluation import earlier_runs
from tasks.text.prompt_template import instruction_prompt
from tasks.pipeline.variants import run_plan, variant_config

log = logging.getLogger("gemma_pipeline")

TEMPLATES = Path(__file__).resolve().parent.parent / "templates"
STAGES = (SNAPSHOT, PREPROCESS, FINETUNE, GENERATE)
CONFIG_KEYS = stage_keys(STAGE)  # the gate's margins
# Line colours of overlaid curves (one per variant).
PALETTE = ("#0b6bcb", "#c5221f", "#137333", "#e37400", "#8430ce", "#007b83", "#b80672", "#5f6368")
VERSIONED = ("apache-airflow", "tensorflow", "keras", "keras-hub", "jinja2", "datasets")


def environment():
    import jinja2

    # select_autoescape() would NOT escape *.html.j2; autoescape=True escapes every template.
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(TEMPLATES)),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )


def line_chart(series: dict[str, list[float]], width: int = 640, height: int = 220, pad: int = 36,
               first_step: int = 1, marker: int | None = None) -> dict:
    """Polyline coordinates for an inline SVG chart; numbers only, so nothing here needs escaping.
    Value i is step `first_step + i` (NaN: no value there; the line joins its neighbours); `marker`:
    a step to draw a vertical line at."""
    values = [v for ys in series.values() for v in ys if v == v]  # drop NaN
    if not values:
        return {"empty": True, "width": width, "height": height}
    lo, hi = min(values), max(values)
    if hi == lo:
        hi = lo + 1.0
    n = max(len(ys) for ys in series.values())
    xs = lambda i: pad + (width - 2 * pad) * (i / max(n - 1, 1))  # noqa: E731
    ys_ = lambda v: height - pad - (height - 2 * pad) * ((v - lo) / (hi - lo))  # noqa: E731
    lines = []
    for k, (name, ys) in enumerate(series.items()):
        pts = " ".join(f"{xs(i):.1f},{ys_(v):.1f}" for i, v in enumerate(ys) if v == v)
        lines.append({"name": name, "points": pts, "color": PALETTE[k % len(PALETTE)] if len(series) > 1 else None})
    ticks = [{"y": round(ys_(lo + (hi - lo) * f), 1), "label": f"{lo + (hi - lo) * f:.3g}"} for f in (0, 0.5, 1)]
    return {"empty": False, "width": width, "height": height, "pad": pad, "lines": lines, "ticks": ticks, "steps": n,
            "first": first_step, "last": first_step + n - 1,
            "marker": {"x": round(xs(marker - first_step), 1), "step": marker} if marker is not None else None}


def validation_chart(validation: dict | None) -> dict | None:
    """The validation loss at the steps it was scored (step 0: the base model), the best step marked."""
    if not validation or not validation["scores"]:
        return None
    last = validation["scores"][-1]["step"]
    ys = [float("nan")] * (last + 1)
    for s in validation["scores"]:
        ys[s["step"]] = s["loss"]
    return line_chart({"validation loss": ys}, first_step=0, marker=validation["best_step"])


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in VERSIONED:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def flags(m: dict) -> list[str]:
    out = []
    if m["template_leak"]:
        out.append("leak")
    if not m["stopped_at_eos"]:
        out.append("no-eos")
    if m["repetitive"]:
        out.append("repetition")
    return out


def cards(answers: dict, evaluation: dict) -> list[dict]:
    """One card per suite prompt: both answers with their metrics and flags."""
    per = {p["id"]: p for p in evaluation["per_prompt"]}
    tuned = {a["id"]: a for a in answers["models"]["tuned"]}
    out = []
    for b in answers["models"]["base"]:
        m = per[b["id"]]
        t = tuned[b["id"]]
        card_flags = sorted(set(flags(m["base"])) | set(flags(m["tuned"])))
        out.append({
            "id": b["id"], "category": b["category"], "prompt": b["prompt"],
            "base": {**b, "m": m["base"], "flags": flags(m["base"])},
            "tuned": {**t, "m": m["tuned"], "flags": flags(m["tuned"])},
            "flags": card_flags, "differ": b["text"] != t["text"],
        })
    return out


def variant_summary(s: dict) -> dict:
    row = {k: s[k] for k in ("index", "name", "label", "overrides", "status", "error", "failed_stage")}
    ev = s["ev"]
    if ev:
        row.update(
            rouge_l=ev["heldout"]["rouge_l"]["tuned"],
            rouge_l_delta_ci=ev["heldout"]["rouge_l_delta_ci"],
            perplexity=ev["perplexity"]["tuned"],
            heldout_loss=ev["heldout_loss"]["tuned"],
            eos_stop_rate=ev["eos_stop_rate"]["tuned"],
            gate_passed=ev["gate"]["passed"],
            failed_checks=[c["name"] for c in ev["gate"]["checks"] if not c["passed"]],
        )
    return row


def sweep_context(cfg: Config, result: dict) -> dict:
    """The comparison section: table rows, overlaid curves, answers per prompt in columns."""
    states = result["states"]
    done = [s for s in states if s["ev"]]
    rows, curves, running, columns = [], {}, {}, []
    for s in states:
        row = variant_summary(s)
        if s["ev"]:
            d = Path(s["dir"])
            ft = artifacts.read_finetune_result(d)
            answers = artifacts.read_answers(d)
            history = artifacts.read_history(d)
            row.update(train_s=ft["timings_s"]["train"], real_per_s=ft["tokens"]["real_per_s"], steps=ft["steps"],
                       final_loss=ft["final_loss"])
            curves[f"{s['name']}: {s['label']}"] = [h["loss"] for h in history]
            # Every variant sees the same batches in the same order, so per-step losses mostly track
            # the batch; the running mean separates the variants.
            running[f"{s['name']}: {s['label']}"] = [h.get("loss_running", h["loss"]) for h in history]
            columns.append({"name": s["name"], "label": s["label"], "answers": {a["id"]: a for a in answers["models"]["tuned"]}})
        rows.append(row)
    shown = result["shown"]
    base_answers = artifacts.read_answers(Path(shown["dir"]))["models"]["base"]
    prompts = [{"id": a["id"], "category": a["category"], "prompt": a["prompt"], "base": a,
                "variants": [c["answers"].get(a["id"]) for c in columns]} for a in base_answers]
    ev = shown["ev"]
    return {
        "rows": rows,
        "base": {"rouge_l": ev["heldout"]["rouge_l"]["base"], "perplexity": ev["perplexity"]["base"],
                 "heldout_loss": ev["heldout_loss"]["base"], "eos_stop_rate": ev["eos_stop_rate"]["base"]},
        "columns": columns,
        "prompts": prompts,
        "loss_chart": line_chart(curves),
        "running_chart": line_chart(running),
        "shown": shown["name"],
        "shown_label": shown["label"],
        "promotable": result["promotable"],
        "finished": len(done),
        "failed": len(states) - len(done),
    }


def gather(cfg: Config, run_dir: Path, evaluation: dict) -> dict:
    done = {s: storage.require(run_dir, s, STAGE) for s in STAGES}
    history = artifacts.read_history(run_dir)
    answers = artifacts.read_answers(run_dir)
    finetune = artifacts.read_finetune_result(run_dir)
    heldout_rows = []
    for b, t, r in zip(answers["heldout"]["base"], answers["heldout"]["tuned"], evaluation["heldout"]["per_example"]):
        heldout_rows.append({"id": b["id"], "category": b.get("category", ""), "earlier_turns": b.get("earlier_turns", []),
                             "instruction": b["prompt"], "reference": b["reference"],
                             "base": b["text"], "tuned": t["text"], "rouge_l": r["rouge_l"]})
    card_list = cards(answers, evaluation)
    return {
        "run_dir": str(run_dir),
        "run_id": Path(run_dir).name,
        "generated_at": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "config": cfg.to_dict(),
        "snapshot": artifacts.read_snapshot_manifest(run_dir),
        "preprocess": artifacts.read_preprocess_manifest(run_dir),
        "finetune": finetune,
        "answers": answers,
        "ev": evaluation,
        "cards": card_list,
        "categories": sorted({c["category"] for c in card_list}),
        "heldout_rows": heldout_rows,
        "earlier_runs": earlier_runs(run_dir),
        "stage_seconds": {s: done[s]["result"].get("seconds") for s in STAGES},
        "loss_chart": line_chart({"loss per step": [h["loss"] for h in history]}),
        "accuracy_chart": line_chart({"token accuracy (running)": [h["accuracy_running"] for h in history]}),
        "validation_chart": validation_chart(finetune.get("validation")),
        "versions": versions(),
        "sweep": None,  # the comparison section (sweep_context), when the run has variants
        "tracking": tracking.status(run_dir),
        **export_context(run_dir, cfg.prompt_template),  # in a sweep, run() sets the run folder's
    }


def export_context(run_dir: Path, template: str) -> dict:
    """The "Use this model" section: the champion's export (or why there is none)."""
    error = artifacts.read_error(run_dir, EXPORT)
    manifest = artifacts.read_export_manifest(run_dir)
    return {
        "export": manifest,
        # Each file by its name inside the export folder.
        "export_files": [{"name": f["path"].split(f"/{EXPORT}/", 1)[-1], "bytes": f["bytes"]}
                         for f in (manifest or {}).get("files", [])],
        "export_dir": str(storage.stage_dir(Path(run_dir).resolve(), EXPORT)),
        "export_error": error["error"] if error else None,
        # A Python/shell string literal of the tuned prompt format, for the copy-paste commands.
        "prompt_example": instruction_prompt("What should I do on a trip to Europe?", template).encode("unicode_escape").decode(),
    }


def render(context: dict) -> str:
    return environment().get_template("report.html.j2").render(**context)


def run(cfg: Config, run_dir: Path, force: bool = False, configured: Config | None = None) -> dict:
    """`configured`: the config as the DAG configured it (without the run's overrides); None: `cfg`."""
    plan = run_plan(cfg, run_dir)
    policy, changes = promotion_approval(), judged_changes(cfg, configured or cfg)
    states = variant_states(run_dir, plan)
    # The report depends on what each variant produced, or on why it failed.
    produced = [
        (s["name"], s["status"], s["error"],
         [(storage.completed(s["dir"], st) or {}).get("fingerprint") for st in VARIANT_STAGES])
        for s in states
    ]
    upstream = [storage.require(run_dir, s, STAGE)["fingerprint"] for s in (SNAPSHOT, PREPROCESS)]
    # The export (or its failure) is shown too.
    upstream.append((storage.completed(run_dir, EXPORT) or {}).get("fingerprint") or artifacts.read_error(run_dir, EXPORT))

    def body(out: Path) -> dict:
        result = evaluate_sweep(cfg, states)
        shown = result["shown"]
        evaluation = dict(shown["ev"], model_preset=cfg.model_preset, variant=shown["name"],
                          variant_label=shown["label"], promotable=result["promotable"],
                          variants=[variant_summary(s) for s in result["states"]])
        evaluation["promotion"] = approval.request(policy, changes, evaluation["gate"]["passed"])
        storage.write_json(out / artifacts.METRICS, evaluation)
        context = gather(variant_config(cfg, shown), Path(shown["dir"]), evaluation)
        context.update(run_dir=str(run_dir), run_id=Path(run_dir).name, earlier_runs=earlier_runs(run_dir),
                       tracking=tracking.status(run_dir),
                       sweep=sweep_context(cfg, result) if plan[0]["name"] else None,
                       **export_context(run_dir, cfg.prompt_template))
        html = render(context)
        (out / artifacts.REPORT_HTML).write_text(html, encoding="utf-8")
        path = artifacts.report_path(run_dir)
        verdict = "PASSED" if evaluation["gate"]["passed"] else "FAILED"
        if plan[0]["name"]:
            for s in result["states"]:
                row = variant_summary(s)
                log.info("report: variant %s (%s): %s", s["name"], s["label"],
                         f"ROUGE-L {row['rouge_l']}, perplexity {row['perplexity']}, gate {'pass' if row['gate_passed'] else 'fail'}"
                         if s["ev"] else f"FAILED in {s['failed_stage']}: {s['error']}")
            log.info("report: promotable variant: %s", result["promotable"] or "none (no variant passed the gate)")
        log.info("report: quality gate %s; wrote %s (%d KB)", verdict, path, len(html) // 1024)
        log.info("report: promotion %s: %s", "waits for a person's approval" if evaluation["promotion"]["approval_required"]
                 else "needs no approval", evaluation["promotion"]["why"])
        return {"report": str(path), "gate_passed": evaluation["gate"]["passed"], "variant": result["promotable"]}

    # Templates are inputs too: editing one re-renders the report.
    tmpl = sorted((p.name, hashlib.sha256(p.read_bytes()).hexdigest()) for p in TEMPLATES.glob("*"))
    gate_cfg = cfg.subset(CONFIG_KEYS)
    fp = fingerprint(STAGE, upstream, plan, produced, tmpl, gate_cfg, policy, changes)
    result = storage.run_stage(run_dir, STAGE, fp, body, force)
    tracking.log_report(str(run_dir), fp)
    return result


def main(argv=None) -> dict:
    return stage_main(STAGE, __doc__, run, argv, with_configured=True)


if __name__ == "__main__":
    main()
