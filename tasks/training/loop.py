"""The training engine: how a LoRA fine-tune runs on this device, shared by `finetune` and the benchmarks.

The recipe is the Keras tutorial's: `backbone.enable_lora(rank)` (placed and scaled by tasks.training.adapter), AdamW(learning_rate, weight_decay)
with bias and scale excluded from decay, SparseCategoricalCrossentropy(from_logits=True),
SparseCategoricalAccuracy, `fit` over the planned steps. `train_mode` picks how the batches run, not
what is learned: `tutorial` pads every example to the sequence length; `fast` pads each
length-bucketed batch only to its longest example, divides the loss by the same batch_size x
sequence_length as the tutorial (so each step's loss is the tutorial's loss on those examples) and
picks the engine for the device (`engine_for`): XLA with a few batch widths on a GPU, one TensorFlow
graph for every width on a CPU, mixed bfloat16 where the device computes it natively. `fast` also
computes the output layer only where the loss looks (`LossPositions`): Gemma's output layer (hidden
size x 256k vocabulary) is most of a step's work, and with `loss_tokens: response` most positions
have weight 0. The loss and its gradient are the same sums either way. Both modes train on every
example once per epoch with the same seeded epoch order.
"""

from __future__ import annotations

import logging
import time

from tasks.text.batching import Step, plan_batches, step_arrays
from tasks.pipeline.config import Config
from tasks.training import device

log = logging.getLogger("gemma_pipeline")


def fills_batches(cfg: Config, engine: dict | None = None) -> bool:
    """Whether every step is fed as a full batch of batch_size rows (a short batch filled with rows at
    weight 0) under the padded-batch loss: fast mode always; tutorial mode too when data parallel,
    so each replica gets an equal share and the loss is still the tutorial's."""
    return cfg.train_mode == "fast" or bool((engine or {}).get("devices"))


def train_plan(lengths: list[int], cfg: Config, max_widths: int | None = None) -> list[Step]:
    """Every step's examples and padded width (tasks.text.batching.plan_batches), a pure function of the
    token lengths, the config and the engine's width limit (`engine_for`; default: this device's):
    a resumed run rebuilds the plan it was checkpointed with. In tutorial mode: each epoch's seeded
    permutation cut into batches, as the stage always did."""
    if max_widths is None:
        max_widths = device.engine_for(cfg)["max_widths"]
    return plan_batches(
        lengths, batch_size=cfg.batch_size, epochs=cfg.epochs, seed=cfg.training_seed,
        sequence_length=cfg.sequence_length, mode=cfg.train_mode,
        bucket_multiple=cfg.bucket_multiple, bucket_shapes=max_widths,
    )


def rows_fed(steps: list[Step], cfg: Config, engine: dict | None = None) -> list[int]:
    """Rows per step as Keras sees them: a short batch is filled up to batch_size (fills_batches)."""
    return [cfg.batch_size if fills_batches(cfg, engine) else len(s.rows) for s in steps]


def build_optimizer(cfg: Config):
    import keras

    opt = keras.optimizers.AdamW(learning_rate=cfg.learning_rate, weight_decay=cfg.weight_decay)
    opt.exclude_from_weight_decay(var_names=["bias", "scale"])
    return opt


def compile_for_training(lm, cfg: Config, optimizer, engine: dict | None = None) -> dict:
    """Compile `lm` for the configured mode; returns what was chosen (recorded in result.json)."""
    import keras

    engine = engine or device.engine_for(cfg)
    if fills_batches(cfg, engine):
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


def gather_sizes(enc: dict, plan: list[Step], cfg: Config) -> dict[int, int]:
    """Fast mode under XLA: how many loss positions each batch width's steps are padded to (the most
    any of its steps has, rounded up to bucket_multiple), so a width stays one compiled shape."""
    sizes: dict[int, int] = {}
    for step in plan:
        _, _, w = step_arrays(enc, step, cfg.batch_size)
        sizes[step.width] = max(sizes.get(step.width, 1), int((w > 0).sum()))
    m = cfg.bucket_multiple
    return {width: min(-(-n // m) * m, cfg.batch_size * width) for width, n in sizes.items()}


def gathered(x: dict, y, w, size: int | None = None, per_row: bool = False):
    """A step's arrays with the labels and weights of its loss positions only, and the positions
    themselves as input `positions`. Flat (row-major over batch x width) by default, padded to `size`
    (XLA) with position 0 at weight 0; with `per_row` (data parallel: the batch is split across
    replicas row by row) one list per row, of positions within the row, as long as the longest."""
    import numpy as np

    if per_row:  # graphs only (data parallel runs without XLA): as many as the step's longest row
        n = max(int((w > 0).sum(axis=1).max()), 1)
        positions = np.zeros((w.shape[0], n), dtype="int32")
        weights = np.zeros((w.shape[0], n), dtype="float32")
        for r in range(w.shape[0]):
            idx = np.flatnonzero(w[r] > 0)
            positions[r, : len(idx)] = idx
            weights[r, : len(idx)] = w[r, idx]
        return {**x, "positions": positions}, np.take_along_axis(y, positions, axis=1), weights
    flat = np.flatnonzero(w.reshape(-1) > 0).astype("int32")
    if size is not None and len(flat) > size:
        raise ValueError(f"a step has {len(flat)} loss positions, more than its width's {size} (gather_sizes)")
    n = max(size or len(flat), 1)
    positions = np.zeros(n, dtype="int32")
    positions[: len(flat)] = flat
    weights = np.zeros(n, dtype="float32")
    weights[: len(flat)] = w.reshape(-1)[flat]
    return {**x, "positions": positions}, y.reshape(-1)[positions], weights


def make_dataset(enc: dict, steps: list, fixed_batch_size: int | None = None, gather: dict | bool | None = None,
                 per_row: bool = False):
    """The steps as a tf.data pipeline. `steps` are Steps (or plain index lists: full width).
    With `fixed_batch_size` (fast mode, or data parallel) widths may vary per step and short batches
    are filled up. With `gather` (fast mode, for LossPositions) the labels and weights are the loss
    positions' only: True for as many as each step has, or a {width: size} mapping (gather_sizes)
    under XLA; `per_row` (data parallel) gathers them row by row (see `gathered`).

    The padding mask goes in as int32, never bool: under tf.distribute.MirroredStrategy a bool mask
    fails in the gradient's all-reduce (`AddN` has no bool kernel)."""
    import tensorflow as tf

    full = enc["token_ids"].shape[1]
    steps = [s if isinstance(s, Step) else Step(list(s), full) for s in steps]

    def gen():
        for step in steps:
            x, y, w = step_arrays(enc, step, fixed_batch_size)
            x = {**x, "padding_mask": x["padding_mask"].astype("int32")}
            if gather:
                yield gathered(x, y, w, gather.get(step.width) if isinstance(gather, dict) else None, per_row)
            else:
                yield x, y, w

    length = None if fixed_batch_size is not None else full
    inputs = {"token_ids": tf.TensorSpec((None, length), tf.int32), "padding_mask": tf.TensorSpec((None, length), tf.int32)}
    if gather:
        shape = (None, None) if per_row else (None,)
        inputs["positions"] = tf.TensorSpec(shape, tf.int32)
        spec = (inputs, tf.TensorSpec(shape, tf.int32), tf.TensorSpec(shape, tf.float32))
    else:
        spec = (inputs, tf.TensorSpec((None, length), tf.int32), tf.TensorSpec((None, length), tf.float32))
    return tf.data.Dataset.from_generator(gen, output_signature=spec)


def loss_positions_model(lm):
    """`lm` computing logits only at the flat `positions` it is given (LossPositions): the backbone
    runs on the whole batch, the output layer (with Gemma's final soft cap, inside it) on those
    positions only. Its variables are `lm`'s, in the same order."""
    import keras

    class LossPositions(keras.Model):
        def __init__(self, causal_lm):
            super().__init__(name="loss_positions")
            self.causal_lm = causal_lm

        def call(self, inputs, training=False):
            backbone = self.causal_lm.backbone
            hidden = backbone({"token_ids": inputs["token_ids"], "padding_mask": inputs["padding_mask"]}, training=training)
            positions = inputs["positions"]
            if len(positions.shape) == 2:  # per row (data parallel): (batch, n) positions within each row
                picked = keras.ops.take_along_axis(hidden, keras.ops.expand_dims(positions, -1), axis=1)
                return backbone.token_embedding(picked, reverse=True)
            hidden = keras.ops.reshape(hidden, (-1, keras.ops.shape(hidden)[-1]))
            return backbone.token_embedding(keras.ops.take(hidden, positions, axis=0), reverse=True)

    return LossPositions(lm)


def make_progress_callback(total_steps: int, sizes: list[int], every: int, history: list[dict], start_step: int = 0,
                           on_step=None, widths: list[int] | None = None, real_tokens: list[int] | None = None):
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
            if real_tokens is not None:
                # Real (non-padding) tokens trained per second so far in this fit() call.
                history[-1]["real_tokens_per_s"] = round(sum(real_tokens[: self.step - start_step]) / max(elapsed, 1e-9), 2)
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


def prepare(lm, cfg: Config, engine: dict):
    """LoRA on (tasks.training.adapter; the token rows too if the caller enabled them), the optimizer built
    and the model that trains compiled for the engine: (trainer, optimizer, what was compiled). The
    trainer is `lm` in tutorial mode and its LossPositions in fast mode; either way it trains
    `lm`'s own variables."""
    from tasks.training import adapter

    adapter.enable(lm, adapter.placement(cfg))
    optimizer = build_optimizer(cfg)
    trainer = loss_positions_model(lm) if cfg.train_mode == "fast" else lm
    compiled = compile_for_training(trainer, cfg, optimizer, engine)
    compiled["logits"] = "loss positions only" if cfg.train_mode == "fast" else "every position"
    return trainer, optimizer, compiled


def fit(trainer, lm, enc: dict, plan: list[Step], cfg: Config, callbacks: list, start: int = 0,
        engine: dict | None = None) -> float:
    """Train `trainer` (from `prepare`) on the plan's steps from `start` (a resumed run); the seconds
    it took. The batches are already token ids, so `lm`'s string preprocessor is detached while fitting."""
    t = time.time()
    preprocessor, lm.preprocessor = lm.preprocessor, None
    try:
        if start < len(plan):
            engine = engine or device.engine_for(cfg)
            per_row = bool(engine.get("devices"))
            gather = None
            if cfg.train_mode == "fast":
                # Data parallel runs without XLA (engine_for), so per-row gathers never need sizes.
                gather = gather_sizes(enc, plan, cfg) if engine["jit_compile"] else True
            dataset = make_dataset(enc, plan[start:], cfg.batch_size if fills_batches(cfg, engine) else None, gather, per_row)
            trainer.fit(dataset, epochs=1, verbose=0, callbacks=callbacks)
    finally:
        lm.preprocessor = preprocessor
    return time.time() - t
