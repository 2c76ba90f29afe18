"""Staged transposes in a ``phases`` kernel (``StagedPhases``, a mixin of ``PhaseKernel``): a
value that reads buffers contiguous along one dim but strided along its innermost one is
computed in square tiles, each input copied into an L1 tile in the output's order first --
along its contiguous runs, one part of a cat per tile -- and the value then computed over
contiguous tile rows."""

from __future__ import annotations

from codegen.cpp.index import bounded
from codegen.cpp.layout import cat_segments, contiguous_run
from codegen.cpp.scalars import ctype
from stitch_ir.core import Value


class StagedPhases:
    """The staged loop nest of ``PhaseKernel`` (which provides ``em``, ``n_loops``,
    ``gathers``, ``_simd_loop`` and ``_run_loops``)."""

    STAGE = 32  # a staged tile is STAGE x STAGE elements (4 KiB of float): L1-resident

    def nest_staged(self, shape: list[int], p: int, us: list[Value], emit) -> None:
        """A loop nest over ``shape`` in tiles of dims ``p`` and the last one, for a value that
        reads each of ``us`` -- buffers contiguous along ``p`` but strided along the last dim
        (transposes). Each tile first copies each of ``us`` into a small buffer in the output's
        order, reading the input contiguously (4-byte values: a vector loop into a tile in input
        order, transposed in registers by ``st_tile_t``; others: a scalar transpose, in L1); the
        computation then runs vectorised over contiguous tile rows. GCC vectorises no strided
        load: this kernel ran scalar and branchy at 0.65 GB/s before."""
        em = self.em
        self.n_loops += 1
        L, B = self.n_loops, self.STAGE
        last = len(shape) - 1
        names = [f"i{L}_{k}" for k in range(len(shape))]
        outer = [k for k in range(len(shape)) if k not in (p, last)]
        pt, lt, pl, ll = f"pt{L}", f"lt{L}", f"pl{L}", f"ll{L}"
        bufs = [f"stage{L}" if j == 0 else f"stage{L}_{j}" for j in range(len(us))]
        err = " reduction(|:err)" if self.gathers else ""
        em.mark()
        em.line(f"#pragma omp for collapse({len(outer) + 2}) schedule(static)")
        for k in outer:
            em.line(f"for (int64_t {names[k]} = 0; {names[k]} < {shape[k]}; ++{names[k]})")
        em.line(f"for (int64_t {pt} = 0; {pt} < ({shape[p]} + {B - 1}) / {B}; ++{pt})")
        em.line(f"for (int64_t {lt} = 0; {lt} < ({shape[last]} + {B - 1}) / {B}; ++{lt})")
        em.line("{")
        tile: list[str] = []
        em.push(tile, em.scopes[-1].indent + "  ", loop_vars={names[k] for k in outer} | {pt, lt})
        em.line(f"const int64_t {pl}_n = {shape[p]} - {pt} * {B} < {B} ? {shape[p]} - {pt} * {B} "
                f": {B};")
        em.line(f"const int64_t {ll}_n = {shape[last]} - {lt} * {B} < {B} ? "
                f"{shape[last]} - {lt} * {B} : {B};")
        for u, buf in zip(us, bufs):
            em.line(f"{ctype(u.type.dtype)} {buf}[{B}][{B}];")
        idx = list(names)
        idx[p], idx[last] = f"({pt} * {B} + {pl})", f"({lt} * {B} + {ll})"
        # 1. the tiles of us, read along p (contiguous), written to the buffers in output order:
        # 4-byte values by a vector loop into a tile in input order, then st_tile_t (AVX-512
        # register transposes); others by a scalar loop storing across the buffer
        four = [ctype(u.type.dtype) in ("float", "int32_t") for u in us]
        for u, buf, f in zip(us, bufs, four):
            if f:
                em.line(f"{ctype(u.type.dtype)} {buf}_in[{B}][{B}];")
        if any(four):
            fours = [u for u, f in zip(us, four) if f]

            def copy_rows(at: list[str], row: str, col: str) -> None:
                for u, buf, f in zip(us, bufs, four):
                    if f:
                        em.line(f"{buf}_in[{row}][{col}] = {em.value(u, at)};")

            def along_p() -> None:
                # where the inputs are contiguous along p only in runs shorter than the tile (a
                # reshape split p), the row copy runs over those runs: ph picks one, pq reads
                # along it, and the index is exact without a / or % of the vector loop's variable
                run = contiguous_run(fours, p, em.buffers, B)
                em.mark()
                em.line(f"for (int64_t {ll} = 0; {ll} < {ll}_n; ++{ll}) {{")
                with em.loop_body([ll]):
                    if run is None:
                        self._simd_loop(pl, f"{pl}_n", err, lambda: copy_rows(idx, ll, pl))
                    else:
                        ph, pq = f"ph{L}", f"pq{L}"
                        at = list(idx)
                        at[p] = f"({pt} * {B} + {ph} * {run} + {pq})"
                        with bounded(**{pt: -(-shape[p] // B)}):
                            self._run_loops(ph, pq, f"{pl}_n / {run}", run, err,
                                            lambda: copy_rows(at, ll, f"{ph} * {run} + {pq}"),
                                            bound=B // run)

            def along_rows(lo: int, hi: int) -> None:
                # a part of a cat that is not transposed: read along the tile's rows (in runs,
                # as above) into the tile in input order, which st_tile_t turns back, in L1
                run = contiguous_run(fours, last, em.buffers, B, lo)
                em.mark()
                em.line(f"for (int64_t {pl} = 0; {pl} < {pl}_n; ++{pl}) {{")
                with em.loop_body([pl]):
                    if run is None:
                        self._simd_loop(ll, f"{ll}_n", err, lambda: copy_rows(idx, ll, pl))
                        return
                    lh, lq = f"lh{L}", f"lq{L}"
                    at = list(idx)
                    at[last] = f"({lt} * {B} + {lh} * {run} + {lq})"
                    em.ranges[at[last]] = (lo, hi)
                    with bounded(**{lt: -(-shape[last] // B)}):
                        self._run_loops(lh, lq, f"{ll}_n / {run}", run, err,
                                        lambda: copy_rows(at, f"{lh} * {run} + {lq}", pl),
                                        bound=B // run)
                    del em.ranges[at[last]]

            # a cat along the last dim whose parts start at tile boundaries: a tile reads one
            # part, resolved statically (em.ranges), by the loop that part is contiguous along
            segments = cat_segments(fours, p, em.buffers, B)
            for lo, hi, rows in segments or [(None, None, False)]:
                if lo is None:
                    along_p()
                    continue
                em.mark()
                em.line(f"if ({lt} * {B} >= {lo} && {lt} * {B} < {hi}) {{")
                with em.loop_body([lt]):
                    em.ranges[idx[last]] = (lo, hi)
                    along_rows(lo, hi) if rows else along_p()
                    del em.ranges[idx[last]]
            for buf, f in zip(bufs, four):
                if f:
                    em.line(f"st_tile_t({buf}, {buf}_in, {ll}_n, {pl}_n);")
        if not all(four):
            em.mark()
            em.line(f"for (int64_t {ll} = 0; {ll} < {ll}_n; ++{ll})")
            em.line(f"for (int64_t {pl} = 0; {pl} < {pl}_n; ++{pl}) {{")
            with em.loop_body([ll, pl]):
                for u, buf, f in zip(us, bufs, four):
                    if not f:
                        em.line(f"{buf}[{pl}][{ll}] = {em.value(u, idx)};")
        # 2. the value, over contiguous rows of the tiles
        for u, buf in zip(us, bufs):
            em.known[id(u)] = lambda at, want=list(idx), buf=buf: \
                f"{buf}[{pl}][{ll}]" if at == want else None
        em.mark()
        em.line(f"for (int64_t {pl} = 0; {pl} < {pl}_n; ++{pl}) {{")
        with em.loop_body([pl]):
            self._simd_loop(ll, f"{ll}_n", err, lambda: emit(idx))
        for u in us:
            del em.known[id(u)]
        em.pop()
        em.scopes[-1].lines.extend(tile)
        em.line("}")
