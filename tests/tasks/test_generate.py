
import pytest

from tasks import artifacts
from tasks.config import load_config
from tasks.generate import answer, make_sampler, stop_token_ids
from tasks.prompt_suite import load_suite
from tasks.storage import StageInputError

CATEGORIES = {"open_qa", "general_qa", "classification", "closed_qa", "brainstorming",
              "information_extraction", "summarization", "creative_writing"}


def test_suite_v1_covers_every_category_and_the_tutorial_prompts():
    suite = load_suite("v1")
    prompts = {p["prompt"] for p in suite["prompts"]}
    assert "What should I do on a trip to Europe?" in prompts
    assert "Explain the process of photosynthesis in a way that a child could understand." in prompts
    assert {p["category"] for p in suite["prompts"]} == CATEGORIES
    assert len(suite["prompts"]) >= 24 and len({p["id"] for p in suite["prompts"]}) == len(suite["prompts"])
    assert len(suite["sha256"]) == 64


def test_answers_for_base_and_tuned(tiny_run):
    data = artifacts.read_answers(tiny_run)
    suite = load_suite("v1")
    for model in ("base", "tuned"):
        answers = data["models"][model]
        assert [a["id"] for a in answers] == [p["id"] for p in suite["prompts"]]
        for a in answers:
            assert isinstance(a["text"], str) and a["tokens"] >= 0 and a["batch_seconds"] >= 0
            assert not (a["stopped_at_eos"] and a["hit_max_length"])
    assert data["suite"]["sha256"] == suite["sha256"]
    # Greedy decoding of a LoRA-tuned model differs from its base somewhere in 26 prompts.
    assert [a["text"] for a in data["models"]["base"]] != [a["text"] for a in data["models"]["tuned"]]


def test_stop_and_max_length_are_read_from_token_ids():
    import keras

    from tasks.models import load_causal_lm

    cfg = load_config("tiny_test", {"max_length": "40", "generate_batch_size": "2"})
    keras.utils.set_random_seed(0)
    lm = load_causal_lm("tiny:gemma")
    lm.compile(sampler=make_sampler(cfg))
    prompts = load_suite("v1")["prompts"][:3]
    free = answer(lm, prompts, cfg, "test", stops=[])
    for a in free:  # no stop token: every answer runs to max_length
        assert a["hit_max_length"] and not a["stopped_at_eos"]
        assert a["tokens"] > 0
    # Make the first token greedy decoding picks a stop token: the answer is then empty and stopped.
    from tasks.prompt_template import format_prompt

    tok = lm.preprocessor.tokenizer
    x = lm.preprocessor.generate_preprocess([format_prompt(prompts[0]["prompt"])], sequence_length=40)
    n = int(keras.ops.convert_to_numpy(x["padding_mask"]).sum())
    first = keras.ops.convert_to_numpy(lm(x))[0, n - 1].argmax()
    stopped = answer(lm, prompts[:1], cfg, "test", stops=[int(first)])
    assert stopped[0]["stopped_at_eos"] and stopped[0]["tokens"] == 0 and stopped[0]["text"] == ""
    assert tok.end_token_id in stop_token_ids(tok)


def test_needs_finetune_first(tmp_path):
    from tasks import generate

    with pytest.raises(StageInputError, match="finetune"):
        generate.run(load_config("tiny_test"), tmp_path)
