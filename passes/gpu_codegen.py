"""Which GPU code generator a ``fusion.group`` gets, and how its CUDA C is stitched.

Input: a group scheduled for an sm_* target (``passes.gpu_kernels``' ``kernel_*`` attributes).
Output: attributes recorded on the group (the plan shows them):

- ``codegen`` (``triton`` | ``cuda``) and ``codegen_why``. ``auto`` (the default) keeps Triton
  unless the schedule needs what Triton hides: a warp per row (or packed short rows) reduced by
  warp shuffles, a row kept in explicit shared memory (regional stitching), or a grid barrier
  that the group can cross inside one kernel (global stitching); ``triton`` / ``cuda`` force
  one generator (``stitchc --gpu-codegen``, the backend's ``gpu_codegen`` option). A group
  with a scatter stays Triton under ``auto`` (the same atomics; Triton also has the
  deterministic owned-destination form).
- ``cuda_stitch`` (``global`` | ``split`` | ``single``), ``cuda_grid`` and ``cuda_why``: a
  group with a grid barrier (several kernels, or a reduction split over blocks) is one
  cooperative kernel only when the cost model finds every block of every part resident at
  once -- the largest part's blocks within one wave at the occupancy of the stitched kernel
  (the largest block, registers and shared memory of its parts; a warp's rows are kept in
  registers by the CUDA C generator, so warp mappings count no shared memory). Otherwise it is split at its
  barriers, and ``cuda_why`` says by how much it missed. ptxas' real registers may still
  change that after the build (``runtime.cuda_build``); the note then lands on the group.
"""

from __future__ import annotations

from cost_model.gpu import occupancy
from stitch_ir.dialects import fusion, st

MODES = ("auto", "triton", "cuda")
WARP_MAPPINGS = ("warp_per_row", "rows_per_block")
SCATTERS = (st.IndexAddOp, st.ScatterAddOp, st.ScatterReduceOp)


def stitching(group: fusion.GroupOp, device) -> dict:
    """``cuda_stitch``, ``cuda_grid``, ``cuda_why`` of a scheduled group."""
    maps = list(group.attr("kernel_mappings", ()))
    splits = list(group.attr("kernel_split", ()))
    body = group.body.ops[:-1]
    # between parts; inside a split reduction (partials, then their combination); inside a
    # scatter (the destination's copy, then the atomics)
    barriers = len(maps) - 1 + sum(1 for m, s in zip(maps, splits)
                                   if s > 1 and m in ("split_row", "column_tiles"))
    barriers += sum(1 for vals in group.attr("kernel_values", ())
                    if any(r >= 0 and isinstance(body[r], SCATTERS) for r in vals))
    if barriers == 0:
        return {"cuda_stitch": "single", "cuda_grid": max(group.attr("kernel_blocks", (1,))),
                "cuda_why": "one kernel, no grid barrier"}
    threads = max(group.attr("kernel_threads"))
    regs = max(group.attr("kernel_regs", (32,)))
    # CUDA C keeps a warp's rows in registers (at most 32 elements a lane: the mapping's own
    # rule), so those parts need no shared memory; the others as the cost model estimates
    smem = max(0 if m in WARP_MAPPINGS else b for m, b in
               zip(maps, group.attr("kernel_smem", [0] * len(maps))))
    grid = max(group.attr("kernel_blocks"))
    bps, limiter = occupancy(device, threads, regs, smem)
    wave = device.num_sms * bps
    shape = (f"{grid} blocks of {threads} threads, {regs} registers, {smem} bytes of shared "
             f"memory: {bps} blocks per SM ({limiter}), one wave = {device.num_sms} x {bps} = "
             f"{wave}")
    if bps and grid <= wave:
        return {"cuda_stitch": "global", "cuda_grid": grid,
                "cuda_why": f"global stitching: {barrier_text(barriers)} inside one cooperative "
                            f"kernel; {shape}"}
    return {"cuda_stitch": "split", "cuda_grid": grid,
            "cuda_why": f"split at {barrier_text(barriers)}: {shape}, and a grid barrier needs "
                        "every block resident"}


def barrier_text(n: int) -> str:
    return f"{n} grid barrier{'s' if n > 1 else ''}"


def gpu_codegen(group: fusion.GroupOp, device, mode: str = "auto", stitch: str = "auto") -> dict:
    """The ``codegen*`` and ``cuda_*`` attributes of ``group`` (see the module docstring);
    ``stitch="split"`` splits every group at its barriers (to measure global stitching
    against the same kernels split)."""
    if mode not in MODES:
        raise ValueError(f"gpu codegen {mode!r}: choose from {', '.join(MODES)}")
    if stitch not in ("auto", "split"):
        raise ValueError(f"cuda stitch {stitch!r}: choose from auto, split")
    attrs = stitching(group, device)
    if stitch == "split" and attrs["cuda_stitch"] == "global":
        attrs.update(cuda_stitch="split", cuda_why="split at its grid barriers: asked for "
                     f"(cuda_stitch=split; it would fit: {attrs['cuda_why']})")
    maps = list(group.attr("kernel_mappings", ()))
    threads = list(group.attr("kernel_threads", ()))
    needs = []
    warp = [m for m in maps if m in WARP_MAPPINGS]
    if warp:
        needs.append(f"warp mapping ({', '.join(sorted(set(warp)))}): rows reduced by warp "
                     "shuffles")
    scratch = max([t // 32 * 4 for t in threads] or [0])
    if group.attr("smem_bytes", 0) > scratch and "regional" in group.attr("schemes", ()):
        needs.append(f"explicit shared memory: {group.attr('smem_bytes')} bytes per block keep "
                     "rows for reuse after a reduction (regional stitching)")
    if attrs["cuda_stitch"] == "global":
        needs.append(attrs["cuda_why"].split(";")[0])
    scatter = any(isinstance(op, SCATTERS) for op in group.body.ops)
    if mode != "auto":
        attrs.update(codegen=mode, codegen_why=f"--gpu-codegen {mode}" +
                     (f" ({'; '.join(needs)})" if needs else ""))
    elif needs and not scatter:
        attrs.update(codegen="cuda", codegen_why="; ".join(needs))
    else:
        attrs.update(codegen="triton", codegen_why=(
            "a scatter: Triton's atomics (or its deterministic form)" if scatter else
            "no warp mapping, explicit shared memory or grid barrier in one kernel needed"))
    return attrs
