"""python -m tests.e2e.airflow_cli COMMANDS_JSON: several `airflow ...` command lines in one process.

Each is parsed by Airflow's own CLI parser and run by its own command function, exactly what the
`airflow` executable does; one process imports Airflow and the stages' libraries once, where one
process per command pays for that each time. Each command's output starts with a marker line
(`MARKER` and its index) on stdout; run it with stderr merged into stdout to read them apart.
"""

from __future__ import annotations

import json
import subprocess
import sys

MARKER = "=== airflow command "


def run(commands: list[list[str]], env: dict, timeout: float = 1200) -> list[str]:
    """Each command's output (stdout and stderr, in order)."""
    out = subprocess.run([sys.executable, "-m", "tests.e2e.airflow_cli", json.dumps(commands)], env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout)
    parts = out.stdout.split(MARKER)[1:]
    assert out.returncode == 0 and len(parts) == len(commands), out.stdout[-4000:]
    return [part.split("\n", 1)[1] if "\n" in part else "" for part in parts]


if __name__ == "__main__":
    from airflow.cli import cli_parser

    for i, argv in enumerate(json.loads(sys.argv[1])):
        print(f"{MARKER}{i}", flush=True)
        args = cli_parser.get_parser().parse_args(argv)
        args.func(args)
        sys.stdout.flush()
        sys.stderr.flush()
