"""python -m bench.gpu_benchmark            (on a machine with an NVIDIA GPU; no internet needed)

A Gemma-2B-shaped model (keras-hub's `gemma_2b_en` architecture: 18 layers, hidden 2048, 8 query
heads, 1 KV head, head dim 256, MLP 2 x 16384, vocabulary 256,000; 2.51 B parameters) built with
random weights, so nothing is downloaded. The workload is random token ids whose lengths follow Dolly
15k's (bench/dolly_token_lengths.json, measured with the Gemma 3 tokenizer), so padding and
bucketing behave as on the real data. It runs:

1. both training modes (`tutorial`, `fast`) for a fixed number of steps each, through the pipeline's
   own plan, dataset and compile code (`tasks.finetune`), with LoRA rank 4 and AdamW as the recipe:
   real and padded tokens/s, step time after warm-up, peak GPU memory, MFU;
2. batched greedy generation of a 26-prompt suite-sized workload to max_length, batch 1 vs batch N.

With `--replicas N` training runs data parallel over the first N GPUs (the pipeline's
`data_parallel: auto`, tf.distribute.MirroredStrategy) at the same global batch; run 1, 2, 4 ... and
compare real tokens/s for the scaling (`--name` keeps the files apart).

Writes bench/results/gpu-<device>.json and prints a one-line summary. `--shape tiny --allow-cpu`
runs the same code on a tiny model on a CPU (a smoke test of the script, not a benchmark).
"""

from __future__ import annotations

import argparse
import json
import random
import re
import statistics
import sys
import time
from pathlib import Path

from bench import common

# keras-hub `gemma_2b_en` (config.json of the Kaggle preset keras/gemma/keras/gemma_2b_en).
GEMMA_2B = dict(vocabulary_size=256000, num_layers=18, num_query_heads=8, num_key_value_heads=1, hidden_dim=2048,
                intermediate_dim=32768, head_dim=256)
TINY = dict(vocabulary_size=1000, num_layers=2, num_query_heads=2, num_key_value_heads=1, hidden_dim=64,
            intermediate_dim=128, head_dim=32)
# enable_lora(4) on the real gemma_2b_en gives the tutorial's 1,363,968 trainable weights.
GEMMA_2B_LORA4_TRAINABLE = 1_363_968
LENGTHS = Path(__file__).with_name("dolly_token_lengths.json")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="python -m bench.gpu_benchmark", description=__doc__.split("\n\n")[1])
    ap.add_argument("--shape", choices=("gemma_2b", "tiny"), default="gemma_2b")
    ap.add_argument("--steps", type=int, default=60, help="training steps per mode (one epoch of steps x batch examples)")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--sequence-length", type=int, default=256)
    ap.add_argument("--modes", default="tutorial,fast")
    ap.add_argument("--gen-prompts", type=int, default=26)
    ap.add_argument("--gen-batch-size", type=int, default=8)
    ap.add_argument("--gen-max-length", type=int, default=256)
    ap.add_argument("--replicas", type=int, default=1,
                    help="train data parallel on this many GPUs (the first N; batch-size must be a multiple): run 1, 2, 4 ... "
                         "and compare real tokens/s for the scaling")
    ap.add_argument("--allow-cpu", action="store_true", help="run without a GPU (smoke test only)")
    ap.add_argument("--name", default=None, help="results file name (default gpu-<device>)")
    ap.add_argument("--out", default=None)
    return ap.parse_args(argv)


def workload(n: int, sequence_length: int, vocab: int, seed: int = 0) -> dict:
    """`n` examples of random token ids with Dolly's token lengths; arrays shaped like batching.encode's."""
    import numpy as np

    dist = json.loads(LENGTHS.read_text())["n_tokens"]
    rng = random.Random(seed)
    lengths = [rng.choice(dist) for _ in range(n)]
    width = sequence_length + 1
    ids = np.zeros((n, width), dtype="int32")
    real = np.zeros((n, width), dtype=bool)
    nprng = np.random.default_rng(seed)
    for i, length in enumerate(lengths):
        m = min(length, width)
        ids[i, :m] = nprng.integers(3, vocab, size=m)
        real[i, :m] = True
    label_mask = real[:, 1:]
    return {
        "token_ids": ids[:, :-1], "padding_mask": real[:, :-1], "labels": ids[:, 1:], "label_mask": label_mask,
        "weights": label_mask.astype("float32"), "real_tokens": label_mask.sum(axis=1),
    }


def build_lm(shape: dict, policy: str):
    import keras_hub

    from tasks.training import device

    with device.dtype_policy(policy):
        backbone = keras_hub.models.GemmaBackbone(**shape)
        return keras_hub.models.GemmaCausalLM(backbone=backbone, preprocessor=None)


def gpu_memory_peak_gib() -> float | None:
    import tensorflow as tf

    try:
        return round(tf.config.experimental.get_memory_info("GPU:0")["peak"] / 2**30, 2)
    except (ValueError, RuntimeError):
        return None


def reset_gpu_peak() -> None:
    import tensorflow as tf

    try:
        tf.config.experimental.reset_memory_stats("GPU:0")
    except (ValueError, RuntimeError):
        pass


def train_mode(mode: str, args, shape: dict, enc: dict, device: str, on_gpu: bool) -> dict:
    import keras

    from tasks.training import loop
    from tasks.text.batching import input_lengths
    from tasks.pipeline.config import load_config

    n = args.steps * args.batch_size
    cfg = load_config("gemma_2b_lora", {"train_mode": mode, "batch_size": str(args.batch_size),
                                         "sequence_length": str(args.sequence_length), "num_examples": str(n),
                                         "data_parallel": "auto" if args.replicas > 1 else "off"})
    engine = device.engine_for(cfg)
    if args.replicas > 1 and len(engine["devices"]) != args.replicas:
        sys.exit(f"--replicas {args.replicas}: training would use {len(engine['devices'])} devices "
                 f"({engine['devices']}); batch-size {args.batch_size} must be a multiple of it")
    policy = engine["dtype_policy"]
    keras.utils.set_random_seed(cfg.training_seed)
    keras.backend.clear_session()
    reset_gpu_peak()
    scope = device.strategy(engine).scope()
    scope.__enter__()
    t = time.time()
    lm = build_lm(shape, policy)
    build_s = time.time() - t
    params = int(lm.backbone.count_params())
    trainer, optimizer, compiled = loop.prepare(lm, cfg, engine)
    trainable = int(sum(int(w.numpy().size) for w in lm.backbone.trainable_weights))
    plan = loop.train_plan(input_lengths(enc), cfg, engine["max_widths"])
    fed = loop.rows_fed(plan, cfg, engine)
    times: list[float] = []

    class Timer(keras.callbacks.Callback):
        def on_train_batch_begin(self, batch, logs=None):
            self.t = time.perf_counter()

        def on_train_batch_end(self, batch, logs=None):
            times.append(time.perf_counter() - self.t)

    print(f"[gpu-bench] {mode}: {len(plan)} steps, policy {policy}, XLA {compiled['jit_compile']}", file=sys.stderr, flush=True)
    train_s = loop.fit(trainer, lm, enc, plan, cfg, [Timer()], engine=engine)
    scope.__exit__(None, None, None)
    real = [sum(int(enc["real_tokens"][i]) for i in s.rows) for s in plan]
    padded = [f * s.width for f, s in zip(fed, plan)]
    # Warm-up: under XLA the first step of each width (a compilation); a TF graph traces once.
    seen, steady = set(), []
    for k, s in enumerate(plan):
        key = s.width if compiled["jit_compile"] else "any"
        if key in seen:
            steady.append(k)
        seen.add(key)
    steady_s = sum(times[k] for k in steady)
    flops = common.lora_train_flops_per_token({**shape, "mlp_dim": shape["intermediate_dim"] // 2,
                                               "class": "GemmaBackbone"}, sum(real) / n)
    dtype = "bfloat16" if "bfloat16" in policy else "float32"
    peak = common.peak_tflops(device, dtype) if on_gpu else None
    steady_flops = flops["flops_per_token"] * sum(real[k] for k in steady)
    out = {
        "dtype_policy": policy, **compiled, "replicas": max(len(engine["devices"]), 1), "devices": engine["devices"],
        "parameters": params, "trainable_parameters": trainable,
        "steps": len(plan), "examples": n, "widths": sorted({s.width for s in plan}),
        "build_s": round(build_s, 1), "train_wall_s": round(train_s, 2),
        "tokens_real": sum(real), "tokens_padded": sum(padded),
        "real_tokens_per_s": round(sum(real) / train_s, 1), "padded_tokens_per_s": round(sum(padded) / train_s, 1),
        "steady_steps": len(steady),
        "steady_step_median_s": round(statistics.median(times[k] for k in steady), 4) if steady else None,
        "steady_real_tokens_per_s": round(sum(real[k] for k in steady) / steady_s, 1) if steady_s else None,
        "warmup_s": round(sum(times) - steady_s, 2),
        "model_tflop_per_s_steady": round(steady_flops / steady_s / 1e12, 2) if steady_s else None,
        "peak_tflops_assumed": peak,
        "mfu_steady": round(steady_flops / steady_s / (peak * 1e12), 4) if peak and steady_s else None,
        "flops_per_token": flops["flops_per_token"],
        "gpu_memory_peak_gib": gpu_memory_peak_gib(),
    }
    if args.shape == "gemma_2b":
        out["lora_shape_check"] = trainable == GEMMA_2B_LORA4_TRAINABLE
    return out, lm


def generation(lm, args, shape: dict) -> dict:
    import keras
    import keras_hub
    import numpy as np

    rng = np.random.default_rng(1)
    L = args.gen_max_length
    prompt_lengths = rng.integers(12, 40, size=args.gen_prompts)
    ids = np.zeros((args.gen_prompts, L), dtype="int32")
    mask = np.zeros((args.gen_prompts, L), dtype=bool)
    for i, p in enumerate(prompt_lengths):
        ids[i, :p] = rng.integers(3, shape["vocabulary_size"], size=p)
        mask[i, :p] = True
    out = {"prompts": args.gen_prompts, "max_length": L, "sampler": "greedy", "stop_tokens": None, "runs": {}}
    texts = {}
    for label, b in (("one_by_one", 1), ("batched", args.gen_batch_size)):
        # XLA, as the generate stage compiles it (config key generate_xla, on by default).
        lm.compile(sampler=keras_hub.samplers.GreedySampler(), jit_compile=True)
        calls = []
        rows = []
        t = time.time()
        for s in range(0, args.gen_prompts, b):
            sel = list(range(s, min(s + b, args.gen_prompts)))
            sel += sel[-1:] * (b - len(sel))
            c = time.perf_counter()
            y = lm.generate({"token_ids": ids[sel], "padding_mask": mask[sel]}, stop_token_ids=None)
            calls.append(time.perf_counter() - c)
            rows += [keras.ops.convert_to_numpy(y["token_ids"])[k] for k in range(min(b, args.gen_prompts - s))]
        wall = time.time() - t
        new_tokens = int(sum(L - p for p in prompt_lengths))
        warm = wall - max(0.0, calls[0] - (statistics.median(calls[1:]) if len(calls) > 1 else calls[0]))
        out["runs"][label] = {"batch_size": b, "calls": len(calls), "wall_s": round(wall, 2),
                              "first_call_s": round(calls[0], 2), "generated_tokens": new_tokens,
                              "tokens_per_s": round(new_tokens / wall, 1),
                              "tokens_per_s_without_first_call_overhead": round(new_tokens / warm, 1)}
        texts[label] = rows
    same = sum(bool((a == b).all()) for a, b in zip(texts["one_by_one"], texts["batched"]))
    out["identical_outputs"] = f"{same}/{args.gen_prompts}"
    out["speedup"] = round(out["runs"]["one_by_one"]["wall_s"] / out["runs"]["batched"]["wall_s"], 2)
    return out


def main(argv=None) -> dict:
    args = parse_args(argv)
    common.quiet_tensorflow()
    import keras
    import tensorflow as tf

    if args.replicas > 1:
        # Only the first N GPUs, set before TensorFlow initialises them: data_parallel auto takes all it sees.
        gpus = tf.config.list_physical_devices("GPU")
        if len(gpus) < args.replicas:
            sys.exit(f"--replicas {args.replicas}: TensorFlow sees {len(gpus)} GPU(s)")
        tf.config.set_visible_devices(gpus[: args.replicas], "GPU")

    env = common.environment("dedicated GPU machine" if not args.allow_cpu else "CPU smoke test")
    on_gpu = bool(env["gpus"])
    if not on_gpu and not args.allow_cpu:
        sys.exit("no GPU visible to TensorFlow: this is the GPU benchmark (use --shape tiny --allow-cpu to smoke-test it)")
    shape = GEMMA_2B if args.shape == "gemma_2b" else TINY
    enc = workload(args.steps * args.batch_size, args.sequence_length, shape["vocabulary_size"])
    out = {"benchmark": "gpu_benchmark", "environment": env,
           "model": {"architecture": "gemma_2b_en" if args.shape == "gemma_2b" else "tiny", "shape": shape,
                     "weights": "random (no download)", "lora_rank": 4},
           "workload": {"examples_per_mode": args.steps * args.batch_size, "batch_size": args.batch_size,
                        "sequence_length": args.sequence_length,
                        "token_lengths": "Dolly 15k without context (bench/dolly_token_lengths.json), random ids",
                        "real_tokens": int(enc["real_tokens"].sum())},
           "training": {}}
    lm = None
    for mode in [m.strip() for m in args.modes.split(",") if m.strip()]:
        del lm
        result, lm = train_mode(mode, args, shape, enc, env["device"], on_gpu)
        out["training"][mode] = result
        print(f"[gpu-bench] {mode}: {result['real_tokens_per_s']} real tokens/s "
              f"(steady {result['steady_real_tokens_per_s']}), MFU {result['mfu_steady']}", file=sys.stderr, flush=True)
    if lm is not None and args.gen_prompts:
        out["generation"] = generation(lm, args, shape)
        out["generation"]["dtype_policy"] = lm.dtype_policy.name
    tr = out["training"]
    if {"tutorial", "fast"} <= set(tr):
        out["comparison"] = {
            "real_tokens_per_s_ratio": round(tr["fast"]["real_tokens_per_s"] / tr["tutorial"]["real_tokens_per_s"], 2),
            "steady_real_tokens_per_s_ratio": round(
                tr["fast"]["steady_real_tokens_per_s"] / tr["tutorial"]["steady_real_tokens_per_s"], 2)
            if tr["fast"]["steady_real_tokens_per_s"] and tr["tutorial"]["steady_real_tokens_per_s"] else None,
        }
    out["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    name = args.name or "gpu-" + re.sub(r"[^a-z0-9]+", "-", env["device"].lower()).strip("-")[:60]
    path = common.write_results(name, out, args.out)
    print(json.dumps(out, indent=2, default=str))
    g = out.get("generation", {})
    print(f"SUMMARY gpu_benchmark [{env['device']}; {out['model']['architecture']} random weights]: real tokens/s "
          + ", ".join(f"{m} {r['real_tokens_per_s']} (steady {r['steady_real_tokens_per_s']}, MFU {r['mfu_steady']})"
                      for m, r in tr.items())
          + (f"; generation batch {args.gen_batch_size} x{g.get('speedup')} vs one-by-one" if g else "") + f" -> {path}")
    keras.backend.clear_session()
    return out


if __name__ == "__main__":
    main()
