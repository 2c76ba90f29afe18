"""Render a scheduled ``fusion.group`` as a module of Triton kernels (``sm_80`` / ``sm_90``).

``stitch-schedule`` (``passes.gpu_kernels``) has cut the group into kernels at its grid
barriers and scheduled each; this module renders each kernel by its kind, following that
schedule (it never re-decides a mapping):

- element-wise (loops, gathers; several outputs): one flat tile of ``threads x vector`` elements
  per program, each output masked by its own size;
- reduction (row or column, with stitched prologue and epilogue): ``codegen.triton.reduce``;
- scatter (index_add / scatter_add / scatter_reduce): the destination is first a copy of the
  input (one kernel), then every source element is added with an atomic (a second kernel); or,
  where a deterministic result is asked for, index_add along dim 0 runs one program per
  destination row that adds its edges in edge order, after the runtime has sorted the index
  (a ``Prep`` step: the same bits as a serial loop, whatever the launch).

The result (``TritonSource``) is data: the module's source text, and per launch the kernel,
grid, ``num_warps``, tile constants and buffers; the runtime builds and launches it.
Buffers: ``in<k>`` the group's operands, ``out<k>`` its results, ``scr<k>`` scratch (values
another kernel of the group reads, split partials, prep outputs), ``err`` an int32 error flag
raised when a gathered or scattered index is out of range.
"""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import jinja2

from codegen.triton.emit import SIG, Emitter, Unsupported, delinearize, dims, linearize, literal, tl_type
from codegen.triton.reduce import ReduceKernel, pow2
from stitch_ir.core import BlockArgument, Value
from stitch_ir.dialects import fusion, st
from stitch_ir.types import DType

TEMPLATES = jinja2.Environment(
    loader=jinja2.FileSystemLoader(Path(__file__).parent / "templates"),
    undefined=jinja2.StrictUndefined, keep_trailing_newline=True, trim_blocks=True,
    lstrip_blocks=True)
SCATTERS = (st.IndexAddOp, st.ScatterAddOp, st.ScatterReduceOp)
HELPERS = ("_max_nan", "_min_nan", "_mul", "_argmax_combine", "_argmin_combine", "_rand")


@dataclass
class Launch:
    kernel: str  # the @triton.jit function's name in the module
    grid: int
    num_warps: int
    args: list[str]  # buffer names, in the kernel's parameter order (each ``<name>_ptr``)
    constexprs: dict[str, int]
    what: str  # one line: what it computes and how it is mapped


@dataclass
class Prep:
    """A torch step before the launches: ``sort_rows`` sorts an index stably and lists each
    destination row's segment (``perm``: edges in row order, ``seg``: R + 1 offsets)."""

    kind: str
    index: str  # the buffer holding the index
    rows: int
    perm: str
    seg: str


@dataclass
class TritonSource:
    symbol: str
    source: str  # the Python module: every @triton.jit kernel of the group
    launches: list[Launch]
    n_inputs: int
    n_outputs: int
    scratch: list[tuple[int, DType]] = field(default_factory=list)  # (elements, dtype) each
    signatures: dict[str, dict[str, str]] = field(default_factory=dict)  # kernel -> arg types
    preps: list[Prep] = field(default_factory=list)
    uses_err: bool = False
    kind: str = ""

    @property
    def scratch_bytes(self) -> list[int]:
        return [max(1, n) * dt.itemsize for n, dt in self.scratch]


def _vec(v: Value) -> int:
    return max(1, 16 // v.type.dtype.itemsize)


class GroupRenderer:
    def __init__(self, group: fusion.GroupOp, deterministic: bool, shrink: int):
        self.group = group
        self.deterministic = deterministic
        self.shrink = shrink
        self.body = group.body.ops[:-1]
        self.args = list(group.body.args)
        self.outputs = list(group.body.terminator.operands)
        self.buffers: dict[int, str] = {id(a): f"in{k}" for k, a in enumerate(self.args)}
        self.dtypes: dict[str, DType] = {f"in{k}": a.type.dtype for k, a in enumerate(self.args)}
        self.types: dict[str, str] = {f"in{k}": str(a.type) for k, a in enumerate(self.args)}
        self.targets: dict[int, list[str]] = {}
        for k, v in enumerate(self.outputs):
            self.targets.setdefault(id(v), []).append(f"out{k}")
            self.dtypes[f"out{k}"] = v.type.dtype
            self.types[f"out{k}"] = str(v.type)
        self.scratch: list[tuple[int, DType]] = []
        self.launches: list[Launch] = []
        self.kernels: list[str] = []
        self.signatures: dict[str, dict[str, str]] = {}
        self.preps: list[Prep] = []
        self.uses_err = False

    def new_scratch(self, n: int, dt: DType, what: str) -> str:
        name = f"scr{len(self.scratch)}"
        self.scratch.append((n, dt))
        self.dtypes[name] = dt
        self.types[name] = what
        return name

    # -- the group -----------------------------------------------------------------------------
    def render(self) -> list[str]:
        g = self.group
        if "kernel_values" not in g.attributes:
            raise Unsupported("the group has no GPU schedule (run stitch-schedule for an sm_* "
                              "target)")
        for v in self.args + self.outputs:
            tl_type(v.type.dtype)
            if 0 in dims(v):
                raise Unsupported("a zero-size tensor")
        refs = g.attr("kernel_values")
        parts = [[self.args[-1 - r] if r < 0 else self.body[r].results[0] for r in vals]
                 for vals in refs]
        later_reads = self._later_reads(parts)
        for i, values in enumerate(parts):
            for v in values:  # values a later kernel reads, not yielded: to scratch
                if id(v) in later_reads and id(v) not in self.targets:
                    self.targets[id(v)] = [self.new_scratch(max(1, v.type.numel()), v.type.dtype,
                                                            f"{v.type} for a later kernel")]
            sched = {k: g.attr(f"kernel_{k}")[i] for k in
                     ("mappings", "threads", "blocks", "rows_per_block", "split", "why")}
            sched = {"mapping": sched["mappings"], **sched}
            self._kernel(i, len(parts), values, sched)
            for v in values:  # later kernels load it
                if id(v) in self.targets:
                    self.buffers.setdefault(id(v), self.targets[id(v)][0])
        return self.kernels

    def _later_reads(self, parts: list[list[Value]]) -> set[int]:
        """Materialised values some other kernel reads (through inlined ops)."""
        kernel_of = {id(v): i for i, vals in enumerate(parts) for v in vals}
        out: set[int] = set()
        for i, vals in enumerate(parts):
            stack = [o for v in vals if not isinstance(v, BlockArgument) for o in v.owner.operands]
            seen: set[int] = set()
            while stack:
                u = stack.pop()
                if id(u) in seen:
                    continue
                seen.add(id(u))
                if id(u) in kernel_of and kernel_of[id(u)] != i:
                    out.add(id(u))
                elif id(u) in kernel_of:
                    # a value of this kernel: its own producers are in this kernel too
                    if not isinstance(u, BlockArgument):
                        stack.extend(u.owner.operands)
                elif not isinstance(u, BlockArgument):
                    stack.extend(u.owner.operands)
        return out

    def _kernel(self, i: int, count: int, values: list[Value], sched: dict) -> None:
        ops = [v.owner for v in values if not isinstance(v, BlockArgument)]
        if any(isinstance(op, st.ReduceOp) for op in ops):
            rk = ReduceKernel(self.group, values, sched, dict(self.buffers), self.targets, "err",
                              self.shrink)
            parts = rk.render()
            names = {}
            for p in parts:
                for name, n, acc in p["partials"]:
                    if name not in names:
                        names[name] = self.new_scratch(n, _acc_dtype(acc),
                                                       f"partial results ({acc})")
            for j, p in enumerate(parts):
                lines = p["lines"]
                for old, new in names.items():
                    lines = [re.sub(rf"\b{old}_ptr\b", f"{new}_ptr", ln) for ln in lines]
                self._emit(f"k{i}_{j}_{sched['mapping']}" if len(parts) > 1 else
                           f"k{i}_{sched['mapping']}", lines, p["grid"], p["num_warps"],
                           p["constexprs"], p["what"], sched, values, i, count)
            return
        scatters = [op for op in ops if isinstance(op, SCATTERS)]
        if scatters:
            self._scatter(i, count, scatters[0], values, sched)
            return
        self._elementwise(i, count, values, sched)

    def _emit(self, name: str, lines: list[str], grid: int, num_warps: int, constexprs: dict,
              what: str, sched: dict, values: list[Value], i: int, count: int) -> None:
        text = "\n".join(lines)
        used = [b for b in self._buffer_order() if re.search(rf"\b{b}_ptr\b", text)]
        if re.search(r"\berr_ptr\b", text):
            used.append("err")
            self.uses_err = True
        args = [f"{b}_ptr" for b in used] + [f"{c}: tl.constexpr" for c in constexprs]
        ops = sorted({op.name for v in values for op in _cone(v)})
        shown = ", ".join(f"{k}={v}" for k, v in constexprs.items())
        src = TEMPLATES.get_template("kernel.py.jinja").render(
            index=len(self.launches), count=count, what=what, ops=ops,
            schedule=f"{sched['mapping']}, {sched['threads']} threads, {sched['blocks']} blocks"
                     f", {sched['rows_per_block']} rows per block, split {sched['split']}: "
                     f"{sched['why']}",
            grid=grid, num_warps=num_warps, constexprs=shown, name=name, args=args, lines=lines)
        self.kernels.append(src)
        self.launches.append(Launch(name, grid, num_warps, used, dict(constexprs), what))
        self.signatures[name] = {f"{b}_ptr": "*" + SIG[self.dtypes[b]] if b != "err" else "*i32"
                                 for b in used}
        self.signatures[name].update({c: "constexpr" for c in constexprs})

    def _buffer_order(self) -> list[str]:
        return ([f"in{k}" for k in range(len(self.args))] +
                [f"out{k}" for k in range(len(self.outputs))] +
                [f"scr{k}" for k in range(len(self.scratch))])

    # -- element-wise --------------------------------------------------------------------------
    def _flat(self, em: Emitter, sizes: list[int], sched: dict, int64: bool) -> None:
        """pid / offs and one named mask per distinct size."""
        em.line("pid = tl.program_id(0)" + (".to(tl.int64)" if int64 else ""))
        em.tile("offs", "pid * BLOCK + tl.arange(0, BLOCK)", frozenset())
        for j, n in enumerate(sizes):
            em.tile(f"e{j}", "offs", frozenset({f"e{j}"}))
            em.masks[frozenset({f"e{j}"})] = f"mask{j}" if len(sizes) > 1 else "mask"
            em.line(f"{em.masks[frozenset({f'e{j}'})]} = offs < {n}")

    def _elementwise(self, i: int, count: int, values: list[Value], sched: dict) -> None:
        stores = [v for v in values if id(v) in self.targets]
        sizes = sorted({max(1, v.type.numel()) for v in stores}, reverse=True)
        threads = int(sched["threads"])
        block = pow2(threads * max(_vec(v) for v in stores))
        em = Emitter(dict(self.buffers), {}, "err")
        lines: list[str] = []
        em.push(lines, "    ")
        self._flat(em, sizes, sched, sizes[0] >= 2 ** 31)
        for v in stores:
            j = sizes.index(max(1, v.type.numel()))
            idx = self._split_flat(em, f"e{j}", dims(v))
            expr = em.value(v, idx)
            for ptr in self.targets[id(v)]:
                em.store(f"{ptr}_ptr", v, idx, expr, "[BLOCK]", f"e{j}")
        em.pop()
        grid = -(-sizes[0] // block)
        what = f"element-wise: {len(stores)} output(s) of {' / '.join(map(str, sizes))} " \
               f"elements, BLOCK={block} per program"
        self._emit(f"k{i}_elementwise", lines, grid, max(1, threads // 32), {"BLOCK": block},
                   what, sched, values, i, count)

    def _split_flat(self, em: Emitter, flat: str, shape: list[int]) -> list[str]:
        """A flat tile as an index of ``shape`` (named tiles, one per non-1 dim)."""
        if len([n for n in shape if n != 1]) <= 1:
            return [flat if n != 1 else "0" for n in shape]
        em.counter += 1
        tag = em.counter
        return [p if p == "0" else em.tile(f"{flat}_{tag}_{k}", p)
                for k, p in enumerate(delinearize(flat, shape))]

    # -- scatter -------------------------------------------------------------------------------
    def _scatter(self, i: int, count: int, op, values: list[Value], sched: dict) -> None:
        out = op.result
        targets = self.targets.get(id(out))
        if targets is None or len(targets) != 1:
            raise Unsupported("a scatter whose result is stored to more than one buffer")
        x, idx, src = op.operands
        if isinstance(op, st.ScatterReduceOp) and op.attributes["reduce"] in ("mean", "prod"):
            raise Unsupported(f"scatter_reduce '{op.attributes['reduce']}' (no atomic form)")
        if out.type.dtype not in (DType.f32, DType.f64, DType.i32, DType.i64, DType.f16):
            raise Unsupported(f"an atomic scatter into {out.type.dtype}")
        if self.deterministic and isinstance(op, st.IndexAddOp) and op.attributes["dim"] == 0:
            return self._index_add_owned(i, count, op, targets[0], values, sched)
        if self.deterministic:
            raise Unsupported(f"a deterministic '{op.name}' (only index_add along dim 0 has the "
                              "owned-destination form)")
        threads = int(sched["threads"])
        # 1. the destination starts as a copy of the input
        self._copy_kernel(i, count, out, x, targets[0], threads, values, sched)
        # 2. include_self=False: positions that receive an element start from the identity
        if isinstance(op, st.ScatterReduceOp) and not op.attributes["include_self"]:
            self._scatter_pass(i, count, op, targets[0], threads, values, sched, reset=True)
        # 3. every source element is accumulated with an atomic
        self._scatter_pass(i, count, op, targets[0], threads, values, sched, reset=False)

    def _copy_kernel(self, i, count, out: Value, x: Value, target: str, threads: int,
                     values, sched) -> None:
        n = max(1, out.type.numel())
        block = pow2(threads * _vec(out))
        em = Emitter(dict(self.buffers), {}, "err")
        lines: list[str] = []
        em.push(lines, "    ")
        self._flat(em, [n], sched, n >= 2 ** 31)
        idx = self._split_flat(em, "e0", dims(out))
        em.store(f"{target}_ptr", out, idx, em.value(x, idx), "[BLOCK]", "e0")
        em.pop()
        self._emit(f"k{i}_scatter_init", lines, -(-n // block), max(1, threads // 32),
                   {"BLOCK": block}, f"scatter, step 1: the destination ({n} elements) starts "
                   "as a copy of the input", sched, values, i, count)

    def _scatter_pass(self, i, count, op, target: str, threads: int, values, sched,
                      reset: bool) -> None:
        x, idx, src = op.operands
        out = op.result
        space = dims(src) if isinstance(op, st.IndexAddOp) else dims(idx)
        n = max(1, math.prod(space))
        block = pow2(threads * 4)
        em = Emitter(dict(self.buffers), {}, "err")
        lines: list[str] = []
        em.push(lines, "    ")
        self._flat(em, [n], sched, n >= 2 ** 31)
        pos = self._split_flat(em, "e0", space)
        d = op.attributes["dim"]
        at = [pos[d]] if isinstance(op, st.IndexAddOp) else pos
        dst = list(pos)
        dst[d] = em.checked_index(em.value(idx, at), dims(x)[d], op.attr("wrap", True))
        offset = linearize(dst, dims(out))
        if "e0" not in em.deps_of(offset):  # one destination for every lane (size-1 dims)
            offset = f"{offset} + 0 * e0"
        cell = f"{target}_ptr + {offset}"
        ct = tl_type(out.type.dtype)
        if reset:
            red = op.attributes["reduce"]
            ident = {"sum": "0", "amax": "-INF" if out.type.dtype.is_float else
                     str(-(2 ** 63) if out.type.dtype is DType.i64 else -(2 ** 31)),
                     "amin": "INF" if out.type.dtype.is_float else
                     str(2 ** 63 - 1 if out.type.dtype is DType.i64 else 2 ** 31 - 1)}[red]
            em.line(f"tl.store({cell}, tl.full([BLOCK], {ident}, {ct}), mask=mask)")
            what = "scatter, step 2: positions that receive an element start from the identity"
        else:
            val = em.value(src, pos)
            alpha = op.attr("alpha", 1) if isinstance(op, st.IndexAddOp) else 1
            if alpha != 1:
                val = em.temp(f"{val} * {literal(alpha, out.type.dtype)}")
            fn = "tl.atomic_add"
            if isinstance(op, st.ScatterReduceOp) and op.attributes["reduce"] in ("amax", "amin"):
                fn = "tl.atomic_max" if op.attributes["reduce"] == "amax" else "tl.atomic_min"
            # widened to the tile (a constant or a scalar adds the same to every lane)
            em.line(f"{fn}({cell}, ({val} + tl.full([BLOCK], 0, {ct})).to({ct}), mask=mask)")
            what = f"scatter, {'step 3' if reset else 'step 2'}: {n} source elements " \
                   f"accumulated with {fn}"
        em.pop()
        self._emit(f"k{i}_scatter_{'reset' if reset else 'atomic'}", lines, -(-n // block),
                   max(1, threads // 32), {"BLOCK": block}, what, sched, values, i, count)

    def _index_add_owned(self, i, count, op, target: str, values, sched) -> None:
        """Deterministic index_add along dim 0: program d owns destination row d and adds its
        edges (listed by the runtime's stable sort) in edge order."""
        x, idx, src = op.operands
        if not isinstance(idx, BlockArgument):
            raise Unsupported("a deterministic index_add whose index is computed in the group")
        rows, inner = dims(x)[0], dims(x)[1:]
        width = max(1, math.prod(inner))
        n_edges = dims(idx)[0]
        perm = self.new_scratch(n_edges, DType.i64, "edges sorted by destination")
        seg = self.new_scratch(rows + 1, DType.i64, "each destination's first sorted edge")
        self.preps.append(Prep("sort_rows", self.buffers[id(idx)], rows, perm, seg))
        threads = int(sched["threads"])
        block = min(pow2(width), pow2(max(32, threads)) * 4)
        em = Emitter(dict(self.buffers), {frozenset({"c"}): "c_mask"}, "err")
        lines: list[str] = []
        em.push(lines, "    ")
        em.line("d = tl.program_id(0)  # this program's destination row")
        em.line(f"start = tl.load({seg}_ptr + d)")
        em.line(f"end = tl.load({seg}_ptr + d + 1)")
        em.mark()
        em.line(f"for c0 in range(0, {width}, BLOCK):")
        cols: list[str] = []
        em.push(cols, "        ", tiles={"c"})
        em.tile("c", "c0 + tl.arange(0, BLOCK)", frozenset({"c"}))
        em.line(f"c_mask = c < {width}")
        cparts = self._split_flat(em, "c", inner) if inner else []
        em.line(f"acc = tl.full([BLOCK], 0, {_acc(op.result)}) + {em.value(x, ['d'] + cparts)}")
        em.mark()
        em.line("for j in range(start, end):  # in edge order: the same sums as a serial loop")
        body: list[str] = []
        em.push(body, "            ", tiles={"j"})
        em.deps["j"] = frozenset({"j"})
        em.tile("e", f"tl.load({perm}_ptr + j)", None)
        val = em.value(src, ["e"] + cparts)
        alpha = op.attr("alpha", 1)
        if alpha != 1:
            val = em.temp(f"{val} * {literal(alpha, op.result.type.dtype)}")
        em.line(f"acc += {val}")
        em.pop()
        em.scopes[-1].lines.extend(body)
        em.store(f"{target}_ptr", op.result, ["d"] + cparts, "acc", "[BLOCK]", "c")
        em.pop()
        em.scopes[-1].lines.extend(cols)
        em.pop()
        what = f"index_add, deterministic: one program per destination row ({rows}), its " \
               f"edges in edge order, {width} features in tiles of BLOCK={block}"
        self._emit(f"k{i}_index_add_owned", lines, rows, max(1, min(threads, block) // 32),
                   {"BLOCK": block}, what, sched, values, i, count)


def _acc(v: Value) -> str:
    return "tl.float32" if v.type.dtype in (DType.f16, DType.bf16) else tl_type(v.type.dtype)


def _acc_dtype(acc: str) -> DType:
    return {"tl.float32": DType.f32, "tl.float64": DType.f64, "tl.int64": DType.i64,
            "tl.int32": DType.i32, "tl.int16": DType.i16, "tl.int8": DType.i8,
            "tl.uint8": DType.u8, "tl.int1": DType.i1}[acc]


def _cone(v: Value) -> list:
    """The ops ``v`` is computed from inside the group (for a kernel's comment)."""
    out, seen, stack = [], set(), [v]
    while stack:
        u = stack.pop()
        if isinstance(u, BlockArgument) or id(u.owner) in seen:
            continue
        seen.add(id(u.owner))
        out.append(u.owner)
        stack.extend(u.owner.operands)
    return out


def render_group(group: fusion.GroupOp, name: str = "", deterministic: bool = False,
                 shrink: int = 1) -> TritonSource:
    """The Triton module of ``group`` (scheduled for an sm_* target). ``deterministic``: scatters
    in the owned-destination form; ``shrink``: tiles hold 1/shrink of the registers the schedule
    allows (a kernel that spilled is rendered again with a larger shrink)."""
    r = GroupRenderer(group, deterministic, shrink)
    kernels = r.render()
    helpers_used = [h for h in HELPERS if any(re.search(rf"\b{h}\b", k) for k in kernels)]
    helpers = TEMPLATES.get_template("helpers.py.jinja").render(used=helpers_used).strip()
    source = TEMPLATES.get_template("module.py.jinja").render(
        kind=group.kind, ops=[op.name for op in group.body.ops[:-1]],
        inputs=[(f"in{k}", r.types[f"in{k}"]) for k in range(len(r.args))],
        outputs=[(f"out{k}", r.types[f"out{k}"]) for k in range(len(r.outputs))],
        scratch=[(f"scr{k}", r.types[f"scr{k}"]) for k in range(len(r.scratch))],
        helpers=[helpers] if helpers else [], kernels=[k.rstrip("\n") for k in kernels])
    digest = hashlib.sha256(source.encode()).hexdigest()[:12]
    symbol = f"stitch_{name or group.kind}_{digest}"
    return TritonSource(symbol, source, r.launches, len(r.args), len(r.outputs), r.scratch,
                        r.signatures, r.preps, r.uses_err, group.kind)
