"""A fixed, representative subset of PyTorch's OpInfo database through ``backend="stitch"``.

Each case is one OpInfo sample (float32) run eagerly and compiled in a fresh dynamo state by
the harness of ``bench/opinfo.py`` (``python -m bench.opinfo`` sweeps every op); the compiled
result must match eager in structure, shape, dtype and value (tolerances in
``bench.opinfo.TOLERANCES``), and stitch itself must have compiled the graph (a whole-graph
fallback to torch would make the match eager's own). Families: element-wise unary and binary,
comparisons, where / clamp, reductions, softmax, normalisation, layout, gather / scatter,
pooling, scan.
"""

from __future__ import annotations

import functools

import pytest
import torch

from bench.opinfo import op_table, run_sample, samples_of

# (op key, sample indices); op keys are OpInfo name[.variant_test_name].
SUBSET: list[tuple[str, tuple[int, ...]]] = [
    # element-wise unary / binary
    ("abs", (0,)), ("sigmoid", (0,)), ("nn.functional.gelu", (0,)), ("add", (1,)),
    ("mul", (1,)), ("div.no_rounding_mode", (1,)), ("div.floor_rounding", (1,)), ("pow", (1,)),
    ("remainder", (1,)), ("lerp", (0,)), ("round", (0,)),
    # comparisons, where, clamp
    ("eq", (1,)), ("lt", (1,)), ("where", (1,)), ("clamp", (0,)),
    # reductions (sample 0 of var / argmax reduces a rank-0 tensor)
    ("sum", (0,)), ("mean", (1,)), ("var", (0, 1)), ("std", (1,)), ("amax", (0,)),
    ("argmax", (0, 1)), ("logsumexp", (1,)), ("prod", (1,)), ("var_mean", (1,)),
    # softmax, normalisation, losses
    ("softmax", (1,)), ("log_softmax", (1,)), ("nn.functional.layer_norm", (1,)),
    ("nn.functional.group_norm", (0,)), ("nn.functional.cross_entropy", (0,)),
    # layout
    ("cat", (0,)), ("stack", (0,)), ("constant_pad_nd", (0,)), ("permute", (0,)),
    ("expand", (0,)), ("flip", (0,)), ("split", (0,)),
    # gather / scatter (sample 0 of index_select / index_add works on a rank-0 tensor)
    ("index_select", (0,)), ("gather", (0,)), ("scatter_add", (0,)), ("index_add", (0,)),
    ("nn.functional.embedding", (1,)), ("masked_fill", (0,)), ("scatter", (0,)),
    ("index_put", (0,)), ("slice_scatter", (0,)),
    # strided views lowered to gathers; pooling with overlapping windows and indices
    ("as_strided", (0,)), ("unfold", (1,)), ("diagonal", (0,)), ("nn.functional.max_pool2d", (0,)),
    # scan (runs as a torch call inside the compiled graph)
    ("cumsum", (0,)),
    # once wrong: round with decimals imported as round(x); a rank-0 half result came back [1]
    ("round.decimals_3", (0,)), ("round.decimals_neg_3", (0,)), ("half", (0,)),
    ("bfloat16", (0,)),
]


def _cases():
    for key, indices in SUBSET:
        for i in indices:
            yield pytest.param(key, i, id=f"{key}-{i}")


@functools.cache
def _samples(key: str) -> tuple:
    op = op_table()[key]
    return op, tuple(samples_of(op, torch.float32, 2))


@pytest.mark.parametrize("key,index", list(_cases()))
def test_opinfo_sample_matches_eager(key, index):
    op, samples = _samples(key)
    assert index < len(samples), f"{key} has only {len(samples)} sample(s)"
    r = run_sample(op, samples[index], index)
    assert r.status == "pass", f"{key} sample {index} ({r.shapes}): {r.status}: {r.detail}"
    assert r.graphs >= 1, "dynamo handed no graph to the backend"
    whole = [k for k in r.fallbacks if k.startswith("graph:")]
    assert not whole, f"stitch did not compile the graph: {r.fallbacks[whole[0]]['why']}"


# -- the harness's own checks --------------------------------------------------------------------


def test_compare_rejects_shape_dtype_and_value_differences():
    from bench.opinfo import compare

    x = torch.tensor(1.5)
    assert compare(x, x.clone())[0]
    ok, _, why = compare(x, x.reshape(1))
    assert not ok and "shape [1], expected []" in why
    ok, _, why = compare(x, x.double())
    assert not ok and "dtype" in why
    ok, err, _ = compare(torch.tensor([1.0, 2.0]), torch.tensor([1.0, 2.001]))
    assert not ok and abs(err - 0.001) < 1e-6
    assert compare(torch.tensor([1.0, 2.0]), torch.tensor([1.0, 2.0 + 1e-6]))[0]
    assert not compare(torch.tensor([1, 2]), torch.tensor([1, 3]))[0]  # integers are exact
    nan = float("nan")
    assert compare(torch.tensor([nan, 1.0]), torch.tensor([nan, 1.0]))[0]
    assert not compare(torch.tensor([nan, 1.0]), torch.tensor([1.0, 1.0]))[0]
    assert not compare((x, x), (x,))[0]
    t = torch.randn(3, 4)
    assert compare(t, t.t().contiguous().t())[0]  # strides do not matter


def test_clone_preserving_strides_keeps_the_layout():
    from bench.opinfo import clone_preserving_strides

    base = torch.randn(4, 6)
    for x in (base[:, 1::2], base.t(), base[1:, :3], torch.randn(3, 1).expand(3, 5)):
        c = clone_preserving_strides(x)
        assert c.stride() == x.stride() and torch.equal(c, x)
        assert c.untyped_storage().data_ptr() != x.untyped_storage().data_ptr()


def test_float64_arbitration_accepts_no_worse_than_eager_only():
    """For an op listed in REFERENCE_F64, a mismatch passes when the compiled result is no
    further from a float64 evaluation than eager (twice eager's error plus atol)."""
    from bench.opinfo import _arbitrate

    def fn(x):  # cancellation: float32 loses x's low bits, float64 keeps them
        return (x + 1e4) - 1e4

    x = torch.tensor([1.2345678, -0.3333333])
    eager = fn(x)
    ref = fn(x.double()).float()
    assert not torch.equal(eager, ref)
    assert _arbitrate(fn, (x,), {}, eager, ref, "differs")[0]  # closer to float64: fine
    ok, why = _arbitrate(fn, (x,), {}, eager, eager + 0.01, "differs")
    assert not ok and "vs float64" in why
