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


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread in these tests, restored afterwards for other folders' tests.

    On a 2-core machine shared with other jobs, two OpenMP threads fighting over a busy
    core made an element-wise-heavy forward (adder_quant) ten times slower.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def workload():
    """`workload(name)`: the session's one build of that workload."""
    return _workload


@pytest.fixture(scope="session")
def exported():
    """`exported(name)`: the session's one core-aten export of that workload."""
    return _exported
