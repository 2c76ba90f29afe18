"""A/B of the cpu loop nests that read runs a reshape split from the vector loop's dim
(``codegen.cpp.layout.contiguous_run``): each case compiled with the split and without it (the
one vector loop whose loads divide its variable), timed alternating in one process beside eager
and inductor.

    python -m bench.split_runs [--threads 2] [--rounds 30] [--out bench/results/...]

The cases are the head merges and head-split transposes of charformer and multi-head attention:
a plain nest whose innermost dim merges two dims that are not adjacent in the buffer, and a
staged transpose whose contiguous dim a reshape split. Each variant is checked bit for bit
against eager before it is timed; the figure is the median over ``--rounds`` samples of 20
calls each.
"""

from __future__ import annotations

import torch

from bench import ab
from bench.ab import stitch_compiled


def _cases():
    return {
        "head merge copy [2,2,4096,16] -> [2,4096,32]": (
            lambda x: x.permute(0, 2, 1, 3).reshape(2, 4096, 32) + 0,
            (torch.randn(2, 2, 4096, 16),)),
        "head merge * y [2,4,1024,16] -> [2,1024,64]": (
            lambda x, y: x.permute(0, 2, 1, 3).reshape(2, 1024, 64) * y,
            (torch.randn(2, 4, 1024, 16), torch.randn(1024, 64))),
        "staged transpose [256,8,64,8] -> [256,64,64]": (
            lambda x: x.permute(0, 1, 3, 2).reshape(256, 64, 64) + 0,
            (torch.randn(256, 8, 64, 8),)),
        "staged transpose * y [64,16,64,4] -> [64,64,64]": (
            lambda x, y: x.permute(0, 1, 3, 2).reshape(64, 64, 64) * y,
            (torch.randn(64, 16, 64, 4), torch.randn(64, 64))),
    }


def _one_loop(fn, args):
    import codegen.cpp.phases as phases
    import codegen.cpp.staged as staged

    def none(*a, **k):
        return None

    # the plain nests' split and the staged copies'
    return stitch_compiled(fn, args, [(phases, "contiguous_run", none),
                                      (staged, "contiguous_run", none)])


def main(argv=None) -> None:
    ab.main(argv, prog="bench.split_runs", doc=__doc__,
            title="Loop nests split at the runs a reshape made", cases=_cases(), off=_one_loop,
            on=stitch_compiled, labels=("one loop", "one vector loop", "split", "split at the runs"))


if __name__ == "__main__":
    main()
