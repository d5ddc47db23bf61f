"""Shared test fixtures. Real VerSe files are read in place from ../shared/fixtures/verse/."""
from __future__ import annotations

import os
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


#: The README's main command writes here (``vfcore run-notebooks --run runs/phantom --quick``);
#: ``VFCORE_TEST_RUN`` points the tests at another folder.
README_RUN = PROJECT / "runs" / "phantom"


@pytest.fixture(scope="session")
def readme_run() -> tuple[Path, list[Path]]:
    """The README's main command, run once per test session: the whole series with the quick
    settings into the README's run folder (a folder left by an earlier run is resumed: every
    stage reuses only what its recorded inputs still match). Returns (run folder, executed
    notebooks). The notebook tests and the browser test read it."""
    from vfcore.notebooks import run_notebooks

    run = Path(os.environ.get("VFCORE_TEST_RUN", README_RUN))
    return run, run_notebooks(run, quick=True)
