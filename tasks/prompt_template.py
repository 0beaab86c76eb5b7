"""The prompt format the model is tuned on and asked in: the one place it is written down.

The Keras tutorial's template, `Instruction:\\n{instruction}\\n\\nResponse:\\n{response}`. Preprocess
formats the training and held-out texts with it, generate asks its prompt half, the metrics detect
an answer that runs on into a new turn of it (`leaks`), and the tiny test models' vocabulary is
trained on texts in it.
"""

from __future__ import annotations

import re

# The turn markers, in order; the template is built from them.
MARKERS = ("Instruction", "Response")
PROMPT_TEMPLATE = "Instruction:\n{instruction}\n\nResponse:\n"
TEMPLATE = PROMPT_TEMPLATE + "{response}"
# A new turn of the template inside an answer: the model kept going after its answer.
_LEAK = re.compile(r"(^|\n)\s*(" + "|".join(MARKERS) + r")\s*:", re.IGNORECASE)


def format_example(instruction: str, response: str) -> str:
    return TEMPLATE.format(instruction=instruction, response=response)


def format_prompt(instruction: str) -> str:
    return PROMPT_TEMPLATE.format(instruction=instruction)


def leaks(text: str) -> bool:
    """Whether an answer holds a new turn of the template (the model did not stop)."""
    return bool(_LEAK.search(text))


def stop_token_ids(tokenizer) -> list[int]:
    """Where an answer ends: <eos>, and Gemma's chat-turn end where the vocabulary has it."""
    ids = [int(tokenizer.end_token_id)]
    # Gemma's chat turn end: a base model tuned on plain text never emits it, an instruct one does.
    try:
        eot = tokenizer.token_to_id("<end_of_turn>")
        if eot not in (None, tokenizer.unk_token_id if hasattr(tokenizer, "unk_token_id") else None):
            ids.append(int(eot))
    except Exception:  # noqa: BLE001 - a vocabulary without the piece simply has no such stop token
        pass
    return sorted(set(ids))
