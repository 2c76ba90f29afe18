"""Column reductions in a ``phases`` kernel (``ColumnPhases``, a mixin of ``PhaseKernel``):
reductions run along a result dim that is contiguous in the input -- the innermost one when the
reduction keeps it (column sums: weight gradients), or the contiguous dim of a channels-last
buffer read as NCHW -- with an L1 accumulator row per task and the reduced index space cut into
a fixed number of chunks, combined in order after the barrier (the answer does not depend on the
thread count)."""

from __future__ import annotations

import math

from codegen.cpp.accumulate import _acc_final, _acc_init, _acc_update, _combine, at_least_1
from codegen.cpp.emit import delinearize
from codegen.cpp.layout import buffer_bytes, transposed_dim
from codegen.cpp.scalars import compute_itemsize, ctype, dims, round_to
from codegen.cpp.scalars import hint as size_hint
from stitch_ir.dialects import st
from stitch_ir.types import Sym

# Reductions that keep the innermost dim (column sums: weight gradients): outputs per task (an
# L1 accumulator row), and how the reduced index space is cut (at most COLUMN_CHUNKS chunks of
# at least COLUMN_CHUNK_MIN terms; the partial rows go to scratch).
COLUMN_BLOCK = 1024
COLUMN_CHUNKS = 16
COLUMN_CHUNK_MIN = 64


class ColumnPhases:
    """The column-reduction methods of ``PhaseKernel`` (which provides ``em``, ``store``,
    ``scratch``, ``gathers``, ``values_in_buffers`` and ``_input_index``)."""

    def _column_dim(self, op: st.ReduceOp) -> int | None:
        """The dim of ``op``'s result to run as a column (``_column_reduce``): the innermost, when
        the reduction keeps it (column sums: weight gradients); or the kept dim along which the
        largest buffer the input reads is contiguous, when the reduced innermost dim is strided
        in memory -- a max over the neighbours of a channels-last [N, P, K, C] buffer seen as
        [N, C, P, K] (rffs_net's edge convolutions) otherwise reads one element per cache line.
        None: reduce along the input's innermost dim."""
        shape, out = dims(op.operand(0)), dims(op.result)
        if not out:
            return None
        if len(shape) - 1 not in op.dims:
            return len(out) - 1 if out[-1] > 1 else None
        sizes = buffer_bytes(self.values_in_buffers(), self.em.buffers)
        # any size: a reduction along a strided dim vectorises across its terms with gathers
        # even in cache (a channels-last batch norm backward's [2, 8, 8, 128] sums over
        # N, H, W: 96 us against 12 us along C)
        found = transposed_dim(op.operand(0), self.em.buffers, sizes, min_bytes=0)
        if found is None or found[1] in op.dims:
            return None
        d = found[1]
        return d if op.keepdim else d - sum(1 for r in op.dims if r < d)

    def _column_reduce(self, op: st.ReduceOp, targets: list[str], at: str, col: int) -> None:
        """A reduction run along result dim ``col``, contiguous in the input (the innermost
        when the reduction keeps it: column sums, weight gradients). Walking an output's terms
        would stride through the input a line per step, so the reduced index space is cut into
        a fixed number of chunks (not one per thread: the answer must not depend on the thread
        count); a task takes one chunk and a block of up to COLUMN_BLOCK outputs along ``col``
        and reads its rows contiguously into an L1 accumulator row, then writes that partial
        row to scratch; after the barrier each output combines its chunks in order. A variance
        takes two such passes, as the row loops do: the means (to scratch), then the squared
        deviations from them (a channels-last batch norm's statistics in training)."""
        out_shape = dims(op.result)
        n = math.prod(dims(op.operand(0))[d] for d in op.dims)
        if not isinstance(op, st.VarOp):
            self._column_pass(op, at, col, "main", None,
                              lambda idx, lv: self._finish(op, targets, idx, n, lv))
            return
        # the means in scratch [O, J], as the output's rest x col index
        k = len(self.scratch)
        self.scratch.append(at_least_1(math.prod(out_shape)) * (8 if at == "double" else
                                                              compute_itemsize(op.result.type.dtype)))
        mean = f"mean{self.n_loops + 1}"
        self.em.line(f"{at}* __restrict {mean} = ({at}*)args[{self.first_scratch + k}];")
        J = out_shape[col]

        def slot(idx: list[str]) -> str:  # idx: the result index, col included
            rest = idx[:col] + idx[col + 1:]
            flat = "0"
            for i, size in zip(rest, out_shape[:col] + out_shape[col + 1:]):
                flat = f"({flat}) * {size} + ({i})"
            return f"({flat}) * {J} + ({idx[col]})"

        def keep_mean(idx: list[str], lv) -> None:
            self.em.line(f"  {mean}[{slot(idx)}] = a / ({at}){n};")
            self.em.line("}")
        self._column_pass(op, at, col, "main", None, keep_mean)
        t = ctype(op.result.type.dtype)
        self._column_pass(op, at, col, "dev", lambda idx: f"({t}){mean}[{slot(idx)}]",
                          lambda idx, lv: self._finish(op, targets, idx, n, lv))

    def _column_pass(self, op: st.ReduceOp, at: str, col: int, mode: str, mean, finish) -> None:
        """One pass of ``_column_reduce``: accumulates ``op``'s terms (``mode`` "main") or their
        squared deviations from ``mean(result index)`` ("dev") into ``a`` for each output, and
        calls ``finish(result index, loop variables)`` to use ``a`` and close its loop."""
        em = self.em
        shape = dims(op.operand(0))
        out_shape = dims(op.result)
        red_shape = [shape[d] for d in op.dims]
        n = math.prod(red_shape)  # 0 for an empty reduction: its mean is 0 / 0 = NaN, as eager
        J = out_shape[col]
        rest = out_shape[:col] + out_shape[col + 1:]  # the other result dims, one task index
        O = at_least_1(math.prod(rest))
        B = COLUMN_BLOCK if isinstance(J, Sym) else min(J, COLUMN_BLOCK)
        # tasks without chunking; chunk only to reach COLUMN_CHUNKS (a symbolic size: decided
        # at its hint; the chunk bounds below hold for any size)
        blocks = size_hint(O) * -(-size_hint(J) // B)
        chunks = max(1, min(-(-COLUMN_CHUNKS // blocks), size_hint(n) // COLUMN_CHUNK_MIN))
        self.n_loops += 1
        L = self.n_loops
        o, c, jb, jj, kk = f"o{L}", f"c{L}", f"jb{L}", f"j{L}", f"kk{L}"
        cnt, acc, nan = f"n{L}", f"cacc{L}", f"cnan{L}"
        minmax = isinstance(op, st.MaxOp | st.MinOp)
        err = " reduction(|:err)" if self.gathers else ""
        init, clause = _acc_init(op, "main")
        # partial rows [O, chunks, J] (and their NaN flags) in scratch; with one chunk each
        # task finishes its outputs itself
        part = f"part{L}"
        if chunks > 1:
            k = len(self.scratch)
            self.scratch.append(O * chunks * J * (8 if at == "double" else
                                                  compute_itemsize(op.result.type.dtype)))
            em.line(f"{at}* __restrict {part} = ({at}*)args[{self.first_scratch + k}];")
            if minmax:
                self.scratch.append(O * chunks * J * 4)
                em.line(f"int* __restrict {part}_nan = (int*)args[{self.first_scratch + k + 1}];")
        onames = delinearize(o, rest) if rest else []

        def at_col(others: list[str], j: str) -> list[str]:
            return others[:col] + [j] + others[col:]
        em.mark()
        em.line("#pragma omp for collapse(3) schedule(static)")
        em.line(f"for (int64_t {o} = 0; {o} < {O}; ++{o})")
        em.line(f"for (int64_t {c} = 0; {c} < {chunks}; ++{c})")
        em.line(f"for (int64_t {jb} = 0; {jb} < {J}; {jb} += {B})")
        em.line("{")
        outer: list[str] = []
        em.push(outer, em.scopes[-1].indent + "  ", loop_vars={o, c, jb})
        em.line(f"const int64_t {cnt} = {J} - {jb} < {B} ? {J} - {jb} : {B};")
        em.line(f"{at} {acc}[{B}];")
        if minmax:
            em.line(f"int {nan}[{B}];")
        em.line(f"for (int64_t {jj} = 0; {jj} < {B}; ++{jj}) {{ {acc}[{jj}] = {init};"
                + (f" {nan}[{jj}] = 0;" if minmax else "") + " }")
        em.mark()
        em.line(f"for (int64_t {kk} = {n} * {c} / {chunks}; {kk} < {n} * ({c} + 1) / {chunks}; "
                f"++{kk}) {{")
        knames = delinearize(kk, red_shape)
        em.line(f"#pragma omp simd{err}")
        em.line(f"for (int64_t {jj} = 0; {jj} < {cnt}; ++{jj}) {{")
        inner: list[str] = []
        em.push(inner, em.scopes[-1].indent + "  ", loop_vars={kk, jj})
        out_idx = at_col(onames, f"({jb} + {jj})")
        x = em.value(op.operand(0), self._input_index(op, out_idx, knames))
        update = _acc_update(op, mode, "ACC", x, mean(out_idx) if mean else None)
        em.line(update.replace("ACC_nan", f"{nan}[{jj}]").replace("ACC", f"{acc}[{jj}]"))
        em.pop()
        em.scopes[-1].lines.extend(inner)
        em.line("}")
        em.line("}")
        if chunks == 1:
            em.line(f"#pragma omp simd{err}")
            em.line(f"for (int64_t {jj} = 0; {jj} < {cnt}; ++{jj}) {{")
            em.line(f"  {at} a = {acc}[{jj}];" + (f" int a_nan = {nan}[{jj}];" if minmax else ""))
            finish(at_col(onames, f"({jb} + {jj})"), {o, jb, jj})
            em.pop()
            em.scopes[-1].lines.extend(outer)
            em.line("}")
            return
        slot = f"({o} * {chunks} + {c}) * {J} + {jb}"
        em.line("#pragma omp simd")
        em.line(f"for (int64_t {jj} = 0; {jj} < {cnt}; ++{jj}) {{ {part}[{slot} + {jj}] = "
                f"{acc}[{jj}];" + (f" {part}_nan[{slot} + {jj}] = {nan}[{jj}];" if minmax else "")
                + " }")
        em.pop()
        em.scopes[-1].lines.extend(outer)
        em.line("}")
        # combine each output's chunks in chunk order
        em.mark()
        em.line("#pragma omp for schedule(static)")
        em.line(f"for (int64_t {o} = 0; {o} < {O}; ++{o})")
        em.line("{")
        comb: list[str] = []
        em.push(comb, em.scopes[-1].indent + "  ", loop_vars={o})
        em.line(f"#pragma omp simd{err}")
        em.line(f"for (int64_t {jj} = 0; {jj} < {J}; ++{jj}) {{")
        em.line(f"  {at} a = {part}[{o} * {chunks} * {J} + {jj}];")
        if minmax:
            em.line(f"  int a_nan = {part}_nan[{o} * {chunks} * {J} + {jj}];")
        em.line(f"  for (int64_t {c} = 1; {c} < {chunks}; ++{c}) {{")
        p = f"{part}[({o} * {chunks} + {c}) * {J} + {jj}]"
        if minmax:
            em.line(f"    a_nan |= {part}_nan[({o} * {chunks} + {c}) * {J} + {jj}];")
        em.line(f"    {_combine(clause, 'a', p)}")
        em.line("  }")
        finish(at_col(onames, jj), {jj})
        em.pop()
        em.scopes[-1].lines.extend(comb)
        em.line("}")

    def _finish(self, op: st.ReduceOp, targets: list[str], idx: list[str], n, loop_vars) -> None:
        """The body's tail of a column reduction's store loop: ``a`` (and ``a_nan``) finished
        and stored at ``idx``; closes the loop."""
        em = self.em
        body: list[str] = []
        em.push(body, em.scopes[-1].indent + "  ", loop_vars=loop_vars)
        self.store(targets, op.result, idx, round_to(op.result.type.dtype, _acc_final(op, "a", n)))
        em.pop()
        em.scopes[-1].lines.extend(body)
        em.line("}")
