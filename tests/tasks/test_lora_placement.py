"""Where LoRA goes (tasks.training.adapter): `lora_targets` resolves to each Gemma generation's layers,
`lora_alpha` scales every one of them, the adapter file records its placement and a mismatch is
refused by name, and an adapter written before placements were recorded loads as it always did."""

import json
from pathlib import Path

import numpy as np
import pytest

from tasks.modeling.presets import load_causal_lm
from tasks.training import adapter
from tasks.training.adapter import Placement, PlacementMismatch

pytestmark = pytest.mark.model

DATA = Path(__file__).parent / "data"
OLD_ADAPTER = DATA / "adapter_before_lora_targets.lora.h5"


def logits(lm, text: str, length: int = 16):
    x = lm.preprocessor.generate_preprocess([text], sequence_length=length)
    return np.asarray(lm({"token_ids": x["token_ids"], "padding_mask": x["padding_mask"]}))


def randomized(lm, seed: int = 0) -> None:
    """Non-zero B matrices, so the adapter changes the model."""
    rng = np.random.default_rng(seed)
    for layer in adapter.lora_layers(lm.backbone):
        b = layer.lora_kernel_b
        b.assign(rng.normal(0, 0.05, b.shape).astype("float32"))


@pytest.mark.parametrize("preset", ["tiny:gemma", "tiny:gemma3"])
@pytest.mark.parametrize("targets", ["attention_qv", "attention", "all_linear"])
def test_targets_resolve_to_every_blocks_layers_with_alpha(preset, targets):
    lm = load_causal_lm(preset, "", 16)
    where = Placement(targets, 4, 12.0)
    adapter.enable(lm, where)
    layers = adapter.lora_layers(lm.backbone)
    assert sorted({layer.name for layer in layers}) == sorted(adapter.TARGETS[targets])
    assert len(layers) == lm.backbone.num_layers * len(adapter.TARGETS[targets])
    assert {layer.lora_alpha for layer in layers} == {12.0}
    counts = adapter.trainable_counts(lm)
    assert list(counts["lora_by_layer"]) == list(adapter.TARGETS[targets])
    assert counts["total"] == sum(int(np.prod(w.shape)) for w in lm.backbone.trainable_weights)
    # The forward pass adds (alpha / rank) x A @ B: the kernel the exporters merge.
    randomized(lm)
    layer = layers[-1]
    expected = np.asarray(layer._kernel) + 3.0 * np.einsum("...r,ro->...o", np.asarray(layer.lora_kernel_a),
                                                           np.asarray(layer.lora_kernel_b))
    np.testing.assert_allclose(np.asarray(layer.kernel), expected, rtol=1e-5, atol=1e-6)


def test_alpha_scales_the_change_and_the_default_is_the_rank():
    import keras

    from tasks.pipeline.config import load_config

    assert adapter.placement(load_config("tiny_test")) == Placement("attention_qv", 4, 4.0)  # the seed's scale 1
    seed = load_config("gemma_2b_lora")  # the seed's recipe, unchanged
    assert adapter.placement(seed) == Placement("attention_qv", 4, 4.0)
    assert (seed.learning_rate, seed.epochs, seed.batch_size, seed.sequence_length) == (5e-5, 1, 1, 256)
    assert (seed.validation_examples, seed.early_stopping_patience, seed.keep) == (0, 0, "last")
    base = load_causal_lm("tiny:gemma", "", 16)
    ref = logits(base, "Name a fruit.")
    deltas = []
    for alpha in (4.0, 8.0):
        lm = load_causal_lm("tiny:gemma", "", 16)
        keras.utils.set_random_seed(0)  # the same A matrices for both
        adapter.enable(lm, Placement("all_linear", 4, alpha))
        # Tiny B, so the change is near-linear in the scale.
        for layer in adapter.lora_layers(lm.backbone):
            b = layer.lora_kernel_b
            b.assign(np.random.default_rng(1).normal(0, 1e-4, b.shape).astype("float32"))
        deltas.append(logits(lm, "Name a fruit.") - ref)
    ratio = np.abs(deltas[1]).sum() / np.abs(deltas[0]).sum()
    assert 1.9 < ratio < 2.1


@pytest.fixture(scope="module")
def all_linear_file(tmp_path_factory):
    lm = load_causal_lm("tiny:gemma3", "", 16)
    adapter.enable(lm, Placement("all_linear", 4, 8.0))
    randomized(lm)
    path = tmp_path_factory.mktemp("adapters") / "all_linear.lora.h5"
    adapter.save(lm, path)
    return path, logits(lm, "Name a fruit.")


def test_the_adapter_file_records_its_placement_and_loads_back(all_linear_file):
    path, tuned = all_linear_file
    assert adapter.read_placement(path) == Placement("all_linear", 4, 8.0)
    fresh = load_causal_lm("tiny:gemma3", "", 16)
    adapter.load(fresh, path, Placement("all_linear", 4, 8.0))
    np.testing.assert_allclose(logits(fresh, "Name a fruit."), tuned, atol=1e-5)
    # keras-hub's own loader still reads the file (it ignores the placement group).
    plain = load_causal_lm("tiny:gemma3", "", 16)
    plain.backbone.enable_lora(4, target_layer_names=list(adapter.TARGETS["all_linear"]))
    plain.backbone.load_lora_weights(str(path))


def test_a_placement_mismatch_is_refused_naming_both(all_linear_file, tmp_path):
    path, _ = all_linear_file
    qv = load_causal_lm("tiny:gemma3", "", 16)
    adapter.enable(qv, Placement("attention_qv", 4, 4.0))
    with pytest.raises(PlacementMismatch, match=r"all_linear \(query, key, value, attention_output, ffw_gating.*"
                                                r"attention_qv \(query, value\)"):
        adapter.load(qv, path)
    # The reverse: a query/value adapter into a model with LoRA on every linear layer.
    randomized(qv)
    qv_file = tmp_path / "qv.lora.h5"
    adapter.save(qv, qv_file)
    wide = load_causal_lm("tiny:gemma3", "", 16)
    adapter.enable(wide, Placement("all_linear", 4, 8.0))
    with pytest.raises(PlacementMismatch, match=r"attention_qv \(query, value\).*all_linear \(query, key"):
        adapter.load(wide, qv_file)
    # Against what the config asks for (generate and export pass it), before any model is touched.
    with pytest.raises(PlacementMismatch, match=r"adapter file .*qv.lora.h5 has LoRA on attention_qv.*the configuration "
                                                r"has it on all_linear"):
        adapter.enable_for(load_causal_lm("tiny:gemma3", "", 16), qv_file, Placement("all_linear", 4, 8.0))
    with pytest.raises(PlacementMismatch, match="alpha 8.*alpha 4"):
        adapter.load(load_causal_lm("tiny:gemma3", "", 16), path, Placement("all_linear", 4, 4.0))


def test_an_adapter_from_another_model_is_refused(all_linear_file):
    """keras-hub finds layers by position: the same placement on another architecture is refused."""
    path, _ = all_linear_file
    with pytest.raises(PlacementMismatch, match="positions"):
        adapter.load(load_causal_lm("tiny:gemma", "", 16), path)


def test_an_adapter_written_before_placements_loads_merges_and_exports_as_before(tmp_path):
    """tests/tasks/data/adapter_before_lora_targets.lora.h5 was written by the pipeline before this
    change (tiny_test config, query/value); the logits its tuned model gave then are in the .json."""
    from tasks import export
    from tasks.pipeline.config import load_config

    then = json.loads((DATA / "adapter_before_lora_targets.json").read_text())
    assert adapter.read_placement(OLD_ADAPTER) == Placement("attention_qv", 4, 4.0)

    def top(lm):
        x = lm.preprocessor.generate_preprocess([then["prompt"]], sequence_length=then["sequence_length"])
        row = np.asarray(lm({"token_ids": x["token_ids"], "padding_mask": x["padding_mask"]}))[0, then["position"]]
        return row[then["top_ids"]]

    # As generate loads it: the model enabled for the file (the config's placement), then loaded.
    cfg = load_config("tiny_test")
    lm = load_causal_lm(then["preset"], "", then["sequence_length"])
    adapter.enable_for(lm, OLD_ADAPTER, adapter.placement(cfg))
    adapter.load(lm, OLD_ADAPTER, adapter.placement(cfg))
    np.testing.assert_allclose(top(lm), then["top_logits"], rtol=1e-5, atol=1e-6)
    base = load_causal_lm(then["preset"], "", then["sequence_length"])
    assert np.abs(top(base) - np.asarray(then["top_logits"])).max() > 1e-3  # the adapter matters

    # As export merges it: the tuned model's kernels into a fresh base, every targeted layer.
    ref, merged, layers = export.merge(cfg, OLD_ADAPTER, export.parity_texts(cfg)[:1])
    assert layers == merged.backbone.num_layers * 2
    np.testing.assert_allclose(top(merged), then["top_logits"], rtol=1e-4, atol=1e-5)
    assert not adapter.lora_layers(merged.backbone)
