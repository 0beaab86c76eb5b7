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


def pair_answers(answers: dict) -> list[dict]:
    tuned = {a["id"]: a for a in answers["models"]["tuned"]}
    return [{"id": b["id"], "category": b["category"], "prompt": b["prompt"], "base": b, "tuned": tuned[b["id"]]}
            for b in answers["models"]["base"]]


def answer_stats(answers: list[dict]) -> dict:
    n = max(len(answers), 1)
    return {
        "answers": len(answers),
        "stopped_at_eos": sum(a["stopped_at_eos"] for a in answers),
        "stop_rate": round(sum(a["stopped_at_eos"] for a in answers) / n, 3),
        "mean_tokens": round(sum(a["tokens"] for a in answers) / n, 1),
    }


def gather(cfg: Config, run_dir: Path) -> dict:
    done = {s: storage.require(run_dir, s, STAGE) for s in STAGES}
    d = lambda s: storage.stage_dir(run_dir, s)  # noqa: E731
    history = storage.read_json(d("finetune") / "history.json")
    answers = storage.read_json(d("generate") / "answers.json")
    finetune = storage.read_json(d("finetune") / "result.json")
    return {
        "run_dir": str(run_dir),
        "run_id": Path(run_dir).name,
        "generated_at": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "config": cfg.to_dict(),
        "snapshot": storage.read_json(d("snapshot") / "manifest.json"),
        "preprocess": storage.read_json(d("preprocess") / "manifest.json"),
        "finetune": finetune,
        "answers": answers,
        "pairs": pair_answers(answers),
        "base_stats": answer_stats(answers["models"]["base"]),
        "tuned_stats": answer_stats(answers["models"]["tuned"]),
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
        html = render(gather(cfg, run_dir))
        (out / REPORT).write_text(html, encoding="utf-8")
        path = storage.stage_dir(run_dir, STAGE) / REPORT
        log.info("report: wrote %s (%d KB)", path, len(html) // 1024)
        return {"report": str(path)}

    # Templates are inputs too: editing one re-renders the report.
    tmpl = sorted((p.name, hashlib.sha256(p.read_bytes()).hexdigest()) for p in TEMPLATES.glob("*"))
    return storage.run_stage(run_dir, STAGE, fingerprint(STAGE, upstream, tmpl), body, force)


def main(argv=None) -> dict:
    return stage_main(STAGE, __doc__, run, argv)


if __name__ == "__main__":
    main()
