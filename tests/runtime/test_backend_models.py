"""Every workload under ``torch.compile(model, backend="stitch")``: one training step (forward,
loss, loss.backward) against eager, float32, on the workload's own inputs.

Criteria (1e-4, as the backend issue asks):
- forward: every output element within 1e-4 of eager, relative to the output's scale
  (max(1, max |eager|)), and the loss within 1e-4 relative -- or within 3x eager's own change
  under a one-ulp perturbation of every parameter where that is larger (attention_round
  quantises: one ulp upstream flips a round(); inductor differs from eager there by 8.7e-3);
- training step: the parameter gradients within 1e-4 in
  relative L2 norm over all parameters together. Not element-wise: some workloads have
  parameters whose exact gradient is zero (a conv bias feeding a batch norm that subtracts the
  batch mean), so eager's own value there is rounding noise; inductor differs from eager there
  as much as stitch does (bench/results/backend_models_cpu.txt).
- Two workloads are ill-conditioned in float32 (rffs_net, rcrn: eager's own gradients move by
  2e-3 - 1e-2 in relative L2 when every parameter moves by one ulp). For every workload that
  change is measured here (two random one-ulp perturbations) and the gradient bound is
  max(1e-4, 3 x that change): a rounding difference cannot be held to less than the model's
  own response to one.

The planner's search budget is 1.5 s per graph here (``options={"time_limit": 1.5}``) to keep the
suite's time down; any plan it returns is a legal one, so correctness does not depend on it.
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
from runtime import backend  # noqa: E402


def _leaves(out):
    return [t for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]


def _step(w, fn):
    w.model.zero_grad()
    out = fn(*w.example_inputs)
    loss = w.loss_fn(out, w)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in w.model.named_parameters()
                           if p.grad is not None}, [t.detach().clone() for t in _leaves(out)]


def _sensitivity(w, want, want_out, want_loss) -> tuple[float, float, float]:
    """How much eager itself moves when every float parameter moves by one ulp: the relative L2
    change of its gradients, and the largest change of a forward output relative to that
    output's scale (quantising models round: one ulp upstream flips a round() downstream)."""
    norm = torch.cat([g.flatten() for g in want.values()]).norm().item()
    worst = worst_out = worst_loss = 0.0
    for seed in range(2):
        gen = torch.Generator().manual_seed(seed)
        saved = {n: p.detach().clone() for n, p in w.model.named_parameters()}
        with torch.no_grad():
            for p in w.model.parameters():
                if p.is_floating_point():
                    p.mul_(1 + 2.0**-23 * torch.randn(p.shape, generator=gen).sign())
        loss, moved, moved_out = _step(w, w.model)
        worst_loss = max(worst_loss, abs((loss - want_loss).item()) / max(abs(want_loss.item()),
                                                                             1e-12))
        with torch.no_grad():
            for n, p in w.model.named_parameters():
                p.copy_(saved[n])
        diff = torch.cat([(moved[n] - want[n]).flatten() for n in want]).norm().item()
        worst = max(worst, diff / norm)
        for a, b in zip(moved_out, want_out):
            if b.is_floating_point() and b.numel():
                scale = max(1.0, b.abs().max().item())
                worst_out = max(worst_out, (a - b).abs().max().item() / scale)
    return worst, worst_out, worst_loss


@pytest.mark.parametrize("name", models.names())
def test_workload_forward_and_training_step_match_eager(name):
    torch.manual_seed(0)
    torch._dynamo.reset()
    w = models.get(name)
    want_loss, want, want_out = _step(w, w.model)
    grad_sens, out_sens, loss_sens = _sensitivity(w, want, want_out, want_loss)
    bound = max(1e-4, 3 * grad_sens)
    out_bound = max(1e-4, 3 * out_sens)

    # One compiled training step: its forward outputs are the forward check (inference under
    # no_grad compiles another graph; tests/runtime/test_backend.py covers that path).
    compiled = torch.compile(w.model, backend="stitch", options={"time_limit": 1.5})
    before = dict(backend.FALLBACKS)
    got_loss, got, got_out = _step(w, compiled)
    assert len(got_out) == len(want_out)
    for k, (a, b) in enumerate(zip(got_out, want_out)):
        assert a.shape == b.shape and a.dtype == b.dtype
        if b.is_floating_point():
            scale = max(1.0, b.abs().max().item())
            err = (a - b).abs().max().item()
            assert err <= out_bound * scale, \
                f"{name} output {k}: max error {err:.2e} (scale {scale:.2e}, bound {out_bound:.1e})"
        else:
            assert torch.equal(a, b), f"{name} output {k} differs"
    torch.testing.assert_close(got_loss, want_loss, rtol=max(1e-4, 3 * loss_sens), atol=1e-6)
    assert got.keys() == want.keys()
    diff = torch.cat([(got[n] - want[n]).flatten() for n in want]).norm().item()
    norm = torch.cat([want[n].flatten() for n in want]).norm().item()
    assert diff <= bound * norm, \
        f"{name} gradients: relative L2 error {diff / norm:.2e}, bound {bound:.1e}"
    fell = {k: v - before.get(k, 0) for k, v in backend.FALLBACKS.items() if v != before.get(k, 0)}
    # ops stitch does not have run as torch ops; a whole graph falling back is a failure here
    assert not [k for k in fell if k.startswith(("graph:", "interpreter:"))], fell
    print(f"{name}: gradient error {diff / norm:.1e} (bound {bound:.1e}), fallbacks {fell or 'none'}")
