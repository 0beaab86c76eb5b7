"""Token rows (tasks.training.adapter): a trainable delta on a few embedding rows is exactly a model whose
embedding table has those rows changed, on the input side and in the output logits; it trains,
is saved in the adapter file, loads back and merges into a plain model."""

import numpy as np
import pytest

from tasks.training import adapter, device
from tasks.serving import export_keras
from tasks.text.batching import encode
from tasks.modeling.presets import load_causal_lm
from tasks.text.prompt_template import END_OF_TURN, example

pytestmark = pytest.mark.model


def logits(lm, texts, length=48):
    import keras

    rows = [{"prompt": "", "text": t} for t in texts]
    enc = encode(lm.preprocessor.tokenizer, rows, length)
    x = {"token_ids": enc["token_ids"], "padding_mask": enc["padding_mask"]}
    return np.asarray(keras.ops.convert_to_numpy(lm(x, training=False)), dtype="float64")


CHAT = [example("Name a fruit.", "An apple.", "gemma_chat"), example("Say hi.", "Hi there, friend.", "gemma_chat")]


@pytest.mark.parametrize("preset", ["tiny:gemma", "tiny:gemma3"])
def test_token_rows_equal_a_model_with_those_embedding_rows_changed(preset):
    models = ""  # the session's models folder: each tiny model is built once
    lm = load_causal_lm(preset, models, 48)
    base = logits(lm, CHAT)
    ids = adapter.template_token_ids(lm.preprocessor.tokenizer, "gemma_chat", "auto")
    assert ids == [lm.preprocessor.tokenizer.token_to_id(t) for t in ("<start_of_turn>", END_OF_TURN)]
    adapter.enable(lm, adapter.Placement("attention_qv", 4, 4.0), ids)
    np.testing.assert_array_equal(logits(lm, CHAT), base)  # rows start at zero: still the base model
    layer = lm.backbone.token_embedding
    assert [v.path for v in lm.backbone.trainable_weights if "token_rows" in v.path] == [layer.token_rows.path]
    assert not layer._embeddings.trainable
    rng = np.random.default_rng(0)
    layer.token_rows.assign(rng.normal(0, 0.5, layer.token_rows.shape).astype("float32"))
    tuned = logits(lm, CHAT)
    assert np.abs(tuned - base).max() > 1e-2

    # The same rows written into a plain model's table give the same logits: input and output side.
    plain = load_causal_lm(preset, models, 48)
    table = plain.backbone.token_embedding._embeddings
    values = table.numpy()
    for i, row in adapter.merged_token_rows(lm).items():
        values[i] = row
    table.assign(values)
    np.testing.assert_allclose(logits(plain, CHAT), tuned, atol=1e-4)


def test_token_rows_train_save_load_and_merge(tmp_path):
    """A few steps of fit on chat text move the rows (and only them beside LoRA); the adapter file
    holds them; loading it into a fresh model gives the tuned logits; merging gives them without
    LoRA or rows; `trainable_tokens: none` trains no rows."""
    from tasks.training import loop
    from tasks.pipeline.config import load_config

    models = ""  # the session's models folder: each tiny model is built once
    cfg = load_config("tiny_test", {"learning_rate": "0.01", "prompt_template": "gemma_chat", "batch_size": "2",
                               "sequence_length": "48", "train_mode": "tutorial"})
    lm = load_causal_lm("tiny:gemma3", models, 48)
    tok = lm.preprocessor.tokenizer
    ids = adapter.template_token_ids(tok, "gemma_chat", cfg.trainable_tokens)
    adapter.enable(lm, adapter.placement(cfg), ids)
    trainer, _, _ = loop.prepare(lm, cfg, device.engine_for(cfg))
    enc = encode(tok, [{"prompt": "", "text": t} for t in CHAT * 4], 48)
    plan = loop.train_plan([48] * 8, cfg)
    loop.fit(trainer, lm, enc, plan, cfg, [])
    rows = lm.backbone.token_embedding.token_rows.numpy()
    assert np.abs(rows).max() > 1e-3  # <end_of_turn> is in every example's loss
    tuned = logits(lm, CHAT)

    path = tmp_path / "adapter.lora.h5"
    adapter.save(lm, path)
    got_ids, got_rows = adapter.read_token_rows(path)
    assert got_ids == ids
    np.testing.assert_array_equal(got_rows, rows)
    fresh = load_causal_lm("tiny:gemma3", models, 48)
    adapter.load(fresh, path, adapter.placement(cfg))
    np.testing.assert_allclose(logits(fresh, CHAT), tuned, atol=1e-5)

    merged = export_keras.merged_weights(fresh, path)
    assert set(merged.token_rows) == set(ids)
    del fresh
    plain = export_keras.base_with_kernels("tiny:gemma3", models, merged)
    assert not adapter.token_ids(plain)
    np.testing.assert_allclose(logits(plain, CHAT), tuned, atol=1e-4)

    none = load_causal_lm("tiny:gemma3", models, 48)
    assert adapter.template_token_ids(tok, "gemma_chat", "none") == []
    assert adapter.template_token_ids(tok, "tutorial", "auto") == []
    adapter.enable(none, adapter.Placement("attention_qv", 4, 4.0), [])
    adapter.save(none, tmp_path / "plain.lora.h5")
    assert adapter.read_token_rows(tmp_path / "plain.lora.h5") == ([], None)
