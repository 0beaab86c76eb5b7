"""What fine-tuning trains and saves: LoRA on the attention's query and value projections, plus, when
asked, the embedding rows of a few special tokens ("token rows").

Why token rows: a pretrained (not instruction-tuned) Gemma never saw `<start_of_turn>` and
`<end_of_turn>` in training, so their embedding rows are untrained, and LoRA on the attention
cannot lift `<end_of_turn>`'s logit from rank ~200,000 to the top: the model learns to end a turn
with <eos> instead. Training those rows (PEFT's `trainable_token_indices`) fixes that at the cost
of 2 x hidden_size weights. Gemma ties its input embedding and output layer, so one row serves
both; a row is a trainable delta added to the frozen base row, starting at zero (the tuned model
starts as the base model, as with LoRA's zero B matrices).

The adapter file is keras-hub's `<name>.lora.h5` (`save_lora_weights`), with the token rows in a
`token_rows` group beside keras-hub's `lora` group (ids and rows), so one file holds everything and
keras-hub's own `load_lora_weights` still reads it. `merged_token_rows` gives the merged rows for
the exporters.
"""

from __future__ import annotations

from pathlib import Path

GROUP = "token_rows"


def enable(lm, rank: int, token_ids: list[int] | tuple = ()) -> None:
    """LoRA on (once: its B matrices start at zero) and, for `token_ids`, trainable token rows
    (zero). Call before anything is traced, so one compiled function serves base and tuned model."""
    if not any(getattr(layer, "lora_enabled", False) for layer in lm.backbone._flatten_layers()):
        lm.backbone.enable_lora(rank=rank)
    if token_ids:
        _enable_token_rows(lm.backbone.token_embedding, [int(i) for i in token_ids])


def token_ids(lm) -> list[int]:
    return list(getattr(lm.backbone.token_embedding, "token_row_ids", []))


def _enable_token_rows(layer, ids: list[int]) -> None:
    if getattr(layer, "token_row_ids", None) is not None:
        if list(layer.token_row_ids) != ids:
            raise ValueError(f"token rows {layer.token_row_ids} are already enabled, not {ids}")
        return
    if not layer.tie_weights:
        raise ValueError("token rows need a tied input embedding and output layer (Gemma's)")
    bad = [i for i in ids if not 0 <= i < layer.input_dim]
    if bad:
        raise ValueError(f"token ids {bad} are outside the vocabulary (0..{layer.input_dim - 1})")
    # The layer was frozen by enable_lora; only the new rows train, the base table stays frozen.
    layer.trainable = True
    layer._embeddings.trainable = False
    layer._tracker.unlock()
    layer.token_rows = layer.add_weight(
        name="token_rows", shape=(len(ids), layer.output_dim), initializer="zeros", trainable=True,
    )
    layer._tracker.lock()
    layer.token_row_ids = list(ids)
    layer.__class__ = _with_token_rows(type(layer))


_CLASSES: dict = {}


def _with_token_rows(base):
    """`base` (keras' ReversibleEmbedding or a subclass) with the token rows added to its lookup and
    to its output logits: exactly the base layer with rows `E[id] + delta` for those ids."""
    if base in _CLASSES or getattr(base, "_adds_token_rows", False):
        return _CLASSES.get(base, base)
    from keras import ops

    class WithTokenRows(base):
        _adds_token_rows = True

        def call(self, inputs, reverse=False):
            ids = ops.convert_to_tensor(self.token_row_ids, dtype="int32")
            if not reverse:
                out = super().call(inputs)
                hits = ops.cast(ops.equal(ops.expand_dims(ops.cast(inputs, "int32"), -1), ids), out.dtype)
                return out + ops.matmul(hits, ops.cast(self.token_rows, out.dtype))
            kernel = ops.transpose(self.embeddings)
            if self.reverse_dtype is not None:
                inputs = ops.cast(inputs, self.reverse_dtype)
                kernel = ops.cast(kernel, self.reverse_dtype)
            logits = ops.matmul(inputs, kernel)
            # h . delta for each token row, added to that token's column ((..., k) @ (k, vocab)
            # one-hots): at zero exactly the base model's logits; merged (E + delta) the same sums
            # to float rounding in those columns.
            rows = ops.cast(self.token_rows, logits.dtype)
            columns = ops.one_hot(ids, self.input_dim, dtype=logits.dtype)
            logits = logits + ops.matmul(ops.matmul(inputs, ops.transpose(rows)), columns)
            if self.logit_soft_cap is not None:
                logits = ops.multiply(ops.tanh(ops.divide(logits, self.logit_soft_cap)), self.logit_soft_cap)
            return logits

    WithTokenRows.__name__ = f"{base.__name__}WithTokenRows"
    _CLASSES[base] = WithTokenRows
    return WithTokenRows


def save(lm, path: Path) -> None:
    """The adapter file: keras-hub's LoRA weights, then the token rows (if any) beside them."""
    import h5py
    import numpy as np

    lm.backbone.save_lora_weights(str(path))
    ids = token_ids(lm)
    if ids:
        rows = np.asarray(lm.backbone.token_embedding.token_rows.numpy(), dtype="float32")
        with h5py.File(path, "a") as f:
            group = f.create_group(GROUP)
            group.create_dataset("ids", data=np.asarray(ids, dtype="int64"))
            group.create_dataset("rows", data=rows)


def read_token_rows(path: Path) -> tuple[list[int], "object"]:
    """The adapter file's token ids and rows (numpy); ([], None) when it has none."""
    import h5py

    with h5py.File(path, "r") as f:
        if GROUP not in f:
            return [], None
        return [int(i) for i in f[GROUP]["ids"][()]], f[GROUP]["rows"][()]


def enable_for(lm, path: Path, rank: int) -> None:
    """LoRA and token rows on, at zero, shaped as the adapter file's: the base model still, ready to
    `load` it without retracing."""
    ids, _ = read_token_rows(path)
    enable(lm, rank, ids)


def load(lm, path: Path, rank: int) -> None:
    """The adapter file's weights into `lm` (enabling LoRA and the token rows first if needed)."""
    ids, rows = read_token_rows(path)
    enable(lm, rank, ids)
    lm.backbone.load_lora_weights(str(path))
    if ids:
        lm.backbone.token_embedding.token_rows.assign(rows)


def merged_token_rows(lm) -> dict[int, "object"]:
    """{token id: its merged embedding row (base + delta), numpy} of a tuned model with token rows."""
    import numpy as np

    from keras import ops

    layer = lm.backbone.token_embedding
    ids = token_ids(lm)
    if not ids:
        return {}
    # Only those rows of the base table (not a copy of all 262,144 x hidden of it).
    base = np.asarray(ops.convert_to_numpy(ops.take(layer._embeddings, ids, axis=0)), dtype="float32")
    rows = np.asarray(layer.token_rows.numpy(), dtype="float32")
    return {i: base[n] + rows[n] for n, i in enumerate(ids)}


def template_token_ids(tokenizer, template: str, setting: str) -> list[int]:
    """The token ids whose rows train: with `trainable_tokens: auto`, the template's turn markers
    (prompt_template.turn_tokens) that the vocabulary has; none with `none`."""
    from tasks.text.prompt_template import turn_tokens

    if setting == "none":
        return []
    unk = getattr(tokenizer, "unk_token_id", None)
    ids = []
    for piece in turn_tokens(template):
        try:
            i = int(tokenizer.token_to_id(piece))
        except Exception:  # noqa: BLE001 - a vocabulary without the piece has no row to train
            continue
        if i != unk:
            ids.append(i)
    return ids
