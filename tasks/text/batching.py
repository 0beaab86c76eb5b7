"""Token batches for training and scoring, built the same way for every Gemma generation.

keras-hub's preprocessors disagree on training input: Gemma 1/2 take plain strings and put every
token in the loss, Gemma 3 wants {"prompts", "responses"} and masks the prompt out. The pipeline
tokenizes itself instead, so one code path serves all of them and the loss mask is a setting:
`all` (the Keras tutorial: prompt and response tokens) or `response` (the response and <eos> only).

It also plans the training steps (`plan_batches`), for both training modes: `tutorial` feeds every
example padded to the sequence length, in a seeded order; `fast` groups examples of similar length
into the same batch and pads each batch only as far as its longest example, rounded up to one of a
few widths (under XLA each width is one compilation). The plan is a pure function of the token lengths and
the config, so a resumed run rebuilds exactly the plan it was checkpointed with.
"""

from __future__ import annotations

import collections
import random
from typing import NamedTuple

TRAIN_MODES = ("tutorial", "fast")
# Fast mode sorts examples by length within windows of this many batches (then shuffles the batches),
# so batches are homogeneous in length while an epoch's order stays random at a coarse grain.
SORT_WINDOW_BATCHES = 64


class Step(NamedTuple):
    """One training step: the example indices it trains on and the width it is padded to."""

    rows: list[int]
    width: int


def encode(tokenizer, examples: list[dict], sequence_length: int, loss_tokens: str = "all") -> dict:
    """Pack `<bos> text <eos>` per example, truncated/padded to sequence_length + 1, then shift.

    Each example needs `text` and either `spans` (the character spans of its assistant turns, from
    tasks.text.prompt_template.render) or `prompt` (the text's first part, before a single answer).
    Returns numpy arrays: token_ids, padding_mask (inputs), labels, label_mask (real labels), weights
    (the loss mask for `loss_tokens`), response_mask (labels that belong to an assistant turn, and
    the final <eos>) and real_tokens (label count per row).
    """
    import numpy as np

    texts = [e["text"] for e in examples]
    full = _ids(tokenizer, texts)
    spans = [[tuple(s) for s in e["spans"]] if "spans" in e else [(len(e["prompt"]), len(e["text"]))] for e in examples]
    # Every distinct span boundary, tokenized once as a prefix of its text.
    cuts = sorted({(i, c) for i, sp in enumerate(spans) for span in sp for c in span if 0 < c < len(texts[i])})
    cut_ids = dict(zip(cuts, _ids(tokenizer, [texts[i][:c] for i, c in cuts]))) if cuts else {}
    bos, eos, pad = tokenizer.start_token_id, tokenizer.end_token_id, tokenizer.pad_token_id
    n, width = len(examples), sequence_length + 1
    packed = np.full((n, width), pad, dtype="int32")
    real = np.zeros((n, width), dtype=bool)
    in_response = np.zeros((n, width), dtype=bool)  # per packed token: it belongs to an assistant turn
    for i, ids in enumerate(full):
        row = ([bos] + ids + [eos])[:width]
        packed[i, : len(row)] = row
        real[i, : len(row)] = True
        for start, end in spans[i]:
            # ids[k] sits at packed position k + 1; a turn ending the text also owns the <eos>.
            a = _token_index(ids, cut_ids.get((i, start)), start)
            b = len(ids) + 1 if end >= len(texts[i]) else _token_index(ids, cut_ids.get((i, end)), end, straddling=1)
            in_response[i, 1 + a : min(1 + b, width)] = True
    labels = packed[:, 1:]
    label_mask = real[:, 1:]
    # Label t predicts token t+1.
    response_mask = label_mask & in_response[:, 1:]
    weights = response_mask if loss_tokens == "response" else label_mask
    return {
        "token_ids": packed[:, :-1],
        "padding_mask": real[:, :-1],
        "labels": labels,
        "label_mask": label_mask,
        "weights": weights.astype("float32"),
        "response_mask": response_mask,
        "real_tokens": label_mask.sum(axis=1),
    }


def _token_index(ids: list[int], prefix_ids: list[int] | None, char: int, straddling: int = 0) -> int:
    """How many of the text's tokens come before character `char`: the common prefix of the text's
    tokens and its prefix's. The text's tokens may merge across the cut; such a token counts as
    after the cut, or as before it with `straddling=1` (so an assistant turn keeps its last token
    in the loss: both ends of a turn claim a token they share)."""
    if char <= 0 or prefix_ids is None:
        return 0 if char <= 0 else len(ids)
    k = 0
    while k < min(len(prefix_ids), len(ids)) and prefix_ids[k] == ids[k]:
        k += 1
    return k + straddling if k < len(prefix_ids) else k


def _ids(tokenizer, texts: list[str]) -> list[list[int]]:
    out = tokenizer(texts)
    return out.to_list() if hasattr(out, "to_list") else [list(map(int, x)) for x in out]


def input_lengths(enc: dict) -> list[int]:
    """Real input tokens per encoded example (<bos> included, at most the sequence length)."""
    return [int(n) for n in enc["padding_mask"].sum(axis=1)]


def epoch_orders(n: int, epochs: int, seed: int) -> list[list[int]]:
    """A seeded permutation of the n examples per epoch."""
    orders = []
    for epoch in range(epochs):
        order = list(range(n))
        random.Random(seed * 1000 + epoch).shuffle(order)
        orders.append(order)
    return orders


def choose_widths(needed: list[int], sequence_length: int, multiple: int, max_shapes: int) -> list[int]:
    """At most `max_shapes` batch widths that pad the batches least, given each batch's longest row
    (`max_shapes` 0: no limit, every batch takes the next multiple).

    Widths are multiples of `multiple` (the widest may be `sequence_length` itself); every batch then
    takes the narrowest width that holds it. Exact, by dynamic programming over the candidate widths.
    """
    cand_of = [min(-(-max(n, 1) // multiple) * multiple, sequence_length) for n in needed]
    counts = collections.Counter(cand_of)
    cands = sorted(counts)
    m = len(cands)
    if max_shapes <= 0 or m <= max_shapes:
        return cands
    prefix = []
    total = 0
    for c in cands:
        total += counts[c]
        prefix.append(total)
    inf = float("inf")
    # cost[k][i]: fewest padded rows*width for the batches up to candidate i, with k widths, the widest cands[i].
    cost = [[inf] * m for _ in range(max_shapes + 1)]
    back = [[-1] * m for _ in range(max_shapes + 1)]
    for i in range(m):
        cost[1][i] = prefix[i] * cands[i]
    for k in range(2, max_shapes + 1):
        for i in range(k - 1, m):
            for j in range(k - 2, i):
                c = cost[k - 1][j] + (prefix[i] - prefix[j]) * cands[i]
                if c < cost[k][i]:
                    cost[k][i], back[k][i] = c, j
    k = min(range(1, max_shapes + 1), key=lambda k: (cost[k][m - 1], k))
    widths, i = [], m - 1
    while k >= 1 and i >= 0:
        widths.append(cands[i])
        i, k = back[k][i], k - 1
    return sorted(widths)


def plan_batches(
    lengths: list[int],
    *,
    batch_size: int,
    epochs: int,
    seed: int,
    sequence_length: int,
    mode: str = "tutorial",
    bucket_multiple: int = 16,
    bucket_shapes: int = 4,
) -> list[Step]:
    """Every training step, epoch after epoch: which examples, padded to which width.

    `tutorial`: each epoch's seeded permutation cut into batches (the last may be short), all at
    `sequence_length`. `fast`: the same permutation, sorted by length within windows of
    SORT_WINDOW_BATCHES batches (ties keep the permutation's order), cut into batches, the batches
    shuffled (seeded); each batch padded to the narrowest of at most `bucket_shapes` widths
    (multiples of `bucket_multiple`, chosen by `choose_widths`; 0 = no limit) that holds its longest
    example.
    Every example is trained on once per epoch in both modes.
    """
    if mode not in TRAIN_MODES:
        raise ValueError(f"train_mode {mode!r} is not one of {list(TRAIN_MODES)}")
    n = len(lengths)
    orders = epoch_orders(n, epochs, seed)
    if mode == "tutorial":
        return [Step(order[i : i + batch_size], sequence_length) for order in orders for i in range(0, n, batch_size)]
    batches: list[list[int]] = []
    window = batch_size * SORT_WINDOW_BATCHES
    for epoch, order in enumerate(orders):
        epoch_batches = []
        for start in range(0, n, window):
            chunk = sorted(order[start : start + window], key=lambda i: lengths[i])
            epoch_batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
        # A string seed is hashed with sha512: the same shuffle in every process.
        random.Random(f"fast-batches/{seed}/{epoch}").shuffle(epoch_batches)
        batches += epoch_batches
    needed = [min(max(lengths[i] for i in b), sequence_length) for b in batches]
    widths = choose_widths(needed, sequence_length, bucket_multiple, bucket_shapes)
    return [Step(b, min(w for w in widths if w >= need)) for b, need in zip(batches, needed)]


def plan_orders(plan: list[Step], n: int) -> list[list[int]]:
    """The plan's example order per epoch (what checkpoints and result.json record)."""
    orders, current = [], []
    for step in plan:
        current += step.rows
        if len(current) >= n:
            orders.append(current)
            current = []
    if current:
        orders.append(current)
    return orders


def step_arrays(enc: dict, step: Step, batch_size: int | None = None):
    """The step's (inputs, labels, loss weights), `step.width` tokens wide.

    With `batch_size` (fast mode) a short batch is filled up to it with copies of its first row at
    loss weight 0, and its real rows' weights scaled by batch_size / real rows, so every step has
    the same batch shape and, with a loss summed and divided by batch_size x sequence_length (see
    training.padded_batch_loss), exactly the tutorial's loss: the sum over real rows divided by
    real rows x sequence_length.
    """
    import numpy as np

    rows = list(step.rows)
    real = len(rows)
    if batch_size is not None and real < batch_size:
        rows += [rows[0]] * (batch_size - real)
    idx = np.asarray(rows)
    w = step.width
    x = {"token_ids": enc["token_ids"][idx, :w], "padding_mask": enc["padding_mask"][idx, :w]}
    weights = enc["weights"][idx, :w].copy()
    if batch_size is not None and real < batch_size:
        weights[real:] = 0.0
        weights *= batch_size / real
    return x, enc["labels"][idx, :w], weights
