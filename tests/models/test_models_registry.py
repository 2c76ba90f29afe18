"""Every workload: the registry builds it, it runs, its loss is finite, it exports."""

from __future__ import annotations

import importlib
import sys

import pytest
import torch

import models

# Ops whose output shape depends on data, or that do not belong in a static graph.
FORBIDDEN = {"nonzero", "unique", "_unique2", "unique_dim", "sort", "masked_select", "multinomial"}


def test_names_are_the_nine_in_order():
    assert models.names() == [
        "molcpt",
        "adder_quant",
        "visual_lexical",
        "bert",
        "rffs_net",
        "charformer",
        "rcrn",
        "rzcr",
        "attention_round",
    ]


def test_import_is_lazy():
    # Import `models` afresh (other tests may have loaded workloads already), then put
    # the session's modules back.
    def ours(name):
        return name == "models" or name.startswith("models.")

    saved = {k: v for k, v in sys.modules.items() if ours(k)}
    for k in saved:
        del sys.modules[k]
    try:
        importlib.import_module("models")
        loaded = sorted(m for m in sys.modules if m.startswith("models."))
    finally:
        for k in [k for k in sys.modules if ours(k)]:
            del sys.modules[k]
        sys.modules.update(saved)
    assert loaded == []


def test_unknown_name():
    with pytest.raises(KeyError, match="unknown workload"):
        models.get("resnet")


def test_rebuild_is_deterministic(workload):
    # Seeded factories: a second build gives the same weights, inputs and loss.
    w, again = workload("bert"), models.get("bert")
    assert all(torch.equal(a, b) for a, b in zip(w.example_inputs, again.example_inputs))
    assert torch.equal(w.loss(), again.loss())


def _flat(out):
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        out = list(out.values())
    return [t for o in out for t in _flat(o)]


@pytest.mark.parametrize("name", models.names())
def test_workload_runs(name, workload):
    w = workload(name)
    assert w.name == name and w.paper and w.config and w.chains
    assert "arXiv" in w.paper
    assert not w.model.training
    assert all(isinstance(t, torch.Tensor) for t in w.example_inputs)
    out = w.forward()
    for t in _flat(out):
        assert torch.isfinite(t).all()
    loss = w.loss_fn(out, w)
    assert loss.ndim == 0 and torch.isfinite(loss)
    doc = importlib.import_module(f"models.{name}").__doc__
    assert doc and "arXiv" in doc


@pytest.mark.parametrize("name", models.names())
def test_workload_exports_to_core_aten(name, workload, exported):
    w = workload(name)
    ep = exported(name)
    targets = {
        n.target._opname if hasattr(n.target, "_opname") else str(n.target)
        for n in ep.graph.nodes
        if n.op == "call_function"
    }
    assert not targets & FORBIDDEN, targets & FORBIDDEN
    with torch.no_grad():
        got = _flat(ep.module()(*w.example_inputs))
    want = _flat(w.forward())
    assert len(got) == len(want)
    for g, e in zip(got, want):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", models.names())
def test_training_step_is_one_graph(name, workload):
    # Calibration sets momentum None (a cumulative average); one left in place makes every
    # compiled training step break its graph at each BatchNorm (float(num_batches_tracked)).
    w = workload(name)
    bns = [m for m in w.model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert all(bn.momentum is not None for bn in bns), name


def test_batchnorm_statistics_calibrates_then_restores():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4, momentum=0.3))
    x = torch.randn(5, 3, 2, 3) * 4 + 1
    with models.batchnorm_statistics(net) as m:
        assert m is net and net.training and net[1].momentum is None
        net(x)
    bn = net[1]
    assert bn.momentum == 0.3 and not net.training
    y = net[0](x)
    torch.testing.assert_close(bn.running_mean, y.mean((0, 2, 3)))
    torch.testing.assert_close(bn.running_var, y.var((0, 2, 3), unbiased=True))
    with pytest.raises(RuntimeError, match="boom"), models.batchnorm_statistics(net):
        raise RuntimeError("boom")
    assert bn.momentum == 0.3 and not net.training
