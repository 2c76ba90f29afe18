"""The CUDA C groups of a ``TritonGraph`` (``runtime.gpu_graph``): building and kernel steps.

A group the plan gave to the CUDA C generator (``codegen = cuda``) is rendered by
``codegen.cuda`` and

- on a CUDA device: compiled by nvcc for the device's architecture (what ptxas reports feeds
  the schedule: ``runtime.cuda_build.build_group``), loaded from its cubin and launched with
  the call's tensors (``runtime.cuda_launch``);
- under ``interpret=True`` (no GPU): compiled as C++ for the cpu emulation and run there on cpu
  tensors, scratch and outputs poisoned first, so a missing barrier shows as a wrong result.

A group the CUDA C generator cannot render (it raises ``Unsupported``) goes to Triton, and the
reason is kept on the group (``kernel_notes``) and in the graph's ``cuda_fallbacks``.
"""

from __future__ import annotations

import torch

from codegen.cuda.emit import Unsupported
from codegen.cuda.kernel import SCATTERS, CudaSource, render_group
from runtime import cuda_build
from runtime.graph import Step, _contiguous


class _Scratch:
    def __init__(self, src: CudaSource):
        self.scratch = src.scratch_bytes
        self.symbol = src.symbol
        self.source = src.source


def build(graph, op) -> CudaSource | None:
    """The group's CUDA C, built for where the graph runs; None (with the reason noted) when the
    generator cannot render it."""
    try:
        if graph.deterministic and any(isinstance(o, SCATTERS) for o in op.body.ops):
            raise Unsupported("a deterministic scatter (the owned-destination form is Triton's; "
                              "CUDA C scatters with atomics)")
        if graph.interpret:
            src = render_group(op, op.kind)
            graph.cuda_modules[src.symbol] = cuda_build.emulation_library(src)
        else:
            src, builds, _ = cuda_build.build_group(op, graph.arch, op.kind)
            from runtime.cuda_launch import DeviceModule

            graph.cuda_modules[src.symbol] = DeviceModule(builds[0].cubin_path, src.launches,
                                                          graph.device)
    except Unsupported as e:
        note = f"CUDA C generator: {e}; rendered by Triton instead"
        op.set_attrs(kernel_notes=list(op.attr("kernel_notes", ())) + [note])
        graph.cuda_fallbacks.append(f"{op.kind} group: {e}")
        return None
    graph.cuda_sources[id(op)] = src
    return src


def _aligned(t: torch.Tensor) -> torch.Tensor:
    """Vector loads need 16-byte aligned rows: a view at an odd offset is copied (rare: user
    inputs sliced from a larger tensor; the arena and fresh outputs are aligned)."""
    return t if t.data_ptr() % 16 == 0 else t.clone()


def kernel_step(graph, op, src: CudaSource, k: int) -> Step:
    """The step running ``src``'s kernels with the call's buffers."""
    module = graph.cuda_modules[src.symbol]
    reads = [graph._slot(v) for v in op.operands]
    writes = [graph._slot(r) for r in op.results]
    types = list(op.results)
    emulated = graph.interpret

    def run(env, cs):
        bufs = {}
        for j, i in enumerate(reads):
            t = _contiguous(env[i])
            bufs[f"in{j}"] = _aligned(t) if f"in{j}" in src.vector else t
        for j, (w, v) in enumerate(zip(writes, types)):
            bufs[f"out{j}"] = graph._alloc(cs, env, w, v)
        for j, t in enumerate(cs.scratch[k]):
            bufs[f"scr{j}"] = t
        bufs["err"] = cs.err
        if emulated:
            cuda_build.launch_emulated(src, module, bufs, poison=True,
                                       reverse=graph.emulation_reverse)
        else:
            for ln in src.launches:
                module.launch(ln, [bufs[a].data_ptr() for a in ln.args])

    return Step(src.symbol, run, "kernel", reads, writes, _Scratch(src), module)
