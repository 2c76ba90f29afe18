"""The analytic cost model: latency evaluator, legality, and FusionStitching's delta evaluator.

Entry points (all pure functions of a `KernelDesc` and a `DeviceSpec`; no GPU, no torch):
- `schedule(desc, device) -> Schedule`: the thread mapping chosen and the estimate.
- `latency(desc, device) -> float`: estimated seconds; `math.inf` for an illegal kernel.
- `legal(desc, device) -> (bool, reason)`: resource checks (shared memory per block,
  registers, a grid barrier only when all blocks fit one wave).
- `fits_one_wave(desc, device) -> bool`: all blocks resident at once.
- `fusion_delta(parts, fused, device) -> Delta`: is fusing `parts` into `fused` worth it.

Invariants:
- Deterministic: same inputs, same outputs (a measured CPU spec is read from its cache).
- `latency` is monotone non-decreasing in `bytes_read` and `bytes_written`.
- `Delta.benefit_seconds == Delta.parts_seconds - Delta.fused_seconds` (positive: fuse);
  an illegal fused kernel has `legal == False`, a reason, and benefit `-inf`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from cost_model.cpu import cpu_schedule
from cost_model.devices import DeviceSpec, get_device
from cost_model.gpu import gpu_schedule
from cost_model.kernel import KernelDesc
from cost_model.schedule import Schedule


def schedule(desc: KernelDesc, device: DeviceSpec | str) -> Schedule:
    spec = _spec(device)
    return gpu_schedule(desc, spec) if spec.is_gpu else cpu_schedule(desc, spec)


def latency(desc: KernelDesc, device: DeviceSpec | str) -> float:
    return schedule(desc, device).seconds


def legal(desc: KernelDesc, device: DeviceSpec | str) -> tuple[bool, str]:
    s = schedule(desc, device)
    return s.legal, s.reason


def fits_one_wave(desc: KernelDesc, device: DeviceSpec | str) -> bool:
    """Whether every block of `desc`'s schedule is resident at once (always on a CPU,
    where every thread runs at once) — the legality condition for global stitching."""
    spec = _spec(device)
    return True if not spec.is_gpu else schedule(desc, spec).fits_one_wave


@dataclass(frozen=True)
class Delta:
    """What fusing `parts` into one kernel `fused` gains and costs (seconds unless named).

    The terms explain `benefit_seconds`; they are not an exact decomposition of it (the
    max() of memory and compute time in each kernel does not split).
    """

    legal: bool
    reason: str  # why the fused kernel is illegal; "" when legal
    bytes_saved: int  # global traffic of the parts minus that of the fused kernel
    launches_saved: int  # len(parts) - 1
    memory_seconds_saved: float  # the traffic saved, at the device's best bandwidth
    launch_seconds_saved: float
    parallelism_penalty_seconds: float  # fused kernel fills the device worse than the parts
    resource_penalty_seconds: float  # occupancy the fused kernel loses to regs / shared mem
    sync_penalty_seconds: float  # grid barriers the fused kernel adds
    parts_seconds: float
    fused_seconds: float
    benefit_seconds: float
    fused: Schedule


def fusion_delta(parts: Sequence[KernelDesc], fused: KernelDesc, device: DeviceSpec | str) -> Delta:
    if not parts:
        raise ValueError("fusion_delta needs at least one part")
    spec = _spec(device)
    ps = [schedule(p, spec) for p in parts]
    fs = schedule(fused, spec)
    parts_seconds = sum(s.seconds for s in ps)
    # An illegal kernel has no finite time to compare: its penalties are reported as 0 and
    # its benefit as -inf, so a planner that forgets to check `legal` still rejects it.
    ok = fs.legal
    return Delta(
        legal=fs.legal,
        reason=fs.reason,
        bytes_saved=sum(p.traffic for p in parts) - fused.traffic,
        launches_saved=len(parts) - 1,
        memory_seconds_saved=sum(s.memory_floor_seconds for s in ps) - fs.memory_floor_seconds,
        launch_seconds_saved=sum(s.launch_seconds for s in ps) - fs.launch_seconds,
        parallelism_penalty_seconds=max(
            0.0, fs.parallelism_loss_seconds - sum(s.parallelism_loss_seconds for s in ps)
        )
        if ok
        else 0.0,
        resource_penalty_seconds=max(
            0.0, fs.resource_penalty_seconds - sum(s.resource_penalty_seconds for s in ps)
        ),
        sync_penalty_seconds=fs.sync_seconds - sum(s.sync_seconds for s in ps),
        parts_seconds=parts_seconds,
        fused_seconds=fs.seconds,
        benefit_seconds=parts_seconds - fs.seconds if ok else -float("inf"),
        fused=fs,
    )


def _spec(device: DeviceSpec | str) -> DeviceSpec:
    return get_device(device) if isinstance(device, str) else device
