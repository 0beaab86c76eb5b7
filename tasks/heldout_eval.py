"""Held-out scoring with padding masked out: token loss and accuracy, and response-only perplexity.

Keras's reported training loss averages over padding tokens too (the same data scores 2.04 at
sequence length 64 and 0.51 at 256), so it cannot compare runs. These scores count only real tokens,
and the perplexity only the response tokens (the part the model is asked to produce, <eos> included).
"""

from __future__ import annotations

import math

from tasks.batching import encode


def score_heldout(lm, rows: list[dict], sequence_length: int, batch_size: int = 8) -> dict:
    """Scores of `lm` on held-out rows with keys `prompt` and `text`."""
    import keras
    import numpy as np

    if not rows:
        return {"examples": 0}
    # Logits are batch x length x vocabulary floats: Gemma's 256k vocabulary makes a batch of 8 at
    # length 256 a 2 GB array, so bound the batch by the logits' size.
    per_row = sequence_length * lm.backbone.vocabulary_size
    batch_size = max(1, min(batch_size, int(1.5e8 // per_row)))
    enc = encode(lm.preprocessor.tokenizer, rows, sequence_length)
    tokens = correct = resp_tokens = 0.0
    loss_sum = resp_loss_sum = 0.0
    for s in range(0, len(rows), batch_size):
        x = {"token_ids": enc["token_ids"][s : s + batch_size], "padding_mask": enc["padding_mask"][s : s + batch_size]}
        y = enc["labels"][s : s + batch_size]
        mask = enc["label_mask"][s : s + batch_size].astype("float32")
        resp = enc["response_mask"][s : s + batch_size].astype("float32")
        # Call the model itself: predict_on_batch would run the string preprocessor on these ids.
        logits = np.asarray(keras.ops.convert_to_numpy(lm(x, training=False)), dtype="float32")
        # Log-softmax cross-entropy in numpy, stable through the max shift.
        m = logits.max(axis=-1, keepdims=True)
        logz = np.log(np.exp(logits - m).sum(axis=-1)) + m[..., 0]
        ce = logz - np.take_along_axis(logits, y[..., None], axis=-1)[..., 0]
        hit = (logits.argmax(axis=-1) == y).astype("float32")
        tokens += float(mask.sum())
        correct += float((hit * mask).sum())
        loss_sum += float((ce * mask).sum())
        resp_tokens += float(resp.sum())
        resp_loss_sum += float((ce * resp).sum())
    resp_loss = resp_loss_sum / max(resp_tokens, 1)
    return {
        "examples": len(rows),
        "tokens": int(tokens),
        "loss": round(loss_sum / max(tokens, 1), 5),
        "accuracy": round(correct / max(tokens, 1), 5),
        "response_tokens": int(resp_tokens),
        "response_loss": round(resp_loss, 5),
        "response_perplexity": round(math.exp(min(resp_loss, 50.0)), 4),
    }
