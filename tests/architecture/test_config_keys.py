"""Every config key has one source of truth (its field in tasks.pipeline.config.Config), and every key either
changes some stage's outputs, and is then part of that stage's input fingerprint, or says why it
changes none. A key in neither place would let a stage reuse stale outputs after the key changed."""

from __future__ import annotations

import dataclasses
import typing

import pytest

from tasks.pipeline import config
from tasks.pipeline.artifacts import STAGES

pytestmark = pytest.mark.unit


def unaccounted(cls=config.Config) -> list[str]:
    """Fields that name no stage and give no reason for affecting none, or that do both."""
    bad = []
    for f in dataclasses.fields(cls):
        stages, reason = f.metadata.get("stages", ()), f.metadata.get("no_outputs", "")
        if bool(stages) == bool(reason):
            bad.append(f.name)
        bad += [f"{f.name}: unknown stage {s!r}" for s in stages if s not in STAGES]
    return bad


def test_every_key_is_in_a_stage_fingerprint_or_declared_output_free():
    assert unaccounted() == []


def test_a_planted_key_without_a_stage_is_caught():
    @dataclasses.dataclass(frozen=True)
    class Planted(config.Config):
        new_knob: int = config.key(3, "a key someone forgot to wire")

    assert unaccounted(Planted) == ["new_knob"]

    @dataclasses.dataclass(frozen=True)
    class Misnamed(config.Config):
        other_knob: int = config.key(3, "a key with a typo in its stage", stages=("finetuen",))

    assert unaccounted(Misnamed) == ["other_knob: unknown stage 'finetuen'"]


@pytest.mark.parametrize("stage", [s for s in STAGES if config.stage_keys(s)])
def test_a_stage_fingerprints_exactly_its_declared_keys(stage):
    """The stage module's CONFIG_KEYS (what it fingerprints and records) are the fields that name it."""
    import importlib

    module = importlib.import_module(f"tasks.{stage}")
    assert tuple(module.CONFIG_KEYS) == config.stage_keys(stage)


def test_ranges_choices_and_params_are_derived_from_the_fields():
    for f in dataclasses.fields(config.Config):
        assert config.RANGES.get(f.name) == f.metadata["range"]
        assert config.CHOICES.get(f.name) == f.metadata["choices"]
        assert (f.name in config.VARIANT_KEYS) == f.metadata["variant"]
    form = config.trigger_form({})
    assert list(form) == [f.name for f in dataclasses.fields(config.Config) if f.metadata["param"]]
    for name, spec in form.items():
        want = typing.get_type_hints(config.Config)[name]
        assert spec["type"] == {str: "string", int: "integer", float: "number", bool: "boolean", tuple: "array", dict: "object"}[want]
        if name in config.RANGES:
            assert (spec["minimum"], spec["maximum"]) == config.RANGES[name]
        if name in config.CHOICES:
            assert spec["enum"] == list(config.CHOICES[name])
        assert spec["description"] == spec["description"].strip() and "<" not in spec["description"]


def test_the_config_reference_page_is_current():
    """docs/config-reference.md is generated from Config: regenerate it when a key changes
    (`python -m tasks.pipeline.config > docs/config-reference.md`)."""
    from pathlib import Path

    from tasks.pipeline.config import reference

    page = Path(__file__).resolve().parents[2] / "docs" / "config-reference.md"
    assert page.read_text(encoding="utf-8") == reference()


def untrusted_without_class(cls=config.Config) -> list[str]:
    return [f.name for f in dataclasses.fields(cls) if f.metadata.get("trust") not in config.TRUST_CLASSES]


def test_every_key_has_a_trust_class_and_a_planted_one_without_is_caught():
    assert untrusted_without_class() == []

    @dataclasses.dataclass(frozen=True)
    class Planted(config.Config):
        new_knob: int = config.key(3, "a key someone forgot to class", stages=("finetune",))

    assert untrusted_without_class(Planted) == ["new_knob"]


def test_what_the_verdict_rests_on_is_judged_and_what_a_variant_sets_is_training():
    """A sweep variant only changes how the adapter is trained, so a sweep stays trusted; the data,
    the model, the prompts, the held-out split and the gate's margins are what a run judged on its
    own test would change."""
    assert set(config.VARIANT_KEYS) <= {k for k in config.FIELD_TYPES if k not in config.JUDGED_KEYS}
    for judged in ("dataset_source", "dataset_hub_id", "model_preset", "models_dir", "prompt_suite", "heldout_examples",
                   "subset_seed", "eval_examples", "heldout_generate_examples", "gate_rouge_l_margin",
                   "gate_perplexity_margin", "gate_eos_rate_margin", "prompt_template", "max_bad_share"):
        assert judged in config.JUDGED_KEYS, judged
    base = config.load_config("tiny_test")
    assert config.judged_changes(config.load_config("tiny_test", {"learning_rate": "0.01", "num_examples": "8"}), base) == []
    changed = config.load_config("tiny_test", {"dataset_source": "hub", "gate_perplexity_margin": "0.5"})
    assert config.judged_changes(changed, base) == ["dataset_source", "gate_perplexity_margin"]
    # The configured value given explicitly is no change (the trigger form sends every Param).
    assert config.judged_changes(config.load_config("tiny_test", {"prompt_suite": base.prompt_suite}), base) == []
