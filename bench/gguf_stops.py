"""python -m bench.gguf_stops RUN_DIR [--format q8_0] [--name NAME]

Where an exported GGUF's greedy answers end in llama.cpp (llama-cpp-python, `make test` installs it):
the run's prompt suite, rendered in the run's prompt template, each answered greedily up to the
run's `max_length` (prompt included), and counted by how it ended: at `<end_of_turn>`, at <eos>, or
at the length limit. What `ollama run` with the export's Modelfile would see. Compare with the
report's tuned suite answers (the keras-hub model): the same stops are expected. Writes
bench/results/<name>.json.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from bench import common


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m bench.gguf_stops", description=__doc__.split("\n\n")[1])
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--format", default="q8_0", choices=("q8_0", "f16"))
    ap.add_argument("--name", default=None)
    args = ap.parse_args(argv)

    import llama_cpp

    from tasks.pipeline import artifacts, storage
    from tasks.pipeline.prompt_suite import load_suite
    from tasks.text.prompt_template import END_OF_TURN, instruction_prompt

    answers = artifacts.read_answers(args.run_dir)
    gguf = artifacts.path(args.run_dir, artifacts.EXPORT, artifacts.EXPORT_GGUF) / artifacts.GGUF_FILE.format(fmt=args.format)
    config = storage.read_json(artifacts.path(args.run_dir, artifacts.FINETUNE, artifacts.RESULT))["config"]
    template = storage.read_json(artifacts.path(args.run_dir, artifacts.PREPROCESS, artifacts.MANIFEST))["template"]
    suite = load_suite(answers["suite"]["name"])
    max_length = answers["sampler"]["max_length"]
    llm = llama_cpp.Llama(model_path=str(gguf), n_ctx=max(256, max_length), n_threads=2, verbose=False)
    eot = llm.tokenize(END_OF_TURN.encode(), add_bos=False, special=True)
    stops = {"<end_of_turn>": 0, "<eos>": 0, "max_length": 0}
    for p in suite["prompts"]:
        prompt = llm.tokenize(instruction_prompt(p["prompt"], template).encode(), add_bos=True, special=True)
        n = len(prompt)
        for token in llm.generate(prompt, top_k=1, temp=0.0, reset=True):
            if len(eot) == 1 and token == eot[0]:
                stops["<end_of_turn>"] += 1
                break
            if token == llm.token_eos():
                stops["<eos>"] += 1
                break
            n += 1
            if n >= max_length:
                stops["max_length"] += 1
                break
    keras_tuned = answers["models"]["tuned"]
    out = {
        "benchmark": "gguf_stops", "environment": common.environment("CPU"),
        "run": str(args.run_dir), "gguf": gguf.name, "prompt_template": template, "suite": suite["name"],
        "max_length": max_length, "lora_rank": config.get("lora_rank"), "prompts": len(suite["prompts"]),
        "llama_cpp": {"version": llama_cpp.__version__, "stops": stops},
        "keras_hub_tuned_stops": {k: sum(1 for a in keras_tuned if a.get("stop_token") == k) for k in ("<end_of_turn>", "<eos>")},
    }
    path = common.write_results(args.name or f"gguf-stops-{args.format}-cpu", out)
    print(json.dumps(out, indent=2, default=str))
    print(f"SUMMARY gguf_stops {gguf.name}: llama.cpp {stops}, keras-hub tuned {out['keras_hub_tuned_stops']} "
          f"of {len(suite['prompts'])} prompts -> {path}")
    return out


if __name__ == "__main__":
    main()
