from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def root() -> Path:
    return ROOT


@pytest.fixture(scope="session", autouse=True)
def _prepared_data_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Trainer runs keep their prepared datasets in the session's temporary folder, not in the user's
    ~/.cache/kubetune/prepared (tests that test the cache set their own folder)."""
    from kubetune.contract import ENV_PREPARED_DIR

    old = os.environ.get(ENV_PREPARED_DIR)
    os.environ[ENV_PREPARED_DIR] = str(tmp_path_factory.mktemp("prepared"))
    yield
    if old is None:
        os.environ.pop(ENV_PREPARED_DIR, None)
    else:
        os.environ[ENV_PREPARED_DIR] = old
