"""A merged keras-hub Gemma as a Hugging Face folder (transformers, vLLM, TGI read it).

keras-hub's own exporter (`export_to_transformers`) writes config.json, model.safetensors and the
tokenizer; this module adds what serving stacks need and keras-hub leaves out or gets wrong:
`generation_config.json` with every stop id of the prompt format (Gemma 1 gets none from keras-hub,
Gemma 3 gets fixed ids), the special-token map for Gemma 1, a `torch_dtype` that names the stored
dtype (a mixed policy's name is not a dtype), and shards with an index when the weights are large.
It reads each layer's base kernel, so LoRA must be merged first (tasks.serving.export_keras).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from tasks.serving.export_gguf import architecture
from tasks.text.prompt_template import stop_token_ids

SHARD_BYTES = 2 * 2**30
WEIGHTS = "model.safetensors"
_ITEMSIZE = {"F32": 4, "F16": 2, "BF16": 2}


def _token_map(tokenizer) -> dict:
    def entry(piece):
        return {"content": piece, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False}

    return {"bos_token": entry("<bos>"), "eos_token": entry("<eos>"), "pad_token": entry("<pad>"), "unk_token": entry("<unk>")}


def write(lm, out: Path) -> list[str]:
    """Export `lm` (merged, no LoRA) into the folder `out`; returns the files written."""
    architecture(lm.backbone)  # refuses Gemma 2 and what else would be written wrong
    tok = lm.preprocessor.tokenizer
    lm.export_to_transformers(str(out))
    ids = {"bos_token_id": int(tok.start_token_id), "eos_token_id": stop_token_ids(tok), "pad_token_id": int(tok.pad_token_id)}
    dtype = lm.backbone.dtype_policy.variable_dtype  # what the stored weights are

    config_path = out / "config.json"
    config = json.loads(config_path.read_text())
    config.update(ids, torch_dtype=dtype)
    config["eos_token_id"] = ids["eos_token_id"][0]
    config_path.write_text(json.dumps(config, indent=2) + "\n")
    (out / "generation_config.json").write_text(json.dumps({**ids, "_from_model_config": True}, indent=2) + "\n")
    (out / "special_tokens_map.json").write_text(json.dumps(_token_map(tok), indent=2) + "\n")
    if (out / WEIGHTS).stat().st_size > SHARD_BYTES:
        shard(out)
    return sorted(p.name for p in out.iterdir())


def shard(out: Path, max_bytes: int = SHARD_BYTES) -> None:
    """Split model.safetensors into model-0000i-of-0000n.safetensors and write the index."""
    from safetensors import safe_open
    from safetensors.numpy import save_file

    source = out / WEIGHTS
    with safe_open(str(source), framework="np") as f:
        names = list(f.keys())
        groups, size = [[]], 0
        for name in names:
            piece = f.get_slice(name)
            nbytes = math.prod(piece.get_shape()) * _ITEMSIZE[piece.get_dtype()]
            if groups[-1] and size + nbytes > max_bytes:
                groups.append([])
                size = 0
            groups[-1].append(name)
            size += nbytes
        weight_map, total = {}, 0
        for i, group in enumerate(groups, start=1):
            fname = f"model-{i:05d}-of-{len(groups):05d}.safetensors"
            tensors = {name: f.get_tensor(name) for name in group}
            total += sum(t.nbytes for t in tensors.values())
            save_file(tensors, str(out / fname), metadata={"format": "pt"})
            weight_map.update({name: fname for name in group})
    source.unlink()
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")
