"""python -m tasks.generate --config cpu_demo --run-dir DIR [--set sampler=greedy]

Stage 5 of 8: answer the fixed prompt suite, and the first `heldout_generate_examples` held-out
instructions (never trained on), with the base model and with the tuned model (the same base
weights plus the LoRA adapter from `finetune`). Prompts are rendered in the run's `prompt_template`
(tasks.text.prompt_template; a held-out prompt is its conversation up to the final answer, as preprocess
rendered it), with the configured sampler and seed; an answer ends at <eos> (and at <end_of_turn>). Suite and held-out
prompts are answered together, longest first, in the fewest batches of at most
`generate_batch_size` (all of one size, so the generate function compiles once), by one loaded
model: base first, then the same model with the adapter loaded. For every answer it records the
text, its token count, whether the model stopped at an end token or ran into `max_length`, and the
time its batch took. Writes `answers.json`.

In a sweep every variant has the same base model, prompts and generation settings, so the base
model's answers are the same for all of them: the first variant to finish them leaves them in
`<run dir>/variants/base_answers/<fingerprint>.json` and the others reuse them (answers.json says so).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from tasks.pipeline import artifacts, storage
from tasks.infra import tracking
from tasks.training import adapter
from tasks.pipeline.artifacts import GENERATE as STAGE
from tasks.infra.cli import stage_main
from tasks.pipeline.config import Config, fingerprint, stage_keys
from tasks.pipeline.prompt_suite import load_suite
from tasks.text.prompt_template import instruction_prompt, stop_token_ids
from tasks.pipeline.variants import base_answers_dir

log = logging.getLogger("gemma_pipeline")

CONFIG_KEYS = stage_keys(STAGE)
# What the base model's answers depend on (not on the adapter, so not on where LoRA goes).
BASE_KEYS = tuple(k for k in CONFIG_KEYS if k not in ("lora_rank", "lora_targets", "lora_alpha"))


def base_answers_path(run_dir: Path, cfg: Config, suite_sha256: str) -> Path | None:
    """Where a sweep's variants share the base model's answers; None outside a sweep."""
    shared = base_answers_dir(run_dir)
    if shared is None:
        return None
    prep = storage.require(run_dir, artifacts.PREPROCESS, STAGE)["fingerprint"]
    fp = fingerprint("base-answers", prep, suite_sha256, cfg.subset(BASE_KEYS))
    return shared / f"{fp}.json"


def make_sampler(cfg: Config):
    import keras_hub

    if cfg.sampler == "greedy":
        return keras_hub.samplers.GreedySampler()
    return keras_hub.samplers.TopKSampler(k=cfg.top_k, seed=cfg.sampler_seed)


def compile_for_generation(lm, cfg: Config):
    """The run's sampler and engine on `lm`; returns the sampler. A new compile traces anew."""
    sampler = make_sampler(cfg)
    lm.compile(sampler=sampler, jit_compile=cfg.generate_xla)
    return sampler


def batches(lengths: list[int], batch_size: int) -> list[list[int]]:
    """Indices of the prompts in batches of one size (the fewest batches of at most `batch_size`,
    as equal as possible), longest prompts first: a batch starts generating at its shortest
    prompt, so prompts of similar length share a batch, and one batch shape is one compilation."""
    if not lengths:
        return []
    count = -(-len(lengths) // batch_size)
    size = -(-len(lengths) // count)
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    return [order[i : i + size] for i in range(0, len(order), size)]


def answer(lm, prompts: list[dict], cfg: Config, label: str, stops: list[int] | None = None) -> list[dict]:
    """Answers in the prompts' order; stops and token counts read from the token ids, not the text.
    Each prompt is the model's input `rendered`, or its instruction `prompt` in the run's template.

    keras-hub's generate loop already ends a batch as soon as every row has produced a stop token."""
    import keras
    import numpy as np

    pre = lm.preprocessor
    tok = pre.tokenizer
    stops = stops if stops is not None else stop_token_ids(tok, cfg.prompt_template)
    generate_fn = lm.make_generate_function()
    texts = [p.get("rendered") or instruction_prompt(p["prompt"], cfg.prompt_template) for p in prompts]
    x_all = {k: keras.ops.convert_to_numpy(v) for k, v in pre.generate_preprocess(texts, sequence_length=cfg.max_length).items()}
    prompt_len = x_all["padding_mask"].sum(axis=1)
    full = int((prompt_len >= cfg.max_length).sum())
    if full:
        log.warning("generate [%s]: %d of %d prompts are max_length (%d) tokens or longer: cut to it, no room to answer; "
                    "raise max_length (a multi-turn prompt holds the conversation so far)", label, full, len(prompts), cfg.max_length)
    plan = batches([int(n) for n in prompt_len], cfg.generate_batch_size)
    size = len(plan[0]) if plan else 0
    results: list[dict | None] = [None] * len(prompts)
    done = 0
    for b, idx in enumerate(plan):
        # Pad a short batch with copies: a new batch shape would compile the generate function again.
        rows = idx + idx[-1:] * (size - len(idx))
        x = {k: v[rows] for k, v in x_all.items()}
        t = time.time()
        y = generate_fn(x, stop_token_ids=tuple(stops) if stops else None)
        seconds = time.time() - t
        ids = keras.ops.convert_to_numpy(y["token_ids"])
        mask = keras.ops.convert_to_numpy(y["padding_mask"])
        new_tokens = 0
        for j, i in enumerate(idx):
            p = prompts[i]
            gen = ids[j, int(prompt_len[i]) : int(mask[j].sum())].tolist()
            stopped = bool(gen) and gen[-1] in stops
            if stopped:
                gen = gen[:-1]
            new_tokens += len(gen)
            text = tok.detokenize(np.asarray(gen, dtype="int32")) if gen else ""
            text = text.numpy().decode("utf-8", errors="replace") if hasattr(text, "numpy") else str(text)
            results[i] = {
                "id": p["id"],
                "category": p["category"],
                "prompt": p["prompt"],
                "text": text,
                "tokens": len(gen),
                "stopped_at_eos": stopped,
                # Which end token: <eos>, or <end_of_turn> (Gemma's chat turn end).
                "stop_token": tok.id_to_token(int(ids[j, int(mask[j].sum()) - 1])) if stopped else None,
                "hit_max_length": not stopped and int(prompt_len[i]) + len(gen) >= cfg.max_length,
                "batch": b,
                "batch_seconds": round(seconds, 3),
            }
        done += len(idx)
        log.info(
            "generate [%s]: %d/%d prompts, batch of %d in %.1f s (%.1f new tokens/s)",
            label, done, len(prompts), len(idx), seconds, new_tokens / max(seconds, 1e-9),
        )
    return results


def reset_sampler(sampler, states: list) -> None:
    """Put the sampler's random state back to where it started (no retrace: the traced generate
    function reads the state variable)."""
    for generator, state in zip(getattr(sampler, "_seed_generators", []), states):
        generator.state.assign(state)


def run(cfg: Config, run_dir: Path, force: bool = False) -> dict:
    tune = storage.require(run_dir, artifacts.FINETUNE, STAGE)
    suite = load_suite(cfg.prompt_suite)

    def body(out: Path) -> dict:
        import keras

        from tasks.modeling.presets import load_causal_lm

        adapter_file = artifacts.adapter_path(run_dir)
        heldout = [
            {"id": r["id"], "category": r["category"], "prompt": r["instruction"], "rendered": r["prompt"],
             "earlier_turns": r.get("earlier_turns", []), "reference": r["response"]}
            for r in artifacts.read_heldout(run_dir)
        ][: cfg.heldout_generate_examples]
        prompts = suite["prompts"] + heldout
        keras.utils.set_random_seed(cfg.sampler_seed)
        # One model for both: LoRA (and any token rows) is enabled before anything is traced, with
        # its B matrices and rows at zero, so the base answers are the base model's exactly; loading the
        # adapter then only assigns variables, and the compiled generate function serves both.
        lm = load_causal_lm(cfg.model_preset, cfg.models_dir)
        adapter.enable_for(lm, adapter_file, adapter.placement(cfg))
        sampler = compile_for_generation(lm, cfg)
        seeds = [g.state.numpy() for g in getattr(sampler, "_seed_generators", [])]
        results, seconds = {}, {}
        shared = base_answers_path(run_dir, cfg, suite["sha256"])
        reused = None
        if shared is not None and shared.is_file():
            cached = storage.read_json(shared)
            results["base"], seconds["base"], reused = cached["answers"], cached["seconds"], cached["variant"]
            log.info("generate: base model's answers reused from variant %s (%s): same model, prompts and settings",
                     reused, shared)
        for model in ("base", "tuned"):
            if model in results:
                continue
            if model == "tuned":
                adapter.load(lm, adapter_file, adapter.placement(cfg))
            # Both models answer from the sampler's seed.
            reset_sampler(sampler, seeds)
            t = time.time()
            answers = answer(lm, prompts, cfg, model)
            results[model] = {"suite": answers[: len(suite["prompts"])], "heldout": answers[len(suite["prompts"]) :]}
            seconds[model] = round(time.time() - t, 2)
            if model == "base" and shared is not None:
                shared.parent.mkdir(exist_ok=True)
                storage.write_json(shared, {"variant": Path(run_dir).name, "answers": results["base"],
                                            "seconds": seconds["base"]})
        for model in ("base", "tuned"):
            for a, ref in zip(results[model]["heldout"], heldout):
                a["reference"], a["earlier_turns"] = ref["reference"], ref["earlier_turns"]
        base, tuned = results["base"]["suite"], results["tuned"]["suite"]
        data = {
            "suite": {k: suite[k] for k in ("name", "description", "sha256", "path")},
            "sampler": {"name": cfg.sampler, "top_k": cfg.top_k, "seed": cfg.sampler_seed, "max_length": cfg.max_length},
            "models": {"base": base, "tuned": tuned},
            "heldout": {"base": results["base"]["heldout"], "tuned": results["tuned"]["heldout"]},
            "seconds": seconds,
            "base_answers_reused_from": reused,
            # Which adapter answered (finetune keeps the best or the last step's: its result.json says which).
            "adapter_sha256": storage.sha256_file(adapter_file),
        }
        storage.write_json(out / artifacts.ANSWERS, data)
        del lm
        keras.backend.clear_session()
        return {
            "suite": suite["name"],
            "suite_sha256": suite["sha256"],
            "prompts": len(suite["prompts"]),
            "base_stopped_at_eos": sum(a["stopped_at_eos"] for a in base),
            "tuned_stopped_at_eos": sum(a["stopped_at_eos"] for a in tuned),
        }

    fp = fingerprint(STAGE, tune["fingerprint"], suite["sha256"], cfg.subset(CONFIG_KEYS))
    result = storage.run_stage(run_dir, STAGE, fp, body, force)
    tracking.log_generate(str(run_dir), fp)
    return result


def main(argv=None) -> dict:
    return stage_main(STAGE, __doc__, run, argv)


if __name__ == "__main__":
    main()
