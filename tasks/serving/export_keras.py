"""Merge a LoRA adapter into its base model: one keras-hub model without LoRA, and its preset.

Keras computes a LoRA layer's kernel as `_kernel + (alpha / rank) * A @ B`; the merged model holds
exactly that in its plain kernels, so `keras_hub.models.CausalLM.from_preset(<dir>)` loads it with
no code of this project, and the other exporters (Hugging Face, GGUF), which read base kernels
only, see the tuned weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass
class Merged:
    """The tuned weights a plain base model needs: each LoRA layer's merged kernel by its path, and
    the merged embedding rows of the adapter's token rows ({token id: row})."""

    kernels: dict
    token_rows: dict


def _key(layer) -> str:
    """A layer's path in its backbone (decoder_block_0/attention/query): the same in two instances."""
    return layer.path


def tuned_model(preset: str, models_dir: str, adapter_file: Path, expected=None):
    """The base model with the adapter loaded (what the report evaluated)."""
    from tasks.training import adapter
    from tasks.modeling.presets import load_causal_lm

    lm = load_causal_lm(preset, models_dir)
    adapter.load(lm, adapter_file, expected)
    return lm


def merged_weights(tuned, adapter_file: Path) -> Merged:
    """Each LoRA layer's merged kernel (`_kernel + (alpha / rank) * A @ B`) as numpy, and the merged
    token rows."""
    import keras
    import numpy as np

    from tasks.training import adapter

    kernels = {_key(layer): np.asarray(keras.ops.convert_to_numpy(layer.kernel)) for layer in adapter.lora_layers(tuned.backbone)}
    if not kernels:
        raise RuntimeError(f"the adapter {adapter_file} enabled no LoRA layer")
    return Merged(kernels, adapter.merged_token_rows(tuned))


def base_with_kernels(preset: str, models_dir: str, merged: Merged):
    """A fresh base model (no LoRA) holding the `merged` weights (from `merged_weights`). Drop the
    tuned model before calling it, so two models never sit in memory together."""
    from tasks.modeling.presets import load_causal_lm

    lm = load_causal_lm(preset, models_dir)
    if merged.token_rows:
        # Gemma ties its input embedding and output layer: the merged row serves both, as the delta did.
        table = lm.backbone.token_embedding._embeddings
        values = table.numpy()
        for token, row in merged.token_rows.items():
            values[token] = row.astype(values.dtype)
        table.assign(values)
    layers = {_key(layer): layer for layer in lm.backbone._flatten_layers() if hasattr(layer, "_kernel")}
    if len(merged.kernels) != len(set(merged.kernels) & set(layers)):
        raise RuntimeError(f"merged kernels {sorted(set(merged.kernels) - set(layers))} have no layer in a fresh {preset}")
    for path, kernel in merged.kernels.items():
        layer = layers[path]
        if tuple(layer._kernel.shape) != kernel.shape:
            raise RuntimeError(f"merged kernel of {path} has shape {kernel.shape}, the base's is {tuple(layer._kernel.shape)}")
        layer._kernel.assign(kernel.astype(layer._kernel.dtype))
    return lm


def write_preset(lm, out: Path) -> None:
    lm.save_to_preset(str(out))
