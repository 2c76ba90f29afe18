"""The record store: schema-versioned, duplicates are no-ops, re-measurements fold in."""

from __future__ import annotations

import sqlite3

import pytest

from cost_model.records import SCHEMA_VERSION, Record, RecordStore, SchemaError, record_key


def rec(members, t=1e-6, workload="w", **kw) -> Record:
    base = dict(workload=workload, target="cpu", fingerprint="fp", threads=1, variant="",
                symbol="k", members=list(members), origin=["sample"], kind="loop",
                strategy="phases", mapping="cpu_elementwise", features={"a": 1.0},
                analytic_seconds=2e-6, median_seconds=t * 1.1, min_seconds=t, spread=0.05,
                samples=21, calls=10)
    base.update(kw)
    return Record(**base)


def test_round_trip_and_duplicates(tmp_path):
    with RecordStore(tmp_path / "r.sqlite") as s:
        assert s.add([rec([0, 1]), rec([2])]) == 2
        assert s.add([rec([1, 0], t=5e-6)]) == 0  # same key (members are a set): first wins
        got = {tuple(r.members): r for r in s.records()}
        assert got[(0, 1)].min_seconds == 1e-6 and got[(0, 1)].features == {"a": 1.0}
        assert s.keys() == {rec([0, 1]).key, rec([2]).key}
        assert s.workloads() == {"w": 2} and s.fingerprints() == {"fp": 2}
        assert rec([0, 1]).key == record_key("w", [1, 0], 1, "fp")


def test_remeasure_keeps_the_faster_and_adds_samples(tmp_path):
    with RecordStore(tmp_path / "r.sqlite") as s:
        s.add([rec([0], t=3e-6)])
        s.add([rec([0], t=2e-6)], remeasure=True)
        s.add([rec([0], t=4e-6)], remeasure=True)
        (r,) = s.records()
        assert r.min_seconds == 2e-6 and r.samples == 63 and r.runs == 3


def test_other_schema_version_is_refused(tmp_path):
    path = tmp_path / "r.sqlite"
    RecordStore(path).close()
    db = sqlite3.connect(path)
    with db:
        db.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (str(SCHEMA_VERSION + 1),))
    db.close()
    with pytest.raises(SchemaError, match="schema version"):
        RecordStore(path)


def test_failures_are_remembered(tmp_path):
    with RecordStore(tmp_path / "r.sqlite") as s:
        s.add_failure("k1", "w", [3], "Unsupported: no")
        assert s.failed_keys() == {"k1"} and len(s) == 0
