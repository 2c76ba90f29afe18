"""``stitchc tune --cluster``: jobs fanned out over Ray (a local instance this test starts), the
records merged into the one store, and a job whose worker died retried elsewhere."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from cost_model.records import RecordStore
from runtime import tune

ray = pytest.importorskip("ray", reason="the tune extra: `make test` installs it "
                              "(pip install -e .[tune])")
ROOT = Path(__file__).resolve().parents[2]
WL = "pattern:softmax/512"


def test_tune_on_a_local_ray_cluster_retries_a_lost_worker(tmp_path):
    crashed = tmp_path / "crashed"
    env = {"STITCH_TUNE_CRASH_ONCE": str(crashed),  # the first job's worker dies (os._exit)
           "STITCH_CACHE_DIR": os.environ["STITCH_CACHE_DIR"],
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": env})
    logs: list[str] = []
    try:
        out = tune.tune([WL], tmp_path / "r.sqlite", per_model=4, samples=3, batch=4,
                        cluster="local", progress=False, learned=False, log=logs.append)
    finally:
        ray.shutdown()
    assert crashed.exists(), "no worker was lost"
    assert any("retrying it elsewhere" in line for line in logs), logs
    with RecordStore(tmp_path / "r.sqlite") as s:
        recs = list(s.records())
        failed = s.failed_keys()
    assert out["jobs"] >= 2 and out["added"] == len(recs) > 0 and not failed
    # every candidate of every job came back once, the lost job's included
    assert len({tuple(r.members) for r in recs}) == len(recs) == out["total"]
    assert all(r.host for r in recs)
