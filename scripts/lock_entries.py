"""Print a hashed requirements lock with one package's entry left out (--without NAME) or alone
(--only NAME). `make parity` builds llama-cpp-python from its sdist, checked against the lock's
hash, and installs every other package of the lock with their hashes required: the wheel it built
has a hash of its own, which no lock can know ahead."""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path


def entries(text: str) -> list[tuple[str, str]]:
    """(package name, entry text) in file order; comments and continuation lines stay with the entry."""
    out: list[tuple[str, str]] = []
    for line in text.splitlines(keepends=True):
        head = re.match(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==", line)
        if head:
            out.append((head.group(1).lower().replace("_", "-"), line))
        elif out:
            out[-1] = (out[-1][0], out[-1][1] + line)
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("lock", type=Path)
    group = ap.add_mutually_exclusive_group(required=True)
    group.add_argument("--only")
    group.add_argument("--without")
    args = ap.parse_args(argv)
    name = (args.only or args.without).lower().replace("_", "-")
    found = entries(args.lock.read_text(encoding="utf-8"))
    if name not in {n for n, _ in found}:
        sys.exit(f"{args.lock}: no entry for {name}")
    sys.stdout.write("".join(text for n, text in found if (n == name) == bool(args.only)))


if __name__ == "__main__":
    main()
