"""python -m bench.own_data --format messages|alpaca|columns OUT_FILE

The bundled Dolly sample rewritten in another common shape, with `datasets` (the files a team
exporting its own data would have): Alpaca (`instruction`, `input`, `output`), chat messages
(OpenAI-style `messages`, multi-turn: `--turns` consecutive context-free records make one
conversation, every third with a system message), or custom columns (`question`, `passage`,
`answer`, `kind`). The file type follows OUT_FILE's suffix: .jsonl/.json, .parquet or .csv. The
own-data tests and the README's chat-format run read these files; the text is Dolly's (CC BY-SA 3.0,
see tasks/data/README.md).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from tasks.pipeline.config import BUNDLED_DOLLY

SYSTEM = "You are a helpful assistant. Answer in a few sentences."
COLUMNS = {"instruction": "question", "response": "answer", "context": "passage", "category": "kind"}


def dolly(limit: int | None = None) -> list[dict]:
    rows = [json.loads(x) for x in BUNDLED_DOLLY.read_text(encoding="utf-8").splitlines()]
    return rows[:limit] if limit else rows


def alpaca(rows: list[dict]) -> list[dict]:
    return [{"instruction": r["instruction"], "input": r["context"], "output": r["response"]} for r in rows]


def columns(rows: list[dict]) -> list[dict]:
    return [{"question": r["instruction"], "passage": r["context"], "answer": r["response"], "kind": r["category"]}
            for r in rows]


def messages(rows: list[dict], turns: int = 2) -> list[dict]:
    """Conversations of `turns` consecutive context-free records (the last one's category), a
    system message on every third."""
    plain = [r for r in rows if not r["context"].strip()]
    out = []
    for k in range(0, len(plain) - turns + 1, turns):
        msgs = [{"role": "system", "content": SYSTEM}] if (k // turns) % 3 == 0 else []
        for r in plain[k : k + turns]:
            msgs += [{"role": "user", "content": r["instruction"]}, {"role": "assistant", "content": r["response"]}]
        out.append({"messages": msgs, "category": plain[k + turns - 1]["category"]})
    return out


SHAPES = {"alpaca": alpaca, "columns": columns, "messages": messages}


def write(rows: list[dict], path: Path) -> Path:
    import datasets

    ds = datasets.Dataset.from_list(rows)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = {".jsonl": ds.to_json, ".json": ds.to_json, ".parquet": ds.to_parquet, ".csv": ds.to_csv}.get(path.suffix)
    if writer is None:
        raise SystemExit(f"{path}: the suffix must be .jsonl, .json, .parquet or .csv")
    writer(str(path))
    return path


def main(argv=None) -> Path:
    ap = argparse.ArgumentParser(prog="python -m bench.own_data", description=__doc__.split("\n\n")[1])
    ap.add_argument("--format", choices=sorted(SHAPES), required=True)
    ap.add_argument("--limit", type=int, default=None, help="use the first N Dolly records (default: all 1,700)")
    ap.add_argument("--turns", type=int, default=2, help="messages: user/assistant turns per conversation (default 2)")
    ap.add_argument("out", type=Path)
    args = ap.parse_args(argv)
    rows = messages(dolly(args.limit), args.turns) if args.format == "messages" else SHAPES[args.format](dolly(args.limit))
    path = write(rows, args.out)
    print(f"{len(rows)} {args.format} records -> {path}")
    return path


if __name__ == "__main__":
    main()
