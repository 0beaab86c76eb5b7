"""Held-out scoring with padding masked out: token loss and accuracy, and response-only perplexity.

Keras's reported training loss averages over padding tokens too (the same data scores 2.04 at
sequence length 64 and 0.51 at 256), so it cannot compare runs. These scores count only real tokens,
and the perplexity only the response tokens (the part the model is asked to produce, <eos> included).
"""

from __future__ import annotations

import math


def _prompt_token_counts(tokenizer, prompts: list[str], texts: list[str]) -> list[int]:
    """How many label positions belong to the prompt, found as the common token prefix."""
    counts = []
    for p_ids, t_ids in zip(_ids(tokenizer, prompts), _ids(tokenizer, texts)):
        k = 0
        while k < min(len(p_ids), len(t_ids)) and p_ids[k] == t_ids[k]:
            k += 1
        # Labels are shifted by one and the packer puts <bos> first: label t predicts token t+1,
        # so label positions t >= k are response tokens.
        counts.append(k)
    return counts


def _ids(tokenizer, texts: list[str]) -> list[list[int]]:
    out = tokenizer(texts)
    return out.to_list() if hasattr(out, "to_list") else [list(x) for x in out]


def score_heldout(lm, rows: list[dict], batch_size: int = 8) -> dict:
    """Scores of `lm` on held-out rows with keys `prompt` and `text`."""
    import keras
    import numpy as np

    if not rows:
        return {"examples": 0}
    pre = lm.preprocessor
    # Logits are batch x length x vocabulary floats: Gemma's 256k vocabulary makes a batch of 8 at
    # length 256 a 2 GB array, so bound the batch by the logits' size.
    per_row = pre.sequence_length * lm.backbone.vocabulary_size
    batch_size = max(1, min(batch_size, int(1.5e8 // per_row)))
    tokens = correct = 0
    loss_sum = resp_loss_sum = 0.0
    resp_tokens = 0
    for start in range(0, len(rows), batch_size):
        batch = rows[start : start + batch_size]
        texts = [r["text"] for r in batch]
        x, y, sw = pre(texts)
        # Call the model itself: predict_on_batch would run the preprocessor a second time.
        logits = keras.ops.convert_to_numpy(lm(x, training=False))
        y = keras.ops.convert_to_numpy(y)
        sw = keras.ops.convert_to_numpy(sw).astype("float32")
        logits = np.asarray(logits, dtype="float32")
        # Stable log-softmax cross-entropy in numpy: the batch is small and this keeps one code path.
        m = logits.max(axis=-1, keepdims=True)
        logz = np.log(np.exp(logits - m).sum(axis=-1)) + m[..., 0]
        picked = np.take_along_axis(logits, y[..., None], axis=-1)[..., 0]
        ce = logz - picked
        hit = (logits.argmax(axis=-1) == y).astype("float32")
        k = _prompt_token_counts(pre.tokenizer, [r["prompt"] for r in batch], texts)
        positions = np.arange(y.shape[1])[None, :]
        resp_mask = sw * (positions >= np.asarray(k)[:, None])
        tokens += float(sw.sum())
        correct += float((hit * sw).sum())
        loss_sum += float((ce * sw).sum())
        resp_tokens += float(resp_mask.sum())
        resp_loss_sum += float((ce * resp_mask).sum())
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
