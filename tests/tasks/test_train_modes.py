"""The two training modes: `tutorial` (every example padded to the sequence length) and `fast`
(length-bucketed batches padded per batch; XLA on GPUs, one TF graph on CPUs; bf16 where native). Same recipe, same loss, same
resumability. Speed is measured by bench/train_modes.py, not asserted here."""

from pathlib import Path

import numpy as np
import pytest

from tasks import finetune, preprocess, snapshot
from tasks.pipeline import artifacts
from tasks.training import device, loop
from tasks.text.batching import Step, encode, input_lengths, step_arrays
from tasks.training.checkpoints import Checkpoints
from tasks.pipeline.config import ConfigError, load_config
from tests.tasks.test_faults import SETTINGS, TOTAL_STEPS, lora_weights
from tests.tasks.test_finetune import LEARNABLE

pytestmark = pytest.mark.model


def test_defaults_stay_the_tutorial_recipe_and_fast_is_one_setting_away():
    # The seed's recipe in production; the CPU demo trains fast (its YAML has the measurements).
    for name in ("gemma_2b_lora", "tiny_test"):
        assert load_config(name).train_mode == "tutorial"
    assert load_config("cpu_demo").train_mode == "fast"
    cfg = load_config("tiny_test", {"train_mode": "fast"})
    assert (cfg.train_mode, cfg.bucket_multiple, cfg.bucket_shapes, cfg.mixed_precision) == ("fast", 16, 4, "auto")
    with pytest.raises(ConfigError, match="train_mode"):
        load_config("cpu_demo", {"train_mode": "turbo"})
    with pytest.raises(ConfigError, match="bucket_shapes"):
        load_config("cpu_demo", {"bucket_shapes": "0"})
    # A checkpoint of one mode is never resumed by the other: the mode is part of the stage's inputs.
    assert {"train_mode", "bucket_multiple", "bucket_shapes", "mixed_precision"} <= set(finetune.CONFIG_KEYS)


def test_engine_follows_the_device_in_fast_mode_and_the_config_in_tutorial_mode(monkeypatch):
    def engine(**kw):
        return device.engine_for(load_config("tiny_test", kw))

    # A CPU without AMX-BF16: float32, a TF graph for any width.
    monkeypatch.setattr(device, "has_gpu", lambda: False)
    monkeypatch.setattr(device, "cpu_has_bfloat16", lambda: False)
    assert engine(train_mode="fast") == {"jit_compile": False, "dtype_policy": "float32", "max_widths": 0, "devices": []}
    assert engine(train_mode="fast", mixed_precision="bfloat16")["dtype_policy"] == "mixed_bfloat16"
    # cpu_engine xla (what wins on some CPUs): XLA with at most bucket_shapes widths, as on a GPU.
    assert engine(train_mode="fast", cpu_engine="xla", bucket_shapes="3") == {"jit_compile": True, "dtype_policy": "float32", "max_widths": 3, "devices": []}
    assert engine(train_mode="tutorial", cpu_engine="xla", jit_compile="false")["jit_compile"] is False
    # A CPU with it (this machine's Xeon): mixed bfloat16 in fast mode only.
    monkeypatch.setattr(device, "cpu_has_bfloat16", lambda: True)
    assert engine(train_mode="fast")["dtype_policy"] == "mixed_bfloat16"
    assert engine(train_mode="fast", mixed_precision="off")["dtype_policy"] == "float32"
    assert engine(train_mode="tutorial", jit_compile="true") == {"jit_compile": True, "dtype_policy": "float32", "max_widths": 1, "devices": []}
    # GPUs: XLA with at most bucket_shapes widths; bfloat16 only from compute capability 8.0.
    monkeypatch.setattr(device, "has_gpu", lambda: True)
    monkeypatch.setattr(device, "gpus_with_bfloat16", lambda: [])  # a T4
    assert engine(train_mode="fast", bucket_shapes="3") == {"jit_compile": True, "dtype_policy": "float32", "max_widths": 3, "devices": []}
    monkeypatch.setattr(device, "gpus_with_bfloat16", lambda: ["NVIDIA H100 80GB HBM3"])
    assert engine(train_mode="fast")["dtype_policy"] == "mixed_bfloat16"
    assert engine(train_mode="tutorial", jit_compile="false") == {"jit_compile": False, "dtype_policy": "float32", "max_widths": 1, "devices": []}


def test_cpu_bfloat16_detection_reads_the_cpu_flags():
    flags = Path("/proc/cpuinfo").read_text().split() if Path("/proc/cpuinfo").exists() else []
    assert device.cpu_has_bfloat16() == ("amx_bf16" in flags)


def test_a_fast_step_is_the_tutorial_step():
    """Per-batch padding with the rescaled loss, and the output layer computed at the loss positions
    only (LossPositions, what fast mode trains), give the tutorial's loss and update on the same
    examples: for a full batch at its own width and for a short batch filled up with zero-weight
    rows, with the loss on every token and on the responses only."""
    import keras

    from tasks.modeling.presets import load_causal_lm
    from tasks.text.prompt_template import example, instruction_prompt

    pairs = [("Name a colour.", "Blue."), ("Name a fruit.", "A pear, often green."), ("Say hi.", "Hi!"),
             ("Count to three.", "One, two, three."), ("Name a month.", "May."), ("Name a sea.", "The Baltic Sea.")]
    rows = [{"prompt": instruction_prompt(i, "tutorial"), "text": example(i, r, "tutorial")} for i, r in pairs]
    for loss_tokens in ("all", "response"):
        results = {}
        for mode in ("tutorial", "fast", "fast-full-logits"):
            cfg = load_config("tiny_test", {"train_mode": mode.split("-")[0], "sequence_length": "128", "batch_size": "4",
                                            "learning_rate": "1e-2", "loss_tokens": loss_tokens})
            keras.utils.set_random_seed(0)
            lm = load_causal_lm("tiny:gemma", sequence_length=128)
            enc = encode(lm.preprocessor.tokenizer, rows, 128, loss_tokens)
            if mode == "fast-full-logits":
                lm.backbone.enable_lora(rank=4)
                loop.compile_for_training(lm, cfg, loop.build_optimizer(cfg))
                trainer = lm
            else:
                trainer, _, compiled = loop.prepare(lm, cfg, device.engine_for(cfg))
                assert (trainer is lm) == (mode == "tutorial")
                assert [v.path for v in trainer.trainable_variables] == [v.path for v in lm.trainable_variables]
            lm.preprocessor = None
            losses = []
            for idx in ([0, 1, 2, 3], [4, 5]):
                if mode.startswith("fast"):
                    width = -(-max(input_lengths(enc)[i] for i in idx) // 16) * 16
                    x, y, w = step_arrays(enc, Step(idx, width), batch_size=4)
                    assert x["token_ids"].shape == (4, width) and width <= 32
                    if mode == "fast":
                        x, y, w = loop.gathered(x, y, w, size=4 * width)
                        assert y.shape == w.shape == (4 * width,) and 0 < (w > 0).sum() < 4 * width
                else:
                    x, y, w = step_arrays(enc, Step(idx, 128))
                losses.append(float(trainer.train_on_batch(x, y, sample_weight=w)[0]))
            results[mode] = losses, {v.path: np.array(v.numpy()) for v in lm.backbone.trainable_weights}
            keras.backend.clear_session()
        for mode in ("fast", "fast-full-logits"):
            np.testing.assert_allclose(results[mode][0], results["tutorial"][0], rtol=1e-5, err_msg=f"{mode} {loss_tokens}")
            for name, value in results["tutorial"][1].items():
                np.testing.assert_allclose(results[mode][1][name], value, atol=1e-5, err_msg=f"{mode} {loss_tokens} {name}")


def test_fast_mode_reaches_the_tutorial_heldout_loss(trained_run, learnable_data):
    # The tutorial run is test_finetune's (the same settings: tutorial is tiny_test's mode).
    tut = artifacts.read_finetune_result(trained_run("finetune", **LEARNABLE, dataset_source=learnable_data))
    fast = artifacts.read_finetune_result(trained_run("finetune", **LEARNABLE, dataset_source=learnable_data, train_mode="fast"))
    print("held-out tuned loss: tutorial", tut["heldout_tuned"], "fast", fast["heldout_tuned"])
    # CPU: one TF graph for every width (no XLA, no width limit); bfloat16 where the CPU has AMX.
    bf16 = device.cpu_has_bfloat16()
    assert fast["training"]["train_mode"] == "fast" and fast["training"]["jit_compile"] is False
    assert fast["training"]["dtype_policy"] == ("mixed_bfloat16" if bf16 else "float32")
    assert fast["training"]["max_widths"] == 0 and max(map(int, fast["training"]["widths"])) < 64
    assert tut["training"]["dtype_policy"] == "float32"
    assert fast["steps"] == tut["steps"] and fast["tokens"]["real"] == tut["tokens"]["real"]
    assert fast["tokens"]["padded"] < 0.7 * tut["tokens"]["padded"]  # short fruit questions: ~25-40 of 64 tokens
    # The same base model scored in float32, or in bfloat16 (then close, not equal).
    assert fast["heldout_base"]["loss"] == pytest.approx(tut["heldout_base"]["loss"], rel=0.02 if bf16 else 1e-6)
    assert fast["heldout_tuned"]["loss"] == pytest.approx(tut["heldout_tuned"]["loss"], rel=0.05)
    assert fast["heldout_tuned"]["loss"] < 0.9 * fast["heldout_base"]["loss"]
    assert sorted(fast["data_order"][0]) == sorted(tut["data_order"][0])


class Preempted(Exception):
    pass


@pytest.mark.parametrize("mode, engine", [("tutorial", "graph"), ("fast", "graph"), ("fast", "xla")])
def test_a_preempted_run_resumes_to_the_same_result(tmp_path, monkeypatch, mode, engine):
    """Preempted right after a checkpoint (in-process, every train mode and CPU engine), the retry
    resumes there and ends where an uninterrupted run ends; test_faults kills a process for real."""
    # Under XLA every width is one compilation in each of the three runs: two widths are enough.
    settings = {**SETTINGS, "train_mode": mode, "cpu_engine": engine, "sequence_length": "128",
                **({"bucket_shapes": "2"} if engine == "xla" else {})}
    cfg = load_config("tiny_test", settings)
    clean, killed = tmp_path / "runs" / "clean", tmp_path / "runs" / "killed"
    for run_dir in (clean, killed):
        snapshot.run(cfg, run_dir)
        preprocess.run(cfg, run_dir)

    save = Checkpoints.save

    def save_then_die(self, step, *args):
        save(self, step, *args)
        if step >= 12:
            raise Preempted(step)

    monkeypatch.setattr(Checkpoints, "save", save_then_die)
    with pytest.raises(Preempted):
        finetune.run(cfg, killed)
    monkeypatch.setattr(Checkpoints, "save", save)
    assert not (killed / "finetune").exists()
    finetune.run(cfg, killed)
    finetune.run(cfg, clean)

    result = artifacts.read_finetune_result(killed)
    history = artifacts.read_history(killed)
    clean_history = artifacts.read_history(clean)
    assert result["resumed_from_step"] == 12 and result["steps"] == TOTAL_STEPS
    assert [h["step"] for h in history] == list(range(1, TOTAL_STEPS + 1))
    assert [h["width"] for h in history] == [h["width"] for h in clean_history]
    if mode == "fast":
        assert len({h["width"] for h in history}) > 1  # really bucketed
    a, b = lora_weights(artifacts.adapter_path(killed)), lora_weights(artifacts.adapter_path(clean))
    assert a.keys() == b.keys() and a
    for name in a:
        np.testing.assert_allclose(a[name], b[name], atol=1e-5, err_msg=name)
    np.testing.assert_allclose([h["loss"] for h in history], [h["loss"] for h in clean_history], atol=1e-3)


def test_fast_mode_under_xla_gathers_each_width_to_one_shape(tmp_path, learnable_data):
    """cpu_engine xla: every step of a width feeds the same number of loss positions (one compiled
    shape per width), no step loses a position, and the run trains the held-out loss down."""
    cfg = load_config("tiny_test", {**LEARNABLE, "dataset_source": str(learnable_data), "train_mode": "fast", "cpu_engine": "xla",
                                    "bucket_shapes": "2", "loss_tokens": "response"})
    run_dir = tmp_path / "xla"
    for stage in (snapshot, preprocess):
        stage.run(cfg, run_dir)
    from tasks.modeling.presets import load_tokenizer

    enc = encode(load_tokenizer(cfg.model_preset), artifacts.read_train(run_dir), cfg.sequence_length, cfg.loss_tokens)
    engine = device.engine_for(cfg)
    plan = loop.train_plan(input_lengths(enc), cfg, engine["max_widths"])
    sizes = loop.gather_sizes(enc, plan, cfg)
    assert set(sizes) == {s.width for s in plan} and len(sizes) <= 2
    for step in plan:
        x, y, w = step_arrays(enc, step, cfg.batch_size)
        gx, gy, gw = loop.gathered(x, y, w, sizes[step.width])
        assert gy.shape == gw.shape == gx["positions"].shape == (sizes[step.width],)
        assert gw.sum() == pytest.approx(w.sum()) and (gy[gw > 0] == y.reshape(-1)[w.reshape(-1) > 0]).all()
        assert sizes[step.width] < cfg.batch_size * step.width  # fewer logits than positions
    finetune.run(cfg, run_dir)
    result = artifacts.read_finetune_result(run_dir)
    assert result["training"]["jit_compile"] is True and result["training"]["logits"] == "loss positions only"
    assert result["heldout_tuned"]["response_loss"] < 0.9 * result["heldout_base"]["response_loss"]
