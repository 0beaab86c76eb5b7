"""The export stage: the champion in keras-hub, Hugging Face and GGUF formats, each loaded by an
independent runtime (keras-hub from_preset, transformers + torch, llama.cpp) and compared with the
tuned model. Tiny models in the fast part; the real Gemma 3 270M in the `real` tier."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys

import numpy as np
import pytest

from tasks import export, finetune, generate, preprocess, snapshot
from tasks.text import prompt_template
from tasks.pipeline import artifacts
from tasks.serving import export_gguf, parity
from tasks.pipeline.config import load_config
from tasks.text.prompt_template import instruction_prompt
from tasks.pipeline import storage
from tasks.pipeline.storage import StageInputError
from tests.conftest import copy_run

# A gate every tuned tiny model passes: these tests are about the export, not the tuning.
OPEN_GATE = {"gate_rouge_l_margin": "1.0", "gate_eos_rate_margin": "1.0", "gate_perplexity_margin": "100"}


def settings_for(model: str, **extra) -> dict:
    return {"model_preset": model, "num_examples": "16", **OPEN_GATE, **extra}


def tiny_cfg(model: str, **extra):
    return load_config("tiny_test", settings_for(model, **extra))


def answered(trained_run, tmp_path, model: str, **extra):
    """A copy of the session's tiny run of `model` up to generate, to export."""
    return copy_run(trained_run("generate", **settings_for(model, **extra)), tmp_path / "run")


ALL_LINEAR = {"lora_targets": "all_linear", "lora_alpha": "8"}


@pytest.fixture(scope="module", params=[("tiny:gemma3", ALL_LINEAR), ("tiny:gemma", ALL_LINEAR),
                                        ("tiny:gemma3", {"prompt_template": "gemma_chat"})],
                ids=["tiny:gemma3-all_linear", "tiny:gemma-all_linear", "tiny:gemma3-gemma_chat"])
def exported(request, trained_run, tmp_path_factory):
    """The first two: LoRA on every linear layer (attention and MLP) at alpha = 2 x rank: every
    format carries all seven merges per block. The third: the seed's query/value placement with the
    chat template, whose fine-tune also trains the turn tokens' embedding rows
    (tasks.training.adapter): the exports carry them merged."""
    model, extra = request.param
    run_dir = answered(trained_run, tmp_path_factory.mktemp("export"), model, **extra)
    cfg = tiny_cfg(model, **extra)
    return cfg, run_dir, export.run(cfg, run_dir)


@pytest.mark.e2e
def test_every_format_answers_as_the_tuned_model(exported):
    cfg, run_dir, result = exported
    manifest = artifacts.read_export_manifest(run_dir)
    assert result["exported"] and manifest["formats"] == ["keras", "hf", "gguf"]
    p = manifest["parity"]
    assert all(c["checked"] and c["passed"] for c in p.values()), p
    assert p["keras"]["max_abs_logit_diff"] <= 1e-5 * p["keras"]["max_abs_logit"]
    assert p["hf"]["same_token_ids"] and p["hf"]["max_abs_logprob_diff"] <= 1e-3
    assert p["hf"]["greedy_same_tokens"] == [16, 16]
    assert p["gguf-f16"]["same_token_ids"] and min(p["gguf-f16"]["greedy_same_tokens"]) >= 8
    assert p["gguf-q8_0"]["same_token_ids"] and p["gguf-q8_0"]["reference_in_top_k"] == [16, 16]
    assert min(p["gguf-f16"]["reference_in_top_k"]) == 16
    assert manifest["adapter"] == str(artifacts.adapter_path(run_dir))
    placement = manifest["lora_placement"]
    assert placement["targets"] == cfg.lora_targets and placement["alpha"] == (cfg.lora_alpha or cfg.lora_rank)
    from tasks.modeling.presets import load_causal_lm

    blocks = load_causal_lm(cfg.model_preset, cfg.models_dir).backbone.num_layers
    assert manifest["merged_layers"] == blocks * len(placement["layers"])  # every targeted layer, every block
    rows = artifacts.read_finetune_result(run_dir)["token_rows"]
    assert sorted(rows) == (["<end_of_turn>", "<start_of_turn>"] if cfg.prompt_template == "gemma_chat" else [])


@pytest.mark.e2e
def test_the_merge_is_not_a_no_op(exported):
    """The adapter changed the model: the merged export differs from the base model."""
    cfg, run_dir, _ = exported
    from tasks.modeling.presets import load_causal_lm

    texts = export.parity_texts(cfg)
    base = parity.reference(load_causal_lm(cfg.model_preset, cfg.models_dir), texts[:1])
    merged = parity.reference(__import__("keras_hub").models.CausalLM.from_preset(
        str(artifacts.path(run_dir, artifacts.EXPORT, artifacts.EXPORT_KERAS))), texts[:1])
    assert float(np.abs(base["logits"][0] - merged["logits"][0]).max()) > 1e-3


@pytest.mark.e2e
def test_manifest_lists_every_file_with_its_size_and_sha256(exported):
    _, run_dir, _ = exported
    manifest = artifacts.read_export_manifest(run_dir)
    folder = artifacts.path(run_dir, artifacts.EXPORT, "")
    on_disk = sorted(str(p) for p in folder.rglob("*") if p.is_file() and p.name != artifacts.MANIFEST and p.name != "_SUCCESS")
    assert sorted(f["path"] for f in manifest["files"]) == on_disk
    for f in manifest["files"]:
        data = open(f["path"], "rb").read()
        assert len(data) == f["bytes"] and hashlib.sha256(data).hexdigest() == f["sha256"]
    names = {p.rsplit("/", 1)[-1] for p in on_disk}
    assert {"model-f16.gguf", "model-q8_0.gguf", "Modelfile", "config.json", "generation_config.json",
            "model.safetensors", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"} <= names


@pytest.mark.e2e
def test_hf_ids_and_the_modelfile_name_the_right_tokens(exported):
    cfg, run_dir, _ = exported
    from tasks.modeling.presets import load_tokenizer

    tok = load_tokenizer(cfg.model_preset, cfg.models_dir)
    hf = artifacts.path(run_dir, artifacts.EXPORT, artifacts.EXPORT_HF)
    config = json.loads((hf / "config.json").read_text())
    gen = json.loads((hf / "generation_config.json").read_text())
    eot = tok.token_to_id("<end_of_turn>")
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (
        tok.start_token_id, tok.end_token_id, tok.pad_token_id)
    assert gen["eos_token_id"] == [tok.end_token_id, eot] and gen["bos_token_id"] == tok.start_token_id
    assert config["torch_dtype"] == "float32"
    modelfile = (artifacts.path(run_dir, artifacts.EXPORT, artifacts.EXPORT_GGUF) / artifacts.MODELFILE).read_text()
    assert "FROM ./model-q8_0.gguf" in modelfile
    assert f'TEMPLATE """{instruction_prompt("{instruction}", cfg.prompt_template).replace("{instruction}", "{{ .Prompt }}")}"""' in modelfile
    assert 'PARAMETER stop "<end_of_turn>"' in modelfile


@pytest.mark.e2e
def test_a_rerun_with_the_same_inputs_does_nothing(exported):
    cfg, run_dir, _ = exported
    stamp = (artifacts.path(run_dir, artifacts.EXPORT, artifacts.MANIFEST)).stat().st_mtime_ns
    export.run(cfg, run_dir)
    assert artifacts.path(run_dir, artifacts.EXPORT, artifacts.MANIFEST).stat().st_mtime_ns == stamp


@pytest.mark.model
def test_gemma2_is_refused_by_name():
    import keras_hub

    backbone = keras_hub.models.GemmaBackbone(
        vocabulary_size=64, num_layers=1, num_query_heads=1, num_key_value_heads=1, hidden_dim=16,
        intermediate_dim=32, head_dim=16, use_post_ffw_norm=True, use_post_attention_norm=True,
        final_logit_soft_cap=30.0, attention_logit_soft_cap=50.0)
    with pytest.raises(export_gguf.GGUFExportError, match="Gemma 2 is not exportable yet"):
        export_gguf.architecture(backbone)


@pytest.mark.model
def test_nothing_is_exported_when_no_variant_passes_the_gate(tmp_path):
    cfg = load_config("tiny_test", {"num_examples": "16", "gate_perplexity_margin": "0",
                                    "gate_rouge_l_margin": "0", "gate_eos_rate_margin": "0"})
    run_dir = tmp_path / "run"
    for stage in (snapshot, preprocess, finetune, generate):
        stage.run(cfg, run_dir)
    from tasks.evaluate.evaluation import evaluate

    if evaluate(cfg, run_dir)["gate"]["passed"]:
        pytest.skip("this tiny fine-tune passed a strict gate")
    assert export.run(cfg, run_dir) == {"exported": False, "reason": "no variant passed the quality gate"}
    assert not (run_dir / artifacts.EXPORT).exists()


@pytest.mark.e2e
def test_bad_input_fails_clearly_and_writes_nothing(trained_run, tmp_path, monkeypatch):
    cfg = tiny_cfg("tiny:gemma3")
    run_dir = answered(trained_run, tmp_path, "tiny:gemma3")
    answers = {stage: tmp_path / f"{stage}.kept" for stage in ("finetune", "generate")}
    for stage, kept in answers.items():  # as after snapshot and preprocess only
        (run_dir / stage).rename(kept)
    with pytest.raises((StageInputError, export.ExportError), match="no variant finished"):
        export.run(cfg, run_dir)
    for stage, kept in answers.items():
        kept.rename(run_dir / stage)

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(export_gguf, "write", full_disk)
    with pytest.raises(storage.DiskFullError, match=f"the disk is full: publishing {run_dir / artifacts.EXPORT} failed"):
        export.run(cfg, run_dir)
    assert not (run_dir / artifacts.EXPORT).exists() and not list(run_dir.glob(".export.*"))
    artifacts.adapter_path(run_dir).unlink()
    with pytest.raises(export.ExportError, match="has no adapter"):
        export.run(cfg, run_dir)


@pytest.mark.e2e
def test_our_importer_reads_the_exported_gguf_back(exported, tmp_path):
    """A round trip through this project's own GGUF importer (it shares the exporter's conventions, so
    the independent runtimes above are the real proof; this catches a broken tensor layout early)."""
    cfg, run_dir, _ = exported
    if cfg.model_preset != "tiny:gemma3":
        pytest.skip("the importer reads Gemma 3 only")
    from tasks.modeling.gguf_import import import_gguf

    gguf_path = artifacts.path(run_dir, artifacts.EXPORT, artifacts.EXPORT_GGUF) / "model-f16.gguf"
    import_gguf(tmp_path / "back", gguf_path, log=lambda m: None)
    import keras_hub

    texts = export.parity_texts(cfg)[:1]
    back = parity.reference(keras_hub.models.CausalLM.from_preset(str(tmp_path / "back")), texts)
    merged = parity.reference(keras_hub.models.CausalLM.from_preset(
        str(artifacts.path(run_dir, artifacts.EXPORT, artifacts.EXPORT_KERAS))), texts)
    assert back["ids"] == merged["ids"]
    assert float(np.abs(back["logprobs"][0] - merged["logprobs"][0]).max()) < 0.05  # f16 weights


@pytest.mark.e2e
def test_chat_answers_with_the_champion(exported, tmp_path):
    cfg, run_dir, _ = exported
    if cfg.model_preset != "tiny:gemma3":
        pytest.skip("one model is enough")
    champion = tmp_path / "champion.json"
    champion.write_text(json.dumps({
        "run_id": "r", "variant": None, "model_preset": cfg.model_preset, "lora_rank": cfg.lora_rank,
        "adapter": str(artifacts.adapter_path(run_dir)),
        "export": {"keras": str(artifacts.path(run_dir, artifacts.EXPORT, artifacts.EXPORT_KERAS))}}))
    out = subprocess.run([sys.executable, "-m", "tasks.chat", "--champion", str(champion), "--prompt", "Name a fruit.",
                          "--max-length", "40"], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "merged preset" in out.stderr and out.stdout.strip() != ""


@pytest.mark.real
def test_real_gemma3_270m_exports_answer_as_the_tuned_model(tmp_path):
    """The real model with a non-zero adapter (random B, so the merge matters) on every linear layer
    (the query/value merges among them, so the seed's placement is covered too): every format loaded
    in its own runtime answers the tutorial's prompts as the tuned keras-hub model."""
    import keras

    from tasks.modeling.presets import load_causal_lm
    from tasks.training import adapter as lora

    cfg = load_config("cpu_demo", ALL_LINEAR)
    keras.utils.set_random_seed(0)
    lm = load_causal_lm(cfg.model_preset, cfg.models_dir)
    lora.enable(lm, lora.placement(cfg))
    for layer in lora.lora_layers(lm.backbone):
        b = layer.lora_kernel_b
        b.assign(np.random.default_rng(0).normal(0, 0.02, b.shape).astype("float32"))
    adapter = tmp_path / "adapter.lora.h5"
    lora.save(lm, adapter)
    del lm
    texts = export.parity_texts(cfg)
    ref, merged, layers = export.merge(cfg, adapter, texts)
    out = tmp_path / "export"
    out.mkdir()
    checks = export.write_formats(cfg, merged, ref, out)
    print(json.dumps(checks, indent=1))
    assert layers == 18 * len(lora.TARGETS["all_linear"])  # every targeted layer of the 18 blocks
    assert all(c["checked"] and c["passed"] for c in checks.values()), checks
    assert checks["hf"]["greedy_same_tokens"] == [16, 16]
    assert prompt_template.stop_token_ids(merged.preprocessor.tokenizer) == [1, 106]
