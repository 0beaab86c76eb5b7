"""python -m tasks.finetune --config cpu_demo --run-dir DIR [--set lora_rank=8]

Stage 3: LoRA fine-tune of a keras-hub Gemma causal LM on the preprocessed training examples. The
recipe is the Keras tutorial's: `backbone.enable_lora(rank)`, the preprocessor's sequence length set,
AdamW(learning_rate, weight_decay) with bias and scale excluded from decay,
SparseCategoricalCrossentropy(from_logits=True), SparseCategoricalAccuracy, `fit` for the configured
epochs and batch size. Progress is logged every `log_every_steps` steps. Writes `adapter.lora.h5`
(only the LoRA weights), `history.json` (per step), `result.json` (config, timings, held-out scores
before and after tuning, masked so padding does not count).
"""

from __future__ import annotations

import logging
import random
import time
from pathlib import Path

from tasks import storage
from tasks.cli import stage_main
from tasks.config import Config, fingerprint
from tasks.batching import encode
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
    "eval_examples",
)


def make_progress_callback(total_steps: int, batch_sizes: list[int], every: int, history: list[dict]):
    import keras

    class Progress(keras.callbacks.Callback):
        """Per-step loss from Keras's running means, and a progress line a user sees in the task log."""

        def on_train_begin(self, logs=None):
            self.started = time.time()
            self.step = 0
            self.seen = 0
            self.prev_mean = 0.0

        def on_train_batch_end(self, batch, logs=None):
            logs = logs or {}
            b = batch_sizes[self.step % len(batch_sizes)]
            self.step += 1
            mean = float(logs.get("loss", float("nan")))
            if batch == 0:
                self.seen, self.prev_mean = 0, 0.0
            # Keras reports the epoch's running mean weighted by batch size; undo it for this step.
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
            if self.step % every == 0 or self.step == total_steps:
                eta = elapsed / self.step * (total_steps - self.step)
                log.info(
                    "finetune: step %d/%d loss %.4f (running %.4f) accuracy %.4f | %.2f s/step, ETA %.0f s",
                    self.step, total_steps, step_loss, mean, history[-1]["accuracy_running"], elapsed / self.step, eta,
                )

    return Progress()


def describe_device() -> dict:
    import os
    import platform

    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    names = [tf.config.experimental.get_device_details(g).get("device_name", g.name) for g in gpus]
    return {"gpus": names, "cpu_count": os.cpu_count(), "machine": platform.machine(), "tensorflow": tf.__version__}


def build_optimizer(cfg: Config):
    import keras

    opt = keras.optimizers.AdamW(learning_rate=cfg.learning_rate, weight_decay=cfg.weight_decay)
    opt.exclude_from_weight_decay(var_names=["bias", "scale"])
    return opt


def run(cfg: Config, run_dir: Path, force: bool = False) -> dict:
    prep = storage.require(run_dir, "preprocess", STAGE)

    def body(out: Path) -> dict:
        import keras

        from tasks.models import load_causal_lm

        pre_dir = storage.stage_dir(run_dir, "preprocess")
        train = storage.read_jsonl(pre_dir / "train.jsonl")
        heldout = storage.read_jsonl(pre_dir / "heldout.jsonl")[: cfg.eval_examples]
        # Seed before the model (and its tokenizer) is built.
        keras.utils.set_random_seed(cfg.training_seed)
        order = list(range(len(train)))
        random.Random(cfg.training_seed).shuffle(order)
        train = [train[i] for i in order]

        t0 = time.time()
        lm = load_causal_lm(cfg.model_preset, cfg.models_dir, cfg.sequence_length)
        load_s = time.time() - t0
        base_scores = score_heldout(lm, heldout, cfg.sequence_length)
        log.info("finetune: base model on %d held-out examples: %s", len(heldout), base_scores)

        enc = encode(lm.preprocessor.tokenizer, train, cfg.sequence_length, cfg.loss_tokens)
        base_params = int(lm.backbone.count_params())
        lm.backbone.enable_lora(rank=cfg.lora_rank)
        trainable = int(sum(w.numpy().size for w in lm.backbone.trainable_weights))
        lm.compile(
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            optimizer=build_optimizer(cfg),
            weighted_metrics=[keras.metrics.SparseCategoricalAccuracy()],
            jit_compile=cfg.jit_compile,
        )
        steps_per_epoch = -(-len(train) // cfg.batch_size)
        sizes = [cfg.batch_size] * (steps_per_epoch - 1) + [len(train) - cfg.batch_size * (steps_per_epoch - 1)]
        total = steps_per_epoch * cfg.epochs
        log.info(
            "finetune: %d examples, batch %d, %d epoch(s) = %d steps; LoRA rank %d: %s trainable weights",
            len(train), cfg.batch_size, cfg.epochs, total, cfg.lora_rank, f"{trainable:,}",
        )
        history: list[dict] = []
        # The batches are already token ids: detach the string preprocessor while fitting.
        preprocessor, lm.preprocessor = lm.preprocessor, None
        t1 = time.time()
        try:
            lm.fit(
                x={"token_ids": enc["token_ids"], "padding_mask": enc["padding_mask"]},
                y=enc["labels"],
                sample_weight=enc["weights"],
                epochs=cfg.epochs,
                batch_size=cfg.batch_size,
                shuffle=False,  # the order above is seeded and recorded
                verbose=0,
                callbacks=[make_progress_callback(total, sizes, cfg.log_every_steps, history)],
            )
        finally:
            lm.preprocessor = preprocessor
        train_s = time.time() - t1
        tuned_scores = score_heldout(lm, heldout, cfg.sequence_length)
        log.info("finetune: tuned model on %d held-out examples: %s", len(heldout), tuned_scores)
        lm.backbone.save_lora_weights(str(out / ADAPTER))

        real_tokens = int(enc["real_tokens"].sum()) * cfg.epochs
        result = {
            "model_preset": cfg.model_preset,
            "model_class": type(lm).__name__,
            "parameters": base_params,
            "trainable_parameters": trainable,
            "steps": len(history),
            "examples": len(train),
            "data_order": [r["id"] for r in train],
            "config": cfg.subset(CONFIG_KEYS),
            "timings_s": {"load": round(load_s, 2), "train": round(train_s, 2)},
            "tokens": {
                "real": real_tokens,
                "padded": cfg.sequence_length * len(train) * cfg.epochs,
                "real_per_s": round(real_tokens / train_s, 1),
            },
            "heldout_base": base_scores,
            "heldout_tuned": tuned_scores,
            "final_loss": history[-1]["loss"] if history else None,
            "keras_version": keras.__version__,
            "device": describe_device(),
        }
        storage.write_json(out / "history.json", history)
        storage.write_json(out / "result.json", result)
        del lm
        keras.backend.clear_session()
        return {
            "adapter": str(storage.stage_dir(run_dir, STAGE) / ADAPTER),
            "steps": result["steps"],
            "heldout_loss_base": base_scores.get("loss"),
            "heldout_loss_tuned": tuned_scores.get("loss"),
        }

    fp = fingerprint(STAGE, prep["fingerprint"], cfg.subset(CONFIG_KEYS))
    return storage.run_stage(run_dir, STAGE, fp, body, force)


def main(argv=None) -> dict:
    return stage_main(STAGE, __doc__, run, argv)


if __name__ == "__main__":
    main()
