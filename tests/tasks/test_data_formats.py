"""Bring your own data: every format and file type reaches one record shape; templates and masks.

The files are written by `datasets` itself (to_json, to_parquet, to_csv), the way a team exports
its own data; the records are read back by the snapshot stage.
"""

import json

import numpy as np
import pytest

from tasks import preprocess, snapshot
from tasks.text import prompt_template, records
from tasks.pipeline import artifacts, snapshot_store, storage
from tasks.text.batching import encode
from tasks.pipeline.config import BUNDLED_DOLLY, ConfigError, load_config
from tasks.pipeline.sources import SnapshotError

pytestmark = pytest.mark.model

DOLLY = [json.loads(x) for x in BUNDLED_DOLLY.read_text(encoding="utf-8").splitlines()[:40]]


def as_dolly(r):
    return {k: r[k] for k in ("instruction", "context", "response", "category")}


def as_alpaca(r):
    return {"instruction": r["instruction"], "input": r["context"], "output": r["response"], "category": r["category"]}


def as_columns(r):
    return {"question": r["instruction"], "passage": r["context"], "answer": r["response"], "kind": r["category"]}


COLUMNS = {"instruction": "question", "response": "answer", "context": "passage", "category": "kind"}


def as_openai(r):
    return {"messages": [{"role": "user", "content": r["instruction"]}, {"role": "assistant", "content": r["response"]}],
            "category": r["category"]}


def as_sharegpt(r):
    return {"conversations": [{"from": "human", "value": r["instruction"]}, {"from": "gpt", "value": r["response"]}],
            "category": r["category"]}


def write(rows, path):
    import datasets

    ds = datasets.Dataset.from_list(rows)
    {".jsonl": ds.to_json, ".json": ds.to_json, ".parquet": ds.to_parquet, ".csv": ds.to_csv}[path.suffix](str(path))
    return path


def snap(tmp_path, source, name="r", **kw):
    cfg = load_config("tiny_test", {"dataset_source": str(source), **{k: v if isinstance(v, str) else json.dumps(v)
                                                                      for k, v in kw.items()}})
    snapshot.run(cfg, tmp_path / "runs" / name)
    return artifacts.read_records(tmp_path / "runs" / name), artifacts.read_snapshot_manifest(tmp_path / "runs" / name)


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".parquet", ".csv"])
def test_every_single_turn_format_and_file_type_reaches_the_same_record(tmp_path, suffix):
    want, _ = snap(tmp_path, write([as_dolly(r) for r in DOLLY], tmp_path / "d.jsonl"), "want")
    for fmt, shape, extra in [("dolly", as_dolly, {}), ("alpaca", as_alpaca, {}), ("columns", as_columns, {"dataset_columns": COLUMNS})]:
        got, manifest = snap(tmp_path, write([shape(r) for r in DOLLY], tmp_path / f"{fmt}{suffix}"), fmt,
                             dataset_format=fmt, **extra)
        assert got == want, (fmt, suffix)
        assert manifest["dataset_format"] == fmt and manifest["sha256"] == snapshot_store.content_sha256(want)
    # The normalized shape, and Dolly's ids unchanged by it (old snapshot stores still diff by id).
    first = want[0]
    assert first["messages"] == [{"role": "user", "content": DOLLY[0]["instruction"]},
                                 {"role": "assistant", "content": DOLLY[0]["response"]}]
    assert first["context"] == DOLLY[0]["context"] and first["category"] == DOLLY[0]["category"]
    legacy = "\x1f".join(DOLLY[0][f] for f in ("instruction", "context", "response"))
    import hashlib
    assert first["id"] == hashlib.sha1(legacy.encode()).hexdigest()[:12]


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_openai_and_sharegpt_messages_reach_the_same_record(tmp_path, suffix):
    rows = [r for r in DOLLY if not r["context"].strip()]
    a, ma = snap(tmp_path, write([as_openai(r) for r in rows], tmp_path / f"o{suffix}"), "o", dataset_format="messages")
    b, mb = snap(tmp_path, write([as_sharegpt(r) for r in rows], tmp_path / f"s{suffix}"), "s", dataset_format="messages")
    assert a == b and len(a) == len(rows)
    assert ma["chat_styles"] == {"openai": len(rows)} and mb["chat_styles"] == {"sharegpt": len(rows)}
    # A single-turn conversation is the same record as the Dolly row it came from.
    d, _ = snap(tmp_path, write([as_dolly(r) for r in rows], tmp_path / "d.jsonl"), "d")
    assert a == d


def test_auto_detects_each_format_and_says_so(tmp_path):
    for fmt, shape in [("dolly", as_dolly), ("alpaca", as_alpaca), ("messages", as_openai), ("messages", as_sharegpt)]:
        name = f"{fmt}-{shape.__name__}"
        _, manifest = snap(tmp_path, write([shape(r) for r in DOLLY], tmp_path / f"{name}.jsonl"), name, dataset_format="auto")
        assert manifest["dataset_format"] == fmt and manifest["format_detected"] is True
    with pytest.raises(SnapshotError, match=r"cannot tell the format.*\['answer', 'kind', 'passage', 'question'\]"):
        snap(tmp_path, write([as_columns(r) for r in DOLLY], tmp_path / "c.jsonl"), "c", dataset_format="auto")


def test_a_mapping_naming_a_missing_column_fails_at_once_listing_the_columns(tmp_path):
    for suffix in (".jsonl", ".parquet", ".csv"):
        src = write([as_columns(r) for r in DOLLY], tmp_path / f"c{suffix}")
        with pytest.raises(SnapshotError) as e:
            snap(tmp_path, src, f"c{suffix}", dataset_format="columns",
                 dataset_columns={"instruction": "question", "response": "reply"})
        assert "response='reply'" in str(e.value) and "['answer', 'kind', 'passage', 'question']" in str(e.value)
        assert not (tmp_path / "runs" / f"c{suffix}" / "snapshot").exists()
    with pytest.raises(ConfigError, match="needs a column for \\['response'\\]"):
        load_config("tiny_test", {"dataset_format": "columns", "dataset_columns": '{"instruction": "q"}'})
    with pytest.raises(ConfigError, match="applies to dataset_format 'columns' only"):
        load_config("tiny_test", {"dataset_columns": '{"instruction": "q", "response": "a"}'})


CHAT_BAD = {
    "no_assistant_turn": {"messages": [{"role": "user", "content": "Hi?"}]},
    "unknown_role": {"messages": [{"role": "tool", "content": "x"}, {"role": "assistant", "content": "y"}]},
    "wrong_type": {"messages": [{"role": "user", "content": ["not", "text"]}, {"role": "assistant", "content": "y"}]},
    "empty_conversation": {"messages": []},
    "turn_order": {"messages": [{"role": "assistant", "content": "y"}, {"role": "user", "content": "x"},
                                {"role": "assistant", "content": "z"}]},
    "empty_turn": {"conversations": [{"from": "human", "value": " "}, {"from": "gpt", "value": "y"}]},
}


def test_chat_records_that_do_not_fit_are_bad_records_with_their_reason(tmp_path):
    good = [as_openai(r) for r in DOLLY]
    src = tmp_path / "m.jsonl"
    src.write_text("".join(json.dumps(x) + "\n" for x in good + list(CHAT_BAD.values())), encoding="utf-8")
    _, manifest = snap(tmp_path, src, "m", dataset_format="messages", max_bad_share="0.2")
    v = manifest["validation"]
    assert v["bad_by_reason"] == {reason: 1 for reason in CHAT_BAD}
    assert [x["where"] for x in v["bad_examples"]] == [f"line {len(good) + i}" for i in range(1, len(CHAT_BAD) + 1)]
    with pytest.raises(SnapshotError, match=rf"line {len(good) + 1}: field 'messages' has no assistant turn \[no_assistant_turn\]"):
        snap(tmp_path, src, "m2", dataset_format="messages", bad_record_policy="fail")


def conversation(system=""):
    msgs = [{"role": "system", "content": system}] if system else []
    return msgs + [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."},
                   {"role": "user", "content": "And a fruit?"}, {"role": "assistant", "content": "A pear."},
                   {"role": "user", "content": "One more colour?"}, {"role": "assistant", "content": "Green."}]


def test_templates_render_turns_context_and_system():
    text, spans = prompt_template.render(conversation("Be brief."), "gemma_chat", context="Colours are nice.")
    assert text == ("<start_of_turn>user\nBe brief.\n\nName a colour.\n\nContext:\nColours are nice.<end_of_turn>\n"
                    "<start_of_turn>model\nBlue.<end_of_turn>\n"
                    "<start_of_turn>user\nAnd a fruit?<end_of_turn>\n<start_of_turn>model\nA pear.<end_of_turn>\n"
                    "<start_of_turn>user\nOne more colour?<end_of_turn>\n<start_of_turn>model\nGreen.<end_of_turn>\n")
    # Each answer's span ends with the turn end: what the model learns to say, and where it stops.
    # (the last one also owns the newline and the <eos> that end the sequence).
    assert [text[a:b] for a, b in spans] == ["Blue.<end_of_turn>", "A pear.<end_of_turn>", "Green.<end_of_turn>\n"]
    single = [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "A."}]
    assert prompt_template.render(single, "tutorial", context="C.")[0] == "Instruction:\nQ?\n\nContext:\nC.\n\nResponse:\nA."
    assert prompt_template.render(single, "tutorial")[0] == "Instruction:\nQ?\n\nResponse:\nA."
    assert prompt_template.prompt(single, "gemma_chat") == "<start_of_turn>user\nQ?<end_of_turn>\n<start_of_turn>model\n"
    assert prompt_template.leaks("Sure.<start_of_turn>user\nmore", "gemma_chat")
    assert not prompt_template.leaks("Sure.\n\nInstruction: more", "gemma_chat")
    assert prompt_template.leaks("Sure.\n\nInstruction: more", "tutorial")


@pytest.mark.parametrize("template", prompt_template.TEMPLATES)
def test_three_turn_mask_weights_only_the_assistant_tokens(template):
    from tasks.modeling.presets import load_tokenizer

    tok = load_tokenizer("tiny:gemma3")
    text, spans = prompt_template.render(conversation("Be brief."), template)
    enc = encode(tok, [{"text": text, "spans": spans}], 128, loss_tokens="response")
    labels, w, real = enc["labels"][0], enc["weights"][0], enc["label_mask"][0]
    weighted = labels[w > 0].tolist()
    eos = tok.end_token_id
    assert weighted[-1] == eos and eos not in weighted[:-1]
    if template == "gemma_chat":  # every assistant turn ends with <end_of_turn> in the loss
        eot = tok.token_to_id("<end_of_turn>")
        assert weighted.count(eot) == 3 and weighted[-3:-1] == [eot, np.asarray(tok("\n")).tolist()[0]]
    # The weighted tokens are the assistant turns' tokens, in order, and nothing of the user turns
    # (a token merged across a turn's end, such as ".\n\n", stays with the turn).
    said = "".join(tok.id_to_token(t) for t in weighted[:-1])
    for turn in ("Blue.", "A pear.", "Green."):
        assert turn.replace(" ", "") in said.replace("▁", ""), said
    assert (template == "gemma_chat") == ("<end_of_turn>" in said)
    for user in ("Be", "brief", "Name", "fruit", "more", "model", "Response"):
        assert user not in said, said
    assert real.sum() > len(weighted) + 20  # the user turns and the system message are not weighted
    assert enc["weights"][0].sum() == enc["response_mask"][0].sum()
    every = encode(tok, [{"text": text, "spans": spans}], 128, loss_tokens="all")["weights"][0]
    assert every.sum() == real.sum()


def test_single_turn_spans_mask_equals_the_prompt_prefix_mask():
    from tasks.modeling.presets import load_tokenizer

    tok = load_tokenizer("tiny:gemma")
    rows = []
    for r in DOLLY[:12]:
        msgs = records.single_turn(r["instruction"], r["response"])["messages"]
        text, spans = prompt_template.render(msgs, "tutorial")
        rows.append({"text": text, "spans": spans, "prompt": text[: spans[0][0]]})
    by_spans = encode(tok, rows, 96, "response")
    by_prompt = encode(tok, [{"text": r["text"], "prompt": r["prompt"]} for r in rows], 96, "response")
    assert np.array_equal(by_spans["weights"], by_prompt["weights"])


def test_drop_context_false_puts_the_context_into_the_training_text(tmp_path):
    cfg = load_config("tiny_test", {"drop_context": "false", "num_examples": "40", "heldout_examples": "20"})
    run = tmp_path / "run"
    snapshot.run(cfg, run)
    preprocess.run(cfg, run)
    by_id = {r["id"]: r for r in artifacts.read_records(run)}
    train = artifacts.read_train(run)
    with_context = [t for t in train if by_id[t["id"]]["context"].strip()]
    assert with_context, "the sample has rows with a context"
    for t in with_context:
        r = by_id[t["id"]]
        assert t["text"] == (f"Instruction:\n{records.instruction(r)}\n\nContext:\n{r['context']}\n\nResponse:\n"
                             f"{records.response(r)}")
        assert t["prompt"] == t["text"][: t["spans"][0][0]]
    assert artifacts.read_preprocess_manifest(run)["context_in_prompt"] is True


def test_template_change_is_a_new_fingerprint(tmp_path):
    run = tmp_path / "run"
    cfg = load_config("tiny_test")
    snapshot.run(cfg, run)
    preprocess.run(cfg, run)
    first = storage.completed(run, artifacts.PREPROCESS)["fingerprint"]
    preprocess.run(load_config("tiny_test", {"prompt_template": "gemma_chat"}), run)
    assert storage.completed(run, artifacts.PREPROCESS)["fingerprint"] != first
    assert artifacts.read_train(run)[0]["text"].startswith("<start_of_turn>user\n")


def test_gemma_chat_generation_stops_at_end_of_turn(tmp_path):
    """A model that says <end_of_turn> first (a sampler that always picks it): with gemma_chat's stop
    tokens the answer ends there; without <end_of_turn> among them it runs on to max_length."""
    import keras
    import keras_hub

    from tasks.generate import answer
    from tasks.modeling.presets import load_causal_lm

    cfg = load_config("tiny_test", {"model_preset": "tiny:gemma3", "prompt_template": "gemma_chat", "max_length": "40"})
    lm = load_causal_lm(cfg.model_preset, cfg.models_dir)
    tok = lm.preprocessor.tokenizer
    eot = tok.token_to_id("<end_of_turn>")

    class SaysEndOfTurn(keras_hub.samplers.Sampler):
        def get_next_token(self, probabilities):
            return keras.ops.full(keras.ops.shape(probabilities)[:1], eot, dtype="int32")

    lm.compile(sampler=SaysEndOfTurn())
    prompt = [{"id": "a", "category": "", "prompt": "Name a colour."}]
    stops = prompt_template.stop_token_ids(tok, "gemma_chat")
    assert eot in stops and tok.end_token_id in stops
    [stopped] = answer(lm, prompt, cfg, "test")
    assert stopped["stopped_at_eos"] and not stopped["hit_max_length"] and stopped["tokens"] == 0
    assert stopped["stop_token"] == "<end_of_turn>"
    [ran_on] = answer(lm, prompt, cfg, "test", stops=[tok.end_token_id])
    assert not ran_on["stopped_at_eos"] and ran_on["hit_max_length"] and ran_on["stop_token"] is None
    with pytest.raises(ValueError, match="needs <end_of_turn>"):
        prompt_template.stop_token_ids(type("Vocab", (), {"end_token_id": 1, "token_to_id": lambda self, t: None})(),
                                       "gemma_chat")
