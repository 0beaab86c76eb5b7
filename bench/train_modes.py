"""python -m bench.train_modes [--dataset DOLLY.jsonl] [--examples 128] [--sequence-length 256] [--batch-size 4]

Both training modes side by side, in one process, on the same data, examples, model and recipe:
snapshot and preprocess run once, then `tasks.finetune` runs with `train_mode=tutorial` and with
`train_mode=fast` (each in its own run folder, sharing the preprocessed examples). For each mode:
real (non-padding) and padded tokens per second over the whole fit (compilations included) and after
warm-up (every step that was not the first of its batch width), step times, compilation overhead,
peak memory, model FLOP/s (MFU where the device's peak is known) and the held-out scores before and
after tuning. Writes bench/results/<name>.json and prints a one-line summary.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from bench import common


def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="python -m bench.train_modes", description=__doc__.split("\n\n")[1])
    ap.add_argument("--config", default="cpu_demo", help="base config (default cpu_demo: Gemma 3 270M, the CPU recipe)")
    ap.add_argument("--dataset", default=None,
                    help="Dolly .jsonl (default: $DOLLY_FULL_JSONL, else the bundled sample)")
    ap.add_argument("--examples", type=int, default=128)
    ap.add_argument("--sequence-length", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--eval-examples", type=int, default=32)
    ap.add_argument("--modes", default="tutorial,fast", help="comma-separated, run in this order")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="extra config override (both modes)")
    ap.add_argument("--peak-tflops", type=float, default=None, help="device peak for MFU (CPU peaks are not looked up)")
    ap.add_argument("--name", default="train_modes-cpu", help="results file name under bench/results/")
    ap.add_argument("--out", default=None, help="results path (overrides --name)")
    ap.add_argument("--work-dir", default=None, help="where the run folders go (default: a temp dir, removed)")
    ap.add_argument("--shared-note", default="2 CPU cores shared with other developers' test runs; both modes "
                    "ran back to back in one process, so contention hits both")
    return ap.parse_args(argv)


def step_figures(history: list[dict], steps, lengths: dict[int, int], sequence_length: int, xla: bool = True) -> dict:
    """Per-step durations split into warm-up and steady. Under XLA every width compiles at its first
    step; a TensorFlow graph (fast mode on CPU) is traced once, at the very first step."""
    durations, prev = [], 0.0
    for h in history:
        durations.append(h["elapsed_s"] - prev)
        prev = h["elapsed_s"]
    real = [sum(min(lengths[i], sequence_length + 1) - 1 for i in s.rows) for s in steps]
    seen, warm, steady = set(), [], []
    for k, (d, s) in enumerate(zip(durations, steps)):
        key = s.width if xla else "any"
        (warm if key not in seen else steady).append(k)
        seen.add(key)
    by_width: dict[int, dict] = {}
    for w in sorted({s.width for s in steps}):
        ks = [k for k in steady if steps[k].width == w]
        first = next(k for k in range(len(steps)) if steps[k].width == w)
        med = statistics.median(durations[k] for k in ks) if ks else None
        by_width[w] = {
            "steps": sum(1 for s in steps if s.width == w),
            "first_step_s": round(durations[first], 2),
            "steady_step_median_s": round(med, 3) if med is not None else None,
            "warmup_overhead_s": round(durations[first] - med, 2) if med is not None else None,
        }
    steady_s = sum(durations[k] for k in steady)
    steady_real = sum(real[k] for k in steady)
    return {
        "warmup_steps": len(warm),
        "steady_steps": len(steady),
        "steady_time_s": round(steady_s, 2),
        "steady_step_mean_s": round(steady_s / len(steady), 3) if steady else None,
        "steady_real_tokens_per_s": round(steady_real / steady_s, 1) if steady_s else None,
        "warmup_time_s": round(sum(durations[k] for k in warm), 2),
        "by_width": by_width,
    }


def main(argv=None) -> dict:
    args = parse_args(argv)
    env = common.start(args.shared_note)
    from tasks import finetune, preprocess, snapshot
    from tasks.pipeline import artifacts
    from tasks.training import loop
    from tasks.pipeline.config import load_config, parse_overrides

    dataset = common.dolly_path(args.dataset)
    overrides = {
        "num_examples": str(args.examples),
        "sequence_length": str(args.sequence_length),
        "batch_size": str(args.batch_size),
        "eval_examples": str(args.eval_examples),
        "heldout_examples": str(max(args.eval_examples, 1)),
        "log_every_steps": "1000000",
        **({"dataset_source": dataset} if dataset else {}),
        **parse_overrides(args.set),
    }
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="bench-train-"))
    base_run = work / "runs" / "prepared"
    cfg0 = load_config(args.config, overrides)
    t = time.time()
    snapshot.run(cfg0, base_run)
    preprocess.run(cfg0, base_run)
    prep_s = time.time() - t
    train_rows = artifacts.read_train(base_run)
    lengths = {i: r["n_tokens"] for i, r in enumerate(train_rows)}
    manifest = artifacts.read_preprocess_manifest(base_run)

    out: dict = {
        "benchmark": "train_modes",
        "environment": env,
        "workload": {
            "config": args.config,
            "overrides": overrides,
            "dataset": dataset or "bundled sample (tasks/data/dolly_sample.jsonl)",
            "examples": cfg0.num_examples,
            "epochs": cfg0.epochs,
            "batch_size": cfg0.batch_size,
            "sequence_length": cfg0.sequence_length,
            "loss_tokens": cfg0.loss_tokens,
            "learning_rate": cfg0.learning_rate,
            "lora_rank": cfg0.lora_rank,
            "eval_examples": cfg0.eval_examples,
            "train_token_lengths": manifest["train_token_lengths"],
            "snapshot_and_preprocess_s": round(prep_s, 2),
        },
        "modes": {},
    }
    shape = None
    for mode in modes:
        cfg = load_config(args.config, {**overrides, "train_mode": mode})
        run_dir = work / "runs" / mode
        for stage in (artifacts.SNAPSHOT, artifacts.PREPROCESS):
            shutil.copytree(base_run / stage, run_dir / stage)
        print(f"[bench] {mode}: fine-tuning {cfg.num_examples} examples ...", file=sys.stderr, flush=True)
        t = time.time()
        with common.PeakRss() as mem:
            finetune.run(cfg, run_dir)
        wall = time.time() - t
        result = artifacts.read_finetune_result(run_dir)
        history = artifacts.read_history(run_dir)
        steps = loop.train_plan([min(lengths[i], cfg.sequence_length) for i in range(len(train_rows))], cfg)
        assert len(steps) == len(history), (len(steps), len(history))
        if shape is None:
            shape = model_shape_from(cfg)
        train_s = result["timings_s"]["train"]
        tok = result["tokens"]
        mean_ctx = tok["real"] / max(1, cfg.num_examples * cfg.epochs)
        flops = common.lora_train_flops_per_token(shape, mean_ctx)
        model_flops = flops["flops_per_token"] * tok["real"]
        dtype = result["training"]["dtype_policy"]
        peak = args.peak_tflops or (common.peak_tflops(env["device"], "bfloat16" if "bfloat16" in dtype else "float32")
                                    if env["gpus"] else None)
        figures = step_figures(history, steps, lengths, cfg.sequence_length, result["training"]["jit_compile"])
        out["modes"][mode] = {
            "training": result["training"],
            "parameters": result["parameters"],
            "trainable_parameters": result["trainable_parameters"],
            "steps": result["steps"],
            "train_wall_s": train_s,
            "stage_wall_s": round(wall, 2),
            "model_load_s": result["timings_s"]["load"],
            "tokens_real": tok["real"],
            "tokens_padded": tok["padded"],
            "padding_share": round(1 - tok["real"] / tok["padded"], 3),
            "real_tokens_per_s": tok["real_per_s"],
            "padded_tokens_per_s": tok["padded_per_s"],
            **figures,
            "model_tflop_per_s": round(model_flops / train_s / 1e12, 4),
            "mfu": round(model_flops / train_s / (peak * 1e12), 4) if peak else None,
            "mfu_note": None if peak else "no peak FLOP/s known for this CPU (pass --peak-tflops)",
            "memory": mem.result,
            "heldout_base": result["heldout_base"],
            "heldout_tuned": result["heldout_tuned"],
            "final_train_loss": result["final_loss"],
        }
        print(f"[bench] {mode}: {train_s:.1f} s, {tok['real_per_s']} real tokens/s, held-out loss "
              f"{result['heldout_base']['loss']} -> {result['heldout_tuned']['loss']}", file=sys.stderr, flush=True)
    out["model"] = {"preset": cfg0.model_preset, "shape": shape, "flops": common.lora_train_flops_per_token(shape, 1.0)}
    out["model"]["flops"].pop("flops_per_token")
    if {"tutorial", "fast"} <= set(out["modes"]):
        tu, fa = out["modes"]["tutorial"], out["modes"]["fast"]
        loss_t, loss_f = tu["heldout_tuned"]["loss"], fa["heldout_tuned"]["loss"]
        out["comparison"] = {
            "real_tokens_per_s_ratio": round(fa["real_tokens_per_s"] / tu["real_tokens_per_s"], 2),
            "steady_real_tokens_per_s_ratio": round(fa["steady_real_tokens_per_s"] / tu["steady_real_tokens_per_s"], 2)
            if fa["steady_real_tokens_per_s"] and tu["steady_real_tokens_per_s"] else None,
            "train_wall_ratio": round(tu["train_wall_s"] / fa["train_wall_s"], 2),
            "heldout_loss_tutorial": loss_t,
            "heldout_loss_fast": loss_f,
            "heldout_loss_rel_diff": round((loss_f - loss_t) / loss_t, 4),
            "heldout_response_loss_rel_diff": round(
                (fa["heldout_tuned"]["response_loss"] - tu["heldout_tuned"]["response_loss"]) / tu["heldout_tuned"]["response_loss"], 4),
            "target": "fast real tokens/s >= 2x tutorial over the whole fit; tuned held-out loss within +-5%",
        }
        c = out["comparison"]
        c["meets_2x"] = c["real_tokens_per_s_ratio"] >= 2.0
        c["meets_loss_tolerance"] = abs(c["heldout_loss_rel_diff"]) <= 0.05
    out["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    path = common.write_results(args.name, out, args.out)
    print(json.dumps(out, indent=2, default=str))
    if "comparison" in out:
        c = out["comparison"]
        print(f"SUMMARY train_modes [{env['device']}; {cfg0.model_preset}; {cfg0.num_examples} ex, seq "
              f"{cfg0.sequence_length}, batch {cfg0.batch_size}]: real tokens/s tutorial "
              f"{out['modes']['tutorial']['real_tokens_per_s']} vs fast {out['modes']['fast']['real_tokens_per_s']} "
              f"(x{c['real_tokens_per_s_ratio']}, after warm-up x{c['steady_real_tokens_per_s_ratio']}); held-out loss "
              f"{c['heldout_loss_tutorial']} vs {c['heldout_loss_fast']} ({c['heldout_loss_rel_diff']:+.2%}) -> {path}")
    if not args.work_dir:
        shutil.rmtree(work, ignore_errors=True)
    return out


def model_shape_from(cfg) -> dict:
    """The model's shape without keeping a model around: its preset's config.json."""
    from tasks.modeling.presets import resolve_preset

    conf = json.loads((resolve_preset(cfg.model_preset, cfg.models_dir) / "config.json").read_text())
    c = conf["config"]
    shape = {"class": conf["class_name"]}
    for key in ("num_layers", "hidden_dim", "intermediate_dim", "num_query_heads", "num_key_value_heads", "head_dim",
                "vocabulary_size"):
        shape[key] = int(c[key])
    shape["mlp_dim"] = shape["intermediate_dim"] if "Gemma3" in shape["class"] else shape["intermediate_dim"] // 2
    return shape


if __name__ == "__main__":
    main()
