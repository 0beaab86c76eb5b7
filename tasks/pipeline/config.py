"""The pipeline's one configuration: a frozen, flat dataclass loaded from YAML, validated.

Keys are flat on purpose: a key is the same word in a YAML file, a `--set key=value` override on a
stage's command line and a Param in the DAG's trigger form. Unknown keys, wrong types and values out
of range are errors that name the key and where it came from.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import typing
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import yaml

from tasks.text.prompt_template import TEMPLATES
from tasks.text.records import COLUMN_ROLES, FORMATS, REQUIRED_COLUMNS

# The package data sits at the top of `tasks/`, beside the stages.
PACKAGE_DIR = Path(__file__).parent.parent
CONFIG_DIR = PACKAGE_DIR / "configs"
PROMPT_SUITE_DIR = PACKAGE_DIR / "prompt_suites"
BUNDLED_DOLLY = PACKAGE_DIR / "data" / "dolly_sample.jsonl"

# Dolly 15k's last commit on the hub (the May 2023 text revision that the bundled sample matches).
DOLLY_HUB_ID = "databricks/databricks-dolly-15k"
DOLLY_PINNED_REVISION = "bdd27f4d94b9c1f951818a7da7fd7aeea5dbff1a"


class ConfigError(ValueError):
    """A configuration value is wrong; the message names the key and its source."""


# Stages whose outputs a key changes (it is part of their input fingerprint), by name; see
# tasks.pipeline.artifacts.STAGES. Literal names here keep this module free of imports from the package.
SNAPSHOT, PREPROCESS, SWEEP, FINETUNE, GENERATE, EXPORT, REPORT = (
    "snapshot", "preprocess", "sweep", "finetune", "generate", "export", "report")
MAX_VARIANTS = 16
EXPORT_FORMATS = ("keras", "hf", "gguf")
# Where LoRA goes (tasks.training.adapter.TARGETS names their layers).
LORA_TARGETS = ("attention_qv", "attention", "all_linear")


def known_suites() -> list[str]:
    return sorted(p.stem for p in PROMPT_SUITE_DIR.glob("*.yaml"))


# A key's trust class. `training`: how the adapter is trained (or how fast, or what is logged); a manual
# run that changes only these stays trusted: the gate still judges it on the DAG's data, model,
# prompts and thresholds. `judged`: what the gate's verdict rests on (data, model, prompt suite,
# evaluation and gate settings, the held-out split); a run that changes one chose its own test, and a
# person approves its promotion (see docs/security.md).
TRAINING, JUDGED = "training", "judged"
TRUST_CLASSES = (TRAINING, JUDGED)


def key(default: Any, help: str, *, trust: str | None = None, stages: tuple[str, ...] = (), no_outputs: str = "",
        range: tuple | None = None, choices: tuple | None = None, variant: bool = False, param: bool = False,
        schema: dict | None = None):
    """One config key: its default, what it means (`help`, also the trigger form's description), its
    `trust` class (TRAINING or JUDGED; a test fails on a key without one), the stages whose outputs it
    changes (their fingerprints include it) or why it changes none (`no_outputs`), its inclusive (min,
    max) `range` or its `choices`, whether a sweep `variant` may set it, and whether it is a DAG
    `param` (with extra JSON `schema` for the trigger form)."""
    meta = {"help": help, "trust": trust, "stages": stages, "no_outputs": no_outputs, "range": range,
            "choices": choices, "variant": variant, "param": param, "schema": schema or {}}
    if isinstance(default, dict):  # a mutable default: each Config gets its own copy
        return dataclasses.field(default_factory=lambda: dict(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


@dataclass(frozen=True)
class Config:
    # -- dataset snapshot ------------------------------------------------------------------
    dataset_source: str = key(
        "bundled",
        "'hub' (dataset_hub_id from the Hugging Face hub, pinned revision), 'bundled' (the Dolly sample in the image) "
        "or a path to a .jsonl, .json, .parquet or .csv file",
        stages=(SNAPSHOT,), param=True, trust=JUDGED)
    dataset_hub_id: str = key(DOLLY_HUB_ID, "the dataset's id on the Hugging Face hub (also names its snapshot store and Asset)",
                              stages=(SNAPSHOT,), param=True, trust=JUDGED)
    dataset_revision: str = key(DOLLY_PINNED_REVISION, "the hub revision (commit) a 'hub' snapshot reads", stages=(SNAPSHOT,),
                                param=True, trust=JUDGED)
    dataset_split: str = key("train", "the split a 'hub' snapshot reads", stages=(SNAPSHOT,), param=True, trust=JUDGED)
    dataset_format: str = key(
        "dolly",
        "the records' shape: dolly (instruction, context, response, category), alpaca (instruction, input, output), "
        "messages (OpenAI 'messages' or ShareGPT 'conversations', multi-turn), columns (named by dataset_columns), "
        "or auto (detected from the first record)",
        stages=(SNAPSHOT,), choices=("auto",) + FORMATS, param=True, trust=JUDGED)
    dataset_columns: dict = key(
        {},
        "with dataset_format 'columns': which column is which, e.g. "
        '{"instruction": "question", "response": "answer", "context": "passage"}; roles: ' + ", ".join(COLUMN_ROLES),
        stages=(SNAPSHOT,), param=True, trust=JUDGED)
    hub_timeout_s: float = key(20.0, "seconds the hub may take to answer before the snapshot fails as unreachable",
                               no_outputs="only how long to wait", range=(1, 600), trust=TRAINING)
    # A broken upstream file should stop the run, not quietly train on what is left: see max_bad_share.
    bad_record_policy: str = key(
        "skip",
        "bad dataset records: 'skip' drops and counts them (the run fails above max_bad_share), 'fail' stops at the first one",
        stages=(SNAPSHOT,), choices=("skip", "fail"), param=True, trust=JUDGED)
    max_bad_share: float = key(0.05, "with 'skip': the largest share of bad records (0-1) a snapshot accepts",
                               stages=(SNAPSHOT,), range=(0.0, 1.0), param=True, trust=JUDGED)
    max_record_bytes: int = key(100_000, "a record (its JSON line, or its fields as JSON) larger than this is bad ('too_large')",
                                stages=(SNAPSHOT,), range=(1, 1_000_000_000), trust=JUDGED)

    # -- preprocessing ---------------------------------------------------------------------
    drop_context: bool = key(True, "drop the records that have a context (the seed's choice); false puts the context "
                             "into the prompt", stages=(PREPROCESS,), trust=JUDGED)
    prompt_template: str = key(
        "tutorial",
        "the prompt format: tutorial (Instruction: ... Response:, the Keras tutorial's) or gemma_chat (the turn "
        "format of Gemma's instruction-tuned checkpoints, start_of_turn user ... end_of_turn; answers stop at the turn end)",
        stages=(PREPROCESS, GENERATE, EXPORT), choices=TEMPLATES, param=True, trust=JUDGED)
    num_examples: int = key(1000, "training examples drawn (seeded) from the usable rows",
                            stages=(PREPROCESS,), range=(1, 1_000_000), param=True, trust=TRAINING)
    heldout_examples: int = key(100, "held-out examples kept for evaluation, disjoint from training",
                                stages=(PREPROCESS,), range=(0, 100_000), param=True, trust=JUDGED)
    subset_seed: int = key(42, "seed of the held-out split and the training subset", stages=(PREPROCESS,), trust=JUDGED)

    # -- model -----------------------------------------------------------------------------
    model_preset: str = key(
        "gemma_2b_en",
        "keras-hub preset (e.g. gemma_2b_en, via Kaggle), a local preset directory, or gguf:gemma3-270m",
        stages=(PREPROCESS, FINETUNE, GENERATE), param=True, trust=JUDGED)
    models_dir: str = key("", "where imported and tiny models are cached; empty means $GEMMA_MODELS_DIR or ~/.cache",
                          no_outputs="a cache location", trust=JUDGED)
    sequence_length: int = key(256, "tokens per training example; longer ones are truncated",
                               stages=(PREPROCESS, FINETUNE), range=(8, 8192), variant=True, param=True, trust=TRAINING)

    # -- LoRA fine-tune (defaults: the Keras tutorial's recipe) -----------------------------
    lora_rank: int = key(4, "LoRA rank", stages=(FINETUNE, GENERATE), range=(1, 1024), variant=True, param=True, trust=TRAINING)
    lora_targets: str = key(
        "attention_qv",
        "where LoRA goes: attention_qv (the attention's query and value projections, the seed's), attention (query, "
        "key, value and output projections) or all_linear (the attention's and the MLP's gating, gating_2 and linear layers)",
        stages=(FINETUNE, GENERATE), choices=LORA_TARGETS, variant=True, param=True, trust=TRAINING)
    lora_alpha: float = key(
        0.0, "LoRA alpha: each layer adds (alpha / rank) x A @ B to its kernel; 0 means alpha = lora_rank (scale 1, the seed's)",
        stages=(FINETUNE, GENERATE), range=(0.0, 65536.0), variant=True, param=True, trust=TRAINING)
    trainable_tokens: str = key(
        "auto",
        "auto: with prompt_template gemma_chat, also train the embedding rows of <start_of_turn> and <end_of_turn> "
        "(untrained in a pretrained base, so its tuned answers could not stop at the turn end); none: LoRA only",
        stages=(FINETUNE,), choices=("auto", "none"), variant=True, trust=TRAINING)
    learning_rate: float = key(5e-5, "AdamW learning rate", stages=(FINETUNE,), range=(1e-8, 1.0), variant=True, param=True, trust=TRAINING)
    weight_decay: float = key(0.01, "AdamW weight decay (bias and scale excluded)", stages=(FINETUNE,), range=(0.0, 1.0),
                              variant=True, param=True, trust=TRAINING)
    epochs: int = key(1, "passes over the training examples", stages=(FINETUNE,), range=(1, 1000), variant=True, param=True, trust=TRAINING)
    batch_size: int = key(1, "examples per training step", stages=(FINETUNE,), range=(1, 4096), variant=True, param=True, trust=TRAINING)
    training_seed: int = key(0, "seed of the LoRA initialisation and the epochs' example order", stages=(FINETUNE,), variant=True, trust=TRAINING)
    loss_tokens: str = key("all", "tokens in the loss: 'all' (the tutorial: prompt and response) or 'response'",
                           stages=(FINETUNE,), choices=("all", "response"), variant=True, trust=TRAINING)
    # The same recipe, data, order of epochs and loss either way. "fast" scales the loss so it
    # equals the tutorial's. Which engine fast mode takes on a CPU is cpu_engine (one graph, or XLA
    # as on a GPU, which cpu_demo uses); bench/README.md has the figures.
    train_mode: str = key(
        "tutorial",
        "tutorial: pad every example to sequence_length (the Keras tutorial); fast: length-bucketed batches, XLA on GPUs, bf16 where native (bench/README.md)",
        stages=(FINETUNE,), choices=("tutorial", "fast"), variant=True, param=True, trust=TRAINING)
    data_parallel: str = key(
        "auto", "auto: train on every GPU the stage sees (tf.distribute.MirroredStrategy; the global batch stays "
        "batch_size, so use a multiple of the GPU count); off: one device", stages=(), choices=("auto", "off"),
        no_outputs="the same recipe on N devices trains to the same adapter", trust=TRAINING)
    bucket_multiple: int = key(16, "fast mode: batch widths are multiples of this many tokens (capped at sequence_length)",
                               stages=(FINETUNE,), range=(1, 8192), variant=True, trust=TRAINING)
    # Every width is one more XLA compilation; graph mode (CPU) is not limited.
    bucket_shapes: int = key(4, "fast mode under XLA (GPU): at most this many batch widths, chosen from the data to pad least",
                             stages=(FINETUNE,), range=(1, 1024), variant=True, trust=TRAINING)
    # Which engine wins on a CPU depends on the CPU: one graph measured 2.2x XLA's per-width
    # compilations on a Xeon with AMX, XLA 2x the graph's tokens/s on a 2-core AMD EPYC.
    cpu_engine: str = key(
        "graph",
        "fast mode on a CPU: 'graph' (one TensorFlow graph traced once for every width) or 'xla' (XLA, at most "
        "bucket_shapes widths, each one compilation); measure with bench.train_modes",
        stages=(FINETUNE,), choices=("graph", "xla"), variant=True, trust=TRAINING)
    mixed_precision: str = key(
        "auto",
        "'auto': mixed bfloat16 in fast mode on a device that computes it natively (GPU of compute capability >= 8.0, "
        "CPU with AMX-BF16), else float32; 'off': float32; 'bfloat16': mixed bfloat16 on any device and mode",
        stages=(FINETUNE,), choices=("auto", "off", "bfloat16"), variant=True, trust=TRAINING)
    # Keras's "auto" turns XLA off on CPU, where it halves Gemma 3's step.
    jit_compile: bool = key(False, "XLA for the tutorial mode's train step", stages=(FINETUNE,), variant=True, trust=TRAINING)
    # Validation: drawn after the held-out split and the training set, so neither moves.
    validation_examples: int = key(
        0, "examples drawn (seeded) outside the training set and the held-out split and scored every eval_every_steps "
        "while training (a validation loss curve, early stopping, keep: best); 0: none (the seed's recipe)",
        stages=(PREPROCESS,), range=(0, 100_000), param=True, trust=TRAINING)
    eval_every_steps: int = key(
        16, "with validation_examples: steps between validation scores (also before the first step and after the last)",
        stages=(FINETUNE,), range=(1, 1_000_000), variant=True, trust=TRAINING)
    early_stopping_patience: int = key(
        0, "with validation_examples: stop after this many validation scores in a row without a new lowest "
        "validation loss; 0: off (train every planned step)",
        stages=(FINETUNE,), range=(0, 1_000_000), variant=True, param=True, trust=TRAINING)
    keep: str = key(
        "last", "the adapter finetune saves: 'last' (after the last step trained) or 'best' (at the step with the "
        "lowest validation loss; needs validation_examples)",
        stages=(FINETUNE,), choices=("last", "best"), variant=True, param=True, trust=TRAINING)
    eval_examples: int = key(100, "held-out examples scored (masked loss, response perplexity) before and after tuning",
                             stages=(FINETUNE,), range=(0, 100_000), trust=JUDGED)
    log_every_steps: int = key(1, "steps between progress lines in the task log", no_outputs="only logging",
                               range=(1, 1_000_000), trust=TRAINING)
    checkpoint_every_steps: int = key(
        50, "steps between fine-tune checkpoints a retried task resumes from; 0 turns them off",
        no_outputs="a resumed run trains to the same adapter", range=(0, 1_000_000), trust=TRAINING)

    # -- generation --------------------------------------------------------------------------
    prompt_suite: str = key("v1", "versioned prompt suite both models answer", stages=(GENERATE,), param=True,
                            schema={"enum": known_suites()}, trust=JUDGED)
    max_length: int = key(256, "generation length in tokens, prompt included", stages=(GENERATE,), range=(8, 8192), param=True, trust=JUDGED)
    sampler: str = key("top_k", "generation sampler", stages=(GENERATE,), choices=("top_k", "greedy"), param=True, trust=JUDGED)
    top_k: int = key(5, "k of the top_k sampler", stages=(GENERATE,), range=(1, 1_000_000), trust=JUDGED)
    sampler_seed: int = key(2, "seed of the sampler", stages=(GENERATE,), trust=JUDGED)
    generate_batch_size: int = key(4, "prompts answered per generate call", stages=(GENERATE,), range=(1, 4096), trust=TRAINING)
    # keras-hub compiles its generate function with the model's jit_compile, and Keras's "auto"
    # turns XLA off on a machine without a GPU (the demo's generate stage: 252 s off, 116 s on).
    generate_xla: bool = key(True, "XLA for the generate function (the whole decoding loop, one compilation per batch shape)",
                             stages=(GENERATE,), trust=TRAINING)
    heldout_generate_examples: int = key(
        100, "held-out prompts both models answer, scored with ROUGE-L against the reference responses",
        stages=(GENERATE,), range=(0, 100_000), trust=JUDGED)

    # -- sweep -------------------------------------------------------------------------------
    # Each variant is fine-tuned and answers in its own folder (<run dir>/variants/v<i>); the report
    # compares them and the best one that passes the gate is promoted.
    variants: tuple = key(
        (),
        "a sweep: a list of LoRA variants, each a JSON object of overrides, e.g. "
        '[{"lora_rank": 4}, {"lora_rank": 8, "learning_rate": 0.0001}]; each is fine-tuned and '
        "compared in one report, the best that passes the gate is promoted. Empty: one fine-tune. "
        "Keys a variant may set: <variant keys>",
        stages=(SWEEP,), param=True, schema={"items": {"type": "object"}, "maxItems": MAX_VARIANTS}, trust=TRAINING)

    # -- export of the champion -------------------------------------------------------------
    export_formats: tuple = key(
        EXPORT_FORMATS,
        "formats the champion is exported in: keras (a keras-hub preset with LoRA merged), hf (Hugging Face "
        "safetensors for transformers, vLLM, TGI), gguf (f16 and q8_0 for llama.cpp, Ollama, LM Studio)",
        stages=(EXPORT,), param=True, schema={"items": {"type": "string", "enum": list(EXPORT_FORMATS)}, "uniqueItems": True}, trust=TRAINING)

    # -- quality gate: the tuned model passes when all three hold ----------------------------------
    # Export applies it too: it exports the variant that passes (the one promote promotes).
    gate_rouge_l_margin: float = key(0.0, "gate: tuned held-out ROUGE-L >= base - margin", stages=(EXPORT, REPORT),
                                     range=(0.0, 1.0), trust=JUDGED)
    gate_eos_rate_margin: float = key(0.0, "gate: tuned EOS-stop rate >= base rate - margin (suite and held-out answers)",
                                      stages=(EXPORT, REPORT), range=(0.0, 1.0), trust=JUDGED)
    gate_perplexity_margin: float = key(0.05, "gate: tuned held-out response perplexity <= base x (1 + margin)",
                                        stages=(EXPORT, REPORT), range=(0.0, 100.0), trust=JUDGED)
    gate_require_significant: bool = key(
        False, "gate: the ROUGE-L and perplexity checks pass only on an improvement significant at 95% (the interval "
        "wholly on the better side of zero), not only within their margins", stages=(EXPORT, REPORT), trust=JUDGED)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def subset(self, keys: typing.Iterable[str]) -> dict[str, Any]:
        d = self.to_dict()
        return {k: d[k] for k in keys}


FIELD_TYPES: dict[str, type] = {f.name: typing.get_type_hints(Config)[f.name] for f in fields(Config)}
_META = {f.name: f.metadata for f in fields(Config)}
CHOICES: dict[str, tuple[str, ...]] = {k: m["choices"] for k, m in _META.items() if m["choices"]}
# (minimum, maximum) inclusive.
RANGES: dict[str, tuple[float, float]] = {k: m["range"] for k, m in _META.items() if m["range"]}
# What a sweep variant may change: how the adapter is trained. The data, the base model and the
# generation settings stay the run's, so every variant is compared on the same prompts and scores.
VARIANT_KEYS = tuple(k for k, m in _META.items() if m["variant"])
JUDGED_KEYS = tuple(k for k, m in _META.items() if m["trust"] == JUDGED)


def judged_changes(cfg: "Config", configured: "Config") -> list[str]:
    """The judged keys (see TRAINING, JUDGED) whose value in the run differs from the configured one:
    empty for the scheduled run and for a manual one that changed only how the adapter is trained."""
    return [k for k in JUDGED_KEYS if getattr(cfg, k) != getattr(configured, k)]


def stage_keys(stage: str) -> tuple[str, ...]:
    """The config keys a stage's outputs depend on: part of its input fingerprint."""
    return tuple(k for k, m in _META.items() if stage in m["stages"])


_JSON_TYPES = {str: "string", int: "integer", float: "number", bool: "boolean", tuple: "array", dict: "object"}


def trigger_form(defaults: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The DAG's Params as keyword arguments of Airflow's `Param` (JSON schema), in field order;
    defaults from a config file's mapping, else the field's own."""
    form = {}
    for f in fields(Config):
        meta = f.metadata
        if not meta["param"]:
            continue
        kind = _JSON_TYPES[FIELD_TYPES[f.name]]
        value = defaults.get(f.name, f.default_factory() if f.default is dataclasses.MISSING else f.default)
        spec: dict[str, Any] = {
            "default": list(value or []) if kind == "array" else dict(value) if kind == "object" else value,
            "type": kind,
            "description": meta["help"].replace("<variant keys>", ", ".join(VARIANT_KEYS)),
        }
        if f.name in CHOICES:
            spec["enum"] = list(CHOICES[f.name])
        if f.name in RANGES:
            spec["minimum"], spec["maximum"] = RANGES[f.name]
        spec.update(meta["schema"])
        if kind == "string" and "enum" not in spec:
            spec["minLength"] = 1
        form[f.name] = spec
    return form


def coerce_variants(value: Any, source: str) -> tuple[dict[str, Any], ...]:
    """The `variants` key: a list (or its JSON/YAML text) of override mappings over VARIANT_KEYS."""
    if isinstance(value, str):
        try:
            value = parse_text(value) if value.strip() else []
        except yaml.YAMLError as e:
            raise ConfigError(f"config key 'variants' ({source}): not a JSON/YAML list: {e}") from e
    if value is None:
        value = []
    if not isinstance(value, (list, tuple)):
        raise ConfigError(f"config key 'variants' ({source}): expected a list of mappings, got {type(value).__name__}")
    if len(value) > MAX_VARIANTS:
        raise ConfigError(f"config key 'variants' ({source}): {len(value)} variants; at most {MAX_VARIANTS}")
    out: list[dict[str, Any]] = []
    for i, item in enumerate(value):
        where = f"{source}, variants[{i}]"
        if not isinstance(item, dict):
            raise ConfigError(f"config key 'variants' ({where}): expected a mapping of keys to values, got {item!r}")
        bad = sorted(set(map(str, item)) - set(VARIANT_KEYS))
        if bad:
            raise ConfigError(
                f"config key 'variants' ({where}): {bad} cannot vary between variants; "
                f"a variant may set {list(VARIANT_KEYS)}"
            )
        coerced = {k: _coerce(k, item[k], where) for k in sorted(item)}
        if coerced in out:
            raise ConfigError(f"config key 'variants' ({where}): the same overrides as variants[{out.index(coerced)}]")
        out.append(coerced)
    return tuple(out)


def coerce_formats(value: Any, source: str) -> tuple[str, ...]:
    """The `export_formats` key: a list (or its JSON/YAML text, or comma-separated names)."""
    if isinstance(value, str):
        text = value.strip()
        try:
            value = parse_text(text) if text.startswith("[") else [v.strip() for v in text.split(",") if v.strip()]
        except yaml.YAMLError as e:
            raise ConfigError(f"config key 'export_formats' ({source}): not a list: {e}") from e
    if value is None:
        value = []
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"config key 'export_formats' ({source}): expected a list of names, got {value!r}")
    unknown = sorted(set(value) - set(EXPORT_FORMATS))
    if unknown:
        raise ConfigError(f"config key 'export_formats' ({source}): {unknown} not among {list(EXPORT_FORMATS)}")
    return tuple(f for f in EXPORT_FORMATS if f in value)


def coerce_columns(value: Any, source: str) -> dict[str, str]:
    """The `dataset_columns` key: a mapping (or its JSON/YAML text) of roles to column names."""
    where = f"config key 'dataset_columns' ({source})"
    if isinstance(value, str):
        try:
            value = parse_text(value) if value.strip() else {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{where}: not a JSON/YAML mapping: {e}") from e
    if value is None:
        value = {}
    if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str) and v for k, v in value.items()):
        raise ConfigError(f"{where}: expected a mapping of roles to column names, e.g. "
                          f'{{"instruction": "question", "response": "answer"}}, got {value!r}')
    unknown = sorted(set(value) - set(COLUMN_ROLES))
    if unknown:
        raise ConfigError(f"{where}: {unknown} are not roles; roles are {list(COLUMN_ROLES)}")
    return dict(sorted(value.items()))


def parse_text(text: str) -> Any:
    """A value given as text (`--set k=v`, a pod's argv): JSON first, as the DAG renders every list and
    mapping, so a quote, a backslash or U+2028 arrives as the worker validated it; else a YAML
    scalar or flow collection, as a person types it ("5e-5", "true", [a, b])."""
    try:
        return json.loads(text)
    except ValueError:
        return yaml.safe_load(text)


def _coerce(key: str, value: Any, source: str) -> Any:
    if key == "variants":
        return coerce_variants(value, source)
    if key == "export_formats":
        return coerce_formats(value, source)
    if key == "dataset_columns":
        return coerce_columns(value, source)
    want = FIELD_TYPES[key]
    if isinstance(value, str) and want is not str:
        # Values from `--set k=v` arrive as text: read them as YAML scalars ("5e-5", "true").
        try:
            value = parse_text(value) if value.strip() else value
        except yaml.YAMLError:
            pass
        if isinstance(value, str) and want is float:
            try:
                value = float(value)
            except ValueError:
                pass
    if want is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    ok = isinstance(value, want) and not (want is not bool and isinstance(value, bool))
    if not ok:
        raise ConfigError(
            f"config key '{key}' ({source}): expected {want.__name__}, got {type(value).__name__} {value!r}"
        )
    if want is float and not math.isfinite(value):
        # NaN passes every range comparison, and JSON from Airflow's `-c` may carry it.
        raise ConfigError(f"config key '{key}' ({source}): {value!r} is not a finite number")
    if key in CHOICES and value not in CHOICES[key]:
        raise ConfigError(f"config key '{key}' ({source}): {value!r} is not one of {list(CHOICES[key])}")
    if key in RANGES:
        lo, hi = RANGES[key]
        if value < lo or value > hi:
            raise ConfigError(f"config key '{key}' ({source}): {value!r} is outside [{lo}, {hi}]")
    return value


def _check_keys(mapping: dict, source: str) -> None:
    unknown = sorted(set(mapping) - set(FIELD_TYPES))
    if unknown:
        raise ConfigError(
            f"unknown config key(s) {unknown} in {source}; known keys: {sorted(FIELD_TYPES)}"
        )


def config_path(name_or_path: str) -> Path:
    """A config name ("cpu_demo") names tasks/configs/<name>.yaml; anything else is a file path."""
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") or p.parent != Path("."):
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        return p
    p = CONFIG_DIR / f"{name_or_path}.yaml"
    if not p.is_file():
        known = sorted(x.stem for x in CONFIG_DIR.glob("*.yaml"))
        raise ConfigError(f"unknown config '{name_or_path}'; known configs: {known} (or give a .yaml path)")
    return p


def read_config_file(name_or_path: str) -> dict[str, Any]:
    """The raw mapping of a config file, keys checked (used by the DAG for its Param defaults)."""
    path = config_path(name_or_path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of keys to values")
    _check_keys(data, str(path))
    return data


def parse_overrides(pairs: typing.Iterable[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {pair!r} must look like key=value")
        out[key.strip()] = value
    return out


def load_config(name_or_path: str, overrides: dict[str, Any] | None = None) -> Config:
    """Load a named or file config, apply overrides, validate every value."""
    data = read_config_file(name_or_path)
    path = config_path(name_or_path)
    values = {k: _coerce(k, v, str(path)) for k, v in data.items()}
    overrides = overrides or {}
    _check_keys(overrides, "overrides")
    values.update({k: _coerce(k, v, "override") for k, v in overrides.items()})
    cfg = Config(**values)
    _check_consistency(cfg)
    return cfg


def _check_consistency(cfg: Config) -> None:
    if not cfg.model_preset.strip():
        raise ConfigError("config key 'model_preset' is empty")
    suite = PROMPT_SUITE_DIR / f"{cfg.prompt_suite}.yaml"
    if not Path(cfg.prompt_suite).is_file() and not suite.is_file():
        known = sorted(x.stem for x in PROMPT_SUITE_DIR.glob("*.yaml"))
        raise ConfigError(f"config key 'prompt_suite': no suite {cfg.prompt_suite!r}; known: {known}")
    if cfg.dataset_format == "columns":
        missing = [r for r in REQUIRED_COLUMNS if r not in cfg.dataset_columns]
        if missing:
            raise ConfigError(f"config key 'dataset_columns': dataset_format 'columns' needs a column for {missing}, "
                              f'e.g. {{"instruction": "question", "response": "answer"}}; got {cfg.dataset_columns}')
    elif cfg.dataset_columns:
        raise ConfigError(f"config key 'dataset_columns' is set but dataset_format is {cfg.dataset_format!r}; "
                          "it applies to dataset_format 'columns' only")
    check_validation(cfg)
    src = cfg.dataset_source
    if src not in ("bundled", "hub") and not Path(src).is_file():
        raise ConfigError(
            f"config key 'dataset_source': {src!r} is neither 'bundled', 'hub' nor an existing file"
        )


def check_validation(cfg: Config) -> None:
    """keep: best and early stopping judge by the validation loss: without validation examples there is none."""
    if cfg.validation_examples == 0:
        for name, on in (("keep", cfg.keep == "best"), ("early_stopping_patience", cfg.early_stopping_patience > 0)):
            if on:
                raise ConfigError(f"config key '{name}' ({getattr(cfg, name)!r}) needs validation_examples > 0: "
                                  "it judges by the validation loss")


def fingerprint(*parts: Any) -> str:
    """A stable hash of JSON-able parts: what a stage's outputs depend on."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def reference() -> str:
    """docs/config-reference.md: every key of Config with its type, default, range or choices, the
    stages whose outputs it changes (or why none), and whether a variant or the trigger form sets it.
    `python -m tasks.pipeline.config > docs/config-reference.md` writes it; a test keeps it current."""
    def cell(text: Any) -> str:
        return str(text).replace("|", "\\|").replace("\n", " ")

    rows = []
    for f in fields(Config):
        m = f.metadata
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        allowed = (f"{m['range'][0]} to {m['range'][1]}" if m["range"]
                   else ", ".join(f"`{c}`" for c in m["choices"]) if m["choices"] else "")
        affects = ", ".join(f"`{st}`" for st in m["stages"]) or f"none: {m['no_outputs']}"
        who = ", ".join(w for w, on in (("variant", m["variant"]), ("Param", m["param"])) if on)
        rows.append(f"| `{f.name}` | {FIELD_TYPES[f.name].__name__} | `{cell(json.dumps(default))}` | {cell(allowed)} "
                    f"| {cell(affects)} | {who} | {m['trust']} | {cell(m['help'])} |")
    head = ["# Configuration reference", "",
            "Generated from `Config` in `tasks/pipeline/config.py` (`python -m tasks.pipeline.config >",
            "docs/config-reference.md`); `tests/architecture/test_config_keys.py` fails when this page is stale.",
            "A config file (`tasks/configs/*.yaml`) sets any of these keys; `--set key=value` and the trigger",
            "form's Params override them; a sweep variant may set those marked `variant`. \"Stages\" are the",
            "stages whose input fingerprint holds the key: changing it reruns them. \"Trust\": a run that",
            "changes a `judged` key from the DAG's configured value waits for a person's approval before its",
            "promotion (docs/security.md); `training` keys stay trusted.", "",
            "| key | type | default | range or choices | stages | set by | trust | meaning |",
            "|---|---|---|---|---|---|---|---|"]
    return "\n".join(head + rows) + "\n"


if __name__ == "__main__":
    print(reference(), end="")
