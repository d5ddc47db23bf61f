"""Shared test fixtures. Real VerSe files are read in place from ../shared/fixtures/verse/."""
from __future__ import annotations

from pathlib import Path

import pytest

PROJECT = Path(__file__).resolve().parents[1]
FIXTURES = (PROJECT.parent / "shared" / "fixtures" / "verse").resolve()


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    """The real VerSe-format fixtures (never copied into the project)."""
    if not FIXTURES.is_dir():
        pytest.fail(f"real fixtures not found at {FIXTURES}: the project expects ../shared beside it")
    return FIXTURES
