"""A/B of staged cats on the cpu (``codegen.cpp.layout.cat_segments``): a cat along the innermost
dim whose parts start at multiples of the tile, one part transposed, compiled with each tile
reading its one part (the transposed part along the tile's columns, a plain part along its rows)
and without (the kernel before: a root cat not staged, a staged one loading every part of the
cat for each element and selecting), timed alternating in one process beside eager and inductor.

    python -m bench.cat_tiles [--threads 2] [--rounds 30] [--out bench/results/...]

Each variant is checked bit for bit against eager before it is timed; the figure is the median
over ``--rounds`` samples of 20 calls each.
"""

from __future__ import annotations

import torch

from bench import ab
from bench.ab import stitch_compiled


def _cases():
    def head_merge(z):
        b, h, p, d = z.shape
        return z.permute(0, 2, 1, 3).reshape(b, p, h * d)

    return {
        "cat(x^T, head merge) [32,64,256] + [32,2,256,16] -> [32,256,96]": (
            lambda x, z: torch.cat([x.transpose(1, 2), head_merge(z)], 2) + 0,
            (torch.randn(32, 64, 256), torch.randn(32, 2, 256, 16))),
        "cat(x^T, y) * 2 [16,64,512] + [16,512,64] -> [16,512,128]": (
            lambda x, y: torch.cat([x.transpose(1, 2), y], 2) * 2,
            (torch.randn(16, 64, 512), torch.randn(16, 512, 64))),
        "cat(y, x^T) * 2 [16,512,64] + [16,64,512] -> [16,512,128]": (
            lambda y, x: torch.cat([y, x.transpose(1, 2)], 2) * 2,
            (torch.randn(16, 512, 64), torch.randn(16, 64, 512))),
        "cat(x1^T, x2^T) [16,32,512] x 2 -> [16,512,64]": (
            lambda x1, x2: torch.cat([x1.transpose(1, 2), x2.transpose(1, 2)], 2) + 0,
            (torch.randn(16, 32, 512), torch.randn(16, 32, 512))),
    }


def _before(fn, args):
    import codegen.cpp.layout as layout
    import codegen.cpp.staged as staged

    return stitch_compiled(fn, args, [(staged, "cat_segments", lambda *a, **k: None),
                                      (layout, "_staged_cat", lambda *a, **k: False)])


def main(argv=None) -> None:
    ab.main(argv, prog="bench.cat_tiles", doc=__doc__, title="Staged cats: a part per tile",
            cases=_cases(), off=_before, on=stitch_compiled,
            labels=("before", "before", "tiles", "a part per tile"))


if __name__ == "__main__":
    main()
