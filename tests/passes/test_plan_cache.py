"""The planner's disk cache: a graph planned before is not searched again, and gives the same plan;
a damaged entry is a miss, not an error."""

from __future__ import annotations

import torch

from cost_model import cpu_spec
from passes import PassContext, PassManager
from passes.fusion import plan_cache
from stitch_ir.importer import import_model

PIPELINE = "canonicalize,cse,dce,sink-broadcasts,fusion-plan{planner=stitch time_limit=2}"


class Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.ln = torch.nn.LayerNorm(24)
        self.fc = torch.nn.Linear(24, 24)

    def forward(self, x):
        y = torch.softmax(self.fc(self.ln(x)) * 0.5, -1)
        return y + x.amax(-1, keepdim=True)


def plan(monkeypatch, tmp_path):
    monkeypatch.setenv("STITCH_CACHE_DIR", str(tmp_path))
    torch.manual_seed(0)
    prog = import_model(Block().eval(), (torch.randn(5, 24),))
    ctx = PassContext(target="cpu", device_spec=cpu_spec(measure=False))
    PassManager.parse(PIPELINE).run(prog.module, ctx)
    return ctx.results["plan"]["forward"]


def groups(p):
    return sorted(sorted(gi.members) for gi in p.groups)


def test_second_plan_is_a_cache_hit_with_the_same_groups(monkeypatch, tmp_path):
    first = plan(monkeypatch, tmp_path)
    assert "cache" not in first.solver and list((tmp_path / "plans").glob("*.json"))
    second = plan(monkeypatch, tmp_path)
    assert second.solver["cache"] == "hit"
    assert groups(second) == groups(first) and second.kernels == first.kernels
    assert [r.reason for r in second.reasons] == [r.reason for r in first.reasons]


def test_damaged_entries_are_misses(monkeypatch, tmp_path):
    first = plan(monkeypatch, tmp_path)
    for f in (tmp_path / "plans").glob("*.json"):
        f.write_text('{"groups": [[0, 0]], "solver": {}}')  # a node twice: rejected
    again = plan(monkeypatch, tmp_path)
    assert "cache" not in again.solver and groups(again) == groups(first)
    for f in (tmp_path / "plans").glob("*.json"):
        f.write_text("not json")
    assert "cache" not in plan(monkeypatch, tmp_path).solver


def test_cache_off(monkeypatch, tmp_path):
    monkeypatch.setenv("STITCH_PLAN_CACHE", "0")
    plan(monkeypatch, tmp_path)
    assert not (tmp_path / "plans").exists()
    assert plan_cache.load("x" * 32, 10) is None


def test_an_edited_planner_or_cost_model_is_a_new_key(monkeypatch, tmp_path):
    """The key covers the planning code itself: a plan cached before a cost rule changed is not
    served after it."""
    first = plan(monkeypatch, tmp_path)
    assert "cache" not in first.solver
    monkeypatch.setattr(plan_cache, "_source_digest", "an-edited-cost-model")
    assert "cache" not in plan(monkeypatch, tmp_path).solver
    assert len(list((tmp_path / "plans").glob("*.json"))) == 2
    monkeypatch.setattr(plan_cache, "_source_digest", None)
    assert plan(monkeypatch, tmp_path).solver["cache"] == "hit"


def test_the_source_digest_reads_the_planning_modules():
    from pathlib import Path

    import cost_model.cpu
    import passes.fusion.features

    root = Path(plan_cache.__file__).resolve().parents[2]
    for module in (passes.fusion.features, cost_model.cpu):
        assert Path(module.__file__).resolve().parent.relative_to(root).as_posix() in \
            plan_cache._PLANNING_SOURCES
    assert len(plan_cache.source_digest()) == 16
