"""python -m bench.lora_sweep [--config cpu_demo] [--rows A,B,...] [--seeds 0,1] [--heldout ROW ...] [--table]

Where LoRA goes and how strongly, chosen by measurement and ranked on the validation split only.
Each row (a `lora_targets` x `lora_alpha` x learning rate setting) is fine-tuned with each seed on
the config with `validation_examples` drawn (outside the training set and the held-out split) and
the validation loss scored every `eval_every_steps`; a row's rank is the mean over its seeds of the
final validation loss (the adapter `keep: last` saves). The held-out split is looked at once, for
the rows named by `--heldout` (the chosen one and today's), at seed 0: `generate` and the report's
own evaluation (held-out ROUGE-L and response perplexity with their 95% paired-bootstrap intervals
and minimum detectable effects, EOS-stop rate). `finetune` scores the held-out loss of every run as
part of its stage; this script never reads it for a row it did not name with --heldout.

Writes bench/results/lora_sweep-cpu.json: every run's seconds, trainable weights, validation curve,
best step and final validation loss; the rows ranked; the held-out results. Compare seconds within
one sitting only.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from bench import common

# Row A is today's cpu_demo (query/value, alpha = rank 4, 3.5e-4).
ROWS = {
    "A": {"lora_targets": "attention_qv", "lora_alpha": 4.0, "learning_rate": 3.5e-4},
    "B": {"lora_targets": "attention", "lora_alpha": 4.0, "learning_rate": 3.5e-4},
    "C": {"lora_targets": "all_linear", "lora_alpha": 4.0, "learning_rate": 3.5e-4},
    "D": {"lora_targets": "all_linear", "lora_alpha": 8.0, "learning_rate": 3.5e-4},
    "E": {"lora_targets": "all_linear", "lora_alpha": 4.0, "learning_rate": 2.0e-4},
    "F": {"lora_targets": "attention_qv", "lora_alpha": 8.0, "learning_rate": 3.5e-4},
}
VALIDATION = {"validation_examples": 32, "eval_every_steps": 16}


def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="python -m bench.lora_sweep", description=__doc__.split("\n\n")[1])
    ap.add_argument("--config", default="cpu_demo")
    ap.add_argument("--rows", default="A,B,C,D", help=f"rows of {sorted(ROWS)}")
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--heldout", action="append", default=[], metavar="ROW", help="rows scored on the held-out split (seed 0)")
    ap.add_argument("--work-dir", default=None)
    ap.add_argument("--name", default="lora_sweep-cpu")
    ap.add_argument("--shared-note", default="2 CPU cores; small unit tests ran beside it at times")
    ap.add_argument("--table", action="store_true", help="print the results file as a markdown table and stop")
    return ap.parse_args(argv)


def table(out: dict) -> str:
    """The results as markdown: one line per row (mean over seeds) and the held-out results."""
    lines = ["| row | lora_targets | alpha | lr | trainable | final validation loss (seeds) | best step | train s (validation s) |",
             "|---|---|---:|---:|---:|---|---|---|"]
    for r in out["ranked"]:
        runs = sorted((x for x in out["runs"] if x["row"] == r["row"]), key=lambda x: x["seed"])
        finals = ", ".join(format(x["final_loss"], ".4f") for x in runs)
        best = ", ".join(str(x["best_step"]) for x in runs)
        seconds = ", ".join(f"{x['train_s']:.0f} ({x['validation_s']:.0f})" for x in runs)
        lines.append(
            f"| {r['row']} | `{r['lora_targets']}` | {r['lora_alpha']:g} | {r['learning_rate']:g} | {r['trainable_weights']:,} | "
            f"**{r['final_validation_loss_mean']:.4f}** ({finals}) | {best} | {seconds} |")
    for h in out["heldout"]:
        rci, pci = h["rouge_l"]["delta_ci"], h["perplexity"]["delta_ci"]
        lines.append(f"\nHeld-out, row {h['row']} (seed {h['seed']}): ROUGE-L {h['rouge_l']['base']} -> {h['rouge_l']['tuned']}, "
                     f"change {rci['mean']:+.4f} [{rci['low']:+.4f}, {rci['high']:+.4f}] (MDE {rci['mde_80']}, n = {rci['n']}); "
                     f"response perplexity {pci['base']} -> {pci['tuned']} [{pci['low']:+.3f}, {pci['high']:+.3f}] "
                     f"(MDE {pci['mde_80']}); EOS-stop {h['eos_stop_rate']['base']} -> {h['eos_stop_rate']['tuned']}")
    return "\n".join(lines)


def label(row: str, seed: int) -> str:
    return f"{row}-seed{seed}"


def train_run(cfg_name: str, row: str, seed: int, work: Path) -> dict:
    from tasks import finetune, preprocess, snapshot
    from tasks.pipeline import artifacts
    from tasks.pipeline.config import load_config

    overrides = {**ROWS[row], **VALIDATION, "training_seed": seed}
    cfg = load_config(cfg_name, {k: str(v) for k, v in overrides.items()})
    run_dir = work / label(row, seed) / "runs" / "run"
    seconds = {}
    for stage in (snapshot, preprocess, finetune):
        name = stage.__name__.rsplit(".", 1)[-1]
        print(f"[bench] {label(row, seed)}: {name} ...", file=sys.stderr, flush=True)
        t = time.time()
        stage.run(cfg, run_dir)
        seconds[name] = round(time.time() - t, 1)
    result = artifacts.read_finetune_result(run_dir)
    v = result["validation"]
    return {
        "row": row, "seed": seed, "overrides": overrides, "seconds": seconds,
        "train_s": result["timings_s"]["train"], "validation_s": result["timings_s"].get("validation"),
        "trainable_weights": result["trainable_weights"],
        "validation_curve": [(s["step"], s["loss"]) for s in v["scores"]],
        "best_step": v["best_step"], "best_loss": v["best_loss"], "final_loss": v["scores"][-1]["loss"],
        "run_dir": str(run_dir),
    }


def heldout(cfg_name: str, run: dict) -> dict:
    from tasks import generate
    from tasks.evaluate.evaluation import evaluate
    from tasks.pipeline.config import load_config

    cfg = load_config(cfg_name, {k: str(v) for k, v in run["overrides"].items()})
    t = time.time()
    generate.run(cfg, Path(run["run_dir"]))
    ev = evaluate(cfg, Path(run["run_dir"]))
    rci, pci = ev["heldout"]["rouge_l_delta_ci"], ev["perplexity"]["delta_ci"]
    return {
        "row": run["row"], "seed": run["seed"], "generate_s": round(time.time() - t, 1),
        "rouge_l": {**ev["heldout"]["rouge_l"], "delta_ci": rci},
        "perplexity": {"base": ev["perplexity"]["base"], "tuned": ev["perplexity"]["tuned"], "delta_ci": pci},
        "eos_stop_rate": ev["eos_stop_rate"], "significance": ev["significance"],
    }


def main(argv=None) -> dict:
    args = parse_args(argv)
    path = common.RESULTS / f"{args.name}.json"
    if args.table:
        print(table(json.loads(path.read_text())))
        return {}
    env = common.start(args.shared_note)
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="bench-lora-sweep-"))
    out = json.loads(path.read_text()) if path.is_file() else {"runs": [], "heldout": []}
    out.update({"config": args.config, "validation": VALIDATION, "rows": ROWS, "environment": env})
    done = {(r["row"], r["seed"]) for r in out["runs"] if Path(r["run_dir"]).is_dir()}
    for row in args.rows.split(","):
        for seed in (int(s) for s in args.seeds.split(",")):
            if (row, seed) in done:
                continue
            run = train_run(args.config, row, seed, work)
            out["runs"] = [r for r in out["runs"] if (r["row"], r["seed"]) != (row, seed)] + [run]
            path.write_text(json.dumps(out, indent=1) + "\n")
            print(f"{label(row, seed)}: train {run['train_s']} s, final validation loss {run['final_loss']:.4f}, "
                  f"best {run['best_loss']:.4f} at step {run['best_step']}", flush=True)
    ranked = []
    for row in sorted({r["row"] for r in out["runs"]}):
        runs = [r for r in out["runs"] if r["row"] == row]
        finals = [r["final_loss"] for r in runs]
        ranked.append({"row": row, **ROWS[row], "seeds": len(runs), "final_validation_loss_mean": round(statistics.mean(finals), 5),
                       "final_validation_loss_spread": round(max(finals) - min(finals), 5),
                       "train_s_mean": round(statistics.mean(r["train_s"] for r in runs), 1),
                       "trainable_weights": runs[0]["trainable_weights"]["total"]})
    out["ranked"] = sorted(ranked, key=lambda r: r["final_validation_loss_mean"])
    for row in args.heldout:
        run = next(r for r in out["runs"] if r["row"] == row and r["seed"] == 0)
        out["heldout"] = [h for h in out["heldout"] if h["row"] != row] + [heldout(args.config, run)]
        path.write_text(json.dumps(out, indent=1) + "\n")
    path.write_text(json.dumps(out, indent=1) + "\n")
    for r in out["ranked"]:
        print(f"{r['row']} {r['lora_targets']:>12} alpha {r['lora_alpha']:g} lr {r['learning_rate']:g}: validation "
              f"{r['final_validation_loss_mean']:.4f} (seeds differ by {r['final_validation_loss_spread']:.4f}), "
              f"train {r['train_s_mean']} s, {r['trainable_weights']:,} trainable")
    for h in out["heldout"]:
        rci = h["rouge_l"]["delta_ci"]
        print(f"held-out {h['row']}: ROUGE-L {h['rouge_l'].get('base')} -> {h['rouge_l'].get('tuned')} [{rci['low']:+.4f}, {rci['high']:+.4f}]; "
              f"perplexity {h['perplexity']['base']} -> {h['perplexity']['tuned']}; EOS {h['eos_stop_rate']}")
    return out


if __name__ == "__main__":
    main()
