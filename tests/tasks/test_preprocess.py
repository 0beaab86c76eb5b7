import json

import pytest

from tasks import preprocess, snapshot
from tasks.pipeline import artifacts
from tasks.text import records as record_shape
from tasks.pipeline.config import ConfigError, load_config
from tasks.pipeline.storage import StageInputError

pytestmark = pytest.mark.model


def run_both(run_dir, **overrides):
    cfg = load_config("tiny_test", {k: str(v) for k, v in overrides.items()})
    snapshot.run(cfg, run_dir)
    preprocess.run(cfg, run_dir)
    out = run_dir / "preprocess"
    read = lambda name: [json.loads(x) for x in (out / name).read_text().splitlines()]  # noqa: E731
    return read("train.jsonl"), read("heldout.jsonl"), json.loads((out / artifacts.MANIFEST).read_text())


def test_template_split_and_drops(tmp_path):
    train, held, manifest = run_both(tmp_path, num_examples=40, heldout_examples=20)
    records = {json.loads(x)["id"]: json.loads(x) for x in (tmp_path / "snapshot/records.jsonl").read_text().splitlines()}
    assert len(train) == 40 and len(held) == 20
    assert not {r["id"] for r in train} & {r["id"] for r in held}
    for r in train:
        src = records[r["id"]]
        assert src["context"].strip() == ""
        assert r["text"] == f"Instruction:\n{record_shape.instruction(src)}\n\nResponse:\n{record_shape.response(src)}"
    for r in held:
        assert r["prompt"] == f"Instruction:\n{r['instruction']}\n\nResponse:\n"
        assert r["text"] == r["prompt"] + r["response"]
    with_context = sum(1 for r in records.values() if r["context"].strip())
    assert manifest["dropped"]["has_context"] == with_context
    assert manifest["rows_usable"] == len(records) - sum(manifest["dropped"].values())


def test_token_lengths_use_the_model_tokenizer(tmp_path):
    from tasks.modeling.presets import load_tokenizer

    train, _, manifest = run_both(tmp_path, num_examples=30, heldout_examples=5, sequence_length=64)
    tok = load_tokenizer("tiny:gemma")
    for r in train[:5]:
        assert r["n_tokens"] == len(tok(r["text"])) + 2  # <bos> and <eos>
    stats = manifest["train_token_lengths"]
    assert stats["over_sequence_length"] == sum(1 for r in train if r["n_tokens"] > 64)
    assert sum(b["count"] for b in stats["histogram"]) == 30


def test_seeded_and_heldout_stable_when_num_examples_changes(tmp_path):
    t1, h1, _ = run_both(tmp_path / "a", num_examples=20, heldout_examples=10, subset_seed=7)
    t2, h2, _ = run_both(tmp_path / "b", num_examples=20, heldout_examples=10, subset_seed=7)
    t3, h3, _ = run_both(tmp_path / "c", num_examples=50, heldout_examples=10, subset_seed=7)
    t4, _, _ = run_both(tmp_path / "d", num_examples=20, heldout_examples=10, subset_seed=8)
    assert [r["id"] for r in t1] == [r["id"] for r in t2]
    assert [r["id"] for r in h1] == [r["id"] for r in h3]
    assert [r["id"] for r in t3[:20]] == [r["id"] for r in t1]
    assert [r["id"] for r in t4] != [r["id"] for r in t1]


def test_keep_context_rows(tmp_path):
    _, _, manifest = run_both(tmp_path, drop_context="false", num_examples=30, heldout_examples=5)
    assert "has_context" not in manifest["dropped"]
    assert manifest["rows_usable"] == manifest["rows_in"] - sum(manifest["dropped"].values())


def test_too_few_rows_names_the_settings(tmp_path):
    with pytest.raises(ConfigError) as e:
        run_both(tmp_path, num_examples=5000, heldout_examples=16)
    assert "num_examples (5000)" in str(e.value) and "heldout_examples" in str(e.value)
    assert (tmp_path / "snapshot" / "_SUCCESS").is_file()  # what was written before stays
    assert not (tmp_path / "preprocess").exists()


def test_needs_snapshot_first(tmp_path):
    with pytest.raises(StageInputError, match="snapshot"):
        preprocess.run(load_config("tiny_test"), tmp_path)
