"""The learned cost model: its file, its evaluator, which model the planner picks, and the plan it
makes (a hand-built model here: no LightGBM needed; training is tested where lightgbm exists)."""

from __future__ import annotations

import logging
import math
from dataclasses import replace

import pytest
import torch

from cost_model import KernelDesc, cpu_spec
from cost_model.learned import (
    FEATURES,
    IR_FEATURES,
    LearnedModel,
    features,
    resolve,
    vector,
)
from passes import PassContext, PassManager
from stitch_ir.importer import import_model

FP = "test cpu|2 cores"
SPEC = replace(cpu_spec(measure=False), fingerprint=FP)  # a "measured" machine, fixed numbers


# a kernel of one op costs 1000x what the analytic model says: the learned planner fuses more
SINGLE_OPS_DEAR = {"f": FEATURES.index("num_ops"), "t": 1.5, "left": {"leaf": math.log(1000.0)},
                   "right": {"leaf": 0.0}}


def per_kernel_model(fingerprint: str = FP, default: bool = True,
                     trees=(SINGLE_OPS_DEAR,)) -> LearnedModel:
    return LearnedModel(list(trees), fingerprint, default=default)


class Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(24, 24)

    def forward(self, x):
        y = torch.softmax(self.fc(torch.relu(x) * 2.0) * 0.5, -1)
        return torch.exp(y) + x.amax(-1, keepdim=True)


def plan(cost_model: str, spec=SPEC, monkeypatch=None):
    torch.manual_seed(0)
    prog = import_model(Block().eval(), (torch.randn(5, 24),))
    ctx = PassContext(target="cpu", device_spec=spec)
    pipe = f"canonicalize,cse,dce,sink-broadcasts,fusion-plan{{time_limit=1 cost_model={cost_model}}}"
    PassManager.parse(pipe).run(prog.module, ctx)
    return ctx.results["plan"]["forward"], ctx.results["cost_model"]


def test_trees_evaluate_as_written_and_survive_a_file(tmp_path):
    tree = {"f": FEATURES.index("inputs"), "t": 1.5, "left": {"leaf": 0.0},
            "right": {"f": FEATURES.index("outputs"), "t": 1.5, "left": {"leaf": math.log(2)},
                      "right": {"leaf": math.log(4)}}}
    m = per_kernel_model(trees=[tree, tree])
    assert m.log_ratio([0.0] * len(FEATURES)) == 0.0
    ir = {**dict.fromkeys(IR_FEATURES, 0.0), "inputs": 2.0, "outputs": 1.0, "max_elems": 64.0,
          "inner_len": 64.0, "loop_shapes": 1.0}
    f = features(ir, KernelDesc(256, 256, 64), SPEC, 1)
    assert m.log_ratio(vector(f)) == pytest.approx(2 * math.log(2))
    assert m.predict(f) == pytest.approx(4 * f["analytic_s"])
    back = LearnedModel.load(m.save(tmp_path / "m.json"))
    assert back.predict(f) == m.predict(f) and back.digest == m.digest


def test_resolve_falls_back_and_says_why(tmp_path, monkeypatch):
    assert resolve("auto", cpu_spec(measure=False)).name == "analytic"  # no fingerprint
    path = per_kernel_model(fingerprint="another machine|64 cores").save(tmp_path / "m.json")
    monkeypatch.setenv("STITCH_COST_MODEL", str(path))
    choice = resolve("learned", SPEC)
    assert choice.name == "analytic" and "another machine" in choice.note
    assert "falling back to the analytic model" in choice.note
    per_kernel_model(default=False).save(path)
    assert resolve("learned", SPEC).name == "learned"
    assert resolve("auto", SPEC).name == "analytic"  # not the default: it did not win
    per_kernel_model(default=True).save(path)
    assert resolve("auto", SPEC).name == "learned"
    with pytest.raises(ValueError):
        resolve("psychic", SPEC)


def test_planner_uses_the_learned_model_and_the_plan_says_so(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("STITCH_COST_MODEL", str(per_kernel_model().save(tmp_path / "m.json")))
    analytic, _ = plan("analytic")
    learned, choice = plan("learned")
    assert analytic.cost_model == "analytic" and learned.cost_model == "learned"
    assert choice.model is not None and "m.json" in learned.cost_model_note
    # single ops cost 1000x: the learned plan has no more kernels than the analytic one
    assert learned.kernels <= analytic.kernels
    for gi in learned.groups:
        if not gi.is_view:
            dear = 1000.0 if len(gi.members) == 1 else 1.0
            assert gi.analytic_seconds > 0 and gi.seconds == pytest.approx(dear * gi.analytic_seconds)
    data = learned.to_json()
    assert data["cost_model"] == "learned" and "analytic_us" in data["groups"][0]
    # the plan cache keeps the two apart: a learned plan is never served for an analytic one
    assert "cache" not in learned.solver
    assert plan("learned")[0].solver.get("cache") == "hit"
    # a model for another machine: analytic, with a warning
    per_kernel_model(fingerprint="elsewhere|8 cores").save(tmp_path / "m.json")
    with caplog.at_level(logging.WARNING, logger="stitch"):
        other, _ = plan("learned")
    assert other.cost_model == "analytic" and "elsewhere" in other.cost_model_note
    assert any("falling back to the analytic model" in r.message for r in caplog.records)


def test_the_shipped_model_and_records_fit_together(monkeypatch):
    """cost_model/data ships this machine's model and the records it was trained from (xz): the
    model loads and resolves for its own fingerprint only, and predicts the shipped records'
    kernels within the range measured (not a constant, not a wild extrapolation)."""
    from cost_model.learned import shipped_model_path
    from runtime import tune_eval as te

    model = LearnedModel.load(shipped_model_path("cpu"))
    assert model.trees and model.fingerprint and model.evaluation
    monkeypatch.delenv("STITCH_COST_MODEL", raising=False)
    mine = replace(SPEC, fingerprint=model.fingerprint)
    chosen = resolve("learned", mine)
    assert chosen.name == "learned" and chosen.model.fingerprint == model.fingerprint
    assert resolve("auto", mine).name == ("learned" if model.default else "analytic")
    assert resolve("learned", SPEC).name == "analytic"  # another machine: analytic, said why
    store = shipped_model_path("cpu").parent / "cpu_records.sqlite.xz"
    records = te.load(str(store), model.fingerprint, model.threads)
    assert len(records) >= 1000 and len({r.workload for r in records}) >= 9
    small = [r for r in records if r.workload.startswith("pattern:softmax")]  # cheap to re-trace
    sample = small[:: max(1, len(small) // 60)]
    feats = te.refeaturize(sample)
    ratios = sorted(model.predict(f) / te.measured(r) for f, r in zip(feats, sample))
    assert len(set(ratios)) > len(ratios) // 2
    median = ratios[len(ratios) // 2]
    assert 1 / 3 < median < 3, median
