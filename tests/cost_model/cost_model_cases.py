"""Kernel descriptions of the patterns the tests reason about (fp32 unless said).

Each builder returns what the planner would produce: the unfused kernels one per core-aten
op (or per op group eager runs), and the single fused kernel with its stitched values.
"""

from __future__ import annotations

from cost_model import KernelDesc, ReduceDesc

F32 = 4


def elementwise(
    n: int, inputs: int = 1, outputs: int = 1, flops: int = 1, trans: int = 0, **kw: object
) -> KernelDesc:
    return KernelDesc(
        bytes_read=inputs * n * F32,
        bytes_written=outputs * n * F32,
        parallel_size=n,
        flops=flops * n,
        transcendentals=trans * n,
        **kw,
    )


def row_reduce(rows: int, length: int, **kw: object) -> KernelDesc:
    fields: dict[str, object] = dict(
        bytes_read=rows * length * F32,
        bytes_written=rows * F32,
        parallel_size=rows,
        flops=rows * length,
        reduce=(ReduceDesc("row", rows, length),),
    )
    fields.update(kw)
    return KernelDesc(**fields)  # type: ignore[arg-type]


def layernorm(rows: int, cols: int) -> tuple[list[KernelDesc], KernelDesc]:
    """y = (x - mean) * rsqrt(var + eps) * w + b over the last dim, as core aten runs it:
    mean, x - mean, var of the centred x, rsqrt, the affine epilogue."""
    n = rows * cols
    rowvec = rows * F32
    parts = [
        row_reduce(rows, cols),  # mean
        KernelDesc(n * F32 + rowvec, n * F32, n, flops=n),  # x - mean
        row_reduce(rows, cols, flops=2 * n),  # var
        KernelDesc(rowvec, rowvec, rows, flops=rows, transcendentals=rows),  # rsqrt
        KernelDesc(n * F32 + rowvec + 2 * cols * F32, n * F32, n, flops=3 * n),  # affine
    ]
    fused = KernelDesc(
        bytes_read=n * F32 + 2 * cols * F32,
        bytes_written=n * F32,
        parallel_size=rows,
        flops=7 * n,
        transcendentals=rows,
        reduce=(ReduceDesc("row", rows, cols), ReduceDesc("row", rows, cols)),
        smem_bytes_per_row=cols * F32,
        num_regional=2,
        num_ops=len(parts) + 4,
    )
    return parts, fused


def softmax(rows: int, cols: int) -> tuple[list[KernelDesc], KernelDesc]:
    """softmax(x * 0.125) over the last dim: scale, amax, sub + exp, sum, div."""
    n = rows * cols
    rowvec = rows * F32
    parts = [
        elementwise(n),  # x * 0.125
        row_reduce(rows, cols),  # amax
        KernelDesc(n * F32 + rowvec, n * F32, n, flops=n, transcendentals=n),  # exp(x - m)
        row_reduce(rows, cols),  # sum
        KernelDesc(n * F32 + rowvec, n * F32, n, flops=n),  # / s
    ]
    fused = KernelDesc(
        bytes_read=n * F32,
        bytes_written=n * F32,
        parallel_size=rows,
        flops=5 * n,
        transcendentals=n,
        reduce=(ReduceDesc("row", rows, cols), ReduceDesc("row", rows, cols)),
        smem_bytes_per_row=cols * F32,
        num_regional=2,
        num_ops=len(parts),
    )
    return parts, fused
