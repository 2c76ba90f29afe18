"""Shared fixtures for the workload-model tests.

Each workload is built once per session (`workload("bert")`), and exported once
(`exported("bert")`), so that the whole suite stays within a minute on two cores.
Do not add an `__init__.py` here: it would shadow the top-level `models` package.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import models  # noqa: E402

# Submodules loaded by `import models` alone: must stay empty (the registry is lazy).
LOADED_AT_IMPORT = sorted(m for m in sys.modules if m.startswith("models."))

# One intra-op thread: on a 2-core machine shared with other jobs, two OpenMP threads
# fighting a busy core can make an element-wise-heavy forward 10x slower.
torch.set_num_threads(1)

_BUILT: dict[str, models.Workload] = {}
_EXPORTED: dict[str, torch.export.ExportedProgram] = {}


def _workload(name: str) -> models.Workload:
    if name not in _BUILT:
        _BUILT[name] = models.get(name)
    return _BUILT[name]


def _exported(name: str) -> torch.export.ExportedProgram:
    if name not in _EXPORTED:
        w = _workload(name)
        ep = torch.export.export(w.model, w.example_inputs, strict=False)
        _EXPORTED[name] = ep.run_decompositions()
    return _EXPORTED[name]


@pytest.fixture(scope="session")
def loaded_at_import():
    """The `models.*` submodules that `import models` alone loaded (should be none)."""
    return LOADED_AT_IMPORT


@pytest.fixture(scope="session")
def workload():
    """`workload(name)`: the session's one build of that workload."""
    return _workload


@pytest.fixture(scope="session")
def exported():
    """`exported(name)`: the session's one core-aten export of that workload."""
    return _exported
