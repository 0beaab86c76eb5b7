"""python -m bench.preprocess_scale --dataset /path/to/databricks-dolly-15k.jsonl [--model-preset gguf:gemma3-270m]

The whole Dolly 15k through the snapshot and preprocess stages (their own `run`), with every usable
record tokenized by the model's tokenizer for the token-length statistics (the histogram the report
shows comes from preprocess's manifest). Two passes: the seed's filter (rows with a context dropped)
and `drop_context: false` (all ~15k rows tokenized). Wall time per stage, rows per second and the
token-length statistics. Writes bench/results/<name>.json and prints a one-line summary.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

from bench import common


def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="python -m bench.preprocess_scale", description=__doc__.split("\n\n")[1])
    ap.add_argument("--dataset", default=None, help="Dolly .jsonl (default: $DOLLY_FULL_JSONL)")
    ap.add_argument("--config", default="cpu_demo")
    ap.add_argument("--model-preset", default=None, help="tokenizer's model (default: the config's, Gemma 3 270M)")
    ap.add_argument("--heldout", type=int, default=100)
    ap.add_argument("--name", default="preprocess-dolly15k-cpu")
    ap.add_argument("--out", default=None)
    ap.add_argument("--shared-note", default="2 CPU cores shared with other developers' test runs")
    return ap.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    # Not common.start(): its environment() imports TensorFlow, which is timed here on its own.
    common.quiet()
    from tasks import preprocess, snapshot
    from tasks.pipeline import artifacts
    from tasks.pipeline.config import load_config

    t = time.time()
    import keras_hub  # noqa: F401 - timed on its own: every stage process pays it once

    import_s = time.time() - t
    dataset = common.dolly_path(args.dataset)
    if not dataset or not Path(dataset).is_file():
        sys.exit("give the full Dolly file with --dataset or $DOLLY_FULL_JSONL")
    env = common.environment(args.shared_note)
    work = Path(tempfile.mkdtemp(prefix="bench-prep-"))
    over = {"dataset_source": dataset, "heldout_examples": str(args.heldout)}
    if args.model_preset:
        over["model_preset"] = args.model_preset
    out = {"benchmark": "preprocess_scale", "environment": env, "dataset": dataset,
           "import_tensorflow_keras_hub_s": round(import_s, 2), "passes": {}}
    try:
        for label, drop in (("seed_filter_drop_context", True), ("all_rows_keep_context", False)):
            run_dir = work / "runs" / label
            cfg = load_config(args.config, {**over, "drop_context": str(drop).lower(), "num_examples": "1"})
            t = time.time()
            with common.PeakRss() as snap_mem:
                snap = snapshot.run(cfg, run_dir)
            snap_s = time.time() - t
            # Every usable record: all but the held-out split go to training, so all are tokenized.
            records = artifacts.read_records(run_dir)
            usable = len(preprocess.filter_records(records, drop)[0])
            cfg = load_config(args.config, {**over, "drop_context": str(drop).lower(),
                                            "num_examples": str(usable - args.heldout)})
            t = time.time()
            with common.PeakRss() as prep_mem:
                preprocess.run(cfg, run_dir)
            prep_s = time.time() - t
            manifest = artifacts.read_preprocess_manifest(run_dir)
            out["passes"][label] = {
                "drop_context": drop,
                "rows_in": manifest["rows_in"],
                "rows_usable": manifest["rows_usable"],
                "dropped": manifest["dropped"],
                "tokenized_examples": manifest["train_examples"] + manifest["heldout_examples"],
                "snapshot_s": round(snap_s, 2),
                "preprocess_s": round(prep_s, 2),
                "total_s": round(snap_s + prep_s, 2),
                "rows_per_s": round(manifest["rows_in"] / (snap_s + prep_s), 1),
                "sequence_length": manifest["sequence_length"],
                "train_token_lengths": manifest["train_token_lengths"],
                "snapshot_rows_bad": snap.get("rows_bad"),
                "memory": {"snapshot": snap_mem.result, "preprocess": prep_mem.result},
            }
            print(f"[bench] {label}: snapshot {snap_s:.1f} s, preprocess {prep_s:.1f} s", file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    out["model_preset"] = cfg.model_preset
    out["note"] = ("preprocess_s includes loading the tokenizer (a 262k-piece SentencePiece model) but not importing "
                   "TensorFlow and keras-hub (import_tensorflow_keras_hub_s, paid once per process); the snapshot "
                   "validates, canonicalises and hashes every record")
    out["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    path = common.write_results(args.name, out, args.out)
    print(json.dumps(out, indent=2, default=str))
    a = out["passes"]["all_rows_keep_context"]
    s = out["passes"]["seed_filter_drop_context"]
    print(f"SUMMARY preprocess_scale [{env['device']}; tokenizer {cfg.model_preset}]: Dolly {a['rows_in']} rows "
          f"(after a {out['import_tensorflow_keras_hub_s']} s import): all rows "
          f"snapshot {a['snapshot_s']} s + preprocess {a['preprocess_s']} s = {a['total_s']} s "
          f"({a['tokenized_examples']} tokenized, p50/p90/max {a['train_token_lengths']['p50']}/"
          f"{a['train_token_lengths']['p90']}/{a['train_token_lengths']['max']} tokens); seed filter {s['total_s']} s "
          f"({s['tokenized_examples']} tokenized) -> {path}")
    return out


if __name__ == "__main__":
    main()
