"""Session data the stage tests share."""

import pytest

from tests.conftest import built_once


@pytest.fixture(scope="session")
def learnable_data(shared_dir):
    """The fruit-colour dataset a tiny random model learns in seconds (tests.tasks.test_finetune), at
    one path for every worker, so runs trained on it are shared (tests/conftest.py's trained_run)."""
    from tests.tasks.test_finetune import write_learnable_dataset

    folder = shared_dir / "learnable"
    with built_once(folder) as build:
        if build:
            folder.mkdir()
            write_learnable_dataset(folder / "fruit.jsonl")
    return folder / "fruit.jsonl"
