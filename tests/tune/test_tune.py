"""``stitchc tune``: the planner's candidates built, timed alone and recorded; a re-run measures
nothing twice; a run killed part way keeps every finished batch and resumes without loss."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from cost_model.learned import FEATURES
from cost_model.records import RecordStore
from runtime import tune

WL = "pattern:softmax/512"  # softmax(x * 0.125) on 16 x 1024
ROOT = Path(__file__).resolve().parents[2]


def quiet(*_a, **_k) -> None:
    pass


def test_tune_records_the_planners_candidates(tmp_path):
    store = tmp_path / "r.sqlite"
    out = tune.tune([WL], store, per_model=4, samples=5, batch=6, progress=False,
                    learned=False, log=quiet)
    with RecordStore(store) as s:
        recs = list(s.records())
    assert out["added"] == len(recs) >= 8 and out["failed"] == 0
    origins = {o for r in recs for o in r.origin}
    assert {"plan:stitch", "plan:greedy", "sample", "split", "single"} <= origins
    assert {r.strategy for r in recs} == {"rows", "phases"}  # a fused softmax and lone ops
    for r in recs:
        assert r.workload == WL and r.threads == 1 and r.fingerprint and r.samples == 5
        assert 0 < r.min_seconds <= r.median_seconds < 0.1 and r.calls >= 1
        assert r.analytic_seconds == r.features["analytic_s"] > 0
        assert set(FEATURES[:-1]) <= set(r.features)
    again = tune.tune([WL], store, per_model=4, samples=5, batch=6, progress=False,
                      learned=False, log=quiet)
    assert again["jobs"] == 0 and again["added"] == 0 and again["total"] == len(recs)


def test_an_interrupted_tune_resumes_without_loss(tmp_path):
    store = tmp_path / "r.sqlite"
    cmd = [sys.executable, "-m", "runtime.cli", "tune", "--model", WL, "--store", str(store),
           "--per-model", "8", "--samples", "9", "--batch", "2"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    first: dict = {}
    deadline = time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline:
        if store.exists():
            with RecordStore(store) as s:
                if len(s) >= 2:  # a batch is committed: pull the plug mid-run
                    proc.send_signal(signal.SIGKILL)
                    break
        time.sleep(0.05)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be interrupted"
    with RecordStore(store) as s:
        first = {r.key: (r.created, r.min_seconds) for r in s.records()}
    assert len(first) >= 2
    done = subprocess.run(cmd + ["--no-progress"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    m = re.search(r"(\d+) candidates, (\d+) already measured, (\d+) to time", done.stdout)
    total, skipped, todo = map(int, m.groups())
    assert skipped == len(first) and todo == total - skipped > 0
    with RecordStore(store) as s:
        after = {r.key: (r.created, r.min_seconds) for r in s.records()}
    assert len(after) == total
    assert all(after[k] == v for k, v in first.items())  # nothing measured before was lost or redone


def test_kernels_far_over_their_estimate_are_named_as_codegen_leads(tmp_path):
    """``stitchc tune --train`` lists the kernels measured at over 4x their analytic estimate,
    by workload and ops: stop 31's records named three code generation bugs that way."""
    from dataclasses import replace

    from runtime import tune_eval

    store = tmp_path / "r.sqlite"
    tune.tune([WL], store, per_model=2, samples=3, batch=6, progress=False, learned=False,
              log=quiet)
    with RecordStore(store) as s:
        recs = list(s.records())
    feats = [r.features for r in recs]
    slow = max(range(len(recs)), key=lambda k: len(recs[k].members))
    recs[slow] = replace(recs[slow], min_seconds=10 * recs[slow].analytic_seconds + 1e-4)
    fast = [replace(r, min_seconds=r.analytic_seconds) if k != slow else r
            for k, r in enumerate(recs)]
    (line,) = tune_eval.codegen_leads(fast, feats)
    assert WL in line and recs[slow].symbol in line
    assert re.search(r"\b(exp|max|sum)\(16x1024\)", line), line
    assert tune_eval.codegen_leads([replace(r, min_seconds=r.analytic_seconds) for r in recs],
                                   feats) == []
