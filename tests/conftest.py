"""Shared fixtures: the real-MRI data folder and small generated phantoms."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


def shared_data_dir() -> Path:
    """The real public MRI data (``MRIFLOW_TEST_DATA``, fallback ``../shared/data``)."""
    env = os.environ.get("MRIFLOW_TEST_DATA")
    return Path(env) if env else REPO_ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def data_dir() -> Path:
    path = shared_data_dir()
    if not path.is_dir():
        pytest.skip(f"real MRI test data not found at {path} (set MRIFLOW_TEST_DATA)")
    return path


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)
