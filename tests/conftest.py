"""Shared fixtures. `reference` is the one way tests reach ../shared/reference.

Absent reference data skips the tests that need it, with a reason, except where
GLMTUNE_REQUIRE_REFERENCE=1 (set by `.ci/run`): there a missing folder is a failure, so CI can never
pass by silently skipping every golden-parity test.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
REFERENCE = Path(os.environ.get("GLMTUNE_REFERENCE", REPO.parent / "shared" / "reference"))


def reference_missing_action(reference: Path, required: bool) -> str | None:
    """None when `reference` is usable, else "fail" (required) or "skip", with the message in the caller."""
    if (reference / "README.md").is_file():
        return None
    return "fail" if required else "skip"


@pytest.fixture(scope="session")
def reference() -> Path:
    action = reference_missing_action(REFERENCE, os.environ.get("GLMTUNE_REQUIRE_REFERENCE") == "1")
    message = f"reference data not found at {REFERENCE} (set GLMTUNE_REFERENCE)"
    if action == "fail":
        pytest.fail(message + "; GLMTUNE_REQUIRE_REFERENCE=1 makes this an error", pytrace=False)
    if action == "skip":
        pytest.skip(message)
    return REFERENCE


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    """A tiny random ChatGLM2 folder (glmtune init-model defaults), made once per test module."""
    from glmtune.model.tiny import init_model

    return init_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture
def single_thread_own_cache(tmp_path, monkeypatch):
    """One torch thread and a private token cache for the test.

    Tiny matrices run faster on one thread, and one thread is immune to other processes on a shared
    machine; a private GLMTUNE_CACHE keeps tests from reading each other's tokenized data.
    """
    import torch

    monkeypatch.setenv("GLMTUNE_CACHE", str(tmp_path / "cache"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
