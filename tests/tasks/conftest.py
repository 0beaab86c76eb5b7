"""Session data the stage tests share."""

import pytest


@pytest.fixture(scope="session")
def learnable_data(tmp_path_factory):
    """The fruit-colour dataset a tiny random model learns in seconds (tests.tasks.test_finetune)."""
    from tests.tasks.test_finetune import write_learnable_dataset

    return write_learnable_dataset(tmp_path_factory.mktemp("learnable") / "fruit.jsonl")
