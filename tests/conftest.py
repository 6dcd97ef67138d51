"""Shared fixtures: where the real test data lives, a deterministic CPU setup."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


def shared_data_dir() -> Path:
    """The read-only real-data folder (EXAONEPATH_TEST_DATA, default ../shared/data beside the checkout)."""
    return Path(os.environ.get("EXAONEPATH_TEST_DATA", REPO_ROOT.parent / "shared" / "data")).resolve()


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Path to ../shared/data; skips the test with a clear reason when it is absent."""
    root = shared_data_dir()
    if not (root / "README.md").is_file():
        pytest.skip(f"real test data not found at {root} (set EXAONEPATH_TEST_DATA to the shared/data folder)")
    return root


@pytest.fixture(autouse=True, scope="session")
def _torch_threads():
    try:
        import torch

        torch.set_num_threads(min(2, os.cpu_count() or 1))
    except ImportError:  # pragma: no cover
        pass
    yield
