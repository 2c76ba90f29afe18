"""Where a kernel's loads land: the memory stride of every buffer a value reads, per dimension of
the value, found by evaluating the group's index maps on concrete indices.

A layout op inside a group is an index map (``codegen.cpp.emit``). A loop nest that follows the
output's row-major order reads a permuted input with a large stride in its innermost loop: an
NHWC buffer read in NCHW order touches H * W cache lines per channel and reads each of them
again for the next channel (a batch-norm + residual kernel after a channels-last convolution
ran at 0.65 GB/s). ``interchange`` finds the dim along which the input *is* contiguous; the loop
over it goes just outside the innermost (vectorised) loop, so the lines one pass of the
innermost loop touches are all used before they leave L1.

Invariants: exact for affine index maps (broadcast, permute, slice, reshapes that split or merge
whole dims); for other reshapes, pads and cats the stride is the local step at the origin.
Gathered reads are data-dependent and are not reported.
"""

from __future__ import annotations

import itertools
import math

from codegen.cpp.scalars import dims
from codegen.cpp.scalars import hint as size_hint
from stitch_ir.core import BlockArgument, Value
from stitch_ir.dialects import st

# Buffers smaller than this stay in cache whatever the loop order.
MIN_BYTES = 256 << 10


def buffer_bytes(values, buffers: dict[int, str]) -> dict[str, int]:
    """Buffer name -> bytes, for the ``values`` held in ``buffers`` (the ``sizes`` the functions
    below take)."""
    return {buffers[id(x)]: size_hint(math.prod(dims(x))) * x.type.dtype.itemsize
            for x in values if id(x) in buffers}


def _flat(idx: tuple[int, ...], shape: list[int]) -> int:
    flat = 0
    for i, n in zip(idx, shape):
        flat = flat * n + i
    return flat


def _unflat(flat: int, shape: list[int]) -> tuple[int, ...]:
    out = []
    for n in reversed(shape):
        out.append(flat % n if n else 0)
        flat //= max(n, 1)
    return tuple(reversed(out))


def reads(v: Value, idx: tuple[int, ...], buffers: dict[int, str],
          out: dict[str, int] | None = None) -> dict[str, int]:
    """Buffer name -> the flat element index that ``v`` at ``idx`` reads from it."""
    out = {} if out is None else out
    if id(v) in buffers:
        out.setdefault(buffers[id(v)], _flat(idx, dims(v)))
        return out
    op = getattr(v, "owner", None)
    if op is None or isinstance(v, BlockArgument) or isinstance(
            op, st.ConstantOp | st.IotaOp | st.EmbeddingOp | st.IndexSelectOp | st.GatherOp |
            st.ReduceOp | st.IndexAddOp | st.ScatterAddOp | st.ScatterReduceOp):
        return out  # nothing read, data-dependent, or materialised (then it is in ``buffers``)
    if isinstance(op, st.BroadcastOp):
        src = dims(op.operand(0))
        off = len(idx) - len(src)
        return reads(op.operand(0), tuple(0 if n == 1 else idx[off + k] for k, n in enumerate(src)),
                     buffers, out)
    if isinstance(op, st.ReshapeOp):
        return reads(op.operand(0), _unflat(_flat(idx, dims(v)), dims(op.operand(0))), buffers, out)
    if isinstance(op, st.PermuteOp):
        src = [0] * len(idx)
        for k, p in enumerate(op.attributes["perm"]):
            src[p] = idx[k]
        return reads(op.operand(0), tuple(src), buffers, out)
    if isinstance(op, st.SliceOp):
        a = op.attributes
        src = list(idx)
        src[a["dim"]] = a["start"] + a["step"] * idx[a["dim"]]
        return reads(op.operand(0), tuple(src), buffers, out)
    if isinstance(op, st.PadOp):
        shape = dims(op.operand(0))
        src = tuple(min(max(i - lo, 0), n - 1) for i, lo, n in zip(idx, op.attributes["low"], shape))
        return reads(op.operand(0), src, buffers, out)
    if isinstance(op, st.CatOp):
        d, start = op.attributes["dim"], 0
        for o in op.operands:
            n = dims(o)[d]
            if idx[d] < start + n or o is op.operands[-1]:
                src = list(idx)
                src[d] = min(max(idx[d] - start, 0), n - 1)
                return reads(o, tuple(src), buffers, out)
            start += n
        return out
    for o in op.operands:  # element-wise: every operand at the same index
        if o.type.rank == len(idx):
            reads(o, idx, buffers, out)
    return out


def strides(v: Value, buffers: dict[int, str], last: int = 0) -> dict[str, list[int]]:
    """Buffer name -> its flat-index step per unit step of each dim of ``v`` (0 where the buffer
    does not depend on that dim or the dim has size 1), read at index ``last`` of the innermost
    dim (a part of a cat there) and 0 elsewhere."""
    shape = dims(v)
    if _symbolic(v):
        return {}
    at = (0,) * (len(shape) - 1) + (last,) if shape else ()
    base = reads(v, at, buffers)
    out = {name: [0] * len(shape) for name in base}
    for k, n in enumerate(shape):
        if at[k] + 1 < n:
            step = tuple(i + (j == k) for j, i in enumerate(at))
            for name, flat in reads(v, step, buffers).items():
                if name in out:
                    out[name][k] = flat - base[name]
    return out


def _symbolic(v: Value) -> bool:
    """Strides are evaluated on concrete indices: not for symbolic shapes (loop order and tiles
    then stay row-major; the kernel is right either way)."""
    return not v.type.is_static


def interchange(v: Value, buffers: dict[int, str], sizes: dict[str, int]) -> int | None:
    """The dim of ``v`` (not the innermost) to loop over just outside the innermost loop: where
    the largest buffer ``v`` reads is contiguous along it but strided along ``v``'s innermost
    dim. None when the row-major order is already right. ``sizes``: buffer name -> bytes."""
    shape = dims(v)
    if _symbolic(v) or len(shape) < 3 or shape[-1] < 2:
        return None
    best = None
    for name, s in strides(v, buffers).items():
        if sizes.get(name, 0) < MIN_BYTES or abs(s[-1]) in (0, 1):
            continue
        unit = [k for k in range(len(shape) - 2) if s[k] == 1 and shape[k] >= 2]
        if unit and (best is None or sizes[name] > best[1]):
            best = (unit[-1], sizes[name])
    return best[0] if best else None


def merged_tail(v: Value, buffers: dict[int, str], short: int = 256, outer_min: int = 16) -> int:
    """How many trailing dims of ``v`` one innermost loop can run over: dims whose every buffer
    read continues the next dim's (``[B, C, H, W] * scale[C]``: H and W), merged while that loop
    is shorter than ``short`` and the loops outside it keep at least ``outer_min`` iterations
    for the thread team. 1 when nothing merges (or the shape is symbolic)."""
    shape = dims(v)
    s = strides(v, buffers)
    if not s or len(shape) < 2 or not _affine(v, buffers):
        return 1
    k = len(shape) - 1  # the first merged dim
    while k > 0 and size_hint(math.prod(shape[k:])) < short and \
            size_hint(math.prod(shape[:k - 1])) >= outer_min and \
            all(_flat_run(d, shape, k - 1) for d in s.values()):
        k -= 1
    return len(shape) - k


def _affine(v: Value, buffers: dict[int, str]) -> bool:
    """Whether every buffer ``v`` reads is read through affine index maps (no pad or cat, whose
    strides are only local, no gather): what ``strides`` says then holds at every index."""
    seen: set[int] = set()
    todo = [v]
    while todo:
        w = todo.pop()
        if id(w) in seen or id(w) in buffers:
            continue
        seen.add(id(w))
        op = getattr(w, "owner", None)
        if op is None:
            continue
        if isinstance(op, st.PadOp | st.CatOp) or op.kind == st.GATHER:
            return False
        todo.extend(op.operands)
    return True


def _flat_run(d: list[int], shape: list[int], k: int) -> bool:
    """Whether strides ``d`` step through dims ``k``.. of ``shape`` as one flat index (a
    multiple of it: 0 for a broadcast read)."""
    unit, size = None, 1
    for j in range(len(shape) - 1, k - 1, -1):
        if shape[j] == 1:
            continue
        if unit is None:
            unit = d[j]
        elif d[j] != unit * size:
            return False
        size *= shape[j]
    return True


def loop_order(shape: list[int], inner: int | None) -> list[int]:
    """The order of the loops over ``shape``: row-major, with ``inner`` moved just outside the
    last one."""
    order = list(range(len(shape)))
    if inner is not None:
        order.remove(inner)
        order.insert(len(order) - 1, inner)
    return order



LAYOUT = (st.PermuteOp, st.ReshapeOp, st.SliceOp, st.BroadcastOp)


def _reads_only(v: Value, buffers: dict[int, str], name: str) -> bool:
    """Whether ``v`` is buffer ``name`` seen through layout ops only."""
    while id(v) not in buffers:
        op = getattr(v, "owner", None)
        if op is None or not isinstance(op, LAYOUT):
            return False
        v = op.operand(0)
    return buffers[id(v)] == name


def transposed_dim(v: Value, buffers: dict[int, str], sizes: dict[str, int],
                   min_bytes: int | None = None, last: int = 0):
    """(buffer, p): the largest buffer ``v`` reads (of at least ``min_bytes``; at index ``last``
    of its innermost dim) that is contiguous along dim ``p`` of ``v`` and strided along its
    innermost dim (a transpose); None when there is none. ``min_bytes`` defaults to
    ``MIN_BYTES``."""
    shape = dims(v)
    if _symbolic(v) or len(shape) < 2 or shape[-1] < 2:
        return None
    min_bytes = MIN_BYTES if min_bytes is None else min_bytes
    best = None
    for name, s in strides(v, buffers, last).items():
        if sizes.get(name, 0) < min_bytes or abs(s[-1]) in (0, 1):
            continue
        unit = [k for k in range(len(shape) - 1) if s[k] == 1 and shape[k] >= 2]
        if unit and (best is None or sizes[name] > best[2]):
            best = (name, unit[-1], sizes[name])
    return None if best is None else best[:2]


def transposed_view(v: Value, buffers: dict[int, str], sizes: dict[str, int], tile: int = 32):
    """(us, p): the values ``us`` of ``v``'s shape that ``v``'s element reads at its own index
    (through element-wise ops only), each a large buffer seen through layout ops so that it is
    contiguous along dim ``p`` and strided along ``v``'s innermost dim -- transposes, which a
    vectorising compiler will not vectorise (GCC 12 has no strided vector loads). The kernel
    stages each in tiles (``StagedPhases.nest_staged``); the largest such buffer picks ``p``, and
    every other one transposed along the same ``p`` is staged with it (charformer's CBAM
    backward read two NHWC buffers in an NCHW loop: staging one left the other a gather), and
    so is a cat along the innermost dim of such buffers and others whose parts start at
    multiples of ``tile`` (each staged tile then reads one part: ``cat_segments``).
    None when there is none."""
    starts = [0] + cat_starts(v, buffers)  # a cat's transposed part need not be its first
    best = next((b for b in (transposed_dim(v, buffers, sizes, last=s) for s in starts) if b),
                None)
    if best is None:
        return None
    _, p = best
    names = set().union(*(_transposed_along(v, buffers, sizes, p, last=s) for s in starts))

    def staged(w: Value) -> bool:
        if isinstance(w.owner, LAYOUT):
            return any(_reads_only(w, buffers, name) for name in names) or \
                _computed_transpose(w, buffers, sizes, p)
        return _staged_cat(w.owner, buffers, names, tile)

    found = [w for w in _read_at_own_index(v, buffers) if staged(w)]
    return (found, p) if found else None


def _read_at_own_index(v: Value, buffers: dict[int, str]):
    """The values of ``v``'s shape, computed in the kernel, that ``v``'s element reads at its own
    index through element-wise ops: each path's first op that is not element-wise, once."""
    shape = dims(v)
    todo, seen = [v], set()
    while todo:
        w = todo.pop()
        if id(w) in seen or dims(w) != shape:
            continue
        seen.add(id(w))
        op = getattr(w, "owner", None)
        if op is None or isinstance(w, BlockArgument) or id(w) in buffers:
            continue
        if op.kind == st.ELEMENTWISE:
            todo.extend(op.operands)
        else:
            yield w


def cat_starts(v: Value, buffers: dict[int, str]) -> list[int]:
    """Where the parts after the first start, of each cat along the innermost dim that ``v``
    reads at its own index through element-wise ops."""
    if _symbolic(v) or not dims(v):
        return []
    shape, last = dims(v), len(dims(v)) - 1
    out: set[int] = set()
    for w in _read_at_own_index(v, buffers):
        if isinstance(w.owner, st.CatOp) and w.owner.attributes["dim"] == last:
            out.update(itertools.accumulate(dims(o)[last] for o in w.owner.operands[:-1]))
    return sorted(s for s in out if isinstance(s, int) and 0 < s < shape[last])


def _staged_cat(op, buffers: dict[int, str], names, tile: int) -> bool:
    """Whether ``op`` is a cat along its innermost dim of buffers seen through layout ops, one of
    them among ``names`` (transposed), whose parts start at multiples of ``tile``."""
    if not isinstance(op, st.CatOp) or op.attributes["dim"] != op.result.type.rank - 1:
        return False
    starts = itertools.accumulate([dims(o)[-1] for o in op.operands[:-1]])
    layout_only = [next((b for b in set(buffers.values()) if _reads_only(o, buffers, b)), None)
                   for o in op.operands]
    return all(b is not None for b in layout_only) and any(b in names for b in layout_only) \
        and all(isinstance(s, int) and s % tile == 0 for s in starts)


def _computed_transpose(w: Value, buffers: dict[int, str], sizes: dict[str, int],
                        p: int) -> bool:
    """Whether ``w`` permutes a value the kernel computes (not a buffer) from buffers that are
    all contiguous (or constant) along dim ``p`` of ``w``, some large one strided along its
    innermost dim: staged, ``w`` is computed reading along ``p`` (charformer's CBAM backward
    compares and counts a channel max in NHWC, then permutes the mask to NCHW)."""
    op = getattr(w, "owner", None)
    if not isinstance(op, st.PermuteOp) or id(op.operand(0)) in buffers or \
            isinstance(getattr(op.operand(0), "owner", None), LAYOUT):
        return False
    s = strides(w, buffers)
    return bool(s) and all(v[p] in (0, 1) for v in s.values()) and any(
        sizes.get(n, 0) >= MIN_BYTES and abs(v[-1]) not in (0, 1) for n, v in s.items())


def _transposed_along(v: Value, buffers: dict[int, str], sizes: dict[str, int], p: int,
                      min_bytes: int | None = None, last: int = 0) -> set[str]:
    """The buffers ``v`` reads (of at least ``min_bytes``; at index ``last`` of its innermost
    dim) contiguous along dim ``p`` of ``v`` and strided along its innermost dim."""
    min_bytes = MIN_BYTES if min_bytes is None else min_bytes
    return {name for name, s in strides(v, buffers, last).items()
            if sizes.get(name, 0) >= min_bytes and abs(s[-1]) not in (0, 1) and s[p] == 1}


def contiguous_run(us: list[Value], p: int, buffers: dict[int, str], tile: int,
                   lo: int = 0) -> int | None:
    """The longest run ``f`` (a divisor of ``tile`` and of dim ``p``, below ``tile``, 4 or more)
    over which every buffer each of ``us`` reads that starts contiguous (or constant) along dim
    ``p`` stays so, from every multiple of ``f`` (one strided along ``p`` is a gather either
    way). A staged tile's copy loop split at ``f`` reads those runs with vector loads:
    charformer's head-permuted cat read a [256, 16, 128] buffer whose rows hold 8 x 8 blocks,
    and ``(pt * 32 + pl) / 8`` in every load had made the copy loop a gather. Sampled from
    index ``lo`` of dim ``p`` on (a tile-aligned part of a cat). None when the whole tile row
    is contiguous or no such run exists."""
    shape = dims(us[0])
    if any(_symbolic(u) for u in us):
        return None
    span = min(shape[p] - lo, 2 * tile)
    samples = [tuple(0 for _ in shape), tuple(n - 1 for n in shape), tuple(n // 2 for n in shape)]

    walks = []  # for each of us and each sample: the buffers' flat indices along dim p from lo
    for u in us:
        for base in samples:
            walks.append([reads(u, base[:p] + (lo + j,) + base[p + 1:], buffers)
                          for j in range(span)])

    def run_ok(f: int) -> bool:
        for rows in walks:
            for start in range(0, span, f):
                block = rows[start:start + f]
                for name, flat in block[0].items():
                    steps = [r.get(name, -1) - flat for r in block]
                    if len(steps) > 1 and steps[1] not in (0, 1):
                        continue  # strided along p from the start: a gather either way
                    if steps != [0] * len(block) and steps != list(range(len(block))):
                        return False
        return True

    if run_ok(tile):
        return None
    return next((f for f in range(tile // 2, 3, -1)
                 if tile % f == 0 and shape[p] % f == 0 and run_ok(f)), None)


def cat_segments(us: list[Value], p: int, buffers: dict[int, str],
                 tile: int) -> list[tuple[int, int, bool]] | None:
    """The ranges ``(lo, hi, along_rows)`` of the innermost dim of ``us`` (values staged along
    dim ``p``) over each of which they read the same buffers -- the parts of a cat along that
    dim -- and whether a range reads every buffer contiguously along the innermost dim instead
    of along ``p`` (a part that is not transposed: its tile is copied along rows, not gathered).
    Only where every range starts at a multiple of ``tile``, so that each tile lies in one;
    None where there is one range. charformer's head-permuted cat read one transposed and one
    plain buffer for every element, the plain one with a stride-16 gather."""
    shape = dims(us[0])
    last = len(shape) - 1
    if p == last or any(_symbolic(u) for u in us) or shape[last] > 1 << 14:
        return None

    def at(j: int, q: int = 0) -> tuple[int, ...]:
        idx = [n // 2 for n in shape]
        idx[p], idx[last] = q, j
        return tuple(idx)

    def names(j: int) -> tuple[frozenset[str], ...]:
        return tuple(frozenset(reads(u, at(j), buffers)) for u in us)

    cuts, prev = [0], names(0)
    for j in range(1, shape[last]):
        cur = names(j)
        if cur != prev:
            cuts.append(j)
        prev = cur
    if len(cuts) == 1 or any(c % tile for c in cuts):
        return None
    cuts.append(shape[last])

    def along_rows(lo: int, hi: int) -> bool:
        if hi - lo < 2 or shape[p] < 2:
            return False
        steps = []
        for u in us:
            base, nxt, down = (reads(u, i, buffers) for i in (at(lo), at(lo + 1), at(lo, 1)))
            steps += [(nxt[b] - f, down[b] - f) for b, f in base.items()]
        return bool(steps) and all(s in (0, 1) and d != 1 for s, d in steps) and \
            any(s == 1 for s, _ in steps)

    return [(lo, hi, along_rows(lo, hi)) for lo, hi in zip(cuts, cuts[1:])]


def broken_inner_run(v: Value, buffers: dict[int, str]) -> bool:
    """Whether some buffer ``v`` reads starts contiguous along ``v``'s innermost dim but is not
    contiguous over all of it (a reshape split that dim from another): two reads a buffer, the
    cheap test before ``contiguous_run`` walks the dim."""
    shape = dims(v)
    if _symbolic(v) or len(shape) < 1 or not isinstance(shape[-1], int) or shape[-1] < 8:
        return False
    s = strides(v, buffers)
    base = reads(v, (0,) * len(shape), buffers)
    end = reads(v, (0,) * (len(shape) - 1) + (shape[-1] - 1,), buffers)
    return any(d[-1] == 1 and end.get(name) != base[name] + shape[-1] - 1
               for name, d in s.items())
