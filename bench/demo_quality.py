"""python -m bench.demo_quality --label NAME [--config cpu_demo] [--set KEY=VALUE ...]

What a configuration of the demo buys and costs: the pipeline's own stages (snapshot, preprocess,
finetune, generate) run in one process on the config with the overrides, then the report's own
evaluation (tasks.evaluate.evaluation.evaluate). One row per call, appended to
bench/results/demo_quality-cpu.json: the seconds of each stage, the held-out n, ROUGE-L of base and
tuned with the 95% paired-bootstrap interval of the change, the response perplexity with its
interval, the EOS-stop rates and the verdict words. The rows of one file are the sweep behind the
demo's settings (tasks/configs/cpu_demo.yaml names it); compare rows of one sitting only.

The stages run one after another in this process; here `generate` was measured ~1.5x slower than
the same stage alone in a fresh process and than in `make demo` (row E's run folder, 2026-12-01;
cause not found): the seconds compare rows with each other, not with `make demo`
(bench/demo_side_by_side.sh measures that).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from bench import common


def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="python -m bench.demo_quality", description=__doc__.split("\n\n")[1])
    ap.add_argument("--label", required=True, help="the row's name")
    ap.add_argument("--config", default="cpu_demo")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    ap.add_argument("--name", default="demo_quality-cpu", help="results file name under bench/results/")
    ap.add_argument("--work-dir", default=None, help="where the run folder goes (default: a temp dir)")
    ap.add_argument("--shared-note", default="2 CPU cores; nothing else ran on the machine during the run")
    return ap.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    env = common.start(args.shared_note)
    from tasks import finetune, generate, preprocess, snapshot
    from tasks.pipeline.config import load_config, parse_overrides
    from tasks.evaluate.evaluation import evaluate

    overrides = parse_overrides(args.set)
    cfg = load_config(args.config, overrides)
    run_dir = Path(args.work_dir or tempfile.mkdtemp(prefix="bench-demo-")) / args.label
    seconds = {}
    for stage in (snapshot, preprocess, finetune, generate):
        name = stage.__name__.rsplit(".", 1)[-1]
        print(f"[bench] {args.label}: {name} ...", file=sys.stderr, flush=True)
        t = time.time()
        stage.run(cfg, run_dir)
        seconds[name] = round(time.time() - t, 1)
    ev = evaluate(cfg, run_dir)
    rci, pci = ev["heldout"]["rouge_l_delta_ci"], ev["perplexity"]["delta_ci"]
    row = {
        "label": args.label,
        "overrides": overrides,
        "seconds": {**seconds, "total": round(sum(seconds.values()), 1)},
        "rouge_l": {**ev["heldout"]["rouge_l"], "delta_ci": rci},
        "perplexity": {"base": ev["perplexity"]["base"], "tuned": ev["perplexity"]["tuned"], "delta_ci": pci},
        "eos_stop_rate": ev["eos_stop_rate"],
        "significance": ev["significance"],
        "gate_passed": ev["gate"]["passed"],
        "run_dir": str(run_dir),
        "environment": env,
    }
    path = common.RESULTS / f"{args.name}.json"
    rows = json.loads(path.read_text()) if path.is_file() else []
    rows = [r for r in rows if r["label"] != args.label] + [row]
    path.write_text(json.dumps(rows, indent=2) + "\n")
    print(json.dumps({k: row[k] for k in ("label", "seconds", "rouge_l", "perplexity", "eos_stop_rate", "significance")}))
    print(f"{args.label}: {row['seconds']['total']} s; ROUGE-L {rci['mean']:+.4f} [{rci['low']:+.4f}, {rci['high']:+.4f}] "
          f"n={rci['n']} ({row['significance']['rouge_l']}); perplexity {pci['base']} -> {pci['tuned']} "
          f"[{pci['low']:+.3f}, {pci['high']:+.3f}] ({row['significance']['perplexity']})")
    return row


if __name__ == "__main__":
    main()
