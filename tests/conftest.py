"""Shared fixtures. `reference` is the one way tests reach ../shared/reference; absent → skip with a reason."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
REFERENCE = Path(os.environ.get("GLMTUNE_REFERENCE", REPO.parent / "shared" / "reference"))


@pytest.fixture(scope="session")
def reference() -> Path:
    if not (REFERENCE / "README.md").is_file():
        pytest.skip(f"reference data not found at {REFERENCE} (set GLMTUNE_REFERENCE)")
    return REFERENCE
