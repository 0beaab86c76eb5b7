"""python -m tasks.report --config cpu_demo --run-dir DIR

Stage 5: render `report/report.html`, one self-contained HTML file (inline CSS and SVG, no scripts
from elsewhere) that reads the run directory: run summary (config, dataset manifest, model, wall time
per stage), held-out scores before and after tuning, the training curve, and every prompt of the
suite with the base and the tuned answer side by side. Rendered with Jinja, autoescape on and
StrictUndefined: dataset text and model output are untrusted and always reach the HTML escaped.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import platform
from importlib import metadata
from pathlib import Path

from tasks import storage
from tasks.cli import stage_main
from tasks.config import Config, fingerprint
from tasks.evaluation import evaluate
from tasks.evaluation import history as evaluation_history

log = logging.getLogger("gemma_pipeline")

STAGE = "report"
REPORT = "report.html"
TEMPLATES = Path(__file__).resolve().parent.parent / "templates"
STAGES = ("snapshot", "preprocess", "finetune", "generate")
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


def line_chart(series: dict[str, list[float]], width: int = 640, height: int = 220, pad: int = 36) -> dict:
    """Polyline coordinates for an inline SVG chart; numbers only, so nothing here needs escaping."""
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
    for name, ys in series.items():
        pts = " ".join(f"{xs(i):.1f},{ys_(v):.1f}" for i, v in enumerate(ys) if v == v)
        lines.append({"name": name, "points": pts})
    ticks = [{"y": round(ys_(lo + (hi - lo) * f), 1), "label": f"{lo + (hi - lo) * f:.3g}"} for f in (0, 0.5, 1)]
    return {"empty": False, "width": width, "height": height, "pad": pad, "lines": lines, "ticks": ticks, "steps": n}


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


def gather(cfg: Config, run_dir: Path, evaluation: dict) -> dict:
    done = {s: storage.require(run_dir, s, STAGE) for s in STAGES}
    d = lambda s: storage.stage_dir(run_dir, s)  # noqa: E731
    history = storage.read_json(d("finetune") / "history.json")
    answers = storage.read_json(d("generate") / "answers.json")
    finetune = storage.read_json(d("finetune") / "result.json")
    heldout_rows = []
    for b, t, r in zip(answers["heldout"]["base"], answers["heldout"]["tuned"], evaluation["heldout"]["per_example"]):
        heldout_rows.append({"id": b["id"], "instruction": b["prompt"], "reference": b["reference"],
                             "base": b["text"], "tuned": t["text"], "rouge_l": r["rouge_l"]})
    card_list = cards(answers, evaluation)
    return {
        "run_dir": str(run_dir),
        "run_id": Path(run_dir).name,
        "generated_at": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "config": cfg.to_dict(),
        "snapshot": storage.read_json(d("snapshot") / "manifest.json"),
        "preprocess": storage.read_json(d("preprocess") / "manifest.json"),
        "finetune": finetune,
        "answers": answers,
        "ev": evaluation,
        "cards": card_list,
        "categories": sorted({c["category"] for c in card_list}),
        "heldout_rows": heldout_rows,
        "history": evaluation_history(run_dir),
        "stage_seconds": {s: done[s]["result"].get("seconds") for s in STAGES},
        "loss_chart": line_chart({"loss per step": [h["loss"] for h in history]}),
        "accuracy_chart": line_chart({"token accuracy (running)": [h["accuracy_running"] for h in history]}),
        "versions": versions(),
    }


def render(context: dict) -> str:
    return environment().get_template("report.html.j2").render(**context)


def run(cfg: Config, run_dir: Path, force: bool = False) -> dict:
    upstream = [storage.require(run_dir, s, STAGE)["fingerprint"] for s in STAGES]

    def body(out: Path) -> dict:
        evaluation = evaluate(cfg, run_dir)
        evaluation["model_preset"] = cfg.model_preset
        storage.write_json(out / "metrics.json", evaluation)
        html = render(gather(cfg, run_dir, evaluation))
        (out / REPORT).write_text(html, encoding="utf-8")
        path = storage.stage_dir(run_dir, STAGE) / REPORT
        verdict = "PASSED" if evaluation["gate"]["passed"] else "FAILED"
        log.info("report: quality gate %s; wrote %s (%d KB)", verdict, path, len(html) // 1024)
        return {"report": str(path), "gate_passed": evaluation["gate"]["passed"]}

    # Templates are inputs too: editing one re-renders the report.
    tmpl = sorted((p.name, hashlib.sha256(p.read_bytes()).hexdigest()) for p in TEMPLATES.glob("*"))
    gate_cfg = cfg.subset(("gate_rouge_l_margin", "gate_eos_rate_margin", "gate_perplexity_margin"))
    return storage.run_stage(run_dir, STAGE, fingerprint(STAGE, upstream, tmpl, gate_cfg), body, force)


def main(argv=None) -> dict:
    return stage_main(STAGE, __doc__, run, argv)


if __name__ == "__main__":
    main()
