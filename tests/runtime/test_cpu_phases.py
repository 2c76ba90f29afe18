"""The phases strategy's loop nests: which materialised values share one nest."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from cpu_kernel_check import run_both


def _nests(g) -> list[int]:
    """The work-shared loop nests of each kernel of ``g``."""
    return [s.source.source.count("#pragma omp for") for s in g.steps if s.kind == "kernel"]


@pytest.mark.parametrize("shape", [(3, 7, 33), (2, 128, 1024), (1, 1, 5)])
def test_outputs_read_in_place_share_their_producers_nest(shape):
    """A value the kernel writes out (a bias add saved for a backward) and an output computed
    from it element-wise at the same index (its GELU): one loop nest, the second reading the
    first from its register -- not a second pass reading the first's output back."""
    torch.manual_seed(0)
    x, b = torch.randn(*shape), torch.randn(shape[-1])

    def f(x, b):
        y = x + b
        return y, F.gelu(y) * 2 - y

    g = run_both(f, [x, b])
    assert _nests(g) == [1]


def test_outputs_read_elsewhere_or_rounded_keep_their_own_nest():
    """The same, but the second output reads the first transposed (another element, not
    computed yet in the shared nest), or the first is float16 (its stored value is rounded, the
    register's is not): they stay two nests, with eager's values."""
    torch.manual_seed(0)
    x, b = torch.randn(6, 40, 40), torch.randn(40)

    def transposed(x, b):
        y = x + b
        return y, torch.tanh(y.transpose(1, 2)) + y

    g = run_both(transposed, [x, b])
    assert _nests(g) == [2]
    g = run_both(lambda x, b: ((x + b), torch.tanh(x + b).float()), [x.half(), b.half()],
                 atol=1e-3, rtol=1e-3)
    assert _nests(g) == [2]


@pytest.mark.parametrize("b,h,s,d", [(2, 4, 16, 64), (1, 3, 5, 16), (3, 2, 7, 33)])
def test_head_merges_loop_over_the_unmerged_heads(b, h, s, d):
    """A head merge ([B, H, S, D] read as [B*S, H*D]) written out beside a reduction of it (a
    bias gradient): the nest runs over the permuted [B, S, H, D] value, its inner loop along D,
    so no load divides the vector loop's variable; odd sizes and D below a vector loop's worth
    (then the merged nest, as before) give eager's values."""
    torch.manual_seed(0)
    x = torch.randn(b * h, s, d)

    def f(x):
        m = x.view(b, h, s, d).permute(0, 2, 1, 3).reshape(b * s, h * d)
        return m, m.sum(0)

    g = run_both(f, [x])
    (k,) = [st for st in g.steps if st.kind == "kernel"]
    loads = [line for line in k.source.source.splitlines() if "= in0[" in line]
    assert loads
    if d >= 16:
        assert not any(f"/ {d})" in line or f"% {d})" in line for line in loads), loads
