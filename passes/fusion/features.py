"""Summarise a candidate group of ops as a ``KernelDesc`` for the cost model.

A group's kernel reads each external input once and writes each value used outside once
(minimum traffic); gathered tables count only the rows gathered. Its reductions give the
parallel structure (row / column / all); values that a row reduction's consumers need again
after the reduction are kept *regionally* (shared memory on a GPU, a per-thread row buffer on
a CPU), and reductions of a different parallel shape than the dominant one are stitched
*globally* (grid barrier), as AStitch describes. When the regional values do not fit the
target's shared memory, they are demoted to global memory: re-read instead of cached.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

from cost_model import DeviceSpec, KernelDesc, ReduceDesc, latency, legal
from passes.fusion.graph import PlanGraph, is_free_constant, members_of
from stitch_ir.core import Value
from stitch_ir.dialects import st

TRANSCENDENTAL = (st.ExpOp, st.Exp2Op, st.LogOp, st.Log2Op, st.Log1pOp, st.Expm1Op, st.TanhOp,
                  st.SigmoidOp, st.ErfOp, st.RsqrtOp, st.SqrtOp, st.SinOp, st.CosOp, st.TanOp,
                  st.PowOp, st.Atan2Op)
GATHERS = (st.EmbeddingOp, st.IndexSelectOp, st.GatherOp)
GATHER_FLOPS = 4  # flops-equivalent work per element of a gathered row (see _facts)
# ... and per element gathered one at a time (an index per element, or rows shorter than a
# vector): a vector gather of the index and another of the value, ~2.4 ns an element on a
# 2-core EPYC (adder_quant's im2col, 1.2 M elements from a padded map: 1.4 ms on 2 threads)
ELEMENT_GATHER_FLOPS = 32
VECTOR_ELEMS = 16  # a gathered row shorter than this is gathered element by element
SCATTERS = (st.IndexAddOp, st.ScatterAddOp, st.ScatterReduceOp)


def numel(v: Value) -> int:
    return v.type.numel() if v.type.is_static else 1 << 20


def nbytes(v: Value) -> int:
    return numel(v) * v.type.dtype.itemsize


def reduce_desc(op: st.ReduceOp) -> ReduceDesc:
    shape = [int(d) if isinstance(d, int) else 1 << 10 for d in op.operand(0).type.shape]
    dims = op.dims
    length = math.prod(shape[d] for d in dims) or 1
    rows = max(1, math.prod(shape) // length)
    if rows == 1:
        return ReduceDesc("all", 1, length)
    trailing = all(shape[d] == 1 for d in range(min(dims), len(shape)) if d not in dims)
    return ReduceDesc("row" if trailing else "column", rows, length)


@dataclass(frozen=True)
class GroupInfo:
    """A costed candidate group."""

    members: tuple[int, ...]
    inputs: tuple[Value, ...]
    outputs: tuple[Value, ...]
    desc: KernelDesc
    kind: str  # view | loop | gather | scatter | reduce | stitch
    seconds: float
    legal: bool
    reason: str
    regional: tuple[Value, ...] = ()  # values kept in shared memory / row buffers
    demoted: bool = False  # regional values demoted to global memory (did not fit)
    analytic_seconds: float = -1.0  # the analytic estimate, when a learned model set `seconds`

    @property
    def is_view(self) -> bool:
        return self.kind == "view"

    @property
    def kernels(self) -> int:
        return 0 if self.is_view else 1


@dataclass
class NodeFacts:
    """What ``describe`` needs of one node, computed once per graph."""

    inputs: list[tuple[int, int, int]]  # (value id, bytes, producer node or -1)
    outputs: list[tuple[int, int, int, bool]]  # (value id, bytes, user-node bits, escapes)
    flops: int
    trans: int
    reduce: ReduceDesc | None
    gather_table: tuple[int, int] | None  # (table value id, bytes gathered)
    scatter: bool
    reshape: bool
    # (user node, evaluations of this node's value per element of it for that user): a value
    # a user reads under an outer broadcast or a gather is computed again for every read
    # unless it is materialised (see ``_recompute``)
    reads: list[tuple[int, float]] = field(default_factory=list)


def _outer_expansion(src: list, dst: list) -> int:
    """How many times a broadcast from ``src`` to ``dst`` reads each source element in loops
    outside the source's innermost dim: a kernel computes a value once per pass of those
    loops (an [R, 1] row statistic broadcast along its row is computed once per row, a
    [1, K, N] value broadcast to [4, K, N] four times)."""
    if len(src) != len(dst) or not all(isinstance(d, int) for d in (*src, *dst)):
        return 1
    inner = max((k for k, d in enumerate(src) if d != 1), default=-1)
    return math.prod(d for k, (a, d) in enumerate(zip(src, dst)) if k < inner and a == 1)


def _reads_per_element(user, v: Value) -> float:
    """Evaluations of ``v`` per element of ``v`` that ``user`` makes when ``v`` is computed
    inside its loop nest rather than read from memory."""
    if isinstance(user, st.BroadcastOp):
        return float(_outer_expansion(list(v.type.shape), list(user.result.type.shape)))
    if isinstance(user, GATHERS) and user.operand(0) is v:
        return numel(user.result) / max(1, numel(v))
    return 1.0


def _gather_flops(op) -> int:
    """Flops-equivalent work per element of a gather's result: a row gather copies contiguous
    runs; a torch.gather, or an index_select / embedding whose rows are shorter than a vector,
    loads element by element through the index."""
    if isinstance(op, st.GatherOp):
        return ELEMENT_GATHER_FLOPS
    shape = op.result.type.shape
    dim = op.attributes["dim"] if isinstance(op, st.IndexSelectOp) else len(shape) - 2
    run = 1
    for d in shape[dim + 1:]:
        run *= d if isinstance(d, int) else VECTOR_ELEMS
    return GATHER_FLOPS if run >= VECTOR_ELEMS else ELEMENT_GATHER_FLOPS


def _facts(g: PlanGraph) -> list[NodeFacts]:
    cached = getattr(g, "_facts", None)
    if cached is not None:
        return cached
    facts = []
    for _i, op in enumerate(g.ops):
        ins = []
        for v in op.operands:
            if not is_free_constant(v):
                j = g.node_of(v)
                ins.append((id(v), nbytes(v), -1 if j is None else j))
        outs = []
        for r in op.results:
            users = 0
            escapes = False  # used by the terminator: the value leaves the block
            for u in r.users:
                k = g.index.get(id(u))
                if k is None:
                    escapes = True
                else:
                    users |= 1 << k
            outs.append((id(r), nbytes(r), users, escapes))
        flops = trans = 0
        if op.kind in (st.ELEMENTWISE, st.REDUCE, st.SCATTER):
            flops = max([numel(r) for r in op.results] + [numel(v) for v in op.operands])
            trans = flops if isinstance(op, TRANSCENDENTAL) else 0
        elif isinstance(op, GATHERS):
            # a gathered element is a bounds-checked scalar load through a computed index, not
            # a vector lane: counted as GATHER_FLOPS flops (rffs_net's 268K-element neighbour
            # gather, costed as its bytes alone at 11 us, ran 350 us on the calling thread)
            flops = _gather_flops(op) * numel(op.result)
        table = (id(op.operand(0)), min(nbytes(op.operand(0)), nbytes(op.result))) if isinstance(
            op, GATHERS) else None
        facts.append(NodeFacts(ins, outs, flops, trans,
                               reduce_desc(op) if isinstance(op, st.ReduceOp) else None, table,
                               isinstance(op, SCATTERS), isinstance(op, st.ReshapeOp)))
        for v in op.operands:
            j = g.node_of(v)
            if j is not None and j != len(facts) - 1:
                facts[j].reads.append((len(facts) - 1, _reads_per_element(op, v)))
    g._facts = facts
    return facts


def _recompute(facts: list[NodeFacts], members: list[int], member_bits: int) -> dict[int, float]:
    """How many times each member's values are computed by the group's kernel: a value not
    materialised (no user outside the group, not a reduction) is computed where it is read, so
    under an outer broadcast or a gather as many times as it is read (AdderNet's quantised
    im2col, [4, 144, 2048] gathered to 16 output channels inside the L1-distance sum, was
    costed once and ran 16 times: 11 ms a kernel, 0.2 s of a 0.22 s inference)."""
    fan: dict[int, float] = {}
    for i in reversed(members):
        f = facts[i]
        # outputs, reductions and scatters are materialised: computed once, then read
        if f.reduce is not None or f.scatter or any(
                escapes or users & ~member_bits for _, _, users, escapes in f.outputs):
            fan[i] = 1.0
            continue
        fan[i] = max([1.0] + [fan.get(u, 1.0) * r for u, r in f.reads if (member_bits >> u) & 1])
    return fan


def describe(g: PlanGraph, member_bits: int, device: DeviceSpec) -> GroupInfo:
    facts = _facts(g)
    members = members_of(member_bits)
    inputs: dict[int, int] = {}
    input_values: dict[int, Value] = {}
    for i in members:
        for _k, (vid, nb, src) in enumerate(facts[i].inputs):
            if src < 0 or not (member_bits >> src) & 1:
                inputs[vid] = nb
    out_bytes = 0
    out_ids: list[int] = []
    for i in members:
        for vid, nb, users, escapes in facts[i].outputs:
            if escapes or users & ~member_bits:
                out_bytes += nb
                out_ids.append(vid)
    outputs = tuple(r for i in members for r in g.ops[i].results if id(r) in set(out_ids))
    for i in members:
        for v in g.ops[i].operands:
            if id(v) in inputs:
                input_values.setdefault(id(v), v)

    if all(facts[i].reshape for i in members):
        desc = KernelDesc(0, 0, 1, num_ops=len(members))
        return GroupInfo(tuple(members), tuple(input_values.values()), outputs, desc, "view",
                         0.0, True, "")

    gathered: dict[int, int] = {}
    for i in members:
        t = facts[i].gather_table
        if t is not None and t[0] in inputs:
            gathered[t[0]] = min(inputs[t[0]], gathered.get(t[0], 0) + t[1])
    bytes_read = sum(gathered.get(vid, nb) for vid, nb in inputs.items())
    # a value the kernel does not materialise is computed where it is read: under an outer
    # broadcast or a gather, once per read, in a reduction's nest and in a loop nest alike
    # (adder_quant's im2col gather, fused below its four per-group quantisers, ran four
    # times: 1.3-4.9 ms a kernel, a plan twice as slow, chosen where the probe measured a
    # slow memory that made materialising the 1.2 MB column look dear)
    fan = _recompute(facts, members, member_bits) if any(
        r > 1 for i in members for u, r in facts[i].reads if (member_bits >> u) & 1) else {}
    flops = round(sum(facts[i].flops * fan.get(i, 1.0) for i in members))
    trans = round(sum(facts[i].trans * fan.get(i, 1.0) for i in members))

    rdescs = [facts[i].reduce for i in members if facts[i].reduce is not None]
    dominant = max(rdescs, key=lambda r: r.elements) if rdescs else None
    num_global = sum(1 for r in rdescs if r.kind != dominant.kind) if dominant else 0
    for i in members:  # a scatter read back inside the group needs every contribution first
        if facts[i].scatter and any(users & member_bits for _, _, users, _ in facts[i].outputs):
            num_global += 1

    # Regional values: consumed both before (or by) a reduction and after it.
    value_users: dict[int, int] = {}
    value_bytes: dict[int, int] = {}
    for i in members:
        for vid, nb, _ in facts[i].inputs:
            value_users[vid] = value_users.get(vid, 0) | (1 << i)
            value_bytes[vid] = nb
    regional_ids: list[int] = []
    consumed_after = 0
    for i in members:
        if facts[i].reduce is None:
            continue
        after = g.desc_bits[i] & member_bits
        if any(users & member_bits for _, _, users, _ in facts[i].outputs):
            consumed_after += 1
        before = (g.anc_bits[i] | (1 << i)) & member_bits
        for vid, users in value_users.items():
            if users & before and users & after and vid not in regional_ids:
                regional_ids.append(vid)
    row_len = dominant.length if dominant is not None and dominant.kind == "row" else 0
    full_row = row_len * dominant.rows if row_len else 0
    big = [vid for vid in regional_ids if row_len and value_bytes[vid] >= full_row]
    itemsize = max([v.type.dtype.itemsize for v in outputs] or [4])
    smem_per_row = sum(row_len * max(1, value_bytes[v] // max(full_row, 1)) for v in big)
    smem_per_row *= 1 if smem_per_row else 0
    parallel = dominant.rows if dominant is not None else max(
        [nb for i in members for _, nb, _, _ in facts[i].outputs] or [1]) // itemsize
    regional = tuple(v for i in members for v in g.ops[i].operands if id(v) in set(regional_ids))
    regional = tuple({id(v): v for v in regional}.values())

    def make(smem: int, extra_read: int) -> KernelDesc:
        return KernelDesc(bytes_read=bytes_read + extra_read, bytes_written=out_bytes,
                          parallel_size=max(1, parallel), flops=flops, transcendentals=trans,
                          reduce=tuple(rdescs), smem_bytes_per_row=smem,
                          num_regional=len(regional_ids) + consumed_after,
                          num_global=num_global, num_ops=len(members),
                          needs_grid_sync=num_global > 0, elem_bytes=itemsize)

    desc = make(smem_per_row, _strided_scatter_bytes(g, members, member_bits))
    ok, reason = legal(desc, device)
    demoted = False
    if not ok and smem_per_row and "shared memory" in reason:
        # Demote the regional values to global memory: re-read them after the reduction.
        desc = make(0, sum(value_bytes[v] for v in big))
        ok, reason = legal(desc, device)
        demoted = True
    if any(facts[i].scatter for i in members):
        kind = "scatter"
    elif rdescs:
        kind = "stitch" if (consumed_after or len(rdescs) > 1 or num_global) else "reduce"
    elif any(facts[i].gather_table for i in members):
        kind = "gather"
    else:
        kind = "loop"
    secs = latency(desc, device) if ok else math.inf
    return GroupInfo(tuple(members), tuple(input_values.values()), outputs, desc, kind, secs,
                     ok, reason, regional, demoted)


# A scatter walks its source in index order (row-major, the scattered dim within the others):
# through a permute that moves the innermost dim of a buffer larger than this, each element it
# reads is on a cache line of its own.
STRIDED_SCATTER_MIN_BYTES = 256 << 10
CACHE_LINE_ELEMENTS = 16


def _strided_scatter_bytes(g: PlanGraph, members: list[int], member_bits: int) -> int:
    """The extra bytes a scatter group moves when it reads a large input transposed: a line per
    element instead of one per 16. rcrn's nearest-upsampling backward read a channels-last
    gradient as [N, C, H*W]: 5.3 ms fused with the permute, against 1.5 ms reading a contiguous
    NCHW copy (the permute then runs as its own transposing kernel, tiles staged)."""
    if not any(isinstance(g.ops[i], SCATTERS) for i in members):
        return 0
    extra = 0
    for i in members:
        op = g.ops[i]
        if not isinstance(op, st.PermuteOp):
            continue
        perm, src = tuple(op.attributes["perm"]), op.operand(0)
        j = g.node_of(src)
        if perm and perm[-1] != len(perm) - 1 and (j is None or not (member_bits >> j) & 1) \
                and nbytes(src) >= STRIDED_SCATTER_MIN_BYTES:
            extra += nbytes(src) * (CACHE_LINE_ELEMENTS - 1)
    return extra


# ----------------------------------------------------------------------------------------------
# What the learned cost model reads of a group beyond its KernelDesc (cost_model.learned): ops by
# class, elements each kind of op computes (a rounding op is a libm call per element, an exp a
# vectorised polynomial), reduction axes, the innermost (vectorised) loop length, what a phases
# kernel keeps in scratch. Per-node facts are computed once per graph; a group's are sums over
# its members (a few hundred ns per member).

LEARN_COUNTS = ("elementwise", "broadcast", "reduce", "layout", "gather", "scatter", "cast",
                "compare_select", "permute", "slice_cat_pad", "arg_reduce", "rand", "half_ops",
                "row_reduce", "column_reduce", "all_reduce", "bool_ops")
ELEMENT_KINDS = ("el_cheap", "el_div", "el_int", "el_round", "el_exp", "el_log", "el_erf",
                 "el_sqrt", "el_pow", "el_trig", "el_cast", "el_rand", "el_bool", "el_broadcast",
                 "el_permute", "el_slice", "el_reshape", "el_reduce", "el_gather", "el_scatter",
                 "el_permute_rows")
_BY_NAME = {
    **dict.fromkeys(("st.div", "st.reciprocal", "st.remainder", "st.floor_div"), "el_div"),
    **dict.fromkeys(("st.round", "st.floor", "st.ceil", "st.trunc"), "el_round"),
    **dict.fromkeys(("st.exp", "st.exp2", "st.expm1", "st.sigmoid", "st.tanh"), "el_exp"),
    **dict.fromkeys(("st.log", "st.log2", "st.log1p"), "el_log"),
    "st.erf": "el_erf", "st.sqrt": "el_sqrt", "st.rsqrt": "el_sqrt", "st.pow": "el_pow",
    **dict.fromkeys(("st.sin", "st.cos", "st.tan", "st.atan2"), "el_trig"),
    "st.cast": "el_cast", "st.rand": "el_rand", "st.broadcast": "el_broadcast",
    "st.permute": "el_permute", "st.reshape": "el_reshape",
    **dict.fromkeys(("st.slice", "st.cat", "st.pad"), "el_slice"),
}
_CLASS_POS = {st.ELEMENTWISE: 0, st.BROADCAST: 1, st.REDUCE: 2, st.LAYOUT: 3, st.GATHER: 4,
              st.SCATTER: 5}


@dataclass(frozen=True)
class LearnFacts:
    counts: tuple[int, ...]  # LEARN_COUNTS
    kind: int  # index into ELEMENT_KINDS
    elems: int  # elements of the result (a reduction: of its operand)
    out_elems: int
    nbytes: int  # result bytes
    inner: int  # the result's innermost dim: the vectorised loop's length
    reduce_stride: int = 0  # a reduction: elements between two reduced neighbours (1: a row)
    result_ids: frozenset = frozenset()
    shape: tuple = ()  # of the first result
    materialised: bool = False  # a reduction or scatter: stored before its users read it
    user_bits: int = 0  # nodes using any result


def _moves_rows(op: st.PermuteOp) -> bool:
    """A permute that keeps the innermost dim innermost (a head split or merge): it copies rows
    of contiguous elements, a vector loop over each, where a transpose of the innermost dim
    gathers one element per stride."""
    perm = tuple(op.attr("perm"))
    shape = op.operand(0).type.shape
    return bool(perm) and perm[-1] == len(perm) - 1 and isinstance(shape[-1], int) and shape[-1] >= 8


def _element_kind(op) -> str:
    if isinstance(op, st.ReduceOp):
        return "el_reduce"
    if isinstance(op, GATHERS):
        return "el_gather"
    if isinstance(op, SCATTERS):
        return "el_scatter"
    if isinstance(op, st.PermuteOp) and _moves_rows(op):
        return "el_permute_rows"
    if op.name in _BY_NAME:
        return _BY_NAME[op.name]
    res = op.results[0] if op.results else None
    if res is not None and res.type.dtype.is_bool:
        return "el_bool"
    if res is not None and res.type.dtype.is_int:
        return "el_int"
    return "el_cheap"


def _learn_facts(g: PlanGraph) -> list[LearnFacts]:
    cached = getattr(g, "_learn_facts", None)
    if cached is not None:
        return cached
    out = []
    for op in g.ops:
        c = [0] * len(LEARN_COUNTS)
        if op.kind in _CLASS_POS:
            c[_CLASS_POS[op.kind]] = 1
        c[6] = isinstance(op, st.CastOp)
        c[7] = isinstance(op, st.CompareOp | st.PredicateOp | st.WhereOp)
        c[8] = isinstance(op, st.PermuteOp)
        c[9] = isinstance(op, st.SliceOp | st.CatOp | st.PadOp)
        c[10] = isinstance(op, st.ArgReduceOp)
        c[11] = isinstance(op, st.RandOp)
        res = op.results[0] if op.results else None
        inner = 1
        if res is not None:
            c[12] = res.type.dtype.itemsize == 2 and res.type.dtype.is_float
            c[16] = res.type.dtype.is_bool
            shape = res.type.shape
            inner = int(shape[-1]) if shape and isinstance(shape[-1], int) else 1
        stride = 0
        if isinstance(op, st.ReduceOp):
            c[{"row": 13, "column": 14, "all": 15}[reduce_desc(op).kind]] = 1
            shape = [int(d) if isinstance(d, int) else 1 << 10 for d in op.operand(0).type.shape]
            last = max(op.dims) if op.dims else len(shape) - 1
            stride = math.prod(shape[last + 1:])
        out_elems = max([numel(r) for r in op.results] or [1])
        elems = numel(op.operand(0)) if isinstance(op, st.ReduceOp) else out_elems
        f = _facts(g)[len(out)]
        out.append(LearnFacts(tuple(int(x) for x in c), ELEMENT_KINDS.index(_element_kind(op)),
                              elems, out_elems, sum(nbytes(r) for r in op.results), inner,
                              stride, frozenset(id(r) for r in op.results),
                              tuple(res.type.shape) if res is not None else (),
                              f.reduce is not None or f.scatter,
                              sum(u for _, _, u, _ in f.outputs)))
    # per count, the bitset of nodes it counts: a group's count is one AND and a popcount
    g._learn_count_bits = [sum(1 << i for i, lf in enumerate(out) if lf.counts[c])
                           for c in range(len(LEARN_COUNTS))]
    g._learn_facts = out
    return out


def ir_features(g: PlanGraph, info: GroupInfo) -> dict[str, float]:
    """The group's IR-level features for the learned cost model (cost_model.learned)."""
    facts = _learn_facts(g)
    member_bits = 0
    for i in info.members:
        member_bits |= 1 << i
    counts = [(member_bits & b).bit_count() for b in g._learn_count_bits]
    kinds = [0] * len(ELEMENT_KINDS)
    big, small, scratch = 1, 1 << 62, 0
    out_ids = {id(v) for v in info.outputs}
    inner_big, inner_big_elems, inner_min, shapes = 1, 0, 1 << 62, set()
    strided, max_stride, outer = 0, 0, 0
    for i in info.members:
        lf = facts[i]
        kinds[lf.kind] += lf.elems
        if lf.reduce_stride > 1:
            strided += lf.elems
        max_stride = max(max_stride, lf.reduce_stride)
        big, small = max(big, lf.out_elems), min(small, lf.out_elems)
        stored = not lf.result_ids.isdisjoint(out_ids)
        if lf.materialised and lf.user_bits & member_bits:
            scratch += lf.nbytes  # a phases kernel materialises it between its loops
            stored = True
        if stored:  # a loop nest of its own in a phases kernel
            if lf.shape not in shapes:
                outer += lf.out_elems // max(lf.inner, 1)  # starts of its innermost loop
            shapes.add(lf.shape)
            inner_min = min(inner_min, lf.inner)
            if lf.out_elems > inner_big_elems:
                inner_big, inner_big_elems = lf.inner, lf.out_elems
    rd = info.desc.reduce
    dom = info.desc.dominant_reduce
    rows_fit = bool(rd) and not counts[5] and all(
        r.kind == "row" and r.rows == dom.rows and r.length == dom.length for r in rd)
    feats = dict(zip(LEARN_COUNTS, map(float, counts)))
    feats.update(zip(ELEMENT_KINDS, map(float, kinds)))
    feats.update(max_elems=float(big), min_elems=float(min(small, big)),
                 inputs=float(len(info.inputs)), outputs=float(len(info.outputs)),
                 scratch_bytes=float(scratch), rows_fit=float(rows_fit),
                 regional_values=float(len(info.regional)), demoted=float(info.demoted),
                 inner_len=float(inner_big), inner_len_min=float(min(inner_min, inner_big)),
                 loop_shapes=float(len(shapes)), strided_reduce=float(strided),
                 reduce_stride=float(max_stride), outer_iters=float(outer))
    return feats


def learned_estimate(g: PlanGraph, info: GroupInfo, device: DeviceSpec, model) -> GroupInfo:
    """``info`` costed by a learned model (``cost_model.learned.LearnedModel``); the analytic
    estimate is kept in ``analytic_seconds``. Views and illegal groups keep their cost."""
    if not info.legal or info.is_view:
        return info
    return replace(info, seconds=model.seconds(ir_features(g, info), info.desc, device),
                   analytic_seconds=info.seconds)
