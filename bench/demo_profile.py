"""python -m bench.demo_profile DEMO_LOG [DEMO_LOG ...]

Where a `make demo` spends its time, from its log (`airflow_home/demo.log`): each stage's seconds
(its "published ... in N s" line), and inside `finetune` and `generate` the phases their log lines
bound (model load, held-out scoring before and after, training, each model's answers). The Airflow
share is the wall time of the DAG run minus the stages. Prints one table row per phase, one column
per log: the before/after table of the README comes from this.
"""

from __future__ import annotations

import datetime as dt
import re
import sys
from pathlib import Path

LINE = re.compile(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d+)Z \[\w+ *\] (.*)$")
PUBLISHED = re.compile(r"stage (\w+): published .* in ([\d.]+) s")


def events(path: Path) -> list[tuple[float, str]]:
    out = []
    for line in path.read_text(errors="replace").splitlines():
        m = LINE.match(line)
        if m:
            t = dt.datetime.fromisoformat(m.group(1)).replace(tzinfo=dt.timezone.utc).timestamp()
            out.append((t, m.group(2)))
    return out


def between(ev, start: str, end: str, after: float = 0.0) -> float | None:
    """Seconds from the first line containing `start` to the first later line containing `end`."""
    t0 = next((t for t, msg in ev if t >= after and start in msg), None)
    if t0 is None:
        return None
    t1 = next((t for t, msg in ev if t > t0 and end in msg), None)
    return None if t1 is None else t1 - t0


def profile(path: Path) -> dict:
    ev = events(path)
    stages = {m.group(1): float(m.group(2)) for _, msg in ev for m in [PUBLISHED.search(msg)] if m}
    ft0 = next(t for t, msg in ev if "stage finetune: run dir" in msg)
    gen0 = next(t for t, msg in ev if "stage generate: run dir" in msg)
    steps = [t for t, msg in ev if re.search(r"finetune: step \d+/\d+", msg)]
    base_scored = next(t for t, msg in ev if "finetune: base model on" in msg)
    tuned_scored = next(t for t, msg in ev if "finetune: tuned model on" in msg)
    gen_lines = [(t, msg) for t, msg in ev if t >= gen0 and msg.startswith("generate [")]
    loaded_gen = next(t for t, msg in ev if t >= gen0 and msg.startswith("loaded "))
    tuned_first = next((t for t, msg in gen_lines if "[tuned" in msg), None)
    base_last = max((t for t, msg in gen_lines if "[base" in msg), default=loaded_gen)
    wall = ev[-1][0] - ev[0][0]
    return {
        "snapshot + preprocess": stages.get("snapshot", 0) + stages.get("preprocess", 0),
        "finetune": stages.get("finetune"),
        "  model load (finetune)": between(ev, "stage finetune: run dir", "loaded "),
        "  base held-out scoring": base_scored - next(t for t, msg in ev if t >= ft0 and msg.startswith("loaded ")),
        "  training (steps)": (steps[-1] - base_scored) if steps else None,
        "  tuned held-out scoring": (tuned_scored - steps[-1]) if steps else None,
        "generate": stages.get("generate"),
        "  model load (generate)": loaded_gen - gen0,
        "  base answers": base_last - loaded_gen,
        "  tuned answers": (max(t for t, msg in gen_lines) - base_last) if tuned_first else None,
        "export": stages.get("export"),
        "report + promote + sweep": sum(stages.get(s, 0) for s in ("report", "promote", "sweep")),
        "Airflow (between and around tasks)": wall - sum(stages.values()),
        "DAG run, first to last log line": wall,
    }


def main(argv=None) -> None:
    paths = [Path(p) for p in (argv or sys.argv[1:])]
    cols = [profile(p) for p in paths]
    print("| phase | " + " | ".join(p.parent.parent.name or str(p) for p in paths) + " |")
    print("|---|" + "---:|" * len(paths))
    for key in cols[0]:
        cells = [f"{c[key]:.0f}" if isinstance(c.get(key), (int, float)) else "–" for c in cols]
        print(f"| {key} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
