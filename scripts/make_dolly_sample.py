"""python scripts/make_dolly_sample.py FULL_JSONL OUT_JSONL [--n 800] [--seed 0]

Writes the attributed Dolly sample that ships in tasks/data/ for the offline default: a seeded random
sample of records, in the file's own order, byte-identical lines. Reproducible from the full file.
"""

import argparse
import random
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("full", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--n", type=int, default=800)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    lines = args.full.read_text(encoding="utf-8").splitlines(keepends=True)
    keep = sorted(random.Random(args.seed).sample(range(len(lines)), args.n))
    args.out.write_text("".join(lines[i] for i in keep), encoding="utf-8")
    print(f"wrote {args.n} of {len(lines)} records to {args.out}")


if __name__ == "__main__":
    main()
