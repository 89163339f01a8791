import os
import sys
from pathlib import Path

import pytest

TESTS_DIR = Path(__file__).parent
sys.path.insert(0, str(TESTS_DIR))


@pytest.fixture
def cache_root(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setenv("FTPIPE_CACHE", str(root))
    return root


@pytest.fixture(scope="session")
def shared_cache(tmp_path_factory) -> Path:
    """One cache for tests that may share expensive entries (the tiny model, tokenised data)."""
    root = Path(os.environ.get("FTPIPE_TEST_SHARED_CACHE") or tmp_path_factory.mktemp("shared-cache"))
    return root
