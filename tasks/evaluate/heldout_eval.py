"""Held-out scoring with padding masked out: token loss and accuracy, and response-only perplexity.

Keras's reported training loss averages over padding tokens too (the same data scores 2.04 at
sequence length 64 and 0.51 at 256), so it cannot compare runs. These scores count only real tokens,
and the perplexity only the response tokens (the part the model is asked to produce, <eos> included).

Scoring runs as one TensorFlow graph traced once for any batch width: the rows are sorted by length
and each batch is cut to its longest row (rounded up to `WIDTH_MULTIPLE`), so short examples do not
pay for the full sequence length, and the cross-entropy is reduced to per-example sums inside the
graph instead of copying batch x length x 256k logits out to numpy. Padding sits after the real
tokens and attention is causal, so cutting it changes no real position's logits. The per-example
sums are kept: the report's perplexity confidence interval resamples examples.
"""

from __future__ import annotations

import math

from tasks.text.batching import choose_widths, encode

WIDTH_MULTIPLE = 16
# Under XLA every batch shape is one compilation: at most this many widths, and full batches.
XLA_WIDTHS = 2


def sums_fn(lm, xla: bool = False):
    """Per-example (loss sum, correct count, response loss sum) of a batch, as one graph for any shape."""
    import tensorflow as tf

    ids = tf.TensorSpec((None, None), tf.int32)
    flags = tf.TensorSpec((None, None), tf.bool)
    weights = tf.TensorSpec((None, None), tf.float32)

    @tf.function(input_signature=[ids, flags, ids, weights, weights], jit_compile=xla)
    def sums(token_ids, padding_mask, labels, mask, resp):
        logits = lm({"token_ids": token_ids, "padding_mask": padding_mask}, training=False)
        logits = tf.cast(logits, tf.float32)
        ce = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=logits)
        hit = tf.cast(tf.equal(tf.argmax(logits, axis=-1, output_type=tf.int32), labels), tf.float32)
        return (tf.reduce_sum(ce * mask, axis=1), tf.reduce_sum(hit * mask, axis=1), tf.reduce_sum(ce * resp, axis=1))

    return sums


def score_heldout(lm, rows: list[dict], sequence_length: int, batch_size: int = 8, sums=None, xla: bool = False,
                  tokenizer=None, compiled_widths: set | None = None) -> dict:
    """Scores of `lm` on held-out rows with keys `prompt` and `text`; `per_example` holds each row's
    token counts and loss sums in the rows' order. `sums` (from `sums_fn(lm, xla)`) reuses a traced
    function: LoRA enabled before its first call, base and tuned scores share one trace. Under XLA
    the batches take at most `XLA_WIDTHS` widths and short batches are filled with empty rows;
    `compiled_widths` (a set the caller keeps across calls on one `sums`) makes later calls reuse the
    widths the first one compiled (a validation set scored during training compiles nothing new)."""
    import numpy as np

    if not rows:
        return {"examples": 0}
    # Logits are batch x width x vocabulary floats: Gemma's 256k vocabulary makes a batch of 8 at
    # length 256 a 2 GB array, so bound the batch by the logits' size.
    per_row = sequence_length * lm.backbone.vocabulary_size
    batch_size = max(1, min(batch_size, int(1.5e8 // per_row)))
    # `tokenizer`: while fit() runs, the model's string preprocessor is detached (tasks.training.loop.fit).
    enc = encode(tokenizer or lm.preprocessor.tokenizer, rows, sequence_length)
    lengths = enc["padding_mask"].sum(axis=1)
    order = sorted(range(len(rows)), key=lambda i: (int(lengths[i]), i))
    sums = sums or sums_fn(lm, xla)
    n = len(rows)
    chunks = [order[s : s + batch_size] for s in range(0, n, batch_size)]
    need = [int(lengths[idx].max()) for idx in chunks]
    widths = choose_widths(need, sequence_length, WIDTH_MULTIPLE, XLA_WIDTHS if xla else 0)
    if xla and compiled_widths is not None:
        if compiled_widths:
            # Each batch takes the narrowest compiled width that holds it (the full length if none does).
            widths = sorted(compiled_widths | {sequence_length}) if max(need) > max(compiled_widths) else sorted(compiled_widths)
        compiled_widths.update(widths)
    loss_sum, correct, resp_loss_sum = np.zeros(n), np.zeros(n), np.zeros(n)
    for idx, longest in zip(chunks, need):
        width = min(w for w in widths if w >= min(longest, sequence_length))
        fill = batch_size - len(idx) if xla else 0
        picked = idx + idx[:1] * fill

        def part(name, dtype):
            a = enc[name][picked, :width].astype(dtype)
            if fill and dtype == "float32":
                a[len(idx):] = 0.0  # filler rows count nothing
            return a

        out = sums(part("token_ids", "int32"), part("padding_mask", bool), part("labels", "int32"),
                   part("label_mask", "float32"), part("response_mask", "float32"))
        loss_sum[idx], correct[idx], resp_loss_sum[idx] = (np.asarray(t, dtype="float64")[: len(idx)] for t in out)
    tokens = enc["label_mask"].sum(axis=1)
    resp_tokens = enc["response_mask"].sum(axis=1)
    resp_loss = float(resp_loss_sum.sum()) / max(int(resp_tokens.sum()), 1)
    return {
        "examples": n,
        "tokens": int(tokens.sum()),
        "loss": round(float(loss_sum.sum()) / max(int(tokens.sum()), 1), 5),
        "accuracy": round(float(correct.sum()) / max(int(tokens.sum()), 1), 5),
        "response_tokens": int(resp_tokens.sum()),
        "response_loss": round(resp_loss, 5),
        "response_perplexity": round(math.exp(min(resp_loss, 50.0)), 4),
        "per_example": [
            {"tokens": int(t), "loss_sum": round(float(ls), 5), "response_tokens": int(rt),
             "response_loss_sum": round(float(rl), 5)}
            for t, ls, rt, rl in zip(tokens, loss_sum, resp_tokens, resp_loss_sum)
        ],
    }


def summary(scores: dict) -> dict:
    """The scores without the per-example sums (what the log shows)."""
    return {k: v for k, v in scores.items() if k != "per_example"}
