"""What fine-tuning trains and saves: LoRA where `lora_targets` puts it (the attention's query and value
projections by default, the seed's; every attention projection; or every linear layer, attention and
MLP) scaled by `lora_alpha / lora_rank`, plus, when asked, the embedding rows of a few special
tokens ("token rows").

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

keras-hub's file stores only the rank and finds each layer by its position among the backbone's
layers, so an adapter trained on other layers would load silently into the wrong ones. The file
therefore also records its `Placement` (targets, their layer names, rank, alpha) in a `placement`
group; loading compares it with the model's and with what the caller expects, and refuses a
mismatch naming both. A file written before placements were recorded has no such group: it is what
was always trained then, query/value at alpha = rank.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from tasks.pipeline.config import LORA_TARGETS

GROUP = "token_rows"
PLACEMENT_GROUP = "placement"

# Layer names of Gemma's decoder blocks in keras-hub (Gemma 1, 2 and 3 name them alike): the
# attention's projections, then the gated MLP's.
ATTENTION_QV = ("query", "value")
ATTENTION = ("query", "key", "value", "attention_output")
MLP = ("ffw_gating", "ffw_gating_2", "ffw_linear")
# In the order of config.LORA_TARGETS, the key's choices.
TARGETS = dict(zip(LORA_TARGETS, (ATTENTION_QV, ATTENTION, ATTENTION + MLP)))


@dataclasses.dataclass(frozen=True)
class Placement:
    """Where LoRA goes and how strongly: `targets` (a TARGETS name), rank, alpha (scale alpha / rank)."""

    targets: str
    rank: int
    alpha: float

    @property
    def layers(self) -> tuple[str, ...]:
        return TARGETS[self.targets]

    def describe(self) -> str:
        return f"{self.targets} ({', '.join(self.layers)}), rank {self.rank}, alpha {self.alpha:g}"

    def to_dict(self) -> dict:
        return {"targets": self.targets, "layers": list(self.layers), "rank": self.rank, "alpha": self.alpha}


def placement(cfg) -> Placement:
    """The config's placement; `lora_alpha: 0` means alpha = rank (scale 1, the seed's)."""
    return Placement(cfg.lora_targets, int(cfg.lora_rank), float(cfg.lora_alpha or cfg.lora_rank))


class PlacementMismatch(ValueError):
    """An adapter trained with one placement, loaded where another is expected."""


def _mismatch(what: str, have: Placement, other: str, want: Placement) -> PlacementMismatch:
    return PlacementMismatch(
        f"{what} has LoRA on {have.describe()}; {other} has it on {want.describe()}: an adapter loads only into "
        "a model with the same lora_targets, lora_rank and lora_alpha")


def enabled_placement(lm) -> Placement | None:
    return getattr(lm.backbone, "_gemma_lora_placement", None)


def lora_layers(backbone) -> list:
    """The backbone's LoRA-enabled layers, in keras-hub's order."""
    return [layer for layer in backbone._flatten_layers(include_self=False) if getattr(layer, "lora_enabled", False)]


def enable(lm, where: Placement, token_ids: list[int] | tuple = ()) -> None:
    """LoRA on the placement's layers (once: its B matrices start at zero) with its alpha, and, for
    `token_ids`, trainable token rows (zero). Call before anything is traced, so one compiled
    function serves base and tuned model. A model whose LoRA is already on elsewhere is refused."""
    current = enabled_placement(lm)
    if current is None:
        if lora_layers(lm.backbone):
            raise PlacementMismatch("this model already has LoRA enabled outside tasks.training.adapter")
        lm.backbone.enable_lora(rank=where.rank, target_layer_names=list(where.layers))
        layers = lora_layers(lm.backbone)
        missing = sorted(set(where.layers) - {layer.name for layer in layers})
        if missing:
            raise ValueError(f"lora_targets {where.targets}: {type(lm.backbone).__name__} has no layer named {missing}")
        for layer in layers:
            # Keras reads it when the layer is traced: alpha / rank scales A @ B in the forward
            # pass and in the merged kernel the exporters read.
            layer.lora_alpha = where.alpha
        lm.backbone._gemma_lora_placement = where
    elif current != where:
        raise _mismatch("this model", current, "the adapter asked for", where)
    if token_ids:
        _enable_token_rows(lm.backbone.token_embedding, [int(i) for i in token_ids])


def trainable_counts(lm) -> dict:
    """Trainable weights by kind: LoRA per target layer name, the token rows, and the total."""
    where = enabled_placement(lm)
    counts: dict = dict.fromkeys(where.layers, 0) if where else {}
    for layer in lora_layers(lm.backbone):
        n = int(layer.lora_kernel_a.numpy().size + layer.lora_kernel_b.numpy().size)
        counts[layer.name] = counts.get(layer.name, 0) + n
    rows = getattr(lm.backbone.token_embedding, "token_rows", None)
    out = {"lora": sum(counts.values()), "lora_by_layer": counts, "token_rows": int(rows.numpy().size) if rows is not None else 0}
    out["total"] = out["lora"] + out["token_rows"]
    return out


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
    """The adapter file: keras-hub's LoRA weights, its placement, then the token rows (if any)."""
    import h5py
    import numpy as np

    where = enabled_placement(lm)
    if where is None:
        raise ValueError("save: LoRA was not enabled through tasks.training.adapter.enable")
    lm.backbone.save_lora_weights(str(path))
    ids = token_ids(lm)
    with h5py.File(path, "a") as f:
        f.create_group(PLACEMENT_GROUP).attrs["json"] = json.dumps(where.to_dict())
        if ids:
            rows = np.asarray(lm.backbone.token_embedding.token_rows.numpy(), dtype="float32")
            group = f.create_group(GROUP)
            group.create_dataset("ids", data=np.asarray(ids, dtype="int64"))
            group.create_dataset("rows", data=rows)


def read_placement(path: Path) -> Placement:
    """The adapter file's placement; a file from before placements were recorded is query/value at
    alpha = rank, the only placement trained then."""
    import h5py

    with h5py.File(path, "r") as f:
        rank = int(f["lora"]["vars"]["rank"][()])
        if PLACEMENT_GROUP not in f:
            return Placement("attention_qv", rank, float(rank))
        d = json.loads(f[PLACEMENT_GROUP].attrs["json"])
    if d.get("targets") not in TARGETS or tuple(d.get("layers", ())) != TARGETS[d["targets"]]:
        raise ValueError(f"adapter file {path} records an unknown placement {d}")
    return Placement(d["targets"], int(d["rank"]), float(d["alpha"]))


def read_token_rows(path: Path) -> tuple[list[int], "object"]:
    """The adapter file's token ids and rows (numpy); ([], None) when it has none."""
    import h5py

    with h5py.File(path, "r") as f:
        if GROUP not in f:
            return [], None
        return [int(i) for i in f[GROUP]["ids"][()]], f[GROUP]["rows"][()]


def _file_positions(path: Path) -> list[int]:
    """The layer positions keras-hub stored weights for (its `lora/<position>` groups)."""
    import h5py

    with h5py.File(path, "r") as f:
        return sorted(int(k) for k in f["lora"] if k.isdigit())


def _checked_placement(path: Path, expected: Placement | None) -> Placement:
    found = read_placement(path)
    if expected is not None and found != expected:
        raise _mismatch(f"adapter file {path}", found, "the configuration", expected)
    return found


def enable_for(lm, path: Path, expected: Placement | None = None) -> None:
    """LoRA and token rows on, at zero, placed and shaped as the adapter file's: the base model
    still, ready to `load` it without retracing. With `expected` (the config's placement), a file
    with another placement is refused."""
    ids, _ = read_token_rows(path)
    enable(lm, _checked_placement(path, expected), ids)


def load(lm, path: Path, expected: Placement | None = None) -> None:
    """The adapter file's weights into `lm` (enabling LoRA and the token rows first if needed). The
    file's placement must be the model's (if its LoRA is on) and `expected`'s (if given)."""
    ids, rows = read_token_rows(path)
    where = _checked_placement(path, expected)
    current = enabled_placement(lm)
    if current is not None and current != where:
        raise _mismatch(f"adapter file {path}", where, "the model it is loaded into", current)
    enable(lm, where, ids)
    positions = _file_positions(path)
    if positions != sorted(lm.backbone._lora_enabled_layers):
        raise PlacementMismatch(
            f"adapter file {path} holds LoRA weights for the layers at positions {positions}; this "
            f"{type(lm.backbone).__name__}'s {where.targets} layers are at {sorted(lm.backbone._lora_enabled_layers)}: "
            "it was trained on another model")
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
