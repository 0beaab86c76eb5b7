"""Validation while training: a loss curve on examples the run neither trains on nor reports, early
stopping on it, and the best step's adapter kept in memory (and in each checkpoint) for `keep: best`.

The validation loss is the training objective's masked loss on the validation examples: the
response tokens' mean loss with `loss_tokens: response`, every real token's with `all`. It is scored
before the first step (the base model), every `eval_every_steps` steps and after the last one, by
the batched scorer the held-out evaluation uses.
"""

from __future__ import annotations

import logging
import time
from typing import Callable

log = logging.getLogger("gemma_pipeline")


class Validation:
    """The scores so far, the best step and its weights, and whether to stop. `score()` returns the
    scorer's summary of the model as it is now (tasks.evaluate.heldout_eval.score_heldout)."""

    def __init__(self, examples: int, every: int, patience: int, loss_tokens: str, score: Callable[[], dict]):
        self.examples = examples
        self.every = every
        self.patience = patience
        self.objective = "response_loss" if loss_tokens == "response" else "loss"
        self.score = score
        self.scores: list[dict] = []
        self.best: dict | None = None
        self.best_weights: list | None = None
        self.since_best = 0
        self.stopped_at: int | None = None
        self.seconds = 0.0

    @property
    def on(self) -> bool:
        return self.examples > 0

    def due(self, step: int, total: int) -> bool:
        return self.on and (step % self.every == 0 or step == total)

    def evaluate(self, step: int, lm) -> bool:
        """Score at `step`; True when early stopping says stop here."""
        import numpy as np

        t = time.time()
        scores = self.score()
        self.seconds += time.time() - t
        entry = {"step": step, "loss": scores[self.objective], "token_loss": scores.get("loss"),
                 "response_perplexity": scores.get("response_perplexity")}
        self.scores.append(entry)
        if self.best is None or entry["loss"] < self.best["loss"]:
            self.best = entry
            self.best_weights = [np.array(w.numpy()) for w in lm.backbone.trainable_weights]
            self.since_best = 0
        else:
            self.since_best += 1
        stop = bool(self.patience) and self.since_best >= self.patience
        log.info("finetune: validation at step %d on %d examples: loss %.4f (best %.4f at step %d)%s",
                 step, self.examples, entry["loss"], self.best["loss"], self.best["step"],
                 f"; no new best in {self.since_best} scores: stopping early" if stop else "")
        if stop:
            self.stopped_at = step
        return stop

    def state(self) -> dict:
        return {"scores": self.scores, "best": self.best, "since_best": self.since_best, "seconds": self.seconds}

    def restore(self, state: dict | None, best_weights: list | None) -> None:
        if not state:
            return
        self.scores, self.best = list(state["scores"]), state["best"]
        self.since_best, self.seconds = state["since_best"], state.get("seconds", 0.0)
        self.best_weights = best_weights

    def keep_best(self, lm) -> None:
        """The best step's weights back into the model (`keep: best`)."""
        if self.best_weights is None:
            raise RuntimeError("keep: best, but no validation score was recorded")
        for var, value in zip(lm.backbone.trainable_weights, self.best_weights):
            var.assign(value)

    def result(self, keep: str, last_step: int) -> dict:
        return {
            "examples": self.examples,
            "every_steps": self.every,
            "objective": self.objective,
            "scores": self.scores,
            "best_step": self.best["step"] if self.best else None,
            "best_loss": self.best["loss"] if self.best else None,
            "keep": keep,
            "kept_step": (self.best["step"] if keep == "best" and self.best else last_step),
            "early_stopping_patience": self.patience,
            "stopped_early_at": self.stopped_at,
            "seconds": round(self.seconds, 2),
        }
