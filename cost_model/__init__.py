"""stitch's cost model: device specs, kernel descriptions, and the analytic model.

The public API, re-exported here::

    DeviceSpec, SM_80, SM_90, get_device(name), cpu_spec(measure=True)
    KernelDesc, ReduceDesc
    Schedule, schedule(desc, device), latency(desc, device), legal(desc, device),
    fits_one_wave(desc, device), Delta, fusion_delta(parts, fused, device)

Invariant: imports only the standard library and numpy (never torch, never `passes`).
"""

from cost_model.analytic import Delta, fits_one_wave, fusion_delta, latency, legal, schedule
from cost_model.cpu_probe import CPU_FIXED, cpu_spec
from cost_model.devices import KNOWN_DEVICES, SM_80, SM_90, DeviceSpec, get_device
from cost_model.kernel import KernelDesc, ReduceDesc
from cost_model.schedule import Schedule

__all__ = [
    "CPU_FIXED",
    "KNOWN_DEVICES",
    "SM_80",
    "SM_90",
    "Delta",
    "DeviceSpec",
    "KernelDesc",
    "ReduceDesc",
    "Schedule",
    "cpu_spec",
    "fits_one_wave",
    "fusion_delta",
    "get_device",
    "latency",
    "legal",
    "schedule",
]
