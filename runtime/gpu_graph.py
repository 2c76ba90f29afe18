"""``TritonGraph``: a compiled graph whose fused kernels are Triton kernels (``sm_80`` / ``sm_90``).

The same steps as ``runtime.graph.CompiledGraph`` (library ops through torch, views, constants,
``st.torch_call``), with every ``fusion.group`` rendered by ``codegen.triton`` and launched by
``runtime.triton_build``. Where the kernels run:

- on a CUDA device (``interpret=False``): each group is also compiled offline for the device's
  architecture first, so a kernel that spills registers is rendered again with smaller tiles
  before it ever runs (the reason is kept on the group, ``kernel_notes``);
- under Triton's interpreter (``interpret=True``, no GPU needed): the same kernel source runs on
  numpy over CPU tensors (slow: small shapes only). This is how CI checks the GPU target.

Buffers: intermediates and kernel scratch live in one arena on the device per call state,
planned as the cpu graph plans them (static offsets over lifetimes); outputs are allocated per
call. A group that gathers or scatters raises the call state's int32 error flag when an index is
out of range; a last step checks it (one device sync, only in graphs that have such groups).
"""

from __future__ import annotations

import logging

import torch

from codegen.triton.emit import Unsupported
from codegen.triton.kernel import TritonSource, render_group
from runtime.graph import (
    ALIGN,
    CallState,
    CompiledGraph,
    Step,
    _all_empty,
    _contiguous,
    _from_numpy,
    _to_numpy,
    _typed,
)
from runtime.triton_build import build_group, launch_group, load_module
from stitch_ir.dialects import fusion, st
from stitch_ir.importer import dtype_to_torch
from stitch_ir.interpreter import IMPLS

log = logging.getLogger("stitch.runtime")
GPU_TARGETS = ("sm_80", "sm_90")


class _Scratch:
    """What ``CompiledGraph`` plans a kernel step's scratch from (bytes per buffer)."""

    def __init__(self, src: TritonSource):
        self.scratch = src.scratch_bytes
        self.symbol = src.symbol
        self.source = src.source


def target_of(device: torch.device) -> str:
    """The GPU target for a CUDA device: sm_90 from compute capability 9 on, else sm_80."""
    major, _ = torch.cuda.get_device_capability(device)
    return "sm_90" if major >= 9 else "sm_80"


class TritonGraph(CompiledGraph):
    def __init__(self, prog, target: str = "sm_80", interpret: bool | None = None,
                 deterministic: bool | None = None, device: torch.device | str | None = None):
        if target not in GPU_TARGETS:
            raise ValueError(f"TritonGraph: target {target!r} is not one of {GPU_TARGETS}")
        func = prog.module.func()
        if not all(v.type.is_static for v in list(func.args) +
                   [r for op in func.body.ops for r in op.results]):
            raise Unsupported("symbolic sizes on a GPU target (the Triton and CUDA C generators "
                              "compile static shapes: the graph is specialised per shape)")
        if interpret is None:
            interpret = not torch.cuda.is_available()
        if not interpret and not torch.cuda.is_available():
            raise RuntimeError(f"target {target}: no CUDA device here; run the kernels under "
                               "Triton's interpreter instead (interpret=True / --interpret)")
        self.target = target
        self.arch = int(target[3:])
        self.interpret = interpret
        self.device = torch.device("cpu") if interpret else torch.device(device or "cuda")
        self.deterministic = torch.are_deterministic_algorithms_enabled() \
            if deterministic is None else deterministic
        self.triton_sources: dict[int, TritonSource] = {}
        # groups the plan gave to the CUDA C generator (runtime.cuda_graph)
        self.cuda_sources: dict = {}
        self.cuda_modules: dict = {}
        self.cuda_fallbacks: list[str] = []
        self.emulation_reverse = False  # the cpu emulation runs each block's threads reversed
        super().__init__(prog)

    def _final_steps(self) -> list[Step]:
        if any(s.uses_err for s in [*self.triton_sources.values(), *self.cuda_sources.values()]):
            return [Step("check-indices", _check_err, "check")]
        return []

    def _place(self, t: torch.Tensor) -> torch.Tensor:
        return t.to(self.device)

    # -- building ------------------------------------------------------------------------------
    def _build_all(self) -> dict:
        sources: dict = {}
        for op in self.func.body.ops[:-1]:
            if isinstance(op, fusion.GroupOp) and op.kind != "view" and not _all_empty(op):
                try:
                    if op.attr("codegen", "triton") == "cuda":
                        from runtime import cuda_graph

                        if (src := cuda_graph.build(self, op)) is not None:
                            sources[id(op)] = src
                            continue
                    if self.interpret:
                        src = render_group(op, op.kind, self.deterministic)
                    else:  # compiled for the device first: spills are re-rendered
                        src, _, _ = build_group(op, self.arch, op.kind, self.deterministic)
                    self.triton_sources[id(op)] = src
                    sources[id(op)] = src
                except Unsupported as e:
                    sources[id(op)] = e
        return sources

    def _step(self, op) -> Step:
        if isinstance(op, fusion.GroupOp) and op.kind != "view" and not _all_empty(op):
            src = self.sources[id(op)]
            if isinstance(src, TritonSource):
                return self._kernel_step(op)
            if id(op) in self.cuda_sources:
                from runtime import cuda_graph

                return cuda_graph.kernel_step(self, op, src, len(self.steps))
            self.fallbacks.append(f"{op.kind} group of {len(op.body.ops) - 1} ops ({src})")
            return self._interpreted(op, [self._slot(v) for v in op.operands],
                                     [self._slot(r) for r in op.results])
        if isinstance(op, st.SeedOp) and self.device.type != "cpu":  # drawn on the device
            writes = [self._slot(r) for r in op.results]

            def run(env, cs, writes=writes):
                env[writes[0]] = torch.randint(-2**63, 2**63 - 1, (), dtype=torch.int64,
                                               device=self.device)
            return Step(op.name, run, "seed", [], writes)
        if isinstance(op, st.ConstantOp | st.IotaOp) and self.device.type != "cpu":
            value = _from_numpy(IMPLS[op.name](op, [])[0], op.result).to(self.device)
            writes = [self._slot(r) for r in op.results]

            def run(env, cs, value=value, writes=writes):
                env[writes[0]] = value
            return Step(op.name, run, "constant", [], writes)
        return super()._step(op)

    def _kernel_step(self, op) -> Step:
        src: TritonSource = self.sources[id(op)]
        module = load_module(src, self.interpret)
        reads = [self._slot(v) for v in op.operands]
        writes = [self._slot(r) for r in op.results]
        types = list(op.results)
        k = len(self.steps)

        def run(env, cs):
            bufs = {f"in{j}": _contiguous(env[i]) for j, i in enumerate(reads)}
            for j, (w, v) in enumerate(zip(writes, types)):
                bufs[f"out{j}"] = self._alloc(cs, env, w, v)
            for j, t in enumerate(cs.scratch[k]):
                bufs[f"scr{j}"] = t
            bufs["err"] = cs.err
            launch_group(src, module, bufs)

        return Step(src.symbol, run, "kernel", reads, writes, _Scratch(src), module)

    def _interpreted(self, op, reads, writes) -> Step:
        def run(env, cs, op=op, reads=reads, writes=writes):
            args = [_to_numpy(env[i].cpu()) for i in reads]
            for w, o, r in zip(writes, IMPLS[op.name](op, args), op.results):
                env[w] = _from_numpy(o, r).to(self.device)
        return Step(op.name, run, "interpreter", reads, writes)

    # -- buffers -------------------------------------------------------------------------------
    def new_call_state(self, binding: dict | None = None) -> CallState:
        """A fresh arena on the device, its typed views, typed scratch tensors per kernel step
        and an error flag (one per concurrent call, as the cpu graph does)."""
        arena = torch.empty(max(self.arena_bytes, ALIGN), dtype=torch.uint8, device=self.device)
        cs = CallState(arena, {}, {k: [] for k in range(len(self.steps))})
        by_step = self.sources_by_step
        for key, off, (_, _, n) in self.layout:
            if key[0] == "slot":
                cs.views[key[1]] = _typed(arena[off:off + n], key[2])
            else:
                step, j = key[1], key[2]
                count, dt = by_step[step].scratch[j]
                cs.scratch[step].append(
                    arena[off:off + max(1, count) * dt.itemsize].view(dtype_to_torch(dt)))
        cs.err = torch.zeros(1, dtype=torch.int32, device=self.device)
        return self._fill_env(cs)

    @property
    def sources_by_step(self) -> dict[int, TritonSource]:
        by_symbol = {s.symbol: s for s in [*self.triton_sources.values(),
                                            *self.cuda_sources.values()]}
        return {k: by_symbol[s.name] for k, s in enumerate(self.steps) if s.kind == "kernel"}

    def _alloc(self, cs: CallState, env, slot: int, v) -> torch.Tensor:
        t = cs.views.get(slot)
        if t is None:  # a graph output: fresh storage on the device
            t = torch.empty([int(d) for d in v.type.shape], dtype=dtype_to_torch(v.type.dtype),
                            device=self.device)
        env[slot] = t
        return t


def _check_err(env, cs) -> None:
    """The last step of a graph with gathers or scatters: one read of the call's error flag."""
    if int(cs.err.item()):
        cs.err.zero_()
        raise RuntimeError("stitch: an index read from a tensor is out of range (a gather or "
                           "scatter in a Triton kernel)")


def compile_gpu_program(prog, target: str = "sm_80", fusion: str = "stitch", device_spec=None,
                        interpret: bool | None = None, deterministic: bool | None = None,
                        device=None, gpu_codegen: str = "auto",
                        cuda_stitch: str = "auto") -> TritonGraph:
    """Plan, fuse, schedule for ``target`` and build ``prog``'s kernels: Triton, or CUDA C where
    the plan chose it (``gpu_codegen``: auto | triton | cuda; ``cuda_stitch=split``: no
    cooperative kernel, every group split at its grid barriers)."""
    from passes import PassContext, PassManager, pipeline

    ctx = PassContext(target=target, device_spec=device_spec)
    PassManager.parse(pipeline(fusion, gpu_codegen=gpu_codegen, cuda_stitch=cuda_stitch)).run(
        prog.module, ctx)
    g = TritonGraph(prog, target, interpret, deterministic, device)
    g.plan = ctx.results["plan"][prog.module.func().sym_name]
    if g.fallbacks:
        log.warning("stitch (%s): %d group(s) the Triton generator cannot compile run through the "
                    "reference interpreter: %s", target, len(g.fallbacks), "; ".join(g.fallbacks))
    return g
