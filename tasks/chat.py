"""python -m tasks.chat [--champion PATH] [--prompt TEXT] [--max-length N]

Ask the current champion (the last promoted fine-tune, `<run root>/runs/champion.json`) from a
shell, in the prompt format it was tuned on. Loads its exported keras-hub preset (LoRA merged)
when the run exported one, else the base model with the adapter. With --prompt it answers once;
otherwise it reads one instruction a line until end of input (Ctrl-D).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from tasks.infra.settings import runs_dir
from tasks.pipeline import artifacts
from tasks.text.prompt_template import instruction_prompt


def default_champion() -> Path:
    return runs_dir() / artifacts.CHAMPION


def load(champion: dict):
    """The champion as a keras-hub causal LM: its merged export, or base + adapter."""
    import keras_hub

    export = champion.get("export") or {}
    if export.get("keras") and Path(export["keras"]).is_dir():
        return keras_hub.models.CausalLM.from_preset(export["keras"]), f"merged preset {export['keras']}"
    from tasks.serving.export_keras import tuned_model

    lm = tuned_model(champion["model_preset"], "", Path(champion["adapter"]))
    return lm, f"{champion['model_preset']} + adapter {champion['adapter']}"


def answer(lm, instruction: str, max_length: int, template: str = "tutorial") -> str:
    prompt = instruction_prompt(instruction, template)
    out = lm.generate(prompt, max_length=max_length, strip_prompt=True)
    return out.strip()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tasks.chat", description=__doc__.split("\n\n")[1])
    ap.add_argument("--champion", type=Path, default=None, help="champion.json (default: the run root's)")
    ap.add_argument("--prompt", default=None, help="answer this instruction once and exit")
    ap.add_argument("--max-length", type=int, default=192, help="tokens, prompt included (default 192)")
    args = ap.parse_args(argv)
    path = args.champion or default_champion()
    if not path.is_file():
        ap.exit(2, f"no champion at {path}: run the pipeline (make demo) until a fine-tune passes the gate\n")
    champion = json.loads(path.read_text(encoding="utf-8"))
    import keras_hub

    lm, source = load(champion)
    template = champion.get("prompt_template", "tutorial")  # champions promoted before the key: tutorial
    lm.compile(sampler=keras_hub.samplers.GreedySampler())
    print(f"champion: run {champion['run_id']}{' variant ' + champion['variant'] if champion.get('variant') else ''} ({source})",
          file=sys.stderr)
    if args.prompt is not None:
        print(answer(lm, args.prompt, args.max_length, template))
        return 0
    print("Type an instruction and press Enter (Ctrl-D to quit).", file=sys.stderr)
    for line in sys.stdin:
        if line.strip():
            print(answer(lm, line.strip(), args.max_length, template), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
