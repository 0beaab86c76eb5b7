"""The one table between keras-hub's Gemma variables and llama.cpp's GGUF tensors, read both ways:
the importer (tasks.modeling.gguf_import) fills keras variables from a GGUF, the exporter
(tasks.serving.export_gguf) writes them. Each entry has the GGUF name, the keras variable, its
numpy shape in the GGUF and the transform each way:

- every RMSNorm weight is stored as `1 + w` (keras-hub computes `x * (1 + scale)`, llama.cpp `x * w`);
- attention kernels: keras (heads, hidden, head_dim) <-> GGUF (heads * head_dim, hidden), the
  output projection keras (heads, head_dim, hidden) <-> GGUF (hidden, heads * head_dim);
- feed-forward kernels are transposed; the embedding is as is (the LM head is tied to it).

`gemma` (Gemma 1) has the common tensors; `gemma3` adds the post norms and the q/k norms.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

# llama.cpp's token types (gguf.TokenType); SentencePiece numbers its piece types the same way.
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


@dataclass(frozen=True)
class Tensor:
    variable: Any  # the keras variable
    shape: tuple[int, ...]  # numpy shape in the GGUF
    to_keras: Callable  # GGUF array -> the variable's value
    to_gguf: Callable  # the variable's value (float32) -> GGUF array


def tensors(backbone, arch: str) -> dict[str, Tensor]:
    """GGUF tensor name -> Tensor, for a keras-hub Gemma backbone of `arch` (`gemma` or `gemma3`)."""
    import numpy as np

    hidden, head_dim = backbone.hidden_dim, backbone.head_dim
    heads, kv_heads, ffn = backbone.num_query_heads, backbone.num_key_value_heads, backbone.intermediate_dim
    if arch == "gemma":
        ffn //= 2  # keras-hub's Gemma 1 intermediate_dim counts both gate halves

    def norm(variable, width):
        return Tensor(variable, (width,), lambda x: x - np.float32(1.0), lambda x: x + np.float32(1.0))

    def transposed(variable, shape):
        return Tensor(variable, shape, lambda x: np.ascontiguousarray(x.T), lambda x: np.ascontiguousarray(x.T))

    def per_head_in(variable, n_heads):
        return Tensor(variable, (n_heads * head_dim, hidden),
                      lambda x: np.ascontiguousarray(x.reshape(n_heads, head_dim, hidden).transpose(0, 2, 1)),
                      lambda k: np.ascontiguousarray(k.transpose(0, 2, 1).reshape(k.shape[0] * head_dim, hidden)))

    def per_head_out(variable):
        return Tensor(variable, (hidden, heads * head_dim),
                      lambda x: np.ascontiguousarray(x.reshape(hidden, heads, head_dim).transpose(1, 2, 0)),
                      lambda k: np.ascontiguousarray(k.transpose(2, 0, 1).reshape(hidden, -1)))

    def identity(x):
        return x

    table = {
        "token_embd.weight": Tensor(backbone.get_layer("token_embedding").embeddings,
                                    (backbone.vocabulary_size, hidden), identity, identity),
        "output_norm.weight": norm(backbone.get_layer("final_normalization").scale, hidden),
    }
    for i in range(backbone.num_layers):
        block = backbone.get_layer(f"decoder_block_{i}")
        att = block.attention
        p = f"blk.{i}."
        table.update({
            p + "attn_norm.weight": norm(block.pre_attention_norm.scale, hidden),
            p + "ffn_norm.weight": norm(block.pre_ffw_norm.scale, hidden),
            p + "attn_q.weight": per_head_in(att.query_dense.kernel, heads),
            p + "attn_k.weight": per_head_in(att.key_dense.kernel, kv_heads),
            p + "attn_v.weight": per_head_in(att.value_dense.kernel, kv_heads),
            p + "attn_output.weight": per_head_out(att.output_dense.kernel),
            p + "ffn_gate.weight": transposed(block.gating_ffw.kernel, (ffn, hidden)),
            p + "ffn_up.weight": transposed(block.gating_ffw_2.kernel, (ffn, hidden)),
            p + "ffn_down.weight": transposed(block.ffw_linear.kernel, (hidden, ffn)),
        })
        if arch == "gemma3":
            table.update({
                p + "post_attention_norm.weight": norm(block.post_attention_norm.scale, hidden),
                p + "post_ffw_norm.weight": norm(block.post_ffw_norm.scale, hidden),
                p + "attn_q_norm.weight": norm(att.query_norm.scale, head_dim),
                p + "attn_k_norm.weight": norm(att.key_norm.scale, head_dim),
            })
    return table
