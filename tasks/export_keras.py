"""Merge a LoRA adapter into its base model: one keras-hub model without LoRA, and its preset.

Keras computes a LoRA layer's kernel as `_kernel + (alpha / rank) * A @ B`; the merged model holds
exactly that in its plain kernels, so `keras_hub.models.CausalLM.from_preset(<dir>)` loads it with
no code of this project, and the other exporters (Hugging Face, GGUF), which read base kernels
only, see the tuned weights.
"""

from __future__ import annotations

from pathlib import Path


def lora_layers(backbone) -> list:
    """Every layer with LoRA enabled, in a stable order."""
    return [layer for layer in backbone._flatten_layers() if getattr(layer, "lora_enabled", False)]


def _key(layer) -> str:
    """A layer's path in its backbone (decoder_block_0/attention/query): the same in two instances."""
    return layer.path


def tuned_model(preset: str, models_dir: str, lora_rank: int, adapter: Path):
    """The base model with the adapter loaded (what the report evaluated)."""
    from tasks.models import load_causal_lm

    lm = load_causal_lm(preset, models_dir)
    lm.backbone.enable_lora(rank=lora_rank)
    lm.backbone.load_lora_weights(str(adapter))
    return lm


def merged_kernels(tuned, adapter: Path) -> dict:
    """Each LoRA layer's merged kernel (`_kernel + (alpha / rank) * A @ B`) by its path, as numpy."""
    import keras
    import numpy as np

    merged = {_key(layer): np.asarray(keras.ops.convert_to_numpy(layer.kernel)) for layer in lora_layers(tuned.backbone)}
    if not merged:
        raise RuntimeError(f"the adapter {adapter} enabled no LoRA layer")
    return merged


def base_with_kernels(preset: str, models_dir: str, merged: dict):
    """A fresh base model (no LoRA) whose kernels are `merged` (from `merged_kernels`). Drop the
    tuned model before calling it, so two models never sit in memory together."""
    from tasks.models import load_causal_lm

    lm = load_causal_lm(preset, models_dir)
    layers = {_key(layer): layer for layer in lm.backbone._flatten_layers() if hasattr(layer, "_kernel")}
    if len(merged) != len(set(merged) & set(layers)):
        raise RuntimeError(f"merged kernels {sorted(set(merged) - set(layers))} have no layer in a fresh {preset}")
    for path, kernel in merged.items():
        layer = layers[path]
        if tuple(layer._kernel.shape) != kernel.shape:
            raise RuntimeError(f"merged kernel of {path} has shape {kernel.shape}, the base's is {tuple(layer._kernel.shape)}")
        layer._kernel.assign(kernel.astype(layer._kernel.dtype))
    return lm


def write_preset(lm, out: Path) -> None:
    lm.save_to_preset(str(out))
