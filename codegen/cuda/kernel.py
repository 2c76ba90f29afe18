"""Render a scheduled ``fusion.group`` as CUDA C kernels (``sm_80`` / ``sm_90``).

``stitch-schedule`` has cut the group into parts at its grid barriers (``passes.gpu_kernels``)
and chosen the group's generator and stitching (``passes.gpu_codegen``); this module follows
both. Each part becomes one or more *phases* (``codegen.cuda.phase``):

- element-wise (loops, gathers; several outputs): ``VEC`` consecutive elements per thread and
  step, 16-byte vector loads / stores of buffers read or written at the output's own index;
- reduction (row or column, stitched prologue and epilogue): ``codegen.cuda.reduce`` -- one
  phase, or with a split reduced dim one phase per level plus a combining one;
- scatter (index_add / scatter_add / scatter_reduce ``sum``): a phase copying the input to the
  destination, then one adding every source element with an atomic.

``cuda_stitch = global`` (the cost model found every phase's blocks fit one wave): all phases
in one kernel, launched cooperatively, a ``grid.sync()`` wherever a phase reads what an earlier
one wrote since the last barrier -- AStitch's global stitching. Otherwise (``split``) every
phase is its own kernel and the kernel boundary is the barrier.

The result (``CudaSource``) is data: the ``.cu`` text (kernels, then the cpu emulation's entry
points under ``ST_EMULATE``) and per launch its kernel, grid, block, shared memory, whether it
is cooperative, and its buffers: ``in<k>`` the group's operands, ``out<k>`` its results,
``scr<k>`` scratch (values a later phase reads, split partials), ``err`` an int flag raised when
a gathered or scattered index is out of range.
"""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import jinja2

from codegen.cuda.emit import HALF, CudaEmitter, Unsupported, ctype, dims, linearize, storage_ctype
from codegen.cuda.phase import CTYPE_SIZE, Phase, buffer_uses
from codegen.cuda.reduce import ReducePart
from stitch_ir.core import BlockArgument, Value
from stitch_ir.dialects import fusion, st
from stitch_ir.types import DType

TEMPLATES = jinja2.Environment(
    loader=jinja2.FileSystemLoader(Path(__file__).parent / "templates"),
    undefined=jinja2.StrictUndefined, keep_trailing_newline=True, trim_blocks=True,
    lstrip_blocks=True)
HEADER_DIR = Path(__file__).parent
SCATTERS = (st.IndexAddOp, st.ScatterAddOp, st.ScatterReduceOp)


@dataclass
class CudaLaunch:
    kernel: str
    grid: int
    block: int
    smem: int  # dynamic shared memory, bytes
    cooperative: bool  # launched with cudaLaunchCooperativeKernel (it has a grid.sync())
    args: list[str]  # buffer names, in the kernel's parameter order
    what: str
    phases: int
    grid_syncs: int
    syncthreads: int


@dataclass
class CudaSource:
    symbol: str
    source: str  # the .cu text: kernels, then the emulation entry points (#if ST_EMULATE)
    launches: list[CudaLaunch]
    n_inputs: int
    n_outputs: int
    scratch: list[tuple[int, DType]] = field(default_factory=list)
    uses_err: bool = False
    kind: str = ""
    stitch: str = "single"  # single | global (one cooperative kernel) | packed | split
    stitch_why: str = ""
    vector: set[str] = field(default_factory=set)  # buffers read / written 16 bytes at a time

    @property
    def scratch_bytes(self) -> list[int]:
        return [max(1, n) * dt.itemsize for n, dt in self.scratch]


def _vec(shapes_dtypes: list[DType]) -> int:
    return max(1, 16 // max([d.itemsize for d in shapes_dtypes] or [4]))


class CudaGroupRenderer:
    def __init__(self, group: fusion.GroupOp, reg_elems: int = 32):
        self.group = group
        self.reg_elems = reg_elems
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
            self.types[f"out{k}"] = f"{v.type} (result)"
        self.scratch: list[tuple[int, DType]] = []

    @property
    def half(self) -> dict[str, DType]:
        return {n: dt for n, dt in self.dtypes.items() if dt in HALF}

    def new_scratch(self, n: int, dt: DType, what: str) -> str:
        name = f"scr{len(self.scratch)}"
        self.scratch.append((n, dt))
        self.dtypes[name] = dt
        self.types[name] = f"{what} (scratch)"
        return name

    def phases(self) -> list[Phase]:
        g = self.group
        if "kernel_values" not in g.attributes:
            raise Unsupported("the group has no GPU schedule (run stitch-schedule for an sm_* "
                              "target)")
        for v in self.args + self.outputs:
            ctype(v.type.dtype)
            if 0 in dims(v):
                raise Unsupported("a zero-size tensor")
        parts = [[self.args[-1 - r] if r < 0 else self.body[r].results[0] for r in vals]
                 for vals in g.attr("kernel_values")]
        later = _later_reads(parts)
        out: list[Phase] = []
        for i, values in enumerate(parts):
            for v in values:  # values another part reads, not yielded: to scratch
                if id(v) in later and id(v) not in self.targets:
                    self.targets[id(v)] = [self.new_scratch(max(1, v.type.numel()), v.type.dtype,
                                                            f"{v.type} for a later phase")]
            sched = {k: g.attr(f"kernel_{k}")[i] for k in
                     ("mappings", "threads", "blocks", "rows_per_block", "split")}
            sched["mapping"] = sched["mappings"]
            ops = [v.owner for v in values if not isinstance(v, BlockArgument)]
            if any(isinstance(op, st.ReduceOp) for op in ops):
                part = ReducePart(g, values, sched, dict(self.buffers), self.targets, self.half,
                                  self.new_scratch, _Names(self), self.reg_elems)
                out += part.phases()
            elif any(isinstance(op, SCATTERS) for op in ops):
                out += self._scatter([op for op in ops if isinstance(op, SCATTERS)][0], sched)
            else:
                out.append(self._elementwise(values, sched))
            for v in values:
                if id(v) in self.targets:
                    self.buffers.setdefault(id(v), self.targets[id(v)][0])
        return out

    # -- element-wise --------------------------------------------------------------------------
    def _flat_phase(self, n: int, threads: int, vec: int, what: str, mapping: str, fill) -> Phase:
        """A phase over ``n`` flat elements, ``vec`` per thread and step; ``fill(em, e_parts)``
        writes the per-element body (inside the bounds check)."""
        em = CudaEmitter(dict(self.buffers), self.half)
        it = self.index_t = "int64_t" if n * 2 >= 2 ** 31 else "int"
        units = max(1, -(-n // (threads * vec)))
        body: list[str] = []
        em.push(body, "    ")
        em.line("const int tid = threadIdx.x;")
        em.mark()
        em.line(f"for ({it} unit = blockIdx.x; unit < {units}; unit += gridDim.x) {{")
        unit_lines: list[str] = []
        em.push(unit_lines, "      ", loop_vars={"unit", "eb"})
        em.line(f"const {it} eb = (unit * {threads} + tid) * {vec};  // this thread's first element")
        state = {"it_k": 1, "post": [], "vector": set(), "reads": set()}
        em.mark()
        em.line("#pragma unroll")
        em.line(f"for (int j = 0; j < {vec}; ++j) {{")
        j_lines: list[str] = []
        em.push(j_lines, "        ")
        em.line(f"const {it} e = eb + j;")
        em.line(f"if (tid < {threads} && e < {n}) {{")
        g_lines: list[str] = []
        em.push(g_lines, "          ", loop_vars={"j", "e"})
        fill(em, state)
        em.pop()
        j_lines += g_lines + ["        }"]
        em.pop()
        unit_lines += j_lines + ["      }"] + state["post"]
        em.pop()
        body += unit_lines + ["    }"]
        em.pop()
        text = "\n".join(body)
        reads, writes = buffer_uses(text, self._names())
        return Phase(body, threads, units, 0, what, mapping, reads=reads, writes=writes,
                     vector=state["vector"], uses_err="err |= " in text)

    def _names(self) -> list[str]:
        return ([f"in{k}" for k in range(len(self.args))] +
                [f"out{k}" for k in range(len(self.outputs))] +
                [f"scr{k}" for k in range(len(self.scratch))])

    def _eparts(self, em: CudaEmitter, cache: dict, shape: list[int]) -> list[str]:
        key = tuple(shape)
        if key not in cache:
            nz = [n for n in shape if n != 1]
            if len(nz) <= 1:
                cache[key] = ["e" if n != 1 else "0" for n in shape]
            else:
                parts, stride = [], math.prod(nz)
                it = iter(range(len(nz)))
                for n in shape:
                    if n == 1:
                        parts.append("0")
                        continue
                    k = next(it)
                    stride //= n
                    expr = f"e / {stride}" if k == 0 else \
                        (f"e / {stride} % {n}" if stride > 1 else f"e % {n}")
                    parts.append(em.temp(self.index_t, expr, "ip"))
                cache[key] = parts
        return cache[key]

    def _elementwise(self, values: list[Value], sched: dict) -> Phase:
        stores = [v for v in values if id(v) in self.targets]
        n = max(max(1, v.type.numel()) for v in stores)
        full = [v for v in stores if max(1, v.type.numel()) == n]
        vec_dts = [v.type.dtype for v in full] + [a.type.dtype for a in self._flat_reads(full, n)]
        vec = _vec(vec_dts)
        if n % vec:
            vec = 1
        threads = int(sched["threads"])

        def fill(em: CudaEmitter, state: dict) -> None:
            cache: dict = {}
            # buffers read at the output's own flat index: one vector load per step
            for a in self._flat_reads(full, n) if vec > 1 else []:
                name = self.buffers[id(a)]
                want = self._eparts(em, cache, dims(a))
                st_t = storage_ctype(a.type.dtype)

                def hook(idx, a=a, name=name, want=want, st_t=st_t):
                    if list(idx) != want:
                        return None
                    if name not in state["vector"]:
                        state["vector"].add(name)
                        state["reads"].add(name)
                        em._put(1, f"__align__(16) {st_t} v_{name}[{vec}];")
                        em._put(1, f"if (eb < {n}) st_loadv<{vec * CTYPE_SIZE[st_t]}>(v_{name}, "
                                   f"{name} + eb);")
                    return em.temp(ctype(a.type.dtype), em.load_expr(name, f"v_{name}[j]",
                                                                     a.type.dtype), "x")

                em.known[id(a)] = hook
            for v in stores:
                size = max(1, v.type.numel())
                guard = size < n
                if guard:
                    em.line(f"if (e < {size}) {{")
                idx = self._eparts(em, cache, dims(v))
                expr = em.value(v, idx)
                for p in self.targets[id(v)]:
                    if vec > 1 and size == n:
                        st_t = storage_ctype(v.type.dtype)
                        if p in em.stored:
                            em.stored[f"s_{p}"] = em.stored[p]
                        if p not in state["vector"]:
                            state["vector"].add(p)
                            em._put(1, f"__align__(16) {st_t} s_{p}[{vec}];")
                            state["post"].append(
                                f"      if (tid < {threads} && eb < {n}) "
                                f"st_storev<{vec * CTYPE_SIZE[st_t]}>({p} + eb, s_{p});")
                        em.line(em.store(f"s_{p}", "j", v.type.dtype, expr))
                    else:
                        em.line(em.store(p, linearize(idx, dims(v)), v.type.dtype, expr))
                if guard:
                    em.line("}")

        what = (f"element-wise: {len(stores)} output(s) of {n} elements, {vec} per thread and "
                f"step" + (", 16-byte vector loads / stores" if vec > 1 else ""))
        ph = self._flat_phase(n, threads, vec, what, "elementwise", fill)
        return ph

    def _flat_reads(self, full: list[Value], n: int) -> list[Value]:
        """Buffers with ``n`` elements read (through inlined ops) by the outputs ``full``."""
        found, seen = [], set()
        stack = list(full)
        while stack:
            v = stack.pop()
            if id(v) in seen:
                continue
            seen.add(id(v))
            if id(v) in self.buffers:
                if max(1, v.type.numel()) == n and v not in found:
                    found.append(v)
            elif not isinstance(v, BlockArgument):
                stack.extend(v.owner.operands)
        return found

    # -- scatter -------------------------------------------------------------------------------
    def _scatter(self, op, sched: dict) -> list[Phase]:
        out = op.result
        targets = self.targets.get(id(out))
        if targets is None or len(targets) != 1:
            raise Unsupported("a scatter whose result is stored to more than one buffer")
        if isinstance(op, st.ScatterReduceOp) and (op.attributes["reduce"] != "sum" or
                                                   not op.attributes["include_self"]):
            raise Unsupported(f"scatter_reduce '{op.attributes['reduce']}' (include_self="
                              f"{op.attributes['include_self']}) in CUDA C: only sum with "
                              "include_self has an atomic form here")
        if out.type.dtype not in (DType.f32, DType.f64, DType.i32, DType.i64):
            raise Unsupported(f"an atomic scatter into {out.type.dtype} in CUDA C")
        x, idx, src = op.operands
        target = targets[0]
        threads = int(sched["threads"])
        n_out = max(1, out.type.numel())

        def copy(em: CudaEmitter, state: dict) -> None:
            ix = self._eparts(em, {}, dims(out))
            em.line(em.store(target, linearize(ix, dims(out)), out.type.dtype, em.value(x, ix)))

        first = self._flat_phase(n_out, threads, 1, f"scatter, step 1: the destination "
                                 f"({n_out} elements) starts as a copy of the input", "scatter",
                                 copy)
        space = dims(src) if isinstance(op, st.IndexAddOp) else dims(idx)
        n = max(1, math.prod(space))

        def add(em: CudaEmitter, state: dict) -> None:
            pos = self._eparts(em, {}, space)
            d = op.attributes["dim"]
            at = [pos[d]] if isinstance(op, st.IndexAddOp) else pos
            dst = list(pos)
            dst[d] = em.checked_index(em.value(idx, at), dims(x)[d])
            val = em.value(src, pos)
            alpha = op.attr("alpha", 1) if isinstance(op, st.IndexAddOp) else 1
            ct = ctype(out.type.dtype)
            if alpha != 1:
                val = em.temp(ct, f"{val} * ({ct})({alpha})")
            em.line(f"st_atomic_add(&{target}[{linearize(dst, dims(out))}], ({ct})({val}));")

        second = self._flat_phase(n, threads, 1, f"scatter, step 2: {n} source elements added "
                                  "with atomicAdd", "scatter", add)
        second.reads.add(target)  # orders it after the copy
        return [first, second]


class _Names:
    """The group's buffer names, as they are when iterated (scratch grows while rendering)."""

    def __init__(self, r: CudaGroupRenderer):
        self.r = r

    def __iter__(self):
        return iter(self.r._names())


def _later_reads(parts: list[list[Value]]) -> set[int]:
    """Materialised values some other part reads (through inlined ops)."""
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
            elif not isinstance(u, BlockArgument):
                stack.extend(u.owner.operands)
    return out


def _ops_of(group) -> list[str]:
    return sorted({op.name for op in group.body.ops[:-1]})


def render_group(group: fusion.GroupOp, name: str = "", stitch: str | None = None,
                 grid: int | None = None, reg_elems: int = 32) -> CudaSource:
    """The CUDA C of ``group`` (scheduled for an sm_* target). ``stitch``: ``global`` (one
    cooperative kernel over a grid of ``grid`` blocks, one wave) or ``split`` (a kernel per
    phase); by default the plan's ``cuda_stitch`` / ``cuda_grid``. ``reg_elems``: how many of
    a row's elements a thread may keep in registers (a kernel that spilled is rendered again
    with fewer)."""
    r = CudaGroupRenderer(group, reg_elems)
    phases = r.phases()
    stitch = stitch or group.attr("cuda_stitch", "split")
    why = group.attr("cuda_why", "")
    if len(phases) == 1:
        stitch, why = "single", "one phase, no grid barrier"
    names = r._names()
    kernels, launches, wrappers = [], [], []
    sets = [phases] if stitch == "global" else [[p] for p in phases]
    all_vector: set[str] = set()
    for i, ph in enumerate(sets):
        block = max(p.threads for p in ph)
        smem = max(p.smem for p in ph)
        # a barrier before a phase reading what another phase wrote since the last one
        written: set[str] = set()
        rows = []
        grid_syncs = 0
        for k, p in enumerate(ph):
            need = sorted(p.reads & written)
            entry = {"lines": p.lines, "what": p.what, "sync_before": "", "block_sync_before":
                     k > 0 and p.smem and ph[k - 1].smem}
            if need:
                entry["sync_before"] = (f"every block's {', '.join(need)} is written before "
                                        "any block reads it")
                grid_syncs += 1
                written = set()
            written |= p.writes
            rows.append(entry)
        # phases that read nothing of each other share a kernel without a barrier (packing)
        coop = grid_syncs > 0
        if stitch == "global" and not coop:
            stitch, why = "packed", "independent phases in one kernel, no grid barrier needed"
        g = (grid or max(p.units for p in ph)) if len(ph) > 1 else ph[0].units
        text = "\n".join(ln for p in ph for ln in p.lines)
        used = [b for b in names if re.search(rf"\b{b}\b", text)]
        uses_err = any(p.uses_err for p in ph)
        kname = f"k{i}_{ph[0].mapping}" if len(ph) == 1 else f"k{i}_stitched"
        params, casts = [], []
        for j, b in enumerate(used):
            t = storage_ctype(r.dtypes[b])
            if b.startswith("in"):
                params.append(f"const {t}* __restrict__ {b}")
                casts.append(f"(const {t}*)a[{j}]")
            else:  # written in this kernel, and maybe read back after a grid barrier
                params.append(f"{t}* {'__restrict__ ' if not coop else ''}{b}")
                casts.append(f"({t}*)a[{j}]")
        if uses_err:
            params.append("int* err_flag")
            casts.append(f"(int*)a[{len(used)}]")
        what = " | ".join(p.what for p in ph) if len(ph) > 1 else ph[0].what
        kernels.append(TEMPLATES.get_template("kernel.cu.jinja").render(
            index=i, count=len(sets), what=what, ops=_ops_of(group), grid=g, block=block,
            smem=smem, cooperative=coop, name=kname, params=params, uses_err=uses_err,
            phases=rows).rstrip("\n"))
        launches.append(CudaLaunch(kname, g, block, smem, coop, used + (["err"] if uses_err else []),
                                   what, len(ph), grid_syncs, sum(p.syncthreads for p in ph)))
        wrappers.append({"name": kname, "grid": g, "block": block, "smem": smem,
                         "cooperative": coop, "casts": casts})
        for p in ph:
            all_vector |= p.vector
    buffers = [(b, r.types[b]) for b in names]
    source = TEMPLATES.get_template("module.cu.jinja").render(
        kind=group.kind, stitch=stitch, stitch_why=why, ops=_ops_of(group), buffers=buffers,
        kernels=kernels, wrappers=wrappers)
    digest = hashlib.sha256(source.encode()).hexdigest()[:12]
    symbol = f"stitch_cuda_{name or group.kind}_{digest}"
    return CudaSource(symbol, source, launches, len(r.args), len(r.outputs), r.scratch,
                      any("err" in ln.args for ln in launches), group.kind, stitch, why,
                      all_vector)
