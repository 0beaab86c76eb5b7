import json
import random

import numpy as np
import pytest

from tasks import finetune, preprocess, snapshot
from tasks.pipeline import artifacts
from tasks.training import device, loop
from tasks.pipeline.config import load_config
from tasks.text.prompt_template import example
from tasks.pipeline.storage import StageInputError
from tests.tasks.test_faults import lora_weights

pytestmark = pytest.mark.model

# A task a tiny random model can learn in seconds: answers with a fixed shape ("A lime is green.").
# On real Dolly text a 100k-parameter random model barely moves in a test's time budget; the real
# model's learning on Dolly is shown by the demo's report (Gemma 3 270M).
FRUIT = [("apple", "red"), ("banana", "yellow"), ("lime", "green"), ("plum", "purple"), ("cherry", "red"),
         ("lemon", "yellow"), ("blueberry", "blue"), ("coconut", "brown")]
LEARNABLE = {"num_examples": "64", "heldout_examples": "16", "eval_examples": "16", "epochs": "10",
             "learning_rate": "1e-2", "sequence_length": "64", "batch_size": "4", "log_every_steps": "40"}


def write_learnable_dataset(path):
    rng = random.Random(0)
    rows = []
    for i in range(120):
        thing, colour = rng.choice(FRUIT)
        rows.append({"instruction": f"What colour is a {thing}? Question {i}.", "context": "",
                     "response": f"A {thing} is {colour}.", "category": "open_qa"})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_finetune_lowers_heldout_loss(trained_run, learnable_data):
    run_dir = trained_run("finetune", **LEARNABLE, dataset_source=learnable_data)
    out = run_dir / "finetune"
    result = json.loads((out / artifacts.RESULT).read_text())
    history = json.loads((out / artifacts.HISTORY).read_text())
    base, tuned = result["heldout_base"], result["heldout_tuned"]
    print("held-out base", base, "tuned", tuned)
    assert result["steps"] == len(history) == 16 * 10
    # Measured: loss 6.92 -> 5.94, token accuracy 0.00 -> 0.69.
    assert tuned["loss"] < 0.9 * base["loss"]
    assert tuned["response_perplexity"] < 0.8 * base["response_perplexity"]
    assert tuned["accuracy"] > base["accuracy"] + 0.3
    assert np.mean([h["loss"] for h in history[-16:]]) < np.mean([h["loss"] for h in history[:16]])
    assert (out / artifacts.ADAPTER).stat().st_size > 0
    assert result["config"]["lora_rank"] == 4 and result["trainable_parameters"] > 0


def test_the_stage_is_its_named_steps_in_order(trained_run, tmp_path):
    """setup -> score_base -> train -> keep -> score_tuned -> save, called one by one, give the stage's own
    result: the same adapter, history and scores as `finetune.run` on the same inputs."""
    settings = {"num_examples": "16", "eval_examples": "4"}
    cfg = load_config("tiny_test", settings)
    run_dir = trained_run("finetune", **settings)
    by_run = artifacts.read_finetune_result(run_dir)
    out = tmp_path / "by_hand"
    out.mkdir()
    engine = device.engine_for(cfg)
    with device.dtype_policy(engine["dtype_policy"]):
        s = finetune.setup(cfg, run_dir, engine, fp="by-hand")
        assert s.resume is None and len(s.plan) == 16 // cfg.batch_size and len(s.heldout) == 4
        base = finetune.score_base(s)
        trained = finetune.train(s, base)
        assert [h["step"] for h in trained.history] == list(range(1, len(s.plan) + 1)) and trained.start == 0
        finetune.keep(s, trained)  # keep: last, no validation: nothing to do
        tuned = finetune.score_tuned(s)
        summary = finetune.save(s, trained, base, tuned, out)
    assert summary == {"steps": by_run["steps"], "heldout_loss_base": by_run["heldout_base"]["loss"],
                       "heldout_loss_tuned": by_run["heldout_tuned"]["loss"]}
    untimed = lambda history: [{k: v for k, v in h.items() if k not in ("elapsed_s", "real_tokens_per_s")}  # noqa: E731
                               for h in history]
    assert untimed(json.loads((out / artifacts.HISTORY).read_text())) == untimed(artifacts.read_history(run_dir))
    assert lora_weights(out / artifacts.ADAPTER).keys() == lora_weights(artifacts.adapter_path(run_dir)).keys()
    for name, w in lora_weights(out / artifacts.ADAPTER).items():
        np.testing.assert_array_equal(w, lora_weights(artifacts.adapter_path(run_dir))[name])


def test_only_lora_weights_change():
    import keras

    from tasks.training.loop import build_optimizer
    from tasks.modeling.presets import load_causal_lm

    cfg = load_config("tiny_test", {"learning_rate": "1e-2"})
    keras.utils.set_random_seed(0)
    lm = load_causal_lm("tiny:gemma", sequence_length=32)
    before = {w.path: np.array(w.numpy()) for w in lm.backbone.weights}
    lm.backbone.enable_lora(rank=4)
    lm.compile(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), optimizer=build_optimizer(cfg),
               weighted_metrics=[keras.metrics.SparseCategoricalAccuracy()])
    lm.fit([example("Say hi", "Hi there.", "tutorial")] * 8, epochs=2, batch_size=2, verbose=0)
    after = {w.path: np.array(w.numpy()) for w in lm.backbone.weights}
    lora = [p for p in after if "lora" in p]
    assert lora and set(before) == set(after) - set(lora)
    assert {w.path for w in lm.backbone.trainable_weights} == set(lora)
    for p, w in before.items():
        assert np.array_equal(w, after[p]), f"base weight {p} changed"
    assert any(not np.allclose(after[p], 0) for p in lora if "lora_kernel_b" in p)


def test_optimizer_excludes_bias_and_scale_from_decay():
    import keras

    opt = loop.build_optimizer(load_config("gemma_2b_lora"))
    assert isinstance(opt, keras.optimizers.AdamW)
    assert float(opt.learning_rate) == pytest.approx(5e-5) and opt.weight_decay == pytest.approx(0.01)
    named = lambda name: keras.Variable(np.ones(2), name=name)  # noqa: E731
    assert not opt._use_weight_decay(named("bias")) and not opt._use_weight_decay(named("scale"))
    assert opt._use_weight_decay(named("kernel"))


def test_needs_preprocess_first(tmp_path):
    with pytest.raises(StageInputError, match="preprocess"):
        finetune.run(load_config("tiny_test"), tmp_path)
