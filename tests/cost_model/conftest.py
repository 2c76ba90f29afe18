"""Shared set-up for the cost-model tests.

Every test runs with `STITCH_CACHE_DIR` pointing at its own temporary directory, so no
test reads or writes the user's cache. Do not add an `__init__.py` here: it would put
`tests/` on sys.path and shadow packages named like the test folders.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


@pytest.fixture(autouse=True)
def _private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    cache = tmp_path / "stitch_cache"
    monkeypatch.setenv("STITCH_CACHE_DIR", str(cache))
    return cache
