"""A disk cache of the stitch planner's decisions, so a graph compiled before is not planned again.

Candidate growth and the CP-SAT search are most of a compile (seconds per graph); the kernels
are already cached by content. A recompile -- a new process, ``torch._dynamo.reset()``, the
same model compiled again -- sees the same function text, so the chosen groups are stored under a
key of everything the search depends on: the function's printed IR (ops, types, attributes, in
order: plan node ids are op positions), the planner's options and budgets, which cost model
costed the groups (``analytic``, or ``learned:<digest of the model's trees>``), the device spec,
and a digest of the planner's and the cost model's own source (``passes/fusion``, ``cost_model``):
an edited cost rule is a new key, so a cache made before it never serves a plan it would not
make (a hand-bumped version was missed once, and a stale plan measured twice as slow).
Only the groups (member node ids) and the solver's report are stored; the costs and the reasons
for unfused edges are recomputed (deterministic and cheap), so a hit yields the same plan.

Invariants: a cache file is written atomically; an unreadable, stale or mismatched entry is a
miss, never an error; ``STITCH_PLAN_CACHE=0`` turns the cache off.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from pathlib import Path

VERSION = 10  # bump when planning changes in a way the key does not see


def _folder() -> Path | None:
    if os.environ.get("STITCH_PLAN_CACHE", "1") == "0":
        return None
    root = os.environ.get("STITCH_CACHE_DIR")
    base = Path(root).expanduser() if root else \
        Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "stitch"
    return base / "plans"


_PLANNING_SOURCES = ("passes/fusion", "cost_model")
_source_digest: str | None = None


def source_digest() -> str:
    """sha256 of the planner's and the cost model's Python source, read once per process."""
    global _source_digest
    if _source_digest is None:
        root = Path(__file__).resolve().parents[2]
        h = hashlib.sha256()
        for folder in _PLANNING_SOURCES:
            for f in sorted((root / folder).glob("*.py")):
                h.update(f.name.encode())
                h.update(f.read_bytes())
        _source_digest = h.hexdigest()[:16]
    return _source_digest


def key(func_text: str, options: dict, device) -> str:
    payload = json.dumps([VERSION, source_digest(), func_text, sorted(options.items()),
                          repr(device)], default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:32]


def load(k: str, n_nodes: int) -> tuple[list[list[int]], dict] | None:
    folder = _folder()
    if folder is None:
        return None
    try:
        data = json.loads((folder / f"{k}.json").read_text())
        groups = [[int(i) for i in g] for g in data["groups"]]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if sorted(i for g in groups for i in g) != sorted(set(i for g in groups for i in g)) or \
            any(not 0 <= i < n_nodes for g in groups for i in g):
        return None
    return groups, dict(data.get("solver", {}))


def store(k: str, groups: list[list[int]], solver: dict) -> None:
    folder = _folder()
    if folder is None:
        return
    try:
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f".{k}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
        tmp.write_text(json.dumps({"groups": groups, "solver": solver}, default=str))
        os.replace(tmp, folder / f"{k}.json")
    except OSError:
        pass  # a cache that cannot be written is only a slower next compile
