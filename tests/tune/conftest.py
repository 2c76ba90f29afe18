"""Shared set-up for the learned cost model's tests (no ``__init__.py``: see tests/cost_model)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


@pytest.fixture(autouse=True)
def _private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test plans, builds and trains in its own cache (plans, kernels, models)."""
    cache = tmp_path / "stitch_cache"
    monkeypatch.setenv("STITCH_CACHE_DIR", str(cache))
    monkeypatch.delenv("STITCH_COST_MODEL", raising=False)
    return cache
