"""Build, cache, compile and launch the Triton kernels of the ``sm_80`` / ``sm_90`` targets.

A group's kernels are one Python module (``codegen.triton.TritonSource``). This module:

- writes it once to ``$STITCH_CACHE_DIR/kernels/triton/<symbol>.py`` (the symbol holds a hash
  of the source, so a file under a final name is always the right one; written to a temporary
  name and renamed, so concurrent processes are safe) and imports it, either for the GPU
  (``@triton.jit``) or for ``TRITON_INTERPRET=1`` (the same source run on numpy: CPU tensors);
- compiles each kernel for a ``GPUTarget`` without needing a GPU (``triton.compile`` on an
  ``ASTSource``: Triton's own ptxas), keeping ``<kernel>.ptx``, ``<kernel>.cubin`` and a
  resource report (registers, spilled bytes, stack, shared memory, from ``cuobjdump
  -res-usage`` and Triton's metadata) under ``<symbol>-sm<arch>/``; a report on disk means the
  kernel is not compiled again (``stats()["cache_hits"]``);
- launches a group: its ``Prep`` steps (torch), then each kernel over its grid.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import re
import subprocess
import threading
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import torch

from runtime.build import cache_dir, write_atomic

_lock = threading.Lock()
_modules: dict[tuple[str, bool], ModuleType] = {}
_stats = {"compiled": 0, "cache_hits": 0}


def stats() -> dict[str, int]:
    with _lock:
        return dict(_stats)


def triton_dir() -> Path:
    path = cache_dir() / "triton"
    path.mkdir(parents=True, exist_ok=True)
    return path


def source_path(src) -> Path:
    path = triton_dir() / f"{src.symbol}.py"
    if not path.exists():
        write_atomic(path, src.source)
    return path


def load_module(src, interpret: bool) -> ModuleType:
    """The group's kernel module, imported for the GPU or for Triton's interpreter (the mode is
    fixed when ``@triton.jit`` runs, so each mode gets its own module object)."""
    key = (src.symbol, interpret)
    with _lock:
        if key in _modules:
            return _modules[key]
    from triton import knobs

    path = source_path(src)
    spec = importlib.util.spec_from_file_location(
        f"stitch_triton.{src.symbol}{'_interpreted' if interpret else ''}", path)
    module = importlib.util.module_from_spec(spec)
    with _lock:
        before = knobs.runtime.interpret
        knobs.runtime.interpret = interpret
        try:
            spec.loader.exec_module(module)
        finally:
            knobs.runtime.interpret = before
        module.stitch_interpreted = interpret
        _modules[key] = module
    return module


# -- compiling for a GPU target without a GPU --------------------------------------------------


@dataclass
class KernelBuild:
    kernel: str
    arch: int
    ptx_path: Path
    cubin_path: Path
    report: dict  # registers, spill_bytes, stack_bytes, shared_bytes, num_warps, grid

    @property
    def spills(self) -> bool:
        return self.report["spill_bytes"] > 0


def _res_usage(cubin: Path) -> dict[str, dict[str, int]]:
    """``cuobjdump -res-usage``: per function, REG / STACK / SHARED / LOCAL."""
    from triton import knobs

    tool = knobs.nvidia.cuobjdump.path
    out = subprocess.run([tool, "-res-usage", str(cubin)], capture_output=True, text=True,
                         check=True).stdout
    found: dict[str, dict[str, int]] = {}
    name = None
    for line in out.splitlines():
        m = re.match(r"\s*Function (\S+):", line)
        if m:
            name = m.group(1)
            continue
        if name and "REG:" in line:
            found[name] = {k: int(v) for k, v in re.findall(r"(\w+(?:\[\d\])?):(\d+)", line)}
            name = None
    return found


def compile_group(src, arch: int) -> list[KernelBuild]:
    """Every kernel of ``src`` compiled for ``sm_<arch>`` (80 or 90): PTX, cubin, report."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    folder = triton_dir() / f"{src.symbol}-sm{arch}"
    folder.mkdir(parents=True, exist_ok=True)
    module = None
    builds = []
    for launch in src.launches:
        base = folder / launch.kernel
        report_path = base.with_suffix(".json")
        if report_path.exists():
            with _lock:
                _stats["cache_hits"] += 1
            builds.append(KernelBuild(launch.kernel, arch, base.with_suffix(".ptx"),
                                      base.with_suffix(".cubin"), json.loads(report_path.read_text())))
            continue
        module = module or load_module(src, interpret=False)
        fn = getattr(module, launch.kernel)
        sig = src.signatures[launch.kernel]
        names = list(sig)
        # pointers from torch (and the arena's 64-byte offsets) are 16-byte aligned
        attrs = {(names.index(a),): [["tt.divisibility", 16]] for a, t in sig.items()
                 if t.startswith("*")}
        ast = ASTSource(fn, sig, constexprs=dict(launch.constexprs), attrs=attrs)
        compiled = triton.compile(ast, target=GPUTarget("cuda", arch, 32),
                                  options={"num_warps": launch.num_warps})
        write_atomic(base.with_suffix(".ptx"), compiled.asm["ptx"])
        write_atomic(base.with_suffix(".cubin"), compiled.asm["cubin"])
        usage = _res_usage(base.with_suffix(".cubin")).get(launch.kernel, {})
        report = {"kernel": launch.kernel, "arch": f"sm_{arch}", "registers": usage.get("REG", 0),
                  "spill_bytes": usage.get("LOCAL", 0), "stack_bytes": usage.get("STACK", 0),
                  "shared_bytes": int(compiled.metadata.shared), "num_warps": launch.num_warps,
                  "grid": launch.grid, "constexprs": launch.constexprs, "what": launch.what}
        write_atomic(report_path, json.dumps(report, indent=1))
        with _lock:
            _stats["compiled"] += 1
        builds.append(KernelBuild(launch.kernel, arch, base.with_suffix(".ptx"),
                                  base.with_suffix(".cubin"), report))
    return builds


def build_group(group, arch: int, name: str = "", deterministic: bool = False,
                max_retries: int = 3):
    """Render and compile ``group``; a kernel that spills is rendered again with tiles holding
    half the registers (at most ``max_retries`` times). Returns (source, builds, note): the note
    says why it was re-rendered ("" when it was not), and is recorded on the group
    (``kernel_notes``) so the plan shows it."""
    from codegen.triton.kernel import render_group

    shrink, notes = 1, []
    while True:
        src = render_group(group, name, deterministic, shrink)
        builds = compile_group(src, arch)
        spilled = [b for b in builds if b.spills]
        if not spilled or len(notes) >= max_retries:
            break
        notes.append(", ".join(f"{b.kernel} spilled {b.report['spill_bytes']} bytes "
                               f"({b.report['registers']} registers)" for b in spilled)
                     + f" on sm_{arch}: rendered again with tiles of 1/{shrink * 2} of the "
                       "registers per thread")
        shrink *= 2
    if notes:
        group.set_attrs(kernel_notes=notes)
    return src, builds, "; ".join(notes)


# -- launching ---------------------------------------------------------------------------------


def run_preps(src, buffers: dict[str, torch.Tensor]) -> None:
    for p in src.preps:
        if p.kind != "sort_rows":
            raise ValueError(f"unknown prep step {p.kind!r}")
        idx = buffers[p.index].to(torch.int64)
        idx = torch.where(idx < 0, idx + p.rows, idx)
        if idx.numel() and (idx.min() < 0 or idx.max() >= p.rows):
            raise RuntimeError("stitch: an index of index_add is out of range")
        order = torch.sort(idx, stable=True)
        buffers[p.perm].copy_(order.indices)
        bounds = torch.arange(p.rows + 1, device=idx.device, dtype=torch.int64)
        buffers[p.seg].copy_(torch.searchsorted(order.values, bounds))


def launch_group(src, module: ModuleType, buffers: dict[str, torch.Tensor]) -> None:
    """Run the group's preps and kernels; ``buffers`` maps every buffer name to a tensor."""
    from triton import knobs

    run_preps(src, buffers)
    # Triton's library functions (tl.sum ...) check the mode when called, not when defined
    before = knobs.runtime.interpret
    knobs.runtime.interpret = module.stitch_interpreted
    try:
        for launch in src.launches:
            fn = getattr(module, launch.kernel)
            fn[(launch.grid,)](*[buffers[a] for a in launch.args], **launch.constexprs,
                               num_warps=launch.num_warps)
    finally:
        knobs.runtime.interpret = before


def content_key(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# -- stitchc compile --emit kernels ------------------------------------------------------------


def emit_kernels(module, target: str, out: Path, deterministic: bool = False,
                 cuda_groups: bool = True) -> list[dict]:
    """Write every GPU kernel of ``module`` (scheduled for ``target``) under ``out``: the group's
    Triton source (``<symbol>.py``), each kernel's PTX and cubin, and ``kernels.json`` with one
    resource report per kernel; groups the generator cannot compile are listed with the reason."""
    import shutil

    from codegen.triton.emit import Unsupported
    from stitch_ir.dialects import fusion

    arch = int(target[3:])
    out.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    for op in module.walk():
        if not isinstance(op, fusion.GroupOp) or op.kind == "view":
            continue
        if not cuda_groups and op.attr("codegen", "triton") == "cuda":
            continue  # runtime.cuda_build.emit_cuda_kernels writes those
        try:
            src, builds, note = build_group(op, arch, op.kind, deterministic)
        except Unsupported as e:
            rows.append({"group": op.kind, "unsupported": str(e)})
            continue
        write_atomic(out / f"{src.symbol}.py", src.source)
        for b in builds:
            for path in (b.ptx_path, b.cubin_path):
                shutil.copyfile(path, out / f"{src.symbol}.{b.kernel}{path.suffix}")
            rows.append({"group": op.kind, "symbol": src.symbol, "mapping": op.attr("mapping"),
                         **b.report, "note": note})
    write_atomic(out / "kernels.json", json.dumps(rows, indent=1))
    return rows
