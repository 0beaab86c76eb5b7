"""The one record shape every dataset format is normalized to, and the formats that feed it.

A record, as `snapshot/records.jsonl` holds it:

    {"id": "…", "category": "open_qa" or "", "context": "…" or "",
     "messages": [{"role": "system", "content": "…"},          (optional, first)
                  {"role": "user", "content": "…"}, {"role": "assistant", "content": "…"}, …]}

The conversation alternates user and assistant turns, starts with a user turn (after an optional
system message) and ends with an assistant turn. A single-turn record (Dolly, Alpaca, a column
mapping) is one user and one assistant turn; its context stays a field of its own, so the recipe's
`drop_context` can act on it and the template decides where it goes in the prompt.

Formats (the `dataset_format` config key):
- `dolly`: `instruction`, `context` (optional), `response`, `category` (one of Dolly's eight);
- `alpaca`: `instruction`, `input` (optional, the context), `output`;
- `messages`: OpenAI-style `{"messages": [{"role": "system|user|assistant", "content": …}]}` or
  ShareGPT `{"conversations": [{"from": "system|human|gpt", "value": …}]}`;
- `columns`: any column names, mapped by `dataset_columns` onto instruction, response and
  optionally context, category and system;
- `auto`: whichever of the first three the first record looks like (`detect`).
A record that does not fit raises BadRecord with a fixed reason word and a detail that names the
field but never quotes the record's text.
"""

from __future__ import annotations

import hashlib
import json

FORMATS = ("dolly", "alpaca", "messages", "columns")
COLUMN_ROLES = ("instruction", "response", "context", "category", "system")
REQUIRED_COLUMNS = ("instruction", "response")
DOLLY_FIELDS = ("instruction", "context", "response", "category")
DOLLY_CATEGORIES = (
    "open_qa",
    "general_qa",
    "classification",
    "closed_qa",
    "brainstorming",
    "information_extraction",
    "summarization",
    "creative_writing",
)
# Each chat style's list field, role field, content field and role names.
CHAT_STYLES = {
    "openai": ("messages", "role", "content", {"system": "system", "user": "user", "assistant": "assistant"}),
    "sharegpt": ("conversations", "from", "value",
                 {"system": "system", "human": "human", "user": "human", "gpt": "gpt", "assistant": "gpt"}),
}
_ROLE = {"system": "system", "user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant"}


class BadRecord(Exception):
    """One record fails validation: `reason` is a fixed word (counted), `detail` says what is wrong
    without quoting the record's text (it goes into logs and the manifest)."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason, self.detail = reason, detail


class FormatError(ValueError):
    """The source as a whole does not fit the chosen format (not one bad record): names what it has."""


# -- reading a record's parts ---------------------------------------------------------------------


def turns(rec: dict) -> list[dict]:
    """The user and assistant turns, without the system message."""
    return [m for m in rec["messages"] if m["role"] != "system"]


def system(rec: dict) -> str:
    first = rec["messages"][0]
    return first["content"] if first["role"] == "system" else ""


def instruction(rec: dict) -> str:
    """The last user turn: what the final answer answers."""
    return turns(rec)[-2]["content"]


def response(rec: dict) -> str:
    """The final assistant turn: the reference answer of a held-out record."""
    return rec["messages"][-1]["content"]


def earlier_turns(rec: dict) -> list[dict]:
    """The turns before the last user turn (empty for a single-turn record)."""
    return turns(rec)[:-2]


def single_turn(instruction_text: str, response_text: str, context: str = "", category: str = "",
                system_text: str = "") -> dict:
    messages = [{"role": "system", "content": system_text}] if system_text else []
    messages += [{"role": "user", "content": instruction_text}, {"role": "assistant", "content": response_text}]
    return with_id({"category": category, "context": context, "messages": messages})


def record_id(rec: dict) -> str:
    """Stable across snapshots: the same text gives the same id, whatever the row order. A single
    turn without a system message hashes as Dolly's records always did, so their ids never change."""
    msgs = rec["messages"]
    if len(msgs) == 2 and msgs[0]["role"] == "user":
        key = "\x1f".join((msgs[0]["content"], rec["context"], msgs[1]["content"]))
    else:
        key = json.dumps([rec["context"], msgs], ensure_ascii=False, sort_keys=True)
    return hashlib.sha1(key.encode("utf-8")).hexdigest()[:12]


def with_id(rec: dict) -> dict:
    return {"id": record_id(rec), **rec}


def content(rec: dict) -> dict:
    """What a snapshot's content hash covers: everything but the id (derived from it)."""
    return {"category": rec["category"], "context": rec["context"], "messages": rec["messages"]}


# -- validation -----------------------------------------------------------------------------------


def _text(raw: dict, field: str, *, required: bool = True, label: str | None = None) -> str:
    label = label or field
    value = raw.get(field)
    if value is None:
        if required:
            raise BadRecord("missing_field", f"missing field '{label}'")
        return ""
    if not isinstance(value, str):
        raise BadRecord("wrong_type", f"field '{label}' must be a string, got {type(value).__name__}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        # Valid JSON ("\ud800" escapes) but not text: it would fail later, when written out.
        raise BadRecord("invalid_utf8", f"field '{label}' holds a lone surrogate, not valid UTF-8") from None
    return value


def _single(instruction_text: str, response_text: str, context: str, category: str, system_text: str = "",
            names: tuple[str, str] = ("instruction", "response")) -> dict:
    if not instruction_text.strip():
        raise BadRecord("empty_instruction", f"field '{names[0]}' is empty")
    if not response_text.strip():
        raise BadRecord("empty_response", f"field '{names[1]}' is empty")
    return single_turn(instruction_text, response_text, context, category, system_text)


def from_dolly(raw: dict) -> dict:
    rec = {f: _text(raw, f, required=f != "context") for f in DOLLY_FIELDS}
    out = _single(rec["instruction"], rec["response"], rec["context"], rec["category"])
    if rec["category"] not in DOLLY_CATEGORIES:
        raise BadRecord("unknown_category",
                        f"field 'category' is {rec['category'][:40]!r}, not one of {list(DOLLY_CATEGORIES)}")
    return out


def from_alpaca(raw: dict) -> dict:
    return _single(_text(raw, "instruction"), _text(raw, "output"), _text(raw, "input", required=False),
                   _text(raw, "category", required=False), names=("instruction", "output"))


def from_columns(raw: dict, columns: dict[str, str]) -> dict:
    got = {role: _text(raw, col, required=role in REQUIRED_COLUMNS, label=col) for role, col in columns.items()}
    return _single(got["instruction"], got["response"], got.get("context", ""), got.get("category", ""),
                   got.get("system", ""), names=(columns["instruction"], columns["response"]))


def chat_style(raw: dict) -> str | None:
    for style, (field, *_rest) in CHAT_STYLES.items():
        if field in raw:
            return style
    return None


def from_messages(raw: dict) -> dict:
    style = chat_style(raw)
    if style is None:
        raise BadRecord("missing_field", "missing field 'messages' (OpenAI style) or 'conversations' (ShareGPT)")
    field, role_key, content_key, roles = CHAT_STYLES[style]
    items = raw[field]
    if isinstance(items, str):  # a CSV cell holds the list as JSON text
        try:
            items = json.loads(items)
        except json.JSONDecodeError:
            raise BadRecord("wrong_type", f"field '{field}' is text that is not a JSON list") from None
    if not isinstance(items, list):
        raise BadRecord("wrong_type", f"field '{field}' must be a list, got {type(items).__name__}")
    if not items:
        raise BadRecord("empty_conversation", f"field '{field}' is an empty list")
    messages = []
    for i, item in enumerate(items):
        where = f"{field}[{i}]"
        if not isinstance(item, dict):
            raise BadRecord("wrong_type", f"{where} must be an object, got {type(item).__name__}")
        role = item.get(role_key)
        if role not in roles:
            shown = role[:20] if isinstance(role, str) else type(role).__name__
            raise BadRecord("unknown_role", f"{where}.{role_key} is {shown!r}, not one of {sorted(roles)}")
        text = _text(item, content_key, label=f"{where}.{content_key}")
        if not text.strip():
            raise BadRecord("empty_turn", f"{where}.{content_key} is empty")
        messages.append({"role": _ROLE[role], "content": text})
    if not any(m["role"] == "assistant" for m in messages):
        raise BadRecord("no_assistant_turn", f"field '{field}' has no assistant turn")
    body = messages[1:] if messages[0]["role"] == "system" else messages
    for i, m in enumerate(body):
        want = "user" if i % 2 == 0 else "assistant"
        if m["role"] != want:
            raise BadRecord("turn_order", f"field '{field}': turn {i + 1} after the system message is "
                            f"{m['role']}, expected {want} (user and assistant alternate, user first)")
    if body[-1]["role"] != "assistant":
        raise BadRecord("turn_order", f"field '{field}' ends with a user turn that has no answer")
    category = _text(raw, "category", required=False)
    return with_id({"category": category, "context": "", "messages": messages})


def detect(raw: object) -> str:
    """The format a record looks like (`auto`): messages, then alpaca, then dolly."""
    if isinstance(raw, dict):
        if chat_style(raw):
            return "messages"
        if "instruction" in raw and "output" in raw:
            return "alpaca"
        if "instruction" in raw and "response" in raw:
            return "dolly"
    keys = sorted(map(str, raw))[:20] if isinstance(raw, dict) else type(raw).__name__
    raise FormatError(
        f"dataset_format 'auto' cannot tell the format of the first record (its fields: {keys}); set dataset_format "
        "to dolly, alpaca or messages, or to columns with dataset_columns naming the instruction and response columns")


def check_columns(columns: dict[str, str], available: list[str], source: str) -> None:
    """A mapping must name columns the source has: fail at once, listing the ones it does have."""
    missing = sorted(f"{role}={col!r}" for role, col in columns.items() if col not in available)
    if missing:
        raise FormatError(f"{source}: dataset_columns names columns the data does not have: {', '.join(missing)}. "
                          f"Its columns: {sorted(available)}")


def normalizer(fmt: str, columns: dict[str, str] | None = None):
    """raw record -> normalized record (or BadRecord), for a format other than `auto`."""
    if not isinstance(fmt, str) or fmt not in FORMATS:
        raise FormatError(f"dataset_format {fmt!r} is not one of {list(FORMATS) + ['auto']}")

    def norm(raw: object) -> dict:
        if not isinstance(raw, dict):
            raise BadRecord("wrong_type", f"expected a JSON object, got {type(raw).__name__}")
        if fmt == "dolly":
            return from_dolly(raw)
        if fmt == "alpaca":
            return from_alpaca(raw)
        if fmt == "messages":
            return from_messages(raw)
        return from_columns(raw, columns or {})

    return norm
