"""Measurement records: a local SQLite store of timed candidate kernels, for the learned model.

One record is one candidate fused group of one workload, built as one cpu kernel and timed alone
on prepacked arguments (``runtime.tune``): its features (``cost_model.learned.FEATURES``, as a
JSON object), the target and device fingerprint it was measured on, the thread count, the
measured time (median, minimum, relative spread, how many samples of how many calls) and the
analytic model's estimate of the same kernel at the same thread count.

Invariants:
- The file carries its schema version (``meta.schema_version``); a store of another version is
  refused with a clear error, never read wrongly.
- ``key`` identifies a measurement (workload, group members, threads, fingerprint, schedule
  variant): adding a record whose key is present is a no-op (first wins), so merging the
  results of retried or duplicated jobs is safe; a deliberate re-measurement
  (``add(..., remeasure=True)``) folds in: the faster minimum and median are kept, the samples
  and runs add up.
- Every ``add`` is one transaction: a run interrupted at any point keeps every record added
  before it, and a re-run skips them (``keys()``).
- Only the standard library (sqlite3, json): no numpy, no torch.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS records (
    key TEXT PRIMARY KEY,
    workload TEXT NOT NULL,
    target TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    threads INTEGER NOT NULL,
    variant TEXT NOT NULL,
    symbol TEXT NOT NULL,
    members TEXT NOT NULL,
    origin TEXT NOT NULL,
    kind TEXT NOT NULL,
    strategy TEXT NOT NULL,
    mapping TEXT NOT NULL,
    features TEXT NOT NULL,
    analytic_seconds REAL NOT NULL,
    median_seconds REAL NOT NULL,
    min_seconds REAL NOT NULL,
    spread REAL NOT NULL,
    samples INTEGER NOT NULL,
    calls INTEGER NOT NULL,
    runs INTEGER NOT NULL,
    host TEXT NOT NULL,
    created REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS records_by_workload ON records (workload, fingerprint, threads);
CREATE TABLE IF NOT EXISTS failures (
    key TEXT PRIMARY KEY, workload TEXT NOT NULL, members TEXT NOT NULL, error TEXT NOT NULL,
    created REAL NOT NULL
);
"""


class SchemaError(RuntimeError):
    """The store was written with another schema version."""


@dataclass
class Record:
    """One timed kernel (see the module docstring). Times are seconds per call."""

    workload: str
    target: str
    fingerprint: str
    threads: int
    variant: str  # the schedule: "" = the analytic schedule's, "team1" = forced onto one thread
    symbol: str  # the kernel's symbol: a hash of its source
    members: list[int]  # node ids in the workload's planning graph
    origin: list[str]  # why it was measured: plan:stitch, plan:greedy, sample, split, single, ...
    kind: str  # the group's kind (loop, reduce, stitch, gather, scatter)
    strategy: str  # the cpu kernel's strategy (rows | phases)
    mapping: str  # the schedule's mapping
    features: dict[str, float]
    analytic_seconds: float
    median_seconds: float
    min_seconds: float
    spread: float  # (75th - 25th percentile) / median of the samples
    samples: int
    calls: int  # kernel calls per sample
    runs: int = 1  # timing runs folded into this record (``add(..., remeasure=True)``)
    host: str = ""
    created: float = field(default_factory=time.time)

    @property
    def key(self) -> str:
        return record_key(self.workload, self.members, self.threads, self.fingerprint,
                          self.variant)


def record_key(workload: str, members: list[int], threads: int, fingerprint: str,
               variant: str = "") -> str:
    """What identifies a measurement: known before the kernel is built, so a resumed run skips
    it without rendering anything."""
    text = json.dumps([workload, sorted(members), threads, fingerprint, variant])
    return hashlib.sha256(text.encode()).hexdigest()[:24]


_COLUMNS = [f for f in Record.__dataclass_fields__]
_JSON = ("members", "origin", "features")


class RecordStore:
    """The SQLite file at ``path`` (created on first use)."""

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path, timeout=60)
        self._db.execute("PRAGMA journal_mode=WAL")  # readers do not block the one writer
        with self._db:
            self._db.executescript(_SCHEMA)
            row = self._db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
            if row is None:
                self._db.execute("INSERT INTO meta VALUES ('schema_version', ?)",
                                 (str(SCHEMA_VERSION),))
        if row is not None and int(row[0]) != SCHEMA_VERSION:
            self._db.close()
            raise SchemaError(f"{self.path}: record schema version {row[0]}, this stitch reads "
                              f"version {SCHEMA_VERSION}; re-run `stitchc tune` into a new store")

    @property
    def schema_version(self) -> int:
        return SCHEMA_VERSION

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> RecordStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- writing -------------------------------------------------------------------------------
    def add(self, records: Iterable[Record], remeasure: bool = False) -> int:
        """Insert records (one transaction); returns how many were new. ``remeasure``: a
        record already present is folded together with the new one (see the invariants)."""
        rows = []
        for r in records:
            d = asdict(r)
            for k in _JSON:
                d[k] = json.dumps(d[k], sort_keys=True)
            rows.append((r.key, *[d[c] for c in _COLUMNS]))
        if not rows:
            return 0
        marks = ",".join("?" * (len(_COLUMNS) + 1))
        insert = f"INSERT INTO records (key, {', '.join(_COLUMNS)}) VALUES ({marks})"
        with self._db:
            before = len(self)
            if remeasure:
                self._db.executemany(insert + " ON CONFLICT(key) DO UPDATE SET "
                                     "min_seconds = MIN(min_seconds, excluded.min_seconds), "
                                     "median_seconds = MIN(median_seconds, excluded.median_seconds), "
                                     "spread = MIN(spread, excluded.spread), "
                                     "samples = samples + excluded.samples, "
                                     "runs = runs + excluded.runs", rows)
            else:
                self._db.executemany(insert.replace("INSERT", "INSERT OR IGNORE", 1), rows)
            return len(self) - before

    def add_failure(self, key: str, workload: str, members: list[int], error: str) -> None:
        with self._db:
            self._db.execute("INSERT OR REPLACE INTO failures VALUES (?, ?, ?, ?, ?)",
                             (key, workload, json.dumps(members), error[:2000], time.time()))

    def merge_from(self, other: RecordStore) -> int:
        """Add every record of ``other`` (same schema); returns how many were new."""
        return self.add(other.records())

    # -- reading -------------------------------------------------------------------------------
    def keys(self) -> set[str]:
        return {k for (k,) in self._db.execute("SELECT key FROM records")}

    def failed_keys(self) -> set[str]:
        return {k for (k,) in self._db.execute("SELECT key FROM failures")}

    def __len__(self) -> int:
        return self._db.execute("SELECT COUNT(*) FROM records").fetchone()[0]

    def records(self, workload: str | None = None, fingerprint: str | None = None,
                threads: int | None = None, target: str | None = None) -> Iterator[Record]:
        where, args = [], []
        for col, val in (("workload", workload), ("fingerprint", fingerprint),
                         ("threads", threads), ("target", target)):
            if val is not None:
                where.append(f"{col} = ?")
                args.append(val)
        sql = f"SELECT {', '.join(_COLUMNS)} FROM records"
        if where:
            sql += " WHERE " + " AND ".join(where)
        for row in self._db.execute(sql + " ORDER BY workload, created, key", args):
            d = dict(zip(_COLUMNS, row))
            for k in _JSON:
                d[k] = json.loads(d[k])
            yield Record(**d)

    def workloads(self) -> dict[str, int]:
        return dict(self._db.execute(
            "SELECT workload, COUNT(*) FROM records GROUP BY workload ORDER BY workload"))

    def fingerprints(self) -> dict[str, int]:
        return dict(self._db.execute(
            "SELECT fingerprint, COUNT(*) FROM records GROUP BY fingerprint"))
