"""python -m tasks.finetune --config cpu_demo --run-dir DIR [--set lora_rank=8]

Stage 4 of 8: LoRA fine-tune of a keras-hub Gemma causal LM on the preprocessed training examples, with
the Keras tutorial's recipe run by the training engine (tasks.training.loop: `train_mode`, device, dtype,
loss, optimizer) and LoRA where `lora_targets` puts it, scaled by `lora_alpha` (tasks.training.adapter).
Progress is logged every `log_every_steps` steps; a checkpoint every `checkpoint_every_steps` lets a
retried task resume where a killed one stopped. With `validation_examples`, the validation loss is
scored every `eval_every_steps` (tasks.training.validation), training stops early after
`early_stopping_patience` scores without a new best, and `keep: best` saves the best step's adapter.
Writes `adapter.lora.h5` (the LoRA weights and their placement), `history.json` (per step, with the
validation loss where scored) and `result.json` (config, placement, trainable weights, timings,
validation, held-out scores before and after tuning, masked so padding does not count).

The stage reads top to bottom: `setup` (data, model, plan, checkpoint to resume) -> `score_base`
-> `train` -> `keep` -> `score_tuned` -> `save`.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import shutil
from pathlib import Path
from typing import Any

from tasks.pipeline import artifacts, storage
from tasks.infra import tracking
from tasks.training import adapter, device, loop
from tasks.training.validation import Validation
from tasks.pipeline.artifacts import FINETUNE as STAGE
from tasks.text.batching import encode, input_lengths, plan_orders
from tasks.training.checkpoints import Checkpoints
from tasks.infra.cli import stage_main
from tasks.pipeline.config import Config, fingerprint, stage_keys
from tasks.evaluate.heldout_eval import score_heldout, sums_fn, summary

log = logging.getLogger("gemma_pipeline")

CONFIG_KEYS = stage_keys(STAGE)


@dataclasses.dataclass
class Session:
    """What the steps share: the config, the engine, the data, the model and the step plan."""

    cfg: Config
    engine: dict
    train: list[dict]
    heldout: list[dict]
    lm: Any
    load_s: float
    enc: dict
    plan: list
    checkpoints: Checkpoints
    resume: dict | None
    scorer: Any
    validation: Validation
    widths: set  # the batch widths the scorer compiled (XLA), shared by held-out and validation scoring


@dataclasses.dataclass
class Trained:
    history: list[dict]
    start: int
    train_s: float
    base_params: int
    trainable: int
    compiled: dict
    trainable_counts: dict


def setup(cfg: Config, run_dir: Path, engine: dict, fp: str) -> Session:
    import time

    import keras

    from tasks.modeling.presets import load_causal_lm, resolve_preset

    train = artifacts.read_train(run_dir)
    heldout = artifacts.read_heldout(run_dir)[: cfg.eval_examples]
    validation_rows = artifacts.read_validation(run_dir)
    # The model's files first (a download, an import, a tiny model's build: some draw random numbers),
    # then the seed, before the model (and its tokenizer) is built: the adapter is the same whether
    # the files were cached or not (a pod with an empty cache trains what the worker would).
    resolve_preset(cfg.model_preset, cfg.models_dir)
    keras.utils.set_random_seed(cfg.training_seed)
    # A checkpoint is resumed only by the same inputs on the same engine.
    key = f"{fp}/{engine['dtype_policy']}/xla={engine['jit_compile']}/{engine['max_widths']}"
    checkpoints = Checkpoints(artifacts.checkpoint_dir(run_dir), key)
    resume = checkpoints.latest()
    t = time.time()
    lm = load_causal_lm(cfg.model_preset, cfg.models_dir, cfg.sequence_length)
    load_s = time.time() - t
    enc = encode(lm.preprocessor.tokenizer, train, cfg.sequence_length, cfg.loss_tokens)
    plan = loop.train_plan(input_lengths(enc), cfg, engine["max_widths"])
    # LoRA (and the template's token rows) on before anything is traced: the base and the tuned
    # model are scored by one function.
    adapter.enable(lm, adapter.placement(cfg), adapter.template_token_ids(lm.preprocessor.tokenizer, cfg.prompt_template,
                                                                 cfg.trainable_tokens))
    scorer = sums_fn(lm, engine["jit_compile"])
    tokenizer = lm.preprocessor.tokenizer
    # Under XLA every batch width is one compilation of the whole model: validation reuses the
    # held-out scoring's widths.
    widths: set = set()
    validation = Validation(
        len(validation_rows), cfg.eval_every_steps, cfg.early_stopping_patience, cfg.loss_tokens,
        lambda: score_heldout(lm, validation_rows, cfg.sequence_length, sums=scorer, xla=engine["jit_compile"],
                              tokenizer=tokenizer, compiled_widths=widths))
    return Session(cfg, engine, train, heldout, lm, load_s, enc, plan, checkpoints, resume, scorer, validation, widths)


def score(s: Session) -> dict:
    return score_heldout(s.lm, s.heldout, s.cfg.sequence_length, sums=s.scorer, xla=s.engine["jit_compile"],
                         compiled_widths=s.widths)


def score_base(s: Session) -> dict:
    scores = s.resume["base_scores"] if s.resume else score(s)
    log.info("finetune: base model on %d held-out examples: %s", len(s.heldout), summary(scores))
    return scores


def train(s: Session, base_scores: dict) -> Trained:
    cfg, lm, plan = s.cfg, s.lm, s.plan
    base_params = int(lm.backbone.count_params())
    trainer, optimizer, compiled = loop.prepare(lm, cfg, s.engine)
    counts = adapter.trainable_counts(lm)
    trainable = counts["total"]
    total = len(plan)
    orders = plan_orders(plan, len(s.train))
    fed = loop.rows_fed(plan, cfg, s.engine)
    widths = [step.width for step in plan]
    history: list[dict] = []
    start = 0
    if s.resume:
        start = s.resume["step"]
        s.checkpoints.restore(s.resume, lm, optimizer)
        history = s.resume["history"]
        s.validation.restore(s.resume.get("validation"), s.checkpoints.best_weights(s.resume))
        log.info("finetune: RESUMING from the checkpoint at step %d/%d (%s)", start, total, s.resume["dir"])
    log.info(
        "finetune: %d examples, batch %d, %d epoch(s) = %d steps; LoRA on %s%s: %s trainable weights (LoRA %s%s)",
        len(s.train), cfg.batch_size, cfg.epochs, total, adapter.placement(cfg).describe(),
        f" + the embedding rows of {[lm.preprocessor.tokenizer.id_to_token(i) for i in adapter.token_ids(lm)]}"
        if adapter.token_ids(lm) else "", f"{trainable:,}",
        ", ".join(f"{name} {n:,}" for name, n in counts["lora_by_layer"].items()),
        f"; token rows {counts['token_rows']:,}" if counts["token_rows"] else "",
    )
    log.info(
        "finetune: train_mode %s, XLA %s, dtype policy %s, batch widths %s",
        cfg.train_mode, compiled["jit_compile"], s.engine["dtype_policy"], dict(sorted(collections.Counter(widths).items())),
    )

    def after_step(step: int) -> None:
        # Validation first, so the checkpoint of this step holds its score and the best so far.
        if s.validation.due(step, total):
            if s.validation.evaluate(step, lm):
                trainer.stop_training = True  # Keras ends fit() after this step
            history[-1]["validation_loss"] = s.validation.scores[-1]["loss"]
        if cfg.checkpoint_every_steps and step % cfg.checkpoint_every_steps == 0 and step < total:
            s.checkpoints.save(step, lm, optimizer, history, base_scores, orders, s.train, s.validation)

    if s.validation.on and start == 0:
        s.validation.evaluate(0, lm)  # the base model: where the curve starts

    real = [int(s.enc["real_tokens"][step.rows].sum()) for step in plan]
    progress = loop.make_progress_callback(total, fed[start:], cfg.log_every_steps, history, start, after_step,
                                               widths[start:], real[start:])
    train_s = loop.fit(trainer, lm, s.enc, plan, cfg, [progress], start, s.engine)
    return Trained(history, start, train_s, base_params, trainable, compiled, counts)


def keep(s: Session, t: Trained) -> None:
    """`keep: best`: the best validation step's weights back into the model, before it is scored and saved."""
    v = s.validation
    if v.stopped_at is not None:
        log.info("finetune: stopped early at step %d of %d: %d validation scores in a row without a new best",
                 v.stopped_at, len(s.plan), v.patience)
    if s.cfg.keep == "best":
        v.keep_best(s.lm)
        last = v.scores[-1]
        log.info("finetune: keeping the adapter of step %d (validation loss %.4f)%s", v.best["step"], v.best["loss"],
                 ": the last step's is the best" if last["step"] == v.best["step"]
                 else f", not the last step's ({last['step']}, {last['loss']:.4f})")


def score_tuned(s: Session) -> dict:
    scores = score(s)
    log.info("finetune: tuned model on %d held-out examples: %s", len(s.heldout), summary(scores))
    return scores


def save(s: Session, t: Trained, base_scores: dict, tuned_scores: dict, out: Path) -> dict:
    """The adapter, history.json and result.json into the stage's folder; the record's result."""
    import keras

    cfg, plan = s.cfg, s.plan
    adapter.save(s.lm, out / artifacts.ADAPTER)
    total = len(plan)
    fed = loop.rows_fed(plan, cfg, s.engine)
    widths = [step.width for step in plan]
    real_tokens = int(s.enc["real_tokens"].sum()) * cfg.epochs
    # Token positions computed (rows fed x width), the padding included.
    padded_tokens = sum(f * w for f, w in zip(fed, widths))
    padded_here = sum(f * w for f, w in zip(fed[t.start:], widths[t.start:]))
    result = {
        "model_preset": cfg.model_preset,
        "model_class": type(s.lm).__name__,
        "parameters": t.base_params,
        "trainable_parameters": t.trainable,
        "lora": adapter.placement(cfg).to_dict(),
        "trainable_weights": t.trainable_counts,
        # Special tokens whose embedding rows were trained beside LoRA (trainable_tokens).
        "token_rows": {s.lm.preprocessor.tokenizer.id_to_token(i): i for i in adapter.token_ids(s.lm)},
        "steps": len(t.history),
        "planned_steps": total,
        "examples": len(s.train),
        "resumed_from_step": t.start or None,
        "checkpoints_skipped": s.checkpoints.skipped,
        "data_order": [[s.train[i]["id"] for i in order] for order in plan_orders(plan, len(s.train))],
        "config": cfg.subset(CONFIG_KEYS),
        "timings_s": {"load": round(s.load_s, 2), "train": round(t.train_s, 2),
                      **({"validation": round(s.validation.seconds, 2)} if s.validation.on else {})},
        "tokens": {
            "real": real_tokens,
            "padded": padded_tokens,
            "real_per_s": round(real_tokens * (total - t.start) / total / t.train_s, 1) if t.train_s else None,
            "padded_per_s": round(padded_here / t.train_s, 1) if t.train_s else None,
        },
        "training": {
            **t.compiled,
            "dtype_policy": s.engine["dtype_policy"],
            "max_widths": s.engine["max_widths"],
            # Data parallel: the devices the batch was split over (1 replica: one device).
            "replicas": max(len(s.engine["devices"]), 1),
            "devices": s.engine["devices"],
            "widths": dict(sorted(collections.Counter(widths).items())),
        },
        "validation": s.validation.result(cfg.keep, t.history[-1]["step"] if t.history else 0) if s.validation.on else None,
        "heldout_base": base_scores,
        "heldout_tuned": tuned_scores,
        "final_loss": t.history[-1]["loss"] if t.history else None,
        "keras_version": keras.__version__,
        "device": device.describe_device(),
    }
    storage.write_json(out / artifacts.HISTORY, t.history)
    storage.write_json(out / artifacts.RESULT, result)
    return {
        "steps": result["steps"],
        "heldout_loss_base": base_scores.get("loss"),
        "heldout_loss_tuned": tuned_scores.get("loss"),
    }


def tune(cfg: Config, run_dir: Path, out: Path, fp: str) -> dict:
    import keras

    engine = device.engine_for(cfg)
    if engine["devices"]:
        log.info("finetune: data parallel over %d devices (%s): global batch %d, %d per device",
                 len(engine["devices"]), ", ".join(engine["devices"]), cfg.batch_size, cfg.batch_size // len(engine["devices"]))
    # The model, LoRA and the optimizer are built inside the strategy's scope (mirrored variables);
    # held-out scoring reads them on one device.
    with device.dtype_policy(engine["dtype_policy"]):
        with device.strategy(engine).scope():
            s = setup(cfg, run_dir, engine, fp)
            base_scores = score_base(s)
            trained = train(s, base_scores)
            keep(s, trained)
            tuned_scores = score_tuned(s)
            result = save(s, trained, base_scores, tuned_scores, out)
        keras.backend.clear_session()
    return {"adapter": str(artifacts.adapter_path(run_dir)), **result}


def run(cfg: Config, run_dir: Path, force: bool = False) -> dict:
    prep = storage.require(run_dir, artifacts.PREPROCESS, STAGE)
    fp = fingerprint(STAGE, prep["fingerprint"], cfg.subset(CONFIG_KEYS))
    if force:
        shutil.rmtree(artifacts.checkpoint_dir(run_dir), ignore_errors=True)
    result = storage.run_stage(run_dir, STAGE, fp, lambda out: tune(cfg, run_dir, out, fp), force)
    # Published: the adapter is safe, the checkpoints have done their job.
    shutil.rmtree(artifacts.checkpoint_dir(run_dir), ignore_errors=True)
    tracking.log_finetune(str(run_dir), fp, cfg.to_dict())
    return result


def main(argv=None) -> dict:
    return stage_main(STAGE, __doc__, run, argv)


if __name__ == "__main__":
    main()
