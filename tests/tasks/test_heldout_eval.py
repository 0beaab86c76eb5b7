"""Held-out scoring: the length-bucketed graph gives what scoring every example at full width does."""

import math

import numpy as np
import pytest

from tasks.text.batching import encode
from tasks.evaluate.heldout_eval import score_heldout, summary
from tasks.modeling.presets import load_causal_lm
from tasks.text.prompt_template import example, instruction_prompt

pytestmark = pytest.mark.model


def full_width_scores(lm, rows, sequence_length):
    """The plain definition: every example padded to the sequence length, cross-entropy in numpy."""
    import keras

    enc = encode(lm.preprocessor.tokenizer, rows, sequence_length)
    x = {"token_ids": enc["token_ids"], "padding_mask": enc["padding_mask"]}
    logits = np.asarray(keras.ops.convert_to_numpy(lm(x, training=False)), dtype="float64")
    m = logits.max(axis=-1, keepdims=True)
    logz = np.log(np.exp(logits - m).sum(axis=-1)) + m[..., 0]
    ce = logz - np.take_along_axis(logits, enc["labels"][..., None], axis=-1)[..., 0]
    return ce, enc


@pytest.mark.parametrize("preset,xla", [("tiny:gemma", False), ("tiny:gemma3", False), ("tiny:gemma3", True)])
def test_bucketed_scores_equal_full_width_scores(preset, xla):
    """Graph (any width) and XLA (two widths, short batches filled with empty rows) alike."""
    lm = load_causal_lm(preset, "", 64)
    pairs = [("Say " + "hello " * k, "ok " * (k % 5 + 1)) for k in range(11)]
    rows = [{"prompt": instruction_prompt(i, "tutorial"), "text": example(i, r, "tutorial")} for i, r in pairs]
    scores = score_heldout(lm, rows, 64, batch_size=4, xla=xla)
    ce, enc = full_width_scores(lm, rows, 64)
    mask, resp = enc["label_mask"], enc["response_mask"]
    assert scores["examples"] == 11 and len(scores["per_example"]) == 11
    # Rows of different lengths: the graph really ran at several widths.
    assert len(set(enc["padding_mask"].sum(axis=1))) > 3
    for i, pe in enumerate(scores["per_example"]):
        assert pe["tokens"] == int(mask[i].sum()) and pe["response_tokens"] == int(resp[i].sum())
        assert pe["loss_sum"] == pytest.approx(float((ce[i] * mask[i]).sum()), rel=1e-4)
        assert pe["response_loss_sum"] == pytest.approx(float((ce[i] * resp[i]).sum()), rel=1e-4)
    assert scores["loss"] == pytest.approx(float((ce * mask).sum() / mask.sum()), rel=1e-4)
    assert scores["response_perplexity"] == pytest.approx(math.exp((ce * resp).sum() / resp.sum()), rel=1e-4)
    assert "per_example" not in summary(scores) and summary(scores)["loss"] == scores["loss"]


def test_later_scores_reuse_the_widths_the_first_compiled():
    """finetune scores the held-out examples and, while training, the validation examples with one
    XLA scorer: the later calls take the widths the first one compiled (no new compilation of the
    model) and score exactly as on their own."""
    from tasks.evaluate.heldout_eval import sums_fn

    lm = load_causal_lm("tiny:gemma3", "", 64)
    pairs = [("Say " + "hello " * k, "ok " * (k % 5 + 1)) for k in range(11)]
    rows = [{"prompt": instruction_prompt(i, "tutorial"), "text": example(i, r, "tutorial")} for i, r in pairs]
    other = [{"prompt": instruction_prompt(f"Name {k} fruits", "tutorial"), "text": example(f"Name {k} fruits", "apple " * k, "tutorial")}
             for k in range(1, 8)]
    sums, widths = sums_fn(lm, True), set()
    score_heldout(lm, rows, 64, batch_size=4, sums=sums, xla=True, compiled_widths=widths)
    first = set(widths)
    assert 1 <= len(first) <= 2
    shared = score_heldout(lm, other, 64, batch_size=4, sums=sums, xla=True, compiled_widths=widths)
    assert widths == first  # nothing new compiled
    alone = score_heldout(lm, other, 64, batch_size=4, xla=True)
    assert shared["loss"] == pytest.approx(alone["loss"], rel=1e-5)
    assert shared["response_loss"] == pytest.approx(alone["response_loss"], rel=1e-5)


def test_lora_enabled_at_zero_scores_exactly_as_the_base():
    """finetune enables LoRA (and the chat template's token rows) before scoring the base model
    (one traced scorer for both): the B matrices and rows start at zero, so the base scores are the
    base model's, to the last digit."""
    from tasks.training import adapter

    lm = load_causal_lm("tiny:gemma3", "", 64)
    rows = [{"prompt": instruction_prompt(f"Name {k} fruits.", "tutorial"), "text": example(f"Name {k} fruits.", "apple " * k, "tutorial")}
            for k in range(1, 7)]
    before = score_heldout(lm, rows, 64, batch_size=4)
    ids = adapter.template_token_ids(lm.preprocessor.tokenizer, "gemma_chat", "auto")
    assert len(ids) == 2
    adapter.enable(lm, adapter.Placement("attention_qv", 4, 4.0), ids)
    adapter.enable(lm, adapter.Placement("attention_qv", 4, 4.0), ids)  # once only
    assert score_heldout(lm, rows, 64, batch_size=4) == before
