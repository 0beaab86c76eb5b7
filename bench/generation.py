"""python -m bench.generation [--config cpu_demo] [--batch-sizes 8,16,32] [--adapter DIR/adapter.lora.h5]

The prompt suite answered with greedy decoding one prompt at a time and in batches, by the generate
stage's own code (`tasks.generate.answer`, the model compiled as the stage compiles it), on the same
loaded model in one process; batched at each of --batch-sizes (default: the config's
generate_batch_size). For each: wall time for the whole suite (the first call's tracing
included, as the stage pays it; and without it), generated tokens per second, and the answers,
which are compared prompt by prompt. Writes bench/results/<name>.json and prints a one-line summary.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from bench import common
from tasks.training import adapter


def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="python -m bench.generation", description=__doc__.split("\n\n")[1])
    ap.add_argument("--config", default="cpu_demo")
    ap.add_argument("--batch-sizes", default=None, help="comma-separated batch sizes (default: generate_batch_size)")
    ap.add_argument("--max-length", type=int, default=None, help="default: the config's max_length")
    ap.add_argument("--adapter", default=None, help="answer with base + this LoRA adapter (default: the base model)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--name", default="generation-cpu")
    ap.add_argument("--out", default=None)
    ap.add_argument("--shared-note", default="2 CPU cores shared with other developers' test runs; both runs "
                    "back to back in one process on one loaded model")
    return ap.parse_args(argv)


def summarize(answers: list[dict], wall: float) -> dict:
    batches: dict[int, float] = {}
    for a in answers:
        batches[a["batch"]] = a["batch_seconds"]
    times = [batches[k] for k in sorted(batches)]
    first = times[0]
    rest = times[1:]
    typical = statistics.median(rest) if rest else first
    tokens = sum(a["tokens"] for a in answers)
    warm = wall - max(0.0, first - typical)
    return {
        "calls": len(times),
        "suite_wall_s": round(wall, 2),
        "first_call_s": round(first, 2),
        "median_call_s": round(typical, 3),
        "suite_wall_without_first_call_overhead_s": round(warm, 2),
        "generated_tokens": tokens,
        "tokens_per_s": round(tokens / wall, 2),
        "tokens_per_s_without_first_call_overhead": round(tokens / warm, 2),
        "stopped_at_eos": sum(a["stopped_at_eos"] for a in answers),
        "hit_max_length": sum(a["hit_max_length"] for a in answers),
    }


def compare(a: list[dict], b: list[dict]) -> dict:
    diffs = []
    for x, y in zip(a, b):
        if x["text"] != y["text"]:
            n = 0
            while n < min(len(x["text"]), len(y["text"])) and x["text"][n] == y["text"][n]:
                n += 1
            diffs.append({"id": x["id"], "same_prefix_chars": n, "one_by_one": x["text"], "batched": y["text"]})
    return {"prompts": len(a), "identical": len(a) - len(diffs), "different": diffs}


def main(argv=None) -> dict:
    args = parse_args(argv)
    env = common.start(args.shared_note)
    import keras

    from tasks.pipeline.config import load_config, parse_overrides
    from tasks.generate import answer, compile_for_generation
    from tasks.modeling.presets import load_causal_lm
    from tasks.pipeline.prompt_suite import load_suite

    base = load_config(args.config, parse_overrides(args.set))
    sizes = [int(x) for x in args.batch_sizes.split(",")] if args.batch_sizes else [base.generate_batch_size]
    max_length = args.max_length or base.max_length
    common_over = {**parse_overrides(args.set), "sampler": "greedy", "max_length": str(max_length)}
    cfgs = {"one_by_one": load_config(args.config, {**common_over, "generate_batch_size": "1"})}
    for b in sizes:
        cfgs[f"batch_{b}"] = load_config(args.config, {**common_over, "generate_batch_size": str(b)})
    suite = load_suite(base.prompt_suite)
    keras.utils.set_random_seed(base.sampler_seed)
    t = time.time()
    with common.PeakRss() as load_mem:
        lm = load_causal_lm(base.model_preset, base.models_dir)
        if args.adapter:
            adapter.load(lm, Path(args.adapter))
    load_s = time.time() - t
    out = {
        "benchmark": "generation",
        "environment": env,
        "model": {"preset": base.model_preset, "adapter": args.adapter, "class": type(lm).__name__,
                  "parameters": int(lm.backbone.count_params()), "dtype": str(lm.backbone.dtype_policy.name)},
        "workload": {"prompt_suite": suite["name"], "suite_sha256": suite["sha256"], "prompts": len(suite["prompts"]),
                     "sampler": "greedy", "max_length": max_length, "batch_sizes": sizes,
                     "config_generate_batch_size": base.generate_batch_size,
                     "stage_code": "tasks.generate.answer (the generate stage's loop)", "model_load_s": round(load_s, 2),
                     "memory_after_load": load_mem.result},
        "runs": {},
    }
    answers = {}
    for label, cfg in cfgs.items():
        # A fresh compile, as the stage does per model: the generate function is traced anew.
        compile_for_generation(lm, cfg)
        print(f"[bench] {label}: answering {len(suite['prompts'])} prompts ...", file=sys.stderr, flush=True)
        t = time.time()
        with common.PeakRss() as mem:
            answers[label] = answer(lm, suite["prompts"], cfg, label)
        wall = time.time() - t
        out["runs"][label] = {"generate_batch_size": cfg.generate_batch_size, **summarize(answers[label], wall),
                              "memory": mem.result}
    one = out["runs"]["one_by_one"]
    out["comparison"] = {"target": "batched >= 3x faster for the whole suite (wall time, first call included); "
                                   "same greedy answers"}
    for label in cfgs:
        if label == "one_by_one":
            continue
        bat = out["runs"][label]
        out["comparison"][label] = {
            "speedup_suite_wall": round(one["suite_wall_s"] / bat["suite_wall_s"], 2),
            "speedup_without_first_call_overhead": round(
                one["suite_wall_without_first_call_overhead_s"] / bat["suite_wall_without_first_call_overhead_s"], 2),
            "answers": compare(answers["one_by_one"], answers[label]),
        }
        out["comparison"][label]["meets_3x"] = out["comparison"][label]["speedup_suite_wall"] >= 3.0
    out["answers"] = {k: [{"id": a["id"], "tokens": a["tokens"], "stopped_at_eos": a["stopped_at_eos"], "text": a["text"]}
                          for a in v] for k, v in answers.items()}
    out["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    path = common.write_results(args.name, out, args.out)
    print(json.dumps({k: v for k, v in out.items() if k != "answers"}, indent=2, default=str))
    c = out["comparison"]
    batched = "; ".join(
        f"batch {cfgs[k].generate_batch_size} {out['runs'][k]['suite_wall_s']} s ({out['runs'][k]['tokens_per_s']} tokens/s, "
        f"x{c[k]['speedup_suite_wall']}, identical {c[k]['answers']['identical']}/{c[k]['answers']['prompts']})"
        for k in cfgs if k != "one_by_one")
    print(f"SUMMARY generation [{env['device']}; {base.model_preset}; {len(suite['prompts'])} prompts, greedy, max_length "
          f"{max_length}]: one-by-one {one['suite_wall_s']} s ({one['tokens_per_s']} tokens/s) vs {batched} -> {path}")
    return out


if __name__ == "__main__":
    main()
