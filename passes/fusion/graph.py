"""The planning graph: a function's ops as a DAG, with roles and reachability bitsets.

Nodes are the function body's ops except ``func.return`` and constants (splat constants and
iotas are recomputed inside every group that uses them; dense constants are inputs). Each node
has a role:

- ``fusible``: a memory-intensive op (element-wise, broadcast, reduce, layout, gather/scatter)
  that the planner places into exactly one fused group;
- ``library``: a compute-intensive op (mm, conv) or an ``st.torch_call``: a step of its own;
- ``glue``: a reshape / permute that only feeds library ops and only reads function arguments,
  constants, library results or other glue: it is executed as part of the library step (the
  library call receives the view or makes the copy), so it never becomes a kernel of its own.

Reachability is kept as Python int bitsets (bit i = node i), which makes the convexity test of
a candidate group two ORs and an AND.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from passes.classify import LIBRARY, MEMORY_INTENSIVE, TORCH_CALL, classify
from stitch_ir.core import Block, BlockArgument, FuncOp, Operation, OpResult, Value
from stitch_ir.dialects import st
from stitch_ir.strides import contiguous_strides, view_op_strides

FUSIBLE, LIBRARY_ROLE, GLUE = "fusible", "library", "glue"


def is_free_constant(v: Value) -> bool:
    """Splat constants and iotas: cheaper to recompute in a kernel than to load."""
    op = v.owner if isinstance(v, OpResult) else None
    return isinstance(op, st.IotaOp) or (isinstance(op, st.ConstantOp) and op.is_splat)


def is_constant(v: Value) -> bool:
    return isinstance(v, OpResult) and isinstance(v.owner, st.ConstantOp | st.IotaOp)


@dataclass
class PlanGraph:
    block: Block  # a function body or a fusion.group body
    ops: list[Operation]
    role: list[str]
    preds: list[list[int]]
    succs: list[list[int]]
    returned: set[int]  # nodes with a result returned by the function
    desc_bits: list[int] = field(default_factory=list)  # strict descendants
    anc_bits: list[int] = field(default_factory=list)  # strict ancestors
    index: dict[int, int] = field(default_factory=dict)  # id(op) -> node
    # Fusible nodes reading a common value: fusing them reads it once (horizontal fusion).
    siblings: list[list[int]] = field(default_factory=list)

    @property
    def n(self) -> int:
        return len(self.ops)

    @property
    def terminator(self) -> Operation:
        return self.block.terminator

    def node_of(self, v: Value) -> int | None:
        return self.index.get(id(v.owner)) if isinstance(v, OpResult) else None

    def fusible(self) -> list[int]:
        return [i for i, r in enumerate(self.role) if r == FUSIBLE]

    def reach(self, members: int) -> tuple[int, int]:
        """(descendants, ancestors) of a group, as bitsets."""
        d = a = 0
        m = members
        while m:
            low = m & -m
            i = low.bit_length() - 1
            d |= self.desc_bits[i]
            a |= self.anc_bits[i]
            m ^= low
        return d, a

    def is_convex(self, members: int) -> bool:
        """No path leaves the group and comes back (``members`` is a bitset)."""
        d, a = self.reach(members)
        return (d & a & ~members) == 0

    def closure(self, members: int) -> int:
        """The smallest convex superset: add every node on a path between two members."""
        d, a = self.reach(members)
        return members | (d & a)

    def neighbours(self, i: int) -> list[int]:
        return self.preds[i] + self.succs[i]


def bits(nodes) -> int:
    b = 0
    for i in nodes:
        b |= 1 << i
    return b


def members_of(b: int) -> list[int]:
    out = []
    while b:
        low = b & -b
        out.append(low.bit_length() - 1)
        b ^= low
    return out


def build_graph(func: FuncOp | Block) -> PlanGraph:
    """The planning graph of a function body (or of a block ending in any terminator)."""
    block = func.body if isinstance(func, FuncOp) else func
    ops = [op for op in block.ops[:-1] if not isinstance(op, st.ConstantOp | st.IotaOp)]
    index = {id(op): i for i, op in enumerate(ops)}
    role = []
    for op in ops:
        c = classify(op)
        if c in MEMORY_INTENSIVE:
            role.append(FUSIBLE)
        elif c in (LIBRARY, TORCH_CALL):
            role.append(LIBRARY_ROLE)
        else:
            raise ValueError(f"cannot plan op '{op.name}' of class {c}{op.where()}")
    preds: list[list[int]] = [[] for _ in ops]
    succs: list[list[int]] = [[] for _ in ops]
    for i, op in enumerate(ops):
        seen = set()
        for v in op.operands:
            j = index.get(id(v.owner)) if isinstance(v, OpResult) else None
            if j is not None and j not in seen:
                seen.add(j)
                preds[i].append(j)
                succs[j].append(i)
    returned = set()
    for v in block.terminator.operands:
        if isinstance(v, OpResult) and id(v.owner) in index:
            returned.add(index[id(v.owner)])
    g = PlanGraph(block, ops, role, preds, succs, returned, index=index)
    _mark_glue(g)
    _reachability(g)
    _siblings(g)
    return g


# A value read by more fusible ops than this does not make them siblings (a weight read by
# every layer would otherwise tie the whole graph together).
MAX_SIBLINGS = 8


def _siblings(g: PlanGraph) -> None:
    readers: dict[int, list[int]] = {}
    for i, op in enumerate(g.ops):
        if g.role[i] != FUSIBLE:
            continue
        for v in op.operands:
            if not is_free_constant(v):
                lst = readers.setdefault(id(v), [])
                if i not in lst:
                    lst.append(i)
    sib: list[set[int]] = [set() for _ in range(g.n)]
    for nodes in readers.values():
        if 1 < len(nodes) <= MAX_SIBLINGS:
            for i in nodes:
                sib[i].update(j for j in nodes if j != i)
    g.siblings = [sorted(s) for s in sib]


def _mark_glue(g: PlanGraph) -> None:
    """Reshape / permute chains from library results (or weights) into library ops: the
    greatest set of layout nodes whose users are library ops or glue and whose source is a
    function argument, a constant, a library result or glue.

    A chain with a permute that a convolution reads is not glue (``copies_strided``): a matmul
    takes a transposed operand as a flag, but oneDNN copies a strided convolution input with
    torch's generic copy
    (after torch's own copy for a reshape of a permute): two passes where a copy kernel is one
    (charformer's window-reverse permutes into channels-last convolutions)."""
    free = _free_views(g)
    # A returned reshape / permute of a function argument (a training forward saving ``w.t()``
    # for its backward) is a view of the argument, as eager returns it: fused, it made a kernel
    # write a transposed copy of the weight every step (bert's tied 1000x256 embedding: 1 MB
    # written inside its gather + layer-norm kernel, ~0.4 ms of a 0.6 ms kernel).
    of_argument = {i for i in g.returned if isinstance(g.ops[i].operand(0), BlockArgument)}
    glue = {i for i in range(g.n) if g.role[i] == FUSIBLE
            and (i in of_argument or (i not in g.returned and g.succs[i]))
            and isinstance(g.ops[i], st.ReshapeOp | st.PermuteOp)}
    moved: dict[int, bool] = {}  # ops are in program order: a source's entry comes first
    # Strides of each glue value (None: not known, a symbolic shape). A reshape of a permuted
    # value that no strides express (a transposed head split into a bmm) is a copy whatever
    # runs it: a kernel writes it once, where torch's generic copy was slow (bert's attention:
    # 35 us per head split).
    strides: dict[int, tuple[int, ...] | None] = {}
    copies = set()
    for i in sorted(glue):
        op = g.ops[i]
        j = g.node_of(op.operand(0))
        moved[i] = isinstance(op, st.PermuteOp) or moved.get(j, False)
        t = op.operand(0).type
        src = strides[j] if j in strides else contiguous_strides(t.shape) if t.is_static else None
        strides[i] = None if src is None or not op.result.type.is_static else \
            view_op_strides(op, src)
        if src is not None and strides[i] is None:
            copies.add(i)
    glue -= copies
    changed = True
    while changed:
        changed = False
        for i in sorted(glue):
            src = g.ops[i].operand(0)
            j = g.node_of(src)
            source_ok = isinstance(src, BlockArgument) or is_constant(src) or (
                j is not None and (g.role[j] == LIBRARY_ROLE or j in glue))
            users_ok = all((g.role[k] == LIBRARY_ROLE and not (
                moved[i] and copies_strided(g.ops[k]))) or k in glue or k in free
                for k in g.succs[i])
            if not (source_ok and users_ok):
                glue.discard(i)
                changed = True
    for i in glue | free:
        g.role[i] = GLUE
    # A transpose that only matmuls read is a BLAS flag whatever computes its operand: a kernel
    # writes the value once and the matmul reads it transposed, where fusing the permute wrote
    # a transposed copy as well (bert's backward: every weight gradient's mm(grad.t(), x) made
    # its producer write grad twice).
    for i in range(g.n):
        op = g.ops[i]
        if g.role[i] == FUSIBLE and i not in g.returned and g.succs[i] and \
                isinstance(op, st.PermuteOp) and blas_transpose(op) and \
                all(isinstance(g.ops[k], MATMULS) for k in g.succs[i]):
            g.role[i] = GLUE


def _free_views(g: PlanGraph) -> set[int]:
    """Permutes (rank 3 and more) that only the return reads, where the caller takes any memory
    order (a training forward's saved activations, ``layout_free_results``): views. A
    channels-last value returned in the logical order, an attention's q, k and v as views of
    their projections: the kernel (or library call) writes the value once, not a transposed
    copy as well (the backward takes it as it is: ``passes.layout.permute_arguments``)."""
    func = g.block.parent_op
    free = set(func.attr("layout_free_results", ())) if isinstance(func, FuncOp) else set()
    if not free:
        return set()
    positions: dict[int, set[int]] = {}
    for k, v in enumerate(g.terminator.operands):
        positions.setdefault(id(v), set()).add(k)
    return {i for i in g.returned if g.role[i] == FUSIBLE and isinstance(g.ops[i], st.PermuteOp)
            and g.ops[i].result.type.rank >= 3 and not g.succs[i]
            and positions[id(g.ops[i].result)] <= free}


def copies_strided(op) -> bool:
    """Library ops that copy a strided operand with torch's generic copy: convolutions, and a
    channels-last ``convolution_backward`` (``operand_perms``), whose NHWC operands must be
    contiguous -- a kernel writing them so costs one pass, a view then a copy two (rcrn's
    backward recomputes a pad of each saved activation before its convolution_backward)."""
    return isinstance(op, st.ConvolutionOp) or (
        isinstance(op, st.TorchCallOp) and bool(op.attr("operand_perms")))


MATMULS = (st.MatmulOp, st.AddmmOp, st.BatchMatmulOp)


def blas_transpose(op: st.PermuteOp) -> bool:
    """A permute a matmul takes as a transpose flag: of a matrix, or of each matrix of a batch
    (the batch dim stays first)."""
    perm = tuple(op.attributes["perm"])
    return len(perm) == 2 or (len(perm) == 3 and perm[0] == 0)


def _reachability(g: PlanGraph) -> None:
    # ops are in program (topological) order: one backward and one forward sweep.
    desc = [0] * g.n
    for i in reversed(range(g.n)):
        d = 0
        for j in g.succs[i]:
            d |= (1 << j) | desc[j]
        desc[i] = d
    anc = [0] * g.n
    for i in range(g.n):
        a = 0
        for j in g.preds[i]:
            a |= (1 << j) | anc[j]
        anc[i] = a
    g.desc_bits, g.anc_bits = desc, anc
