"""python -m tasks.preprocess --config cpu_demo --run-dir DIR [--set num_examples=200]

Stage 2 of 8: turn the snapshot into training and held-out examples. Drops rows that have a `context`
(the seed's choice; `drop_context: false` keeps them and puts the context into the prompt; empty
instructions or responses and exact duplicates never get here: the snapshot drops and counts them
as bad records), renders every conversation in the `prompt_template` (tasks.text.prompt_template: the
text, and where its assistant turns are, for the loss mask), draws a seeded held-out split (kept
with its reference answers: a held-out conversation's final answer) and, disjoint from it, a seeded
training subset, then, with `validation_examples`, a validation set outside both. Token lengths
are measured with the model's own tokenizer; the manifest records how many examples exceed the
sequence length (they are truncated in training), every drop by reason, the template and one
rendered example.
"""

from __future__ import annotations

import collections
import logging
import random
from pathlib import Path

from tasks.text import prompt_template, records as records_lib
from tasks.pipeline import artifacts, storage
from tasks.pipeline.artifacts import PREPROCESS as STAGE
from tasks.infra.cli import stage_main
from tasks.pipeline.config import Config, ConfigError, fingerprint, stage_keys

log = logging.getLogger("gemma_pipeline")

CONFIG_KEYS = stage_keys(STAGE)


def filter_records(records: list[dict], drop_context: bool) -> tuple[list[dict], dict[str, int]]:
    # Only the recipe's choice is made here. Empty instructions or responses and duplicates are bad
    # records, dropped and counted by the snapshot (its manifest's `validation`), so each is counted
    # once, there; a snapshot's records.jsonl holds none of them.
    kept, dropped = [], collections.Counter()
    for rec in records:
        if drop_context and rec["context"].strip():
            dropped["has_context"] += 1
        else:
            kept.append(rec)
    return kept, dict(sorted(dropped.items()))


def split(records: list[dict], cfg: Config) -> tuple[list[dict], list[dict], list[dict]]:
    """(train, held-out, validation): held-out first, so the evaluation split does not move when
    num_examples changes, then training, then validation after both, so drawing validation
    examples moves neither."""
    parts = [("num_examples", cfg.num_examples), ("heldout_examples", cfg.heldout_examples)]
    if cfg.validation_examples:
        parts.append(("validation_examples", cfg.validation_examples))
    need = sum(n for _, n in parts)
    if len(records) < need:
        raise ConfigError(
            f"{' + '.join(f'{k} ({n})' for k, n in parts)} = {need}, but only {len(records)} usable records remain "
            "after filtering; lower num_examples or use a bigger dataset_source"
        )
    order = list(range(len(records)))
    random.Random(cfg.subset_seed).shuffle(order)
    trained = cfg.heldout_examples + cfg.num_examples
    heldout = [records[i] for i in order[: cfg.heldout_examples]]
    train = [records[i] for i in order[cfg.heldout_examples : trained]]
    validation = [records[i] for i in order[trained:need]]
    return train, heldout, validation


def rendered(records: list[dict], cfg: Config) -> list[dict]:
    """Each record in the run's template: the training text, the spans of its assistant turns (the
    loss mask of `loss_tokens: response`), the prompt (the conversation up to its final answer),
    and, for the report, the final instruction, its reference answer and the turns before it."""
    out = []
    for r in records:
        context = "" if cfg.drop_context else r["context"]
        text, spans = prompt_template.render(r["messages"], cfg.prompt_template, context)
        out.append({
            "id": r["id"],
            "category": r["category"],
            "instruction": records_lib.instruction(r),
            "response": records_lib.response(r),
            "earlier_turns": records_lib.earlier_turns(r),
            "prompt": text[: spans[-1][0]],
            "text": text,
            "spans": spans,
        })
    return out


def token_lengths(texts: list[str], tokenizer, batch: int = 512) -> list[int]:
    """Tokens per example as the model sees them: text plus <bos> and <eos>."""
    lengths = []
    for start in range(0, len(texts), batch):
        ids = tokenizer(texts[start : start + batch])
        lengths += [len(x) + 2 for x in (ids.to_list() if hasattr(ids, "to_list") else ids)]
    return lengths


def length_stats(lengths: list[int], sequence_length: int) -> dict:
    s = sorted(lengths)

    def q(p: float) -> int:
        return s[min(len(s) - 1, int(p * (len(s) - 1) + 0.5))]

    edges = [0, 32, 64, 128, 256, 512, 1024, 2048]
    hist = collections.Counter()
    for n in s:
        lo = max(e for e in edges if e <= n)
        hist[lo] += 1
    return {
        "count": len(s),
        "min": s[0],
        "p50": q(0.5),
        "p90": q(0.9),
        "p99": q(0.99),
        "max": s[-1],
        "mean": round(sum(s) / len(s), 1),
        "over_sequence_length": sum(1 for n in s if n > sequence_length),
        "histogram": [{"from": e, "count": hist.get(e, 0)} for e in edges],
    }


def run(cfg: Config, run_dir: Path, force: bool = False) -> dict:
    snap = storage.require(run_dir, artifacts.SNAPSHOT, STAGE)

    def body(out: Path) -> dict:
        from tasks.modeling.presets import load_tokenizer

        records = artifacts.read_records(run_dir)
        kept, dropped = filter_records(records, cfg.drop_context)
        train, heldout, validation = split(kept, cfg)
        log.info("preprocess: %d records, %d usable, dropped %s", len(records), len(kept), dropped)
        tokenizer = load_tokenizer(cfg.model_preset, cfg.models_dir)
        train_rows, held_rows = rendered(train, cfg), rendered(heldout, cfg)
        train_len = token_lengths([r["text"] for r in train_rows], tokenizer)
        held_len = token_lengths([r["text"] for r in held_rows], tokenizer)
        storage.write_jsonl(out / artifacts.TRAIN, [
            {k: r[k] for k in ("id", "category", "prompt", "text", "spans")} | {"n_tokens": n}
            for r, n in zip(train_rows, train_len)
        ])
        storage.write_jsonl(out / artifacts.HELDOUT, [r | {"n_tokens": n} for r, n in zip(held_rows, held_len)])
        if validation:  # none by default: the seed's outputs stay byte for byte what they were
            val_rows = rendered(validation, cfg)
            val_len = token_lengths([r["text"] for r in val_rows], tokenizer)
            storage.write_jsonl(out / artifacts.VALIDATION, [r | {"n_tokens": n} for r, n in zip(val_rows, val_len)])
        stats = length_stats(train_len, cfg.sequence_length)
        manifest = {
            "snapshot_sha256": snap["result"]["sha256"],
            "rows_in": len(records),
            "rows_usable": len(kept),
            "dropped": dropped,
            "train_examples": len(train),
            "heldout_examples": len(heldout),
            **({"validation_examples": len(validation)} if validation else {}),
            "train_categories": dict(sorted(collections.Counter(r["category"] for r in train if r["category"]).items())),
            "train_multi_turn": sum(1 for r in train if len(records_lib.turns(r)) > 2),
            "sequence_length": cfg.sequence_length,
            "train_token_lengths": stats,
            "heldout_over_sequence_length": sum(1 for n in held_len if n > cfg.sequence_length),
            "template": cfg.prompt_template,
            "context_in_prompt": not cfg.drop_context,
            # What the model is trained on, whole: the report shows it (escaped).
            "example": train_rows[0]["text"] if train_rows else "",
        }
        storage.write_json(out / artifacts.MANIFEST, manifest)
        log.info(
            "preprocess: %d train / %d held-out examples; tokens p50 %d, p90 %d, max %d; %d over %d tokens",
            len(train), len(heldout), stats["p50"], stats["p90"], stats["max"], stats["over_sequence_length"], cfg.sequence_length,
        )
        return {"train_examples": len(train), "heldout_examples": len(heldout), "over_sequence_length": stats["over_sequence_length"]}

    fp = fingerprint(STAGE, snap["fingerprint"], cfg.subset(CONFIG_KEYS))
    return storage.run_stage(run_dir, STAGE, fp, body, force)


def main(argv=None) -> dict:
    return stage_main(STAGE, __doc__, run, argv)


if __name__ == "__main__":
    main()
