"""python -m tasks.track --run-dir DIR

Log to MLflow what a run's stages could not (the store was unreachable or locked when they ran):
every piece whose `<run dir>/tracking/<piece>.json` says `pending`, replayed from what the run folder
holds. Nothing is logged twice (see tasks.infra.tracking). A tool, not a stage.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from tasks.infra import tracking


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tasks.track", description=__doc__.split("\n\n")[1])
    ap.add_argument("--run-dir", type=Path, required=True, help="the run folder (<run root>/runs/<run>)")
    args = ap.parse_args(argv)
    if not (args.run_dir / tracking.STATE_DIR).is_dir():
        ap.exit(2, f"{args.run_dir}: no tracking state (tracking/) here: is it a run folder?\n")
    done = tracking.replay(args.run_dir)
    left = tracking.status(args.run_dir)["pending"]
    print(json.dumps({"replayed": [{k: s.get(k) for k in ("piece", "key", "status", "mlflow_run_id")} for s in done],
                      "still_pending": left}, indent=1))
    return 1 if left else 0


if __name__ == "__main__":
    sys.exit(main())
