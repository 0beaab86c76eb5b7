
import pytest

from tasks.pipeline import artifacts
from tasks.pipeline.config import load_config
from tasks.generate import answer, compile_for_generation, stop_token_ids
from tasks.pipeline.prompt_suite import load_suite
from tasks.pipeline.storage import StageInputError

pytestmark = pytest.mark.model

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

    from tasks.modeling.presets import load_causal_lm

    cfg = load_config("tiny_test", {"max_length": "40", "generate_batch_size": "2"})
    keras.utils.set_random_seed(0)
    lm = load_causal_lm("tiny:gemma")
    compile_for_generation(lm, cfg)
    prompts = load_suite("v1")["prompts"][:3]
    free = answer(lm, prompts, cfg, "test", stops=[])
    for a in free:  # no stop token: every answer runs to max_length
        assert a["hit_max_length"] and not a["stopped_at_eos"]
        assert a["tokens"] > 0
    # Make the first token greedy decoding picks a stop token: the answer is then empty and stopped.
    from tasks.text.prompt_template import instruction_prompt

    tok = lm.preprocessor.tokenizer
    x = lm.preprocessor.generate_preprocess([instruction_prompt(prompts[0]["prompt"], "tutorial")], sequence_length=40)
    n = int(keras.ops.convert_to_numpy(x["padding_mask"]).sum())
    first = keras.ops.convert_to_numpy(lm(x))[0, n - 1].argmax()
    stopped = answer(lm, prompts[:1], cfg, "test", stops=[int(first)])
    assert stopped[0]["stopped_at_eos"] and stopped[0]["tokens"] == 0 and stopped[0]["text"] == ""
    assert tok.end_token_id in stop_token_ids(tok)


def test_xla_and_the_graph_give_the_same_greedy_answers():
    """generate_xla compiles the whole decoding loop; it must not change what greedy decoding says."""
    import keras

    from tasks.modeling.presets import load_causal_lm

    prompts = load_suite("v1")["prompts"][:6]
    texts = {}
    for xla in (False, True):
        cfg = load_config("tiny_test", {"max_length": "40", "generate_batch_size": "3", "sampler": "greedy",
                                        "generate_xla": str(xla).lower()})
        keras.utils.set_random_seed(0)
        lm = load_causal_lm("tiny:gemma")
        compile_for_generation(lm, cfg)
        assert lm.jit_compile is xla
        texts[xla] = [(a["text"], a["tokens"], a["stopped_at_eos"]) for a in answer(lm, prompts, cfg, f"xla={xla}")]
    assert texts[True] == texts[False]
    assert any(t for t, _, _ in texts[True])


def test_needs_finetune_first(tmp_path):
    from tasks import generate

    with pytest.raises(StageInputError, match="finetune"):
        generate.run(load_config("tiny_test"), tmp_path)


def test_batches_are_equal_sized_longest_first_and_cover_every_prompt():
    from tasks.generate import batches

    lengths = [5, 30, 12, 30, 7, 19, 3, 25, 11, 14]
    plan = batches(lengths, 4)
    # 10 prompts, at most 4 per batch: 3 batches of size 4 (the last one padded with copies).
    assert [len(b) for b in plan] == [4, 4, 2]
    assert sorted(i for b in plan for i in b) == list(range(10))
    flat = [lengths[i] for b in plan for i in b]
    assert flat == sorted(lengths, reverse=True)
    assert [len(b) for b in batches(list(range(40)), 32)] == [20, 20]
    assert [len(b) for b in batches(list(range(106)), 32)] == [27, 27, 27, 25]
    assert batches([], 8) == []


def test_one_model_answers_as_a_fresh_base_and_a_fresh_tuned_model(tiny_run):
    """The stage answers with one loaded model (LoRA enabled at zero, then the adapter loaded); its
    answers equal those of a base model without LoRA and of a freshly built tuned model."""
    import keras

    from tasks.generate import reset_sampler
    from tasks.modeling.presets import load_causal_lm

    cfg = load_config("tiny_test")
    data = artifacts.read_answers(tiny_run)
    prompts = load_suite("v1")["prompts"][:6]
    adapter = artifacts.adapter_path(tiny_run)

    def fresh(tuned: bool):
        lm = load_causal_lm(cfg.model_preset, cfg.models_dir)
        if tuned:
            lm.backbone.enable_lora(rank=cfg.lora_rank)
            lm.backbone.load_lora_weights(str(adapter))
        compile_for_generation(lm, cfg)
        return [a["text"] for a in answer(lm, prompts, cfg, "fresh")]

    for model in ("base", "tuned"):
        assert [a["text"] for a in data["models"][model][:6]] == fresh(model == "tuned")
    # The sampler's random state goes back to its seed between the models.
    topk = load_config("tiny_test", {"sampler": "top_k", "top_k": "5"})
    lm = load_causal_lm(cfg.model_preset, cfg.models_dir)
    sampler = compile_for_generation(lm, topk)
    start = [g.state.numpy() for g in sampler._seed_generators]
    first = [a["text"] for a in answer(lm, prompts, topk, "top-k")]
    again = [a["text"] for a in answer(lm, prompts, topk, "top-k")]
    reset_sampler(sampler, start)
    assert [a["text"] for a in answer(lm, prompts, topk, "top-k")] == first != again
    keras.backend.clear_session()
