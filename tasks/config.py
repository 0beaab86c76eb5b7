"""The pipeline's one configuration: a frozen, flat dataclass loaded from YAML, validated.

Keys are flat on purpose: a key is the same word in a YAML file, a `--set key=value` override on a
stage's command line and a Param in the DAG's trigger form. Unknown keys, wrong types and values out
of range are errors that name the key and where it came from.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import typing
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import yaml

CONFIG_DIR = Path(__file__).parent / "configs"
PROMPT_SUITE_DIR = Path(__file__).parent / "prompt_suites"
BUNDLED_DOLLY = Path(__file__).parent / "data" / "dolly_sample.jsonl"

# Dolly 15k's last commit on the hub (the May 2023 text revision that the bundled sample matches).
DOLLY_HUB_ID = "databricks/databricks-dolly-15k"
DOLLY_PINNED_REVISION = "bdd27f4d94b9c1f951818a7da7fd7aeea5dbff1a"


class ConfigError(ValueError):
    """A configuration value is wrong; the message names the key and its source."""


@dataclass(frozen=True)
class Config:
    # -- dataset snapshot ------------------------------------------------------------------
    # "bundled" (the attributed sample in tasks/data), "hub" (the Hugging Face hub through
    # `datasets`), or a path to a local .jsonl / .json / .parquet file with Dolly's fields.
    dataset_source: str = "bundled"
    dataset_hub_id: str = DOLLY_HUB_ID
    dataset_revision: str = DOLLY_PINNED_REVISION
    # Seconds the hub may take to answer before the snapshot fails as unreachable.
    hub_timeout_s: float = 20.0
    # Bad records (malformed JSON, invalid UTF-8, missing or mistyped fields, empty instruction or
    # response, too large, duplicate, unknown category): "skip" drops and counts them by reason,
    # "fail" stops the snapshot at the first one, naming its line and field.
    bad_record_policy: str = "skip"
    # With "skip": the snapshot still fails when more than this share of the records is bad (a
    # broken upstream file should stop the run, not quietly train on what is left).
    max_bad_share: float = 0.05
    # A record (its JSON line, or its fields encoded as JSON) larger than this is bad ("too_large").
    max_record_bytes: int = 100_000

    # -- preprocessing ---------------------------------------------------------------------
    drop_context: bool = True
    num_examples: int = 1000
    heldout_examples: int = 100
    subset_seed: int = 42

    # -- model -----------------------------------------------------------------------------
    # A keras-hub preset name (downloaded through kagglehub, e.g. "gemma_2b_en"), a local preset
    # directory, "gguf:gemma3-270m" (imported from the PyPI GGUF) or "tiny:gemma"/"tiny:gemma3"
    # (small random models for tests).
    model_preset: str = "gemma_2b_en"
    # Where imported and tiny models are cached; empty means $GEMMA_MODELS_DIR or ~/.cache.
    models_dir: str = ""
    sequence_length: int = 256

    # -- LoRA fine-tune (defaults: the Keras tutorial's recipe) -----------------------------
    lora_rank: int = 4
    learning_rate: float = 5e-5
    weight_decay: float = 0.01
    epochs: int = 1
    batch_size: int = 1
    training_seed: int = 0
    # XLA for the train step. Keras's "auto" turns it off on CPU, where it halves Gemma 3's step.
    jit_compile: bool = False
    # Tokens in the loss: "all" (the tutorial: prompt and response) or "response" (response only).
    loss_tokens: str = "all"
    # How batches are built and run (the same recipe, data, order of epochs and loss either way):
    # "tutorial" pads every example to sequence_length (the Keras tutorial; jit_compile as set);
    # "fast" groups examples of similar length into batches, pads each batch only to its longest
    # example (rounded up, see bucket_*) and scales the loss so it equals the tutorial's. On a GPU it
    # compiles with XLA (one compilation per batch width, so widths are few); on a CPU it runs a
    # TensorFlow graph traced once for every width (XLA's per-width compilations cost more there
    # than they save). Mixed bfloat16 where the device computes it natively (see mixed_precision).
    # bench/README.md has the figures.
    train_mode: str = "tutorial"
    # fast mode: batch widths are multiples of this many tokens (capped at sequence_length) ...
    bucket_multiple: int = 16
    # ... and, when fast mode compiles with XLA (GPU), at most this many different widths (chosen
    # from the data to pad least): every width is one more XLA compilation. Graph mode (CPU) is not
    # limited: each batch takes the next multiple of bucket_multiple.
    bucket_shapes: int = 4
    # "auto": mixed bfloat16 in fast mode on a device that computes bfloat16 natively (a GPU of
    # compute capability >= 8.0, a CPU with AMX-BF16), float32 otherwise and always in tutorial
    # mode; "off": float32; "bfloat16": mixed bfloat16 whatever the device and mode.
    mixed_precision: str = "auto"
    # Held-out examples scored (masked loss, response perplexity) before and after tuning; at most
    # heldout_examples are there to score.
    eval_examples: int = 100
    log_every_steps: int = 1
    # Steps between fine-tune checkpoints (LoRA weights, optimizer state, step, data order) that a
    # retried task resumes from; 0 turns checkpoints off.
    checkpoint_every_steps: int = 50

    # -- generation --------------------------------------------------------------------------
    prompt_suite: str = "v1"
    max_length: int = 256
    sampler: str = "top_k"
    top_k: int = 5
    sampler_seed: int = 2
    generate_batch_size: int = 4
    # Held-out prompts both models answer, scored with ROUGE-L against the reference responses.
    heldout_generate_examples: int = 100

    # -- sweep -------------------------------------------------------------------------------
    # Several LoRA variants in one run: a list of override mappings over the training keys in
    # VARIANT_KEYS, e.g. [{lora_rank: 4}, {lora_rank: 8, learning_rate: 1e-4}]. Each variant is
    # fine-tuned and answers the prompts in its own folder (<run dir>/variants/v<i>); the report
    # compares them and the best one that passes the gate is promoted. Empty: one fine-tune, as is.
    variants: tuple = ()

    # -- quality gate: the tuned model passes when all three hold ----------------------------------
    # tuned ROUGE-L >= base ROUGE-L - margin (held-out answers vs reference responses)
    gate_rouge_l_margin: float = 0.0
    # tuned EOS-stop rate >= base rate - margin (prompt suite and held-out answers together)
    gate_eos_rate_margin: float = 0.0
    # tuned held-out response perplexity <= base perplexity * (1 + margin)
    gate_perplexity_margin: float = 0.05

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def subset(self, keys: typing.Iterable[str]) -> dict[str, Any]:
        d = self.to_dict()
        return {k: d[k] for k in keys}


FIELD_TYPES: dict[str, type] = {f.name: typing.get_type_hints(Config)[f.name] for f in fields(Config)}
CHOICES: dict[str, tuple[str, ...]] = {
    "sampler": ("top_k", "greedy"),
    "loss_tokens": ("all", "response"),
    "train_mode": ("tutorial", "fast"),
    "mixed_precision": ("auto", "off", "bfloat16"),
    "bad_record_policy": ("skip", "fail"),
}
# What a sweep variant may change: how the adapter is trained. The data, the base model and the
# generation settings stay the run's, so every variant is compared on the same prompts and scores.
VARIANT_KEYS = (
    "sequence_length", "lora_rank", "learning_rate", "weight_decay", "epochs", "batch_size",
    "training_seed", "loss_tokens", "train_mode", "bucket_multiple", "bucket_shapes", "mixed_precision",
    "jit_compile",
)
MAX_VARIANTS = 16
# (minimum, maximum) inclusive; None means unbounded.
RANGES: dict[str, tuple[float | None, float | None]] = {
    "hub_timeout_s": (1, 600),
    "max_bad_share": (0.0, 1.0),
    "max_record_bytes": (1, 1_000_000_000),
    "num_examples": (1, 1_000_000),
    "heldout_examples": (0, 100_000),
    "sequence_length": (8, 8192),
    "lora_rank": (1, 1024),
    "learning_rate": (1e-8, 1.0),
    "weight_decay": (0.0, 1.0),
    "epochs": (1, 1000),
    "batch_size": (1, 4096),
    "bucket_multiple": (1, 8192),
    "bucket_shapes": (1, 1024),
    "eval_examples": (0, 100_000),
    "log_every_steps": (1, 1_000_000),
    "checkpoint_every_steps": (0, 1_000_000),
    "max_length": (8, 8192),
    "top_k": (1, 1_000_000),
    "generate_batch_size": (1, 4096),
    "heldout_generate_examples": (0, 100_000),
    "gate_rouge_l_margin": (0.0, 1.0),
    "gate_eos_rate_margin": (0.0, 1.0),
    "gate_perplexity_margin": (0.0, 100.0),
}


def coerce_variants(value: Any, source: str) -> tuple[dict[str, Any], ...]:
    """The `variants` key: a list (or its JSON/YAML text) of override mappings over VARIANT_KEYS."""
    if isinstance(value, str):
        try:
            value = yaml.safe_load(value) if value.strip() else []
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


def _coerce(key: str, value: Any, source: str) -> Any:
    if key == "variants":
        return coerce_variants(value, source)
    want = FIELD_TYPES[key]
    if isinstance(value, str) and want is not str:
        # Values from `--set k=v` arrive as text: read them as YAML scalars ("5e-5", "true").
        try:
            value = yaml.safe_load(value) if value.strip() else value
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
    if key in CHOICES and value not in CHOICES[key]:
        raise ConfigError(f"config key '{key}' ({source}): {value!r} is not one of {list(CHOICES[key])}")
    if key in RANGES:
        lo, hi = RANGES[key]
        if (lo is not None and value < lo) or (hi is not None and value > hi):
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
    src = cfg.dataset_source
    if src not in ("bundled", "hub") and not Path(src).is_file():
        raise ConfigError(
            f"config key 'dataset_source': {src!r} is neither 'bundled', 'hub' nor an existing file"
        )


def fingerprint(*parts: Any) -> str:
    """A stable hash of JSON-able parts: what a stage's outputs depend on."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]

