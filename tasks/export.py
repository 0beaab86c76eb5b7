"""python -m tasks.export --config cpu_demo --run-dir DIR [--set export_formats=gguf] [--variant JSON]

Stage 6 of 8: export the champion for serving, and prove each export answers as the model the report
evaluated. The champion is the variant that passes the quality gate with the best held-out scores
(what `promote` then promotes; the single fine-tune when there is no sweep); when none passes,
nothing is exported. By hand, `--variant '{"name": "v1"}'` exports that variant whatever its gate.

Writes `export/` (formats: config key `export_formats`):
- `keras/`: a keras-hub preset with the LoRA weights merged into the kernels
  (`keras_hub.models.CausalLM.from_preset("<run dir>/export/keras")`);
- `hf/`: config.json, generation_config.json, model.safetensors, tokenizer files (transformers, vLLM, TGI);
- `gguf/`: model-f16.gguf, model-q8_0.gguf and an Ollama `Modelfile` with the tuned prompt format;
- `manifest.json`: every file's size and sha256, the source run, variant and adapter, the base preset,
  the merge dtype and the parity results (tasks.serving.parity) of each format.
"""

from __future__ import annotations

import gc
import logging
import time
from pathlib import Path

from tasks.pipeline import artifacts, storage
from tasks.infra import tracking
from tasks.serving import export_gguf, export_hf, export_keras, parity
from tasks.training import adapter as lora_adapter
from tasks.pipeline.artifacts import EXPORT as STAGE
from tasks.infra.cli import stage_main
from tasks.pipeline.config import Config, fingerprint, stage_keys
from tasks.evaluate.evaluation import evaluate, evaluate_sweep, variant_states
from tasks.pipeline.prompt_suite import load_suite
from tasks.text.prompt_template import instruction_prompt, text_stops
from tasks.pipeline.variants import VARIANTS_DIR, run_plan, variant_config

log = logging.getLogger("gemma_pipeline")

CONFIG_KEYS = stage_keys(STAGE)
# The Keras tutorial's two prompts: what every export must answer as the tuned model does.
PARITY_PROMPTS = ("tutorial-europe-trip", "tutorial-photosynthesis")
GGUF_FORMATS = ("f16", "q8_0")


class ExportError(storage.PermanentError):
    """Nothing can be exported from this run; the message names the cause."""


def choose(cfg: Config, run_dir: Path) -> dict | None:
    """The variant to export: this one when the stage runs in a variant's folder (by hand), else the
    best one that passes the gate; None when none passes."""
    run_dir = Path(run_dir)
    if run_dir.parent.name == VARIANTS_DIR:
        name = run_dir.name
        spec = next((s for s in run_plan(cfg, run_dir.parent.parent) if s["name"] == name), None)
        if spec is None:
            raise ExportError(f"{run_dir} is not a variant of its run's sweep plan")
        (state,) = variant_states(run_dir.parent.parent, [spec])
        if state["status"] != "ok":
            raise ExportError(f"variant {name} failed in {state['failed_stage']}: {state['error']}")
        return {**spec, "dir": str(run_dir), "run_dir": str(run_dir.parent.parent)}
    states = variant_states(run_dir, run_plan(cfg, run_dir))
    if not any(s["status"] == "ok" for s in states):
        raise ExportError("no variant finished: " + "; ".join(f"{s['name'] or 'default'}: {s['error']}" for s in states))
    name = evaluate_sweep(cfg, states)["promotable"]
    if name is None:
        return None
    spec = next(s for s in states if s["name"] == name)
    # Its gate as the report judged it (with several variants, Holm-corrected).
    return {**{k: spec[k] for k in ("index", "name", "label", "overrides", "dir")}, "run_dir": str(run_dir),
            "gate": spec["ev"]["gate"]}


def parity_texts(cfg: Config) -> list[str]:
    """The tutorial's two prompts from the run's suite (its first two prompts if it lacks them), in
    the tuned prompt format."""
    prompts = load_suite(cfg.prompt_suite)["prompts"]
    chosen = [p for p in prompts if p["id"] in PARITY_PROMPTS] or prompts[:2]
    return [instruction_prompt(p["prompt"], cfg.prompt_template) for p in chosen]


def merge(cfg: Config, adapter: Path, texts: list[str]):
    """The parity reference from the tuned model, then the merged model: (reference, merged lm, layers merged)."""
    tuned = export_keras.tuned_model(cfg.model_preset, cfg.models_dir, adapter, lora_adapter.placement(cfg))
    if {"hf", "gguf"} & set(cfg.export_formats):
        # Refuse a model the exporters would write wrong (Gemma 2) before any slow step.
        export_gguf.architecture(tuned.backbone)
    log.info("export: reference answers of the tuned model (keras-hub, adapter loaded) on %d prompts", len(texts))
    ref = parity.reference(tuned, texts)
    # The tuned model is loaded once: its merged kernels go into a fresh base, loaded after it is dropped.
    merged = export_keras.merged_weights(tuned, adapter)
    del tuned
    gc.collect()
    lm = export_keras.base_with_kernels(cfg.model_preset, cfg.models_dir, merged)
    layers = len(merged.kernels)
    log.info("export: merged the adapter into %d kernels and %d token rows (%s)", layers, len(merged.token_rows),
             lm.backbone.dtype_policy.name)
    return ref, lm, layers


def write_formats(cfg: Config, lm, ref: dict, out: Path) -> dict:
    """Every configured format into `out`, each checked against the reference: {format: parity}."""
    checks = {}
    if "keras" in cfg.export_formats:
        export_keras.write_preset(lm, out / artifacts.EXPORT_KERAS)
        checks["keras"] = parity.check_keras(ref, out / artifacts.EXPORT_KERAS)
        log.info("export: keras preset written; parity %s", checks["keras"])
    if "hf" in cfg.export_formats:
        export_hf.write(lm, out / artifacts.EXPORT_HF)
        checks["hf"] = parity.check_hf(ref, out / artifacts.EXPORT_HF)
        log.info("export: Hugging Face folder written; parity %s", checks["hf"])
    if "gguf" in cfg.export_formats:
        gdir = out / artifacts.EXPORT_GGUF
        gdir.mkdir()
        for fmt in GGUF_FORMATS:
            path = gdir / artifacts.GGUF_FILE.format(fmt=fmt)
            export_gguf.write(lm, path, fmt, name=f"{cfg.model_preset} + LoRA", context_length=cfg.max_length * 4)
            checks[f"gguf-{fmt}"] = {k: v for k, v in parity.check_gguf(ref, path, fmt).items() if k != "continuations"}
            log.info("export: %s written; parity %s", path.name, checks[f"gguf-{fmt}"])
        (gdir / artifacts.MODELFILE).write_text(
            export_gguf.modelfile(artifacts.GGUF_FILE.format(fmt="q8_0"), instruction_prompt("{instruction}", cfg.prompt_template),
                                  text_stops(cfg.prompt_template)), encoding="utf-8")
    return checks


def file_table(out: Path, final: Path) -> list[dict]:
    rows = []
    for p in sorted(x for x in out.rglob("*") if x.is_file()):
        rows.append({"path": str(final / p.relative_to(out)), "bytes": p.stat().st_size, "sha256": storage.sha256_file(p)})
    return rows


def run(cfg: Config, run_dir: Path, force: bool = False) -> dict:
    chosen = choose(cfg, run_dir)
    if chosen is None:
        log.warning("export: no variant passed the quality gate; nothing to export")
        return {"exported": False, "reason": "no variant passed the quality gate"}
    vcfg = variant_config(cfg, chosen)
    vdir = Path(chosen["dir"])
    tune = storage.require(vdir, artifacts.FINETUNE, STAGE)
    adapter = artifacts.adapter_path(vdir)
    if not adapter.is_file():
        raise ExportError(f"variant {chosen['name'] or 'default'} has no adapter at {adapter}")
    if not vcfg.export_formats:
        raise ExportError("config key 'export_formats' is empty: nothing to export")
    # Outputs of a by-hand export sit in the variant's folder, the champion's in the run folder.
    where = vdir if Path(run_dir).parent.name == VARIANTS_DIR else Path(run_dir)
    final = storage.stage_dir(where, STAGE)

    def body(out: Path) -> dict:
        import keras

        started = time.time()
        ref, lm, layers = merge(vcfg, adapter, parity_texts(vcfg))
        checks = write_formats(vcfg, lm, ref, out)
        dtype = lm.backbone.dtype_policy.variable_dtype
        del lm
        keras.backend.clear_session()
        gate = chosen.get("gate") or evaluate(vcfg, vdir)["gate"]
        manifest = {
            "run_dir": chosen["run_dir"], "variant": chosen["name"] or None, "variant_overrides": chosen["overrides"],
            "adapter": str(adapter), "adapter_sha256": storage.sha256_file(adapter), "base_preset": vcfg.model_preset,
            "lora_rank": vcfg.lora_rank, "lora_placement": lora_adapter.placement(vcfg).to_dict(),
            "merged_layers": layers, "merge_dtype": dtype, "formats": list(vcfg.export_formats),
            "template": vcfg.prompt_template, "prompt_template": instruction_prompt("{instruction}", vcfg.prompt_template),
            "parity_prompts": ref["texts"], "parity": checks,
            "gate_passed": gate["passed"],
            "files": file_table(out, final), "seconds": round(time.time() - started, 1),
        }
        storage.write_json(out / artifacts.MANIFEST, manifest)
        failed = [f for f, c in checks.items() if c.get("checked") and not c["passed"]]
        if failed:
            raise ExportError(f"exported model differs from the tuned one in {failed}: {[checks[f] for f in failed]}")
        return {"exported": True, "variant": chosen["name"] or None, "formats": list(vcfg.export_formats),
                "parity": {f: c.get("passed") for f, c in checks.items()}}

    fp = fingerprint(STAGE, chosen["name"], tune["fingerprint"], cfg.subset(CONFIG_KEYS))
    result = storage.run_stage(where, STAGE, fp, body, force)
    tracking.log_export(str(where), fp)
    return result


def main(argv=None) -> dict:
    return stage_main(STAGE, __doc__, run, argv)


if __name__ == "__main__":
    main()
