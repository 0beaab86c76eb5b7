"""A merged keras-hub Gemma as GGUF for llama.cpp, Ollama and LM Studio, plus an Ollama Modelfile.

The inverse of tasks/modeling/gguf_import.py, written to llama.cpp's own conventions for the `gemma` (Gemma 1)
and `gemma3` architectures: tensors named `token_embd`, `output_norm`, `blk.N.*`; every RMSNorm
weight stored as `1 + w` (keras-hub computes `x * (1 + scale)`, llama.cpp `x * w`); no `output`
tensor (the LM head is tied to the embedding); the SentencePiece vocabulary as `tokenizer.ggml.*`
with token types, scores and the special ids. Norms stay float32; the matrices are float16 or Q8_0
(quantized in Python, bit-exact with ggml). What llama.cpp hard-codes for these architectures (RoPE
bases, Gemma 3's sliding-window pattern, no logit soft-caps) is checked first: a model that differs
is refused, never written wrong.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tasks.modeling import gguf_tensors
from tasks.pipeline import storage

FORMATS = {"f16": "F16", "q8_0": "Q8_0"}
_SP_SPACE = "\u2581"
# Pieces llama.cpp's converter marks CONTROL (chat-turn markers): parsed as special, never split.
_CHAT_MARKERS = ("<start_of_turn>", "<end_of_turn>")


class GGUFExportError(storage.PermanentError):
    """The model cannot be written as GGUF faithfully; the message says why."""


def architecture(backbone) -> str:
    """`gemma` or `gemma3`; an error for what llama.cpp would run differently from keras-hub."""
    name = type(backbone).__name__
    if name == "Gemma3Backbone":
        if getattr(backbone, "vision_encoder", None) is not None:
            raise GGUFExportError("Gemma 3 with a vision encoder: only text models are exported")
        if backbone.attention_logit_soft_cap or backbone.final_logit_soft_cap:
            raise GGUFExportError("Gemma 3 with logit soft-caps: llama.cpp's gemma3 has none")
        if backbone.local_rope_scaling_factor != 1.0 or backbone.global_rope_scaling_factor != 1.0:
            raise GGUFExportError("Gemma 3 with RoPE scaling: not written by this exporter")
        for i in range(backbone.num_layers):
            block = backbone.get_layer(f"decoder_block_{i}")
            sliding = backbone.use_sliding_window_attention and i % 6 < 5
            want = 10_000.0 if sliding else 1_000_000.0
            if float(block.rope_wavelength) != want or bool(block.use_sliding_window_attention) != sliding:
                raise GGUFExportError(f"Gemma 3 layer {i}: RoPE base or sliding window differs from llama.cpp's gemma3")
        if not (backbone.use_query_key_norm and backbone.use_post_ffw_norm and backbone.use_post_attention_norm):
            raise GGUFExportError("Gemma 3 without q/k or post norms: llama.cpp's gemma3 requires them")
        if not backbone.query_head_dim_normalize and backbone.num_layers != 62:
            raise GGUFExportError("Gemma 3 query scaling by hidden/heads: llama.cpp uses it for the 27B only")
        return "gemma3"
    if name == "GemmaBackbone":
        if (backbone.use_post_ffw_norm or backbone.use_post_attention_norm or backbone.final_logit_soft_cap
                or backbone.attention_logit_soft_cap or backbone.use_sliding_window_attention):
            raise GGUFExportError(
                "Gemma 2 is not exportable yet: its extra norms, soft-caps and sliding window need their own "
                "weight mapping (export the keras-hub preset instead)")
        if not backbone.query_head_dim_normalize:
            raise GGUFExportError("Gemma 1 query scaling by hidden/heads: llama.cpp's gemma scales by head_dim")
        return "gemma"
    raise GGUFExportError(f"{name} is not a Gemma backbone this exporter knows (gemma, gemma3)")


def _tensors(backbone, arch: str) -> dict[str, Any]:
    """GGUF tensor name -> numpy array in GGUF's (numpy) layout, from the keras variables."""
    import numpy as np

    return {name: t.to_gguf(np.asarray(t.variable.numpy(), dtype=np.float32))
            for name, t in gguf_tensors.tensors(backbone, arch).items()}


def vocabulary(tokenizer) -> dict:
    """tokens, scores, token types and special ids from the SentencePiece model keras-hub holds."""
    from sentencepiece import sentencepiece_model_pb2 as sp_pb2

    proto = sp_pb2.ModelProto()
    raw = tokenizer.proto
    proto.ParseFromString(raw if isinstance(raw, bytes) else Path(raw).read_bytes())
    tokens, scores, types = [], [], []
    for piece in proto.pieces:
        text, ptype = piece.piece, int(piece.type)
        if text in _CHAT_MARKERS:
            ptype = gguf_tensors.CONTROL
        if ptype == gguf_tensors.USER_DEFINED:
            # llama.cpp matches user-defined pieces in raw text, where a space is a space.
            text = text.replace(_SP_SPACE, " ")
        tokens.append(text)
        scores.append(float(piece.score))
        types.append(ptype)  # SentencePiece's piece types are llama.cpp's token types
    ids = {name: tokenizer.token_to_id(piece) for name, piece in
           (("bos", "<bos>"), ("eos", "<eos>"), ("unk", "<unk>"), ("pad", "<pad>"))}
    if proto.normalizer_spec.add_dummy_prefix:
        raise GGUFExportError("the tokenizer adds a dummy prefix; Gemma's does not")
    return {"tokens": tokens, "scores": scores, "types": types, "ids": ids}


def write(lm, path: Path, fmt: str, name: str, context_length: int) -> Path:
    """Write `lm` (a merged Gemma causal LM, no LoRA) as GGUF in `fmt` ("f16" or "q8_0")."""
    import gguf
    import numpy as np

    backbone = lm.backbone
    arch = architecture(backbone)
    qtype = getattr(gguf.GGMLQuantizationType, FORMATS[fmt])
    vocab = vocabulary(lm.preprocessor.tokenizer)
    with storage.publishing(Path(path), directory=False) as tmp:
        w = gguf.GGUFWriter(str(tmp), arch)
        w.add_name(name)
        w.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if fmt == "f16" else gguf.LlamaFileType.MOSTLY_Q8_0)
        w.add_context_length(context_length)
        w.add_embedding_length(backbone.hidden_dim)
        w.add_block_count(backbone.num_layers)
        # keras-hub's Gemma 1 intermediate_dim counts both gate halves; llama.cpp's is one.
        w.add_feed_forward_length(backbone.intermediate_dim // (2 if arch == "gemma" else 1))
        w.add_head_count(backbone.num_query_heads)
        w.add_head_count_kv(backbone.num_key_value_heads)
        w.add_key_length(backbone.head_dim)
        w.add_value_length(backbone.head_dim)
        w.add_layer_norm_rms_eps(float(backbone.layer_norm_epsilon))
        if arch == "gemma3":
            w.add_rope_freq_base(1_000_000.0)
            if backbone.use_sliding_window_attention:
                w.add_sliding_window(int(backbone.sliding_window_size))
        w.add_tokenizer_model("llama")
        w.add_token_list(vocab["tokens"])
        w.add_token_scores(vocab["scores"])
        w.add_token_types(vocab["types"])
        w.add_bos_token_id(vocab["ids"]["bos"])
        w.add_eos_token_id(vocab["ids"]["eos"])
        w.add_unk_token_id(vocab["ids"]["unk"])
        w.add_pad_token_id(vocab["ids"]["pad"])
        w.add_add_bos_token(True)
        w.add_add_eos_token(False)
        w.add_add_space_prefix(False)
        for tname, array in _tensors(backbone, arch).items():
            if array.ndim == 1 or array.shape[-1] % gguf.GGML_QUANT_SIZES[qtype][0]:
                w.add_tensor(tname, array.astype(np.float32))
            elif fmt == "f16":
                w.add_tensor(tname, array.astype(np.float16))
            else:
                w.add_tensor(tname, gguf.quants.quantize(array, qtype), raw_dtype=qtype)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    return Path(path)


def modelfile(gguf_name: str, prompt_template: str, stops: list[str]) -> str:
    """An Ollama Modelfile: the exact prompt format the model was tuned on, and where it stops.

    `prompt_template` has one `{instruction}` field; Ollama's TEMPLATE names it `.Prompt`."""
    template = prompt_template.replace("{instruction}", "{{ .Prompt }}")
    lines = [f"FROM ./{gguf_name}", f'TEMPLATE """{template}"""']
    lines += [f'PARAMETER stop "{s}"' for s in stops]
    return "\n".join(lines) + "\n"
