"""Shared fixtures. Tests never touch the network and never write into ../shared."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(autouse=True, scope="session")
def _isolated_cache(tmp_path_factory):
    """Image caches and other user-cache writes go to a temp folder, never to ~ or ../shared."""
    os.environ["SKINLESION_CACHE_DIR"] = str(tmp_path_factory.mktemp("usercache"))
    yield


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not (SHARED_DATA / "HAM10000_metadata.csv").is_file():
        pytest.skip("../shared/data is not present")
    return SHARED_DATA
