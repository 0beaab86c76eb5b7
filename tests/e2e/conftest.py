"""The one `airflow standalone` (what `make ui` runs) that the scheduler tests share.

Its config is tiny_test with a checkpoint every 10 steps and a progress line every 50 (neither
changes an output: every run on it trains, answers and reports as on tiny_test itself, and the fault
test can kill a fine-tune between two checkpoints), and the keras-hub export only: no test here is
about the Hugging Face or GGUF files, which tests/tasks/test_export.py and test_sweep_dag check in
their runtimes. Its retries wait 3 s, not 15. Tests that
share it are in one xdist group and take care not to depend on what ran before them.
"""

from __future__ import annotations

import pytest
import yaml

from tasks.config import config_path
from tests.e2e.airflow_api import standalone, unpause_when_parsed

SERVER_SETTINGS = {"checkpoint_every_steps": 10, "log_every_steps": 50, "export_formats": ["keras"]}


@pytest.fixture(scope="session")
def airflow_server(tmp_path_factory):
    home = tmp_path_factory.mktemp("airflow-standalone")
    config = home / "standalone.yaml"
    config.write_text(yaml.safe_dump({**yaml.safe_load(config_path("tiny_test").read_text()), **SERVER_SETTINGS}))
    with standalone(home, {"GEMMA_CONFIG": str(config), "GEMMA_RETRY_DELAY_S": "3"}) as server:
        unpause_when_parsed(server)
        yield server
