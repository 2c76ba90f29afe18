"""Build, cache and launch the CUDA C kernels of the ``sm_80`` / ``sm_90`` targets.

A group's kernels are one ``.cu`` text (``codegen.cuda.CudaSource``). This module:

- compiles it with nvcc for ``sm_<arch>`` (``-cubin`` and ``-ptx``, ``-Xptxas -v``), keeping
  ``<symbol>.cu``, ``.ptx``, ``.cubin`` and ``.json`` (per kernel: registers, spilled bytes,
  stack, static + dynamic shared memory, launch shape) under
  ``$STITCH_CACHE_DIR/kernels/cuda/<symbol>-sm<arch>/``; the symbol holds a hash of the
  source, and the key of the folder a hash of the headers and flags, so a report on disk
  means nothing is compiled (``stats()["cache_hits"]``); no GPU is needed;
- builds the same source as C++ for the cpu emulation (``-DST_EMULATE=1``, through
  ``runtime.build.build_library``: cached by content) and launches it there on cpu tensors;
- on a GPU, loads the cubin through CuPy (``RawModule``) when CuPy is installed, else through
  the CUDA driver API (``libcuda`` via ctypes), and launches with torch tensors' pointers, no
  copies, on torch's current stream; a kernel with a grid barrier goes through a cooperative
  launch, after checking that its grid fits one wave at the occupancy the driver reports.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import re
import shutil
import subprocess
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path

import torch

from runtime.build import BuildError, build_library, cache_dir, load_library, write_atomic

HEADER_DIR = Path(__file__).resolve().parent.parent / "codegen" / "cuda"
HEADERS = ("stitch_cuda.h", "stitch_emu.h")
NVCC_FLAGS = ("-std=c++17", "-O3", "-Xptxas", "-v", "-lineinfo")
EMU_FLAGS = ["-O1", "-std=c++17", "-fPIC", "-shared", "-fno-strict-aliasing", "-w",
             "-DST_EMULATE=1"]
_lock = threading.Lock()
_stats = {"compiled": 0, "cache_hits": 0}


def stats() -> dict[str, int]:
    with _lock:
        return dict(_stats)


def cuda_dir() -> Path:
    path = cache_dir() / "cuda"
    path.mkdir(parents=True, exist_ok=True)
    return path


def headers_text() -> str:
    return "".join((HEADER_DIR / h).read_text() for h in HEADERS)


# -- the cpu emulation -------------------------------------------------------------------------


def emulation_source(src) -> str:
    """The kernel source with its headers inlined, for the C++ compiler."""
    emu = (HEADER_DIR / "stitch_emu.h").read_text().replace("#pragma once\n", "")
    head = (HEADER_DIR / "stitch_cuda.h").read_text().replace("#pragma once\n", "")
    head = head.replace('#include "stitch_emu.h"', emu)
    return src.source.replace('#include "stitch_cuda.h"', head)


def emulation_library(src) -> ctypes.CDLL:
    """The group's kernels compiled for the cpu emulation (cached by content)."""
    path = build_library(emulation_source(src), name=f"emu_{src.symbol}", flags=EMU_FLAGS)
    lib = load_library(path)
    lib.st_emu_last_error.restype = ctypes.c_char_p
    return lib


_emu_lock = threading.Lock()  # the emulation's scheduler state is one per library


def launch_emulated(src, lib: ctypes.CDLL, buffers: dict[str, torch.Tensor],
                    poison: bool = True, reverse: bool = False) -> None:
    """Run the group's kernels in the emulation. ``poison``: scratch and outputs start as 0xFF
    bytes (NaN / -1), so a value read before it is written shows; ``reverse``: each block's
    threads run in reverse order (a race shows in one order or the other)."""
    if poison:
        for name, t in buffers.items():
            if name.startswith(("out", "scr")) and t.numel():
                t.view(-1).view(torch.uint8).fill_(0xFF)
    for launch in src.launches:
        ptrs = (ctypes.c_void_p * max(1, len(launch.args)))(
            *[buffers[a].data_ptr() or None for a in launch.args])
        with _emu_lock:
            lib.st_emu_set_order(1 if reverse else 0)
            rc = getattr(lib, f"{launch.kernel}_emu")(ptrs)
            why = lib.st_emu_last_error().decode() if rc else ""
        if rc:
            raise RuntimeError(f"stitch cuda emulation: kernel {launch.kernel} of {src.symbol}: "
                               f"{why}")


# -- nvcc --------------------------------------------------------------------------------------


@dataclass
class CudaBuild:
    kernel: str
    arch: int
    cu_path: Path
    ptx_path: Path
    cubin_path: Path
    report: dict

    @property
    def spills(self) -> bool:
        return self.report["spill_bytes"] > 0


def nvcc() -> str:
    found = os.environ.get("NVCC") or shutil.which("nvcc") or "/usr/local/cuda/bin/nvcc"
    if not Path(found).exists() and not shutil.which(found):
        raise BuildError("nvcc not found (set NVCC or put the CUDA toolkit on PATH)")
    return found


_PTXAS_FN = re.compile(r"Compiling entry function '(\w+)' for '(sm_\d+)'")
_PTXAS_REGS = re.compile(r"Used (\d+) registers")
_PTXAS_SPILL = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
_PTXAS_STACK = re.compile(r"(\d+) bytes stack frame")
_PTXAS_SMEM = re.compile(r"(\d+) bytes smem")
_PTXAS_BARRIERS = re.compile(r"used (\d+) barriers")


def parse_ptxas(text: str) -> dict[str, dict[str, int]]:
    """``-Xptxas -v`` output: per entry function, registers, spill stores / loads, stack frame,
    static shared memory (bytes) and named hardware barriers used."""
    found: dict[str, dict[str, int]] = {}
    name = None
    for line in text.splitlines():
        m = _PTXAS_FN.search(line)
        if m:
            name = m.group(1)
            found[name] = {"registers": 0, "spill_stores": 0, "spill_loads": 0, "stack": 0,
                           "smem": 0, "barriers": 0}
            continue
        if name is None:
            continue
        if (m := _PTXAS_STACK.search(line)):
            found[name]["stack"] = int(m.group(1))
        if (m := _PTXAS_SPILL.search(line)):
            found[name]["spill_stores"], found[name]["spill_loads"] = int(m.group(1)), int(m.group(2))
        if (m := _PTXAS_REGS.search(line)):
            found[name]["registers"] = int(m.group(1))
        if (m := _PTXAS_SMEM.search(line)):
            found[name]["smem"] = int(m.group(1))
        if (m := _PTXAS_BARRIERS.search(line)):
            found[name]["barriers"] = int(m.group(1))
    return found


def compile_cuda(src, arch: int) -> list[CudaBuild]:
    """Every kernel of ``src`` compiled by nvcc for ``sm_<arch>``: .cu, PTX, cubin, report."""
    key = hashlib.sha256((headers_text() + " ".join(NVCC_FLAGS)).encode()).hexdigest()[:8]
    folder = cuda_dir() / f"{src.symbol}-sm{arch}-{key}"
    report_path = folder / "report.json"
    cu = folder / f"{src.symbol}.cu"
    ptx, cubin = cu.with_suffix(".ptx"), cu.with_suffix(".cubin")
    if report_path.exists():
        with _lock:
            _stats["cache_hits"] += 1
        reports = json.loads(report_path.read_text())
    else:
        folder.mkdir(parents=True, exist_ok=True)
        write_atomic(cu, src.source)
        for h in HEADERS:
            shutil.copyfile(HEADER_DIR / h, folder / h)
        # one nvcc run: the cubin, and (-keep) the PTX it was assembled from
        keep = folder / f".keep-{uuid.uuid4().hex[:8]}"
        keep.mkdir()
        out = keep / "out.cubin"
        cmd = [nvcc(), *NVCC_FLAGS, f"-arch=sm_{arch}", "-I", str(folder), "-cubin", "-keep",
               "-keep-dir", str(keep), str(cu), "-o", str(out)]
        res = subprocess.run(cmd, capture_output=True, text=True, errors="replace", check=False)
        if res.returncode != 0:
            shutil.rmtree(keep, ignore_errors=True)
            raise BuildError(f"nvcc of {src.symbol} for sm_{arch} failed:\n{res.stderr[-6000:]}"
                             f"\nsource kept at: {cu}")
        os.replace(out, cubin)
        os.replace(keep / f"{src.symbol}.ptx", ptx)
        shutil.rmtree(keep, ignore_errors=True)
        outs = {"-cubin": res.stdout + res.stderr}
        usage = parse_ptxas(outs["-cubin"])
        reports = []
        for launch in src.launches:
            u = usage.get(launch.kernel, {})
            reports.append({
                "kernel": launch.kernel, "arch": f"sm_{arch}", "registers": u.get("registers", 0),
                "spill_bytes": u.get("spill_stores", 0) + u.get("spill_loads", 0),
                "stack_bytes": u.get("stack", 0),
                "shared_bytes": u.get("smem", 0) + launch.smem, "static_smem": u.get("smem", 0),
                "dynamic_smem": launch.smem, "threads": launch.block,
                "num_warps": launch.block // 32, "grid": launch.grid,
                "cooperative": launch.cooperative, "grid_syncs": launch.grid_syncs,
                "syncthreads": launch.syncthreads, "hw_barriers": u.get("barriers", 0),
                "what": launch.what})
        write_atomic(report_path, json.dumps(reports, indent=1))
        with _lock:
            _stats["compiled"] += 1
    return [CudaBuild(r["kernel"], arch, cu, ptx, cubin, r) for r in reports]


def build_group(group, arch: int, name: str = "", spec=None, max_retries: int = 2):
    """Render and nvcc-compile ``group``. What ptxas reports feeds the schedule: a kernel that
    spills is rendered again keeping fewer row elements in registers; a cooperative kernel
    whose grid no longer fits one wave at the registers and shared memory ptxas found is
    rendered again with fewer row elements in registers (when registers are what limit it),
    and else split at its barriers (``cuda_stitch`` / ``cuda_why`` updated). Returns (source,
    builds, note); the note (why it was re-rendered, "" when it was not) is recorded on the
    group (``kernel_notes``)."""
    from codegen.cuda.kernel import render_group
    from cost_model import get_device
    from cost_model.gpu import occupancy

    spec = spec or get_device(f"sm_{arch}")
    reg_elems, stitch, notes = 32, None, []
    if group.attr("cuda_stitch", "") == "split":
        stitch = "split"
    while True:
        src = render_group(group, name, stitch=stitch, reg_elems=reg_elems)
        builds = compile_cuda(src, arch)
        coop = [b for b in builds if b.report["cooperative"]]
        if coop and stitch is None:
            b = coop[0]
            bps, limiter = occupancy(spec, b.report["threads"], max(1, b.report["registers"]),
                                     b.report["dynamic_smem"] + b.report["static_smem"])
            if b.report["grid"] > spec.num_sms * bps:
                why = (f"ptxas: {b.kernel} uses {b.report['registers']} registers and "
                       f"{b.report['shared_bytes']} bytes of shared memory: {bps} blocks per SM "
                       f"({limiter}), so its {b.report['grid']} blocks exceed one wave of "
                       f"{spec.num_sms * bps}")
                if limiter == "registers" and reg_elems > 8:
                    # fewer row elements kept in registers (re-read instead) before giving up
                    # the grid barrier
                    reg_elems //= 2
                    notes.append(f"{why}: rendered again keeping {reg_elems} row elements per "
                                 "thread in registers")
                else:
                    notes.append(f"{why}: split at its grid barriers")
                    stitch = "split"
                    group.set_attrs(cuda_stitch="split", cuda_why=notes[-1])
                continue
        spilled = [b for b in builds if b.spills]
        if not spilled or len(notes) >= max_retries + 2 or reg_elems <= 4:
            break
        notes.append(", ".join(f"{b.kernel} spilled {b.report['spill_bytes']} bytes "
                               f"({b.report['registers']} registers)" for b in spilled)
                     + f" on sm_{arch}: rendered again keeping {reg_elems // 2} row elements "
                       "per thread in registers")
        reg_elems //= 2
    if notes:
        group.set_attrs(kernel_notes=list(group.attr("kernel_notes", ())) + notes)
    return src, builds, "; ".join(notes)


def emit_cuda_kernels(module, target: str, out: Path) -> list[dict]:
    """Write every CUDA C group of ``module`` (scheduled for ``target``) under ``out``: its
    ``.cu`` (with the two headers beside it), PTX, cubin, and one resource-report row per
    kernel (returned; the caller writes ``kernels.json``). A group the generator cannot render
    is handed to Triton (``codegen`` set back, the reason noted on the group and in its row)."""
    from codegen.cuda.emit import Unsupported
    from stitch_ir.dialects import fusion

    arch = int(target[3:])
    out.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    for op in module.walk():
        if not isinstance(op, fusion.GroupOp) or op.kind == "view" or \
                op.attr("codegen", "triton") != "cuda":
            continue
        try:
            src, builds, note = build_group(op, arch, op.kind)
        except Unsupported as e:
            op.set_attrs(codegen="triton", codegen_why=f"{op.attr('codegen_why')}; the CUDA C "
                         f"generator cannot render it ({e}): Triton",
                         kernel_notes=list(op.attr("kernel_notes", ())) + [f"CUDA C: {e}"])
            rows.append({"group": op.kind, "codegen": "cuda", "fallback": str(e)})
            continue
        for h in HEADERS:
            shutil.copyfile(HEADER_DIR / h, out / h)
        write_atomic(out / f"{src.symbol}.cu", src.source)
        for path in (builds[0].ptx_path, builds[0].cubin_path):
            shutil.copyfile(path, out / f"{src.symbol}{path.suffix}")
        for b in builds:
            rows.append({"group": op.kind, "codegen": "cuda", "symbol": src.symbol,
                         "mapping": op.attr("mapping"), "stitch": src.stitch,
                         "stitch_why": src.stitch_why, **b.report, "note": note})
    return rows
