"""The prompt formats the model is tuned on and asked in: the one place they are written down.

`tutorial` (the Keras tutorial's, the default) and `gemma_chat` (the turn format of Gemma's
instruction-tuned checkpoints), chosen by the `prompt_template` config key:

    tutorial:   Instruction:\\n{instruction}\\n\\nResponse:\\n{response}
    gemma_chat: <start_of_turn>user\\n{instruction}<end_of_turn>\\n<start_of_turn>model\\n{response}<end_of_turn>\\n

The first user turn carries the record's context, `{instruction}\\n\\nContext:\\n{context}`, and a
system message folded in front of it, `{system}\\n\\n{instruction}` (Gemma has no system role: its
own chat template does the same). A multi-turn conversation is its turns one after the other
(`\\n\\n` between the tutorial's turns). A tutorial answer ends with <eos>, a gemma_chat one with
`<end_of_turn>` (and the text with <eos>). Preprocess renders the training and held-out texts with
`render` (which also says where the assistant turns are, for the loss mask), generate asks
`prompt` and `instruction_prompt`, the metrics detect an answer that runs on into a new turn
(`leaks`), generation stops at `stop_token_ids`, and the tiny test models' vocabulary is trained on
texts rendered here.
"""

from __future__ import annotations

import re

TEMPLATES = ("tutorial", "gemma_chat")
START_OF_TURN, END_OF_TURN = "<start_of_turn>", "<end_of_turn>"

# Per template: what comes before a user turn, between it and the answer, what ends an answer (the
# model learns to say it: part of the answer's span), and what follows an answer.
_PARTS = {
    "tutorial": ("Instruction:\n", "\n\nResponse:\n", "", "\n\n"),
    "gemma_chat": (f"{START_OF_TURN}user\n", f"{END_OF_TURN}\n{START_OF_TURN}model\n", END_OF_TURN, "\n"),
}
# A new turn of the template inside an answer: the model kept going after its answer.
_LEAKS = {
    "tutorial": re.compile(r"(^|\n)\s*(Instruction|Response|Context)\s*:", re.IGNORECASE),
    "gemma_chat": re.compile(rf"{START_OF_TURN}|{END_OF_TURN}|(^|\n)(user|model)\n"),
}


def check(template: str) -> str:
    if template not in TEMPLATES:
        raise ValueError(f"prompt_template {template!r} is not one of {list(TEMPLATES)}")
    return template


def first_user_text(instruction: str, context: str = "", system: str = "") -> str:
    text = f"{instruction}\n\nContext:\n{context}" if context.strip() else instruction
    return f"{system}\n\n{text}" if system.strip() else text


def render(messages: list[dict], template: str, context: str = "") -> tuple[str, list[tuple[int, int]]]:
    """The conversation as one training text, and the (start, end) character span of each assistant
    turn in it: the answer and what ends it (`<end_of_turn>` in gemma_chat). The span that ends the
    text also owns the <eos> the tokenizer appends: in gemma_chat the last turn's span is its answer,
    `<end_of_turn>`, the newline and then <eos>, as Gemma's own fine-tuning recipes end a sequence.
    `messages` are a normalized record's (tasks.text.records)."""
    before, between, end, after = _PARTS[check(template)]
    system = messages[0]["content"] if messages and messages[0]["role"] == "system" else ""
    turns = [m for m in messages if m["role"] != "system"]
    text, spans = "", []
    for i in range(0, len(turns), 2):
        user = turns[i]["content"]
        if i == 0:
            user = first_user_text(user, context, system)
        text += before + user + between
        if i + 1 < len(turns):
            start = len(text)
            text += turns[i + 1]["content"] + end
            spans.append((start, len(text)))
            if i + 2 < len(turns):
                text += after
            elif template == "gemma_chat":
                # The last turn's newline and the <eos> after it end the text; in the loss too, so a
                # base model whose <end_of_turn> is untrained still learns to stop (at <eos>).
                text += after
                spans[-1] = (start, len(text))
    return text, spans


def prompt(messages: list[dict], template: str, context: str = "") -> str:
    """What the model is asked to continue: the conversation up to its final answer (all of it when
    it ends with a user turn)."""
    text, spans = render(messages, template, context)
    return text[: spans[-1][0]] if messages and messages[-1]["role"] == "assistant" else text


def instruction_prompt(instruction: str, template: str) -> str:
    """A single instruction as a prompt (the prompt suite, `make chat`)."""
    return render([{"role": "user", "content": instruction}], template)[0]


def example(instruction: str, response: str, template: str) -> str:
    """A single-turn training text."""
    return render([{"role": "user", "content": instruction}, {"role": "assistant", "content": response}], template)[0]


def text_stops(template: str) -> list[str]:
    """Where an answer ends, as text (a serving stack's stop strings): the turn end, and in
    `tutorial` the start of a new instruction too."""
    return [END_OF_TURN] + (["\nInstruction:"] if check(template) == "tutorial" else [])


def turn_tokens(template: str) -> list[str]:
    """The special tokens the template's turns are made of (what `trainable_tokens: auto` trains)."""
    return [START_OF_TURN, END_OF_TURN] if check(template) == "gemma_chat" else []


def leaks(text: str, template: str) -> bool:
    """Whether an answer holds a new turn of the template (the model did not stop)."""
    return bool(_LEAKS[check(template)].search(text))


def stop_token_ids(tokenizer, template: str = "tutorial") -> list[int]:
    """Where an answer ends: <eos>, and Gemma's chat-turn end where the vocabulary has it (in
    gemma_chat it must: that is how a turn ends)."""
    ids = [int(tokenizer.end_token_id)]
    eot = None
    try:
        eot = tokenizer.token_to_id(END_OF_TURN)
    except Exception:  # noqa: BLE001 - a vocabulary without the piece simply has no such stop token
        pass
    unk = getattr(tokenizer, "unk_token_id", None)
    if eot is not None and eot != unk:
        # A base model tuned on plain text never emits it, an instruct one (or gemma_chat) does.
        ids.append(int(eot))
    elif check(template) == "gemma_chat":
        raise ValueError(f"prompt_template 'gemma_chat' needs {END_OF_TURN} in the model's vocabulary; this one has none")
    return sorted(set(ids))
