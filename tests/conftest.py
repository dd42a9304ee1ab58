"""Shared fixtures: the real scans in ../shared/data (skipped with a reason when absent)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# ../shared/data from the project root; MEDCT_SHARED_DATA overrides (e.g. a clean clone elsewhere).
SHARED_DATA = Path(
    os.environ.get("MEDCT_SHARED_DATA", Path(__file__).resolve().parents[1] / ".." / "shared" / "data")
).resolve()


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Root of the real public scans; tests that need them skip when the folder is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real scans not found at {SHARED_DATA} (see shared/data/MANIFEST.md)")
    return SHARED_DATA
