"""Shared fixtures for core's tests."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

FAKE_SITE = Path(__file__).parent / "fixtures" / "fake_site"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def fake_site() -> Iterator[Path]:
    """Put a fake installed distribution (entry point 'fake_loss') on sys.path."""
    sys.path.insert(0, str(FAKE_SITE))
    try:
        yield FAKE_SITE
    finally:
        sys.path.remove(str(FAKE_SITE))
        sys.modules.pop("prx_fake_loss", None)
