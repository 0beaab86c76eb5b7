"""Does an exported model answer as the model the report evaluated? Checked in independent runtimes.

The reference is the tuned keras-hub model (base weights + adapter). Each export is loaded by a
runtime that shares no code with this project, on the same token ids:
- keras-hub `from_preset` on the merged preset: logits (max abs difference);
- `transformers` (PyTorch, CPU, float32) on the Hugging Face folder: token ids, next-token
  log-probabilities at every prompt position, and a greedy continuation;
- llama.cpp (`llama-cpp-python`) on each GGUF: token ids and a greedy continuation.
A runtime that is not installed is reported as not checked, never as passed.
"""

from __future__ import annotations

from pathlib import Path

GREEDY_TOKENS = 16
# What "the same model" means for each format (the tests hold the exports to these).
# Q8_0 is quantized: where the tuned model's top two tokens are close, its greedy path may part at
# the first token (seen on a demo champion), so it is held to the tuned model's tokens being among
# its top TOP_K at every position of the greedy reference, fed the reference (teacher-forced).
TOP_K = 5
# keras: float32 rounding, relative to the largest logit. The merged LoRA kernels give exactly the
# tuned model's logits; merged token rows (tasks.training.adapter) differ in those tokens' columns by float
# rounding (h.(E + delta) against h.E + h.delta: 8e-5 at logits up to ~180 on the demo's model).
TOLERANCE = {"keras_logits_relative": 1e-5, "hf_logprobs": 1e-3, "f16_same_tokens": 8, "q8_0_in_top_k": GREEDY_TOKENS}


def reference_ids(lm, texts: list[str]) -> list[list[int]]:
    """<bos> + the prompt's tokens, as keras-hub's tokenizer makes them."""
    tok = lm.preprocessor.tokenizer
    out = tok(texts)
    rows = out.to_list() if hasattr(out, "to_list") else [list(map(int, r)) for r in out]
    return [[int(tok.start_token_id)] + [int(t) for t in r] for r in rows]


def keras_logits_fn(lm):
    """A function of one sequence's ids to its logits (float64 numpy), traced once as a graph for
    any length: the greedy reference calls it once per generated token, eagerly ~1 s a call."""
    import keras
    import numpy as np
    import tensorflow as tf

    @tf.function(input_signature=[tf.TensorSpec((1, None), tf.int32), tf.TensorSpec((1, None), tf.bool)])
    def forward(token_ids, padding_mask):
        return lm({"token_ids": token_ids, "padding_mask": padding_mask}, training=False)

    def logits(ids: list[int]):
        out = forward(np.asarray([ids], dtype="int32"), np.ones((1, len(ids)), dtype=bool))
        return np.asarray(keras.ops.convert_to_numpy(out)[0], dtype="float64")

    return logits


def log_softmax(logits):
    import numpy as np

    m = logits.max(axis=-1, keepdims=True)
    return logits - m - np.log(np.exp(logits - m).sum(axis=-1, keepdims=True))


def greedy(next_logits, ids: list[int], n: int = GREEDY_TOKENS) -> list[int]:
    """n greedy tokens after `ids`, from a function of the whole sequence's ids to its last logits."""
    seq = list(ids)
    for _ in range(n):
        seq.append(int(next_logits(seq).argmax()))
    return seq[len(ids):]


def reference(lm, texts: list[str]) -> dict:
    """What every export is compared with: ids, per-position log-probs and greedy continuations."""
    ids = reference_ids(lm, texts)
    keras_logits = keras_logits_fn(lm)
    logits = [keras_logits(i) for i in ids]
    return {
        "texts": texts,
        "ids": ids,
        "logits": logits,
        "logprobs": [log_softmax(x) for x in logits],
        "greedy": [greedy(lambda s: keras_logits(s)[-1], i) for i in ids],
    }


def same_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def check_keras(ref: dict, preset_dir: Path) -> dict:
    import keras_hub
    import numpy as np

    loaded = keras_logits_fn(keras_hub.models.CausalLM.from_preset(str(preset_dir)))
    diff = max(float(np.abs(loaded(i) - x).max()) for i, x in zip(ref["ids"], ref["logits"]))
    scale = max(1.0, max(float(np.abs(x).max()) for x in ref["logits"]))
    return {"checked": True, "runtime": f"keras-hub {keras_hub.__version__}", "max_abs_logit_diff": diff,
            "max_abs_logit": scale, "passed": diff <= TOLERANCE["keras_logits_relative"] * scale}


def check_hf(ref: dict, hf_dir: Path) -> dict:
    """transformers in its own process: torch and TensorFlow each bring an LLVM, and the two clash
    in one process ("LLVM ERROR: ... registered more than once")."""
    import json
    import subprocess
    import sys
    import tempfile

    import numpy as np

    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "reference.npz"
        np.savez(data, texts=np.asarray(ref["texts"]), greedy=np.asarray(ref["greedy"]),
                 **{f"ids_{k}": np.asarray(i) for k, i in enumerate(ref["ids"])},
                 **{f"logprobs_{k}": lp for k, lp in enumerate(ref["logprobs"])})
        out = subprocess.run([sys.executable, "-m", "tasks.serving.parity", "hf", str(hf_dir), str(data)],
                             capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"the transformers parity check failed to run: {out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _hf_in_this_process(hf_dir: Path, data: Path) -> dict:
    try:
        import torch
        import transformers
    except ImportError as e:
        return {"checked": False, "reason": f"transformers/torch not installed ({e.name})"}
    import numpy as np

    saved = np.load(data)
    texts = [str(t) for t in saved["texts"]]
    ref = {"texts": texts, "greedy": saved["greedy"].tolist(),
           "ids": [saved[f"ids_{k}"].tolist() for k in range(len(texts))],
           "logprobs": [saved[f"logprobs_{k}"] for k in range(len(texts))]}
    tok = transformers.AutoTokenizer.from_pretrained(str(hf_dir))
    model = transformers.AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32)
    model.eval()

    def logits(seq):
        with torch.no_grad():
            return model(torch.tensor([seq])).logits[0].double().numpy()

    ids = [tok(t).input_ids for t in ref["texts"]]
    diffs = [float(np.abs(log_softmax(logits(i)) - lp).max()) for i, lp in zip(ref["ids"], ref["logprobs"])]
    continuations = [greedy(lambda s: logits(s)[-1], i) for i in ref["ids"]]
    same = [same_prefix(c, g) for c, g in zip(continuations, ref["greedy"])]
    result = {
        "checked": True, "runtime": f"transformers {transformers.__version__}, torch {torch.__version__} (CPU, float32)",
        "same_token_ids": ids == ref["ids"], "max_abs_logprob_diff": max(diffs),
        "greedy_same_tokens": same, "greedy_tokens": GREEDY_TOKENS,
    }
    result["passed"] = bool(result["same_token_ids"] and max(diffs) <= TOLERANCE["hf_logprobs"]
                            and min(same) == GREEDY_TOKENS)
    return result


def check_gguf(ref: dict, path: Path, fmt: str) -> dict:
    try:
        import llama_cpp
    except ImportError as e:
        return {"checked": False, "reason": f"llama-cpp-python not installed ({e.name})"}
    import numpy as np

    llm = llama_cpp.Llama(model_path=str(path), n_ctx=256, n_threads=2, logits_all=True, verbose=False)

    def last_logits(seq):
        llm.reset()
        llm.eval(seq)
        return np.asarray(llm.scores[len(seq) - 1])

    def in_top_k(prompt: list[int], reference: list[int]) -> int:
        """Positions where the reference's token is among llama.cpp's top TOP_K, fed the reference."""
        llm.reset()
        llm.eval(prompt + reference[:-1])
        scores = np.asarray(llm.scores[len(prompt) - 1 : len(prompt) - 1 + len(reference)])
        top = np.argpartition(-scores, TOP_K, axis=1)[:, :TOP_K]
        return int(sum(tok in row for tok, row in zip(reference, top)))

    # special=True: the chat template's <start_of_turn>/<end_of_turn> are single tokens in the text, as
    # keras-hub's tokenizer reads them and as a serving stack's chat template sends them.
    ids = [llm.tokenize(t.encode("utf-8"), add_bos=True, special=True) for t in ref["texts"]]
    continuations = [greedy(last_logits, i) for i in ref["ids"]]
    same = [same_prefix(c, g) for c, g in zip(continuations, ref["greedy"])]
    top_k = [in_top_k(i, g) for i, g in zip(ref["ids"], ref["greedy"])]
    result = {
        "checked": True, "runtime": f"llama.cpp (llama-cpp-python {llama_cpp.__version__})",
        "same_token_ids": ids == ref["ids"], "greedy_same_tokens": same, "greedy_tokens": GREEDY_TOKENS,
        "reference_in_top_k": top_k, "top_k": TOP_K, "continuations": continuations,
        # What the greedy answers read like (a quantized model may part from the reference later on).
        "answers": [llm.detokenize(c).decode("utf-8", errors="replace") for c in continuations],
    }
    if fmt == "q8_0":
        result["required_in_top_k"] = TOLERANCE["q8_0_in_top_k"]
        enough = min(top_k) >= TOLERANCE["q8_0_in_top_k"]
    else:
        result["required_same_tokens"] = TOLERANCE[f"{fmt}_same_tokens"]
        enough = min(same) >= TOLERANCE[f"{fmt}_same_tokens"]
    result["passed"] = bool(result["same_token_ids"] and enough)
    llm.close()
    return result


if __name__ == "__main__":
    import json
    import sys

    if sys.argv[1:2] != ["hf"] or len(sys.argv) != 4:
        sys.exit("usage: python -m tasks.serving.parity hf HF_DIR REFERENCE.npz (run by check_hf)")
    print(json.dumps(_hf_in_this_process(Path(sys.argv[2]), Path(sys.argv[3]))))
