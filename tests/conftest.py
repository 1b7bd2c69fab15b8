"""Shared fixtures.

``shared_data`` points at ../shared/data (test data that is never committed); tests that use it
skip with a reason on a fresh checkout where that folder is absent.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _shared_data_dir() -> Path:
    env = os.environ.get("CL_BIDSAPP_SHARED_DATA")
    return Path(env) if env else (REPO.parent / "shared" / "data")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    path = _shared_data_dir()
    if not path.is_dir():
        pytest.skip(f"shared test data not found at {path} (set CL_BIDSAPP_SHARED_DATA)")
    return path


@pytest.fixture(scope="session")
def bids_layouts(shared_data) -> Path:
    return shared_data / "bids-layouts"
