"""Small random Gemma-architecture models with a real SentencePiece vocabulary, for tests.

`tiny:gemma` and `tiny:gemma3` are built once into a preset directory (like an imported model) and
then load through the same `from_preset` path as a downloaded Gemma. The vocabulary is trained on
the bundled Dolly sample with the settings Gemma's own tokenizer needs (identity normalisation, no
whitespace squeezing, byte fallback), so the template's newlines survive a round trip.
"""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path

from tasks.pipeline import storage
from tasks.pipeline.config import BUNDLED_DOLLY
from tasks.text.prompt_template import example

log = logging.getLogger("gemma_pipeline")

SPECIAL = ["<start_of_turn>", "<end_of_turn>", "<img>", "<start_of_image>", "<end_of_image>"]

# Small enough that fit + generate take seconds on 2 CPU cores, big enough to learn a template.
SHAPES = {
    "gemma": dict(num_layers=2, num_query_heads=2, num_key_value_heads=1, hidden_dim=64, intermediate_dim=128, head_dim=32),
    "gemma3": dict(num_layers=2, num_query_heads=2, num_key_value_heads=1, hidden_dim=64, intermediate_dim=128, head_dim=32),
}
VOCAB_SIZE = 1000
SEED = 1234


def train_vocab(texts: list[str], vocab_size: int = VOCAB_SIZE) -> bytes:
    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts),
        model_writer=buf,
        vocab_size=vocab_size,
        model_type="bpe",
        pad_id=0,
        eos_id=1,
        bos_id=2,
        unk_id=3,
        pad_piece="<pad>",
        eos_piece="<eos>",
        bos_piece="<bos>",
        unk_piece="<unk>",
        user_defined_symbols=SPECIAL,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=False,
        split_by_whitespace=True,
        byte_fallback=True,
        hard_vocab_limit=False,
        num_threads=1,
        minloglevel=2,
    )
    return buf.getvalue()


def vocab_texts() -> list[str]:
    texts = []
    with BUNDLED_DOLLY.open(encoding="utf-8") as f:
        for line in f:
            rec = json.loads(line)
            texts.append(example(rec["instruction"], rec["response"], "tutorial"))
    return texts


def build_tiny_preset(kind: str, out_dir: Path, sequence_length: int = 256) -> Path:
    """Build `tiny:<kind>` into out_dir (atomically) unless it is already there."""
    if (out_dir / "config.json").is_file():  # published by one rename below
        return out_dir
    if kind not in SHAPES:
        raise ValueError(f"unknown tiny model 'tiny:{kind}'; known: {['tiny:' + k for k in SHAPES]}")
    import keras
    import keras_hub

    # Seed before building the tokenizer: seeding after breaks SentencePiece ops inside fit().
    keras.utils.set_random_seed(SEED)
    proto = train_vocab(vocab_texts())
    shape = SHAPES[kind]
    if kind == "gemma":
        tokenizer = keras_hub.models.GemmaTokenizer(proto=proto)
        backbone = keras_hub.models.GemmaBackbone(vocabulary_size=tokenizer.vocabulary_size(), **shape)
        pre = keras_hub.models.GemmaCausalLMPreprocessor(tokenizer, sequence_length=sequence_length)
        lm = keras_hub.models.GemmaCausalLM(backbone=backbone, preprocessor=pre)
    else:
        tokenizer = keras_hub.models.Gemma3Tokenizer(proto=proto)
        backbone = keras_hub.models.Gemma3Backbone(
            vocabulary_size=tokenizer.vocabulary_size(),
            image_size=896,
            use_post_ffw_norm=True,
            use_post_attention_norm=True,
            use_sliding_window_attention=True,
            sliding_window_size=64,
            **shape,
        )
        pre = keras_hub.models.Gemma3CausalLMPreprocessor(tokenizer, sequence_length=sequence_length)
        lm = keras_hub.models.Gemma3CausalLM(backbone=backbone, preprocessor=pre)
    with storage.publishing(out_dir) as tmp:
        lm.save_to_preset(str(tmp))
    log.info("built tiny:%s (%d parameters) into %s", kind, backbone.count_params(), out_dir)
    return out_dir
