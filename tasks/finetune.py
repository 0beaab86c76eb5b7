"""python -m tasks.finetune --config cpu_demo --run-dir DIR [--set lora_rank=8]

Stage 3: LoRA fine-tune of a keras-hub Gemma causal LM on the preprocessed training examples. The
recipe is the Keras tutorial's: `backbone.enable_lora(rank)`, the preprocessor's sequence length set,
AdamW(learning_rate, weight_decay) with bias and scale excluded from decay,
SparseCategoricalCrossentropy(from_logits=True), SparseCategoricalAccuracy, `fit` for the configured
epochs and batch size. Progress is logged every `log_every_steps` steps. Writes `adapter.lora.h5`
(only the LoRA weights), `history.json` (per step), `result.json` (config, timings, held-out scores
before and after tuning, masked so padding does not count).

`train_mode` picks how the batches run, not what is learned: `tutorial` pads every example to the
sequence length (the Keras tutorial); `fast` pads each length-bucketed batch only to its longest
example, divides the loss by the same batch_size x sequence_length as the tutorial (so each step's
loss is the tutorial's loss on those examples) and picks the engine for the device (`engine_for`):
XLA with a few batch widths on a GPU, one TensorFlow graph for every width on a CPU, mixed bfloat16
where the device computes it natively. Both modes train on every example once per epoch with the same
seeded epoch order.
"""

from __future__ import annotations

import collections
import logging
import shutil
import time
from pathlib import Path

from tasks import storage
from tasks.cli import stage_main
from tasks.config import Config, fingerprint
from tasks.batching import Step, encode, input_lengths, plan_batches, plan_orders, step_arrays
from tasks.checkpoints import Checkpoints
from tasks.heldout_eval import score_heldout

log = logging.getLogger("gemma_pipeline")

STAGE = "finetune"
ADAPTER = "adapter.lora.h5"
CONFIG_KEYS = (
    "model_preset",
    "sequence_length",
    "lora_rank",
    "learning_rate",
    "weight_decay",
    "epochs",
    "batch_size",
    "training_seed",
    "jit_compile",
    "loss_tokens",
    "train_mode",
    "bucket_multiple",
    "bucket_shapes",
    "mixed_precision",
    "eval_examples",
)
# Retries resume from here: outside the stage's temp folder, which a failed attempt removes.
CHECKPOINTS = "finetune.checkpoints"


def make_progress_callback(total_steps: int, sizes: list[int], every: int, history: list[dict], start_step: int = 0,
                           on_step=None, widths: list[int] | None = None):
    """Per-step loss from Keras's running means, a progress line a user sees in the task log, and
    `on_step(step)` after each step (checkpointing). `sizes` are the batch sizes (rows fed) of the
    steps this fit() call runs, which start after `start_step` (a resumed run); `widths` their
    padded widths, recorded per step."""
    import keras

    class Progress(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            self.started = time.time()
            self.step = start_step
            self.seen = 0
            self.prev_mean = 0.0

        def on_train_batch_end(self, batch, logs=None):
            logs = logs or {}
            b = sizes[self.step - start_step]
            self.step += 1
            mean = float(logs.get("loss", float("nan")))
            # Keras reports the running mean over this fit() call, weighted by batch size; undo it.
            step_loss = (mean * (self.seen + b) - self.prev_mean * self.seen) / b
            self.seen += b
            self.prev_mean = mean
            elapsed = time.time() - self.started
            history.append(
                {
                    "step": self.step,
                    "loss": round(step_loss, 5),
                    "loss_running": round(mean, 5),
                    "accuracy_running": round(float(logs.get("sparse_categorical_accuracy", float("nan"))), 5),
                    "elapsed_s": round(elapsed, 3),
                }
            )
            if widths is not None:
                history[-1]["width"] = widths[self.step - 1 - start_step]
            done_here = self.step - start_step
            if self.step % every == 0 or self.step == total_steps:
                eta = elapsed / done_here * (total_steps - self.step)
                log.info(
                    "finetune: step %d/%d loss %.4f (running %.4f) accuracy %.4f | %.2f s/step, ETA %.0f s",
                    self.step, total_steps, step_loss, mean, history[-1]["accuracy_running"], elapsed / done_here, eta,
                )
            if on_step is not None:
                on_step(self.step)

    return Progress()


def describe_device() -> dict:
    import os
    import platform

    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    names = [tf.config.experimental.get_device_details(g).get("device_name", g.name) for g in gpus]
    return {"gpus": names, "cpu_count": os.cpu_count(), "machine": platform.machine(), "tensorflow": tf.__version__}


def checkpoint_dir(run_dir: Path) -> Path:
    return Path(run_dir) / CHECKPOINTS


def train_plan(lengths: list[int], cfg: Config, max_widths: int | None = None) -> list[Step]:
    """Every step's examples and padded width (tasks.batching.plan_batches), a pure function of the
    token lengths, the config and the engine's width limit (`engine_for`; default: this device's):
    a resumed run rebuilds the plan it was checkpointed with. In tutorial mode: each epoch's seeded
    permutation cut into batches, as the stage always did."""
    if max_widths is None:
        max_widths = engine_for(cfg)["max_widths"]
    return plan_batches(
        lengths, batch_size=cfg.batch_size, epochs=cfg.epochs, seed=cfg.training_seed,
        sequence_length=cfg.sequence_length, mode=cfg.train_mode,
        bucket_multiple=cfg.bucket_multiple, bucket_shapes=max_widths,
    )


def rows_fed(steps: list[Step], cfg: Config) -> list[int]:
    """Rows per step as Keras sees them: fast mode fills a short batch up to batch_size."""
    return [cfg.batch_size if cfg.train_mode == "fast" else len(s.rows) for s in steps]


def make_dataset(enc: dict, steps: list, fixed_batch_size: int | None = None):
    """The steps as a tf.data pipeline. `steps` are Steps (or plain index lists: full width).
    With `fixed_batch_size` (fast mode) widths vary per step and short batches are filled up."""
    import tensorflow as tf

    full = enc["token_ids"].shape[1]
    steps = [s if isinstance(s, Step) else Step(list(s), full) for s in steps]

    def gen():
        for step in steps:
            yield step_arrays(enc, step, fixed_batch_size)

    length = None if fixed_batch_size is not None else full
    spec = (
        {"token_ids": tf.TensorSpec((None, length), tf.int32), "padding_mask": tf.TensorSpec((None, length), tf.bool)},
        tf.TensorSpec((None, length), tf.int32),
        tf.TensorSpec((None, length), tf.float32),
    )
    return tf.data.Dataset.from_generator(gen, output_signature=spec)


def padded_batch_loss(batch_size: int, sequence_length: int):
    """The tutorial's loss for batches narrower than the sequence length: the weighted token
    cross-entropy summed and divided by batch_size x sequence_length, which is what Keras's
    `sum_over_batch_size` divides by when every example is padded to the sequence length."""
    import keras

    scale = 1.0 / (batch_size * sequence_length)

    class PaddedBatchLoss(keras.losses.Loss):
        def __init__(self):
            super().__init__(reduction="sum", name="padded_batch_loss")

        def call(self, y_true, y_pred):
            ce = keras.losses.sparse_categorical_crossentropy(y_true, y_pred, from_logits=True)
            return ce * scale

    return PaddedBatchLoss()


def gpus_with_bfloat16() -> list[str]:
    """GPUs with native bfloat16 (compute capability 8.0 or newer: A100, L4, H100, ...)."""
    import tensorflow as tf

    out = []
    for gpu in tf.config.list_physical_devices("GPU"):
        details = tf.config.experimental.get_device_details(gpu)
        if tuple(details.get("compute_capability") or (0, 0)) >= (8, 0):
            out.append(details.get("device_name", gpu.name))
    return out


def cpu_has_bfloat16() -> bool:
    """AMX-BF16 on this CPU: oneDNN then runs bfloat16 matmuls ~2.5x faster than float32 (measured
    on the 2-core Xeon of the CPU benchmark); without it bfloat16 only emulates."""
    try:
        return "amx_bf16" in Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False


def has_gpu() -> bool:
    import tensorflow as tf

    return bool(tf.config.list_physical_devices("GPU"))


def engine_for(cfg: Config) -> dict:
    """How training runs on this device: XLA or not, the dtype policy and the most batch widths.

    tutorial: XLA as `jit_compile` says, one width. fast: on a GPU, XLA (each batch width is one
    compilation, so at most `bucket_shapes` widths); on a CPU a plain TensorFlow graph, which Keras
    traces once for batches of any width (the dataset's width is None), so every batch takes the
    next multiple of `bucket_multiple` (max_widths 0 = no limit). Mixed bfloat16: see the config key
    mixed_precision. A resumed run resumes only a checkpoint made with the same engine.
    """
    if cfg.train_mode == "fast":
        xla = has_gpu()
        native_bf16 = bool(gpus_with_bfloat16()) if xla else cpu_has_bfloat16()
        max_widths = cfg.bucket_shapes if xla else 0
    else:
        xla, native_bf16, max_widths = cfg.jit_compile, False, 1
    if cfg.mixed_precision == "bfloat16" or (cfg.mixed_precision == "auto" and native_bf16):
        policy = "mixed_bfloat16"
    else:
        policy = "float32"
    return {"jit_compile": xla, "dtype_policy": policy, "max_widths": max_widths}


def dtype_policy_for(cfg: Config) -> str:
    """The Keras dtype policy training runs under (see the config key mixed_precision)."""
    return engine_for(cfg)["dtype_policy"]


def compile_for_training(lm, cfg: Config, optimizer, engine: dict | None = None) -> dict:
    """Compile `lm` for the configured mode; returns what was chosen (recorded in result.json)."""
    import keras

    engine = engine or engine_for(cfg)
    if cfg.train_mode == "fast":
        loss = padded_batch_loss(cfg.batch_size, cfg.sequence_length)
    else:
        loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    lm.compile(
        loss=loss,
        optimizer=optimizer,
        weighted_metrics=[keras.metrics.SparseCategoricalAccuracy()],
        jit_compile=engine["jit_compile"],
    )
    return {"train_mode": cfg.train_mode, "jit_compile": engine["jit_compile"], "loss": type(loss).__name__}


def build_optimizer(cfg: Config):
    import keras

    opt = keras.optimizers.AdamW(learning_rate=cfg.learning_rate, weight_decay=cfg.weight_decay)
    opt.exclude_from_weight_decay(var_names=["bias", "scale"])
    return opt


def run(cfg: Config, run_dir: Path, force: bool = False) -> dict:
    prep = storage.require(run_dir, "preprocess", STAGE)

    def body(out: Path) -> dict:
        import keras

        engine = engine_for(cfg)
        previous = keras.config.dtype_policy()
        keras.config.set_dtype_policy(engine["dtype_policy"])
        try:
            return tune(out, engine)
        finally:
            keras.config.set_dtype_policy(previous)

    def tune(out: Path, engine: dict) -> dict:
        import keras

        from tasks.models import load_causal_lm

        pre_dir = storage.stage_dir(run_dir, "preprocess")
        train = storage.read_jsonl(pre_dir / "train.jsonl")
        heldout = storage.read_jsonl(pre_dir / "heldout.jsonl")[: cfg.eval_examples]
        # Seed before the model (and its tokenizer) is built.
        keras.utils.set_random_seed(cfg.training_seed)
        policy = engine["dtype_policy"]
        ckpt = Checkpoints(checkpoint_dir(run_dir), f"{fp}/{policy}/xla={engine['jit_compile']}/{engine['max_widths']}")
        resume = ckpt.latest()

        t0 = time.time()
        lm = load_causal_lm(cfg.model_preset, cfg.models_dir, cfg.sequence_length)
        load_s = time.time() - t0
        base_scores = resume["base_scores"] if resume else score_heldout(lm, heldout, cfg.sequence_length)
        log.info("finetune: base model on %d held-out examples: %s", len(heldout), base_scores)

        enc = encode(lm.preprocessor.tokenizer, train, cfg.sequence_length, cfg.loss_tokens)
        base_params = int(lm.backbone.count_params())
        lm.backbone.enable_lora(rank=cfg.lora_rank)
        trainable = int(sum(w.numpy().size for w in lm.backbone.trainable_weights))
        optimizer = build_optimizer(cfg)
        compiled = compile_for_training(lm, cfg, optimizer, engine)
        plan = train_plan(input_lengths(enc), cfg, engine["max_widths"])
        total = len(plan)
        orders = plan_orders(plan, len(train))
        fed = rows_fed(plan, cfg)
        widths = [s.width for s in plan]
        history: list[dict] = []
        start = 0
        if resume:
            start = resume["step"]
            ckpt.restore(resume, lm, optimizer)
            history = resume["history"]
            log.info("finetune: RESUMING from the checkpoint at step %d/%d (%s)", start, total, resume["dir"])
        log.info(
            "finetune: %d examples, batch %d, %d epoch(s) = %d steps; LoRA rank %d: %s trainable weights",
            len(train), cfg.batch_size, cfg.epochs, total, cfg.lora_rank, f"{trainable:,}",
        )
        log.info(
            "finetune: train_mode %s, XLA %s, dtype policy %s, batch widths %s",
            cfg.train_mode, compiled["jit_compile"], policy, dict(sorted(collections.Counter(widths).items())),
        )

        def on_step(step: int) -> None:
            if cfg.checkpoint_every_steps and step % cfg.checkpoint_every_steps == 0 and step < total:
                ckpt.save(step, lm, optimizer, history, base_scores, orders, train)

        # The batches are already token ids: detach the string preprocessor while fitting.
        preprocessor, lm.preprocessor = lm.preprocessor, None
        t1 = time.time()
        try:
            if start < total:
                lm.fit(
                    make_dataset(enc, plan[start:], cfg.batch_size if cfg.train_mode == "fast" else None),
                    epochs=1,
                    verbose=0,
                    callbacks=[make_progress_callback(total, fed[start:], cfg.log_every_steps,
                                                      history, start, on_step, widths[start:])],
                )
        finally:
            lm.preprocessor = preprocessor
        train_s = time.time() - t1
        tuned_scores = score_heldout(lm, heldout, cfg.sequence_length)
        log.info("finetune: tuned model on %d held-out examples: %s", len(heldout), tuned_scores)
        lm.backbone.save_lora_weights(str(out / ADAPTER))

        real_tokens = int(enc["real_tokens"].sum()) * cfg.epochs
        # Token positions computed (rows fed x width), the padding included.
        padded_tokens = sum(f * w for f, w in zip(fed, widths))
        padded_here = sum(f * w for f, w in zip(fed[start:], widths[start:]))
        result = {
            "model_preset": cfg.model_preset,
            "model_class": type(lm).__name__,
            "parameters": base_params,
            "trainable_parameters": trainable,
            "steps": len(history),
            "examples": len(train),
            "resumed_from_step": start or None,
            "data_order": [[train[i]["id"] for i in order] for order in orders],
            "config": cfg.subset(CONFIG_KEYS),
            "timings_s": {"load": round(load_s, 2), "train": round(train_s, 2)},
            "tokens": {
                "real": real_tokens,
                "padded": padded_tokens,
                "real_per_s": round(real_tokens * (total - start) / total / train_s, 1) if train_s else None,
                "padded_per_s": round(padded_here / train_s, 1) if train_s else None,
            },
            "training": {
                **compiled,
                "dtype_policy": policy,
                "max_widths": engine["max_widths"],
                "widths": dict(sorted(collections.Counter(widths).items())),
            },
            "heldout_base": base_scores,
            "heldout_tuned": tuned_scores,
            "final_loss": history[-1]["loss"] if history else None,
            "keras_version": keras.__version__,
            "device": describe_device(),
        }
        storage.write_json(out / "history.json", history)
        storage.write_json(out / "result.json", result)
        keras.backend.clear_session()
        return {
            "adapter": str(storage.stage_dir(run_dir, STAGE) / ADAPTER),
            "steps": result["steps"],
            "heldout_loss_base": base_scores.get("loss"),
            "heldout_loss_tuned": tuned_scores.get("loss"),
        }

    fp = fingerprint(STAGE, prep["fingerprint"], cfg.subset(CONFIG_KEYS))
    if force:
        shutil.rmtree(checkpoint_dir(run_dir), ignore_errors=True)
    result = storage.run_stage(run_dir, STAGE, fp, body, force)
    # Published: the adapter is safe, the checkpoints have done their job.
    shutil.rmtree(checkpoint_dir(run_dir), ignore_errors=True)
    return result


def main(argv=None) -> dict:
    return stage_main(STAGE, __doc__, run, argv)


if __name__ == "__main__":
    main()
