"""Shared test fixtures. Real data lives in shared/data beside this checkout when present; tests that
need it skip cleanly on a user's fresh clone."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"

# METEOR 1.5 and the PTB tokenizer run on the JVM: tests that score captions skip cleanly without Java.
requires_java = pytest.mark.skipif(shutil.which("java") is None, reason="Java is not installed")


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"{SHARED_DATA} is not present (fresh clone)")
    return SHARED_DATA
