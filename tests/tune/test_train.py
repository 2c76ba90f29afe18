"""Training (needs lightgbm): the saved trees evaluate as LightGBM's own booster does, a model
learns a slowdown the analytic model does not see, and ``stitchc tune --train`` writes a model
the planner then loads."""

from __future__ import annotations

import math
import random
from dataclasses import replace

import pytest

from cost_model import KernelDesc, cpu_spec
from cost_model.learned import IR_FEATURES, LearnedModel, features, train

lgb = pytest.importorskip("lightgbm", reason="the tune extra: `make test` installs it "
                              "(pip install -e .[tune])")
SPEC = replace(cpu_spec(measure=False), fingerprint="test cpu|2 cores")


def synthetic(n: int, seed: int = 0):
    """Kernels of random size; those with a rounding op run 5x slower than the analytic model."""
    rng = random.Random(seed)
    rows, meas = [], []
    for _ in range(n):
        elems = 2 ** rng.randint(6, 20)
        rounding = rng.random() < 0.5
        ir = {**dict.fromkeys(IR_FEATURES, 0.0), "max_elems": float(elems), "inputs": 1.0,
              "outputs": 1.0, "inner_len": 64.0, "loop_shapes": 1.0, "el_cheap": float(elems),
              "el_round": float(elems) if rounding else 0.0}
        f = features(ir, KernelDesc(4 * elems, 4 * elems, elems, flops=elems), SPEC, 1)
        rows.append(f)
        meas.append(f["analytic_s"] * (5.0 if rounding else 1.0) * rng.uniform(0.95, 1.05))
    return rows, meas


def test_a_model_learns_what_the_analytic_model_misses(tmp_path):
    rows, meas = synthetic(400)
    model = train(rows, meas, SPEC.fingerprint, 1)
    test_rows, test_meas = synthetic(100, seed=1)
    ratios = [model.predict(f) / m for f, m in zip(test_rows, test_meas)]
    assert all(0.8 < r < 1.25 for r in ratios)
    back = LearnedModel.load(model.save(tmp_path / "m.json"))
    assert [back.predict(f) for f in test_rows] == [model.predict(f) for f in test_rows]


def test_generated_trees_match_lightgbm(monkeypatch):
    import numpy as np

    from cost_model import learned

    rows, meas = synthetic(300)
    boosters = []
    real_train = lgb.train

    def keep(*a, **k):
        boosters.append(real_train(*a, **k))
        return boosters[-1]

    monkeypatch.setattr(lgb, "train", keep)
    model = train(rows, meas, SPEC.fingerprint, 1)
    x = np.array([learned.vector(f) for f in rows])
    want = boosters[0].predict(x)
    got = [model.log_ratio(list(r)) for r in x]
    assert max(abs(a - b) for a, b in zip(want, got)) < 1e-9
    assert not math.isnan(sum(got))


def test_the_learned_model_is_the_default_only_where_it_also_picks_no_slower():
    """``wins``: ranking every held-out group better and predicting closer is not enough; what
    the model picks among a candidate set's alternatives must run no slower either."""
    from runtime.tune_eval import Row, wins

    better = Row("w", 10, 5, 0.7, 0.8, 0.5, 1.0, 0.8, 0.8, 1.05, 1.04)
    assert wins([better])
    assert not wins([better, replace(better, group="v", regret_learned=1.10)])
    assert not wins([replace(better, tau_learned=0.6)])
    assert not wins([replace(better, ratio_learned=2.5)])
    assert not wins([])
