"""Device specifications as data: `sm_80` (A100), `sm_90` (H100) and the host `cpu`.

Invariants:
- A `DeviceSpec` is frozen and hashable; the analytic model reads nothing about a device
  except its spec, so a spec fully determines every estimate made for it.
- Units are SI: bytes, seconds, bytes/s, operations/s. Whole-device rates (bandwidth,
  FLOP/s, transcendental results/s) describe all SMs or all cores together.
- GPU-only fields keep their defaults (0) in a CPU spec, CPU-only ones (0 / empty) in a
  GPU spec; `parallel_units` is SMs or cores.
- The CPU copy-bandwidth tables are sorted by working-set size, and bandwidth never rises
  with size (a bigger working set never fits a faster cache level); so time = bytes /
  bandwidth(bytes) is monotone in bytes.
- `get_device("cpu")` measures the host at most once per machine fingerprint and caches
  the result as JSON under `$STITCH_CACHE_DIR` (see `cost_model.cpu_probe`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

KiB = 1024
MiB = 1024 * KiB


@dataclass(frozen=True)
class DeviceSpec:
    """Everything the analytic cost model knows about one target."""

    name: str
    kind: Literal["gpu", "cpu"]
    description: str

    # --- both kinds -------------------------------------------------------------------
    mem_bandwidth: float  # peak DRAM bytes/s (GPU); all-core large-copy bytes/s (CPU)
    launch_overhead: float  # seconds per kernel launch (GPU) / parallel region (CPU)
    fp32_flops: float  # FP32 FLOP/s of the whole device (an FMA counts 2)
    transcendental_rate: float  # exp/erf/tanh/log/rsqrt results per second, whole device
    barrier_base: float  # seconds for one grid-wide barrier (GPU) / OpenMP barrier (CPU)
    barrier_per_block: float = 0.0  # extra barrier seconds per participating block (GPU)
    l1_bytes: int = 0  # per SM (GPU: L1 + shared memory pool) / per core (CPU: L1d)
    l2_bytes: int = 0  # whole GPU / per core (CPU)
    l3_bytes: int = 0  # CPU last-level cache; 0 on GPUs

    # --- GPU --------------------------------------------------------------------------
    num_sms: int = 0
    smem_per_sm: int = 0
    smem_per_block: int = 0  # maximum with the dynamic shared-memory opt-in
    smem_per_block_default: int = 0  # static limit without the opt-in (48 KiB)
    smem_reserved_per_block: int = 0  # the driver keeps 1 KiB per resident block (sm_80+)
    regs_per_sm: int = 0
    regs_per_thread_max: int = 0
    regs_per_block: int = 0
    reg_alloc_unit: int = 0  # registers are allocated per warp in units of this many
    threads_per_block_max: int = 0
    threads_per_sm: int = 0
    blocks_per_sm_max: int = 0
    warp_size: int = 0
    mem_latency: float = 0.0  # seconds for a DRAM round trip (Little's law: bytes in flight)
    mem_efficiency: float = 1.0  # best achievable fraction of peak DRAM bandwidth

    # --- CPU --------------------------------------------------------------------------
    cores: int = 0
    # (working-set bytes, bytes/s) of a copy with 1 thread / with all cores; see invariants.
    copy_bw_1: tuple[tuple[int, float], ...] = ()
    copy_bw_all: tuple[tuple[int, float], ...] = ()
    fingerprint: str = ""  # cpu model name + core count; "" for fixed specs

    @property
    def is_gpu(self) -> bool:
        return self.kind == "gpu"

    @property
    def parallel_units(self) -> int:
        """SMs on a GPU, cores on a CPU: what a wave of work is spread over."""
        return self.num_sms if self.is_gpu else self.cores


# A100-SXM4-40GB. FP32: 108 SMs x 64 FMA lanes x 2 x 1.41 GHz = 19.5 TFLOP/s. SFU: 16
# results/clock/SM (CUDA guide, cc 8.0) x 108 x 1.41 GHz. The barrier constants reproduce
# AStitch's "<= 2.7 us at 160 blocks" (measured on a V100; no better public number).
SM_80 = DeviceSpec(
    name="sm_80",
    kind="gpu",
    description="NVIDIA A100-SXM4-40GB (sm_80)",
    mem_bandwidth=1555e9,
    launch_overhead=4e-6,
    fp32_flops=19.5e12,
    transcendental_rate=16 * 108 * 1.41e9,
    barrier_base=1.5e-6,
    barrier_per_block=7.5e-9,
    l1_bytes=192 * KiB,
    l2_bytes=40 * MiB,
    num_sms=108,
    smem_per_sm=164 * KiB,
    smem_per_block=163 * KiB,
    smem_per_block_default=48 * KiB,
    smem_reserved_per_block=1 * KiB,
    regs_per_sm=65536,
    regs_per_thread_max=255,
    regs_per_block=65536,
    reg_alloc_unit=256,
    threads_per_block_max=1024,
    threads_per_sm=2048,
    blocks_per_sm_max=32,
    warp_size=32,
    mem_latency=500e-9,
    mem_efficiency=0.9,
)

# H100-SXM5-80GB. FP32: 132 SMs x 128 lanes x 2 x 1.98 GHz = 67 TFLOP/s; SFU as on sm_80
# per clock. Best memory-bound kernels hold ~3 TB/s of 3.35 (QuACK): efficiency 0.9.
SM_90 = DeviceSpec(
    name="sm_90",
    kind="gpu",
    description="NVIDIA H100-SXM5 (sm_90)",
    mem_bandwidth=3350e9,
    launch_overhead=3e-6,
    fp32_flops=67e12,
    transcendental_rate=16 * 132 * 1.98e9,
    barrier_base=1.5e-6,
    barrier_per_block=7.5e-9,
    l1_bytes=256 * KiB,
    l2_bytes=50 * MiB,
    num_sms=132,
    smem_per_sm=228 * KiB,
    smem_per_block=227 * KiB,
    smem_per_block_default=48 * KiB,
    smem_reserved_per_block=1 * KiB,
    regs_per_sm=65536,
    regs_per_thread_max=255,
    regs_per_block=65536,
    reg_alloc_unit=256,
    threads_per_block_max=1024,
    threads_per_sm=2048,
    blocks_per_sm_max=32,
    warp_size=32,
    mem_latency=550e-9,
    mem_efficiency=0.9,
)

GPU_SPECS: dict[str, DeviceSpec] = {SM_80.name: SM_80, SM_90.name: SM_90}
KNOWN_DEVICES: tuple[str, ...] = ("cpu", SM_80.name, SM_90.name)


def get_device(name: str) -> DeviceSpec:
    """The spec called `name` ("cpu", "sm_80", "sm_90").

    "cpu" is the measured host (measured once per machine, then read from the cache);
    use `cpu_spec(measure=False)` for the fixed, machine-independent CPU spec.
    """
    if name in GPU_SPECS:
        return GPU_SPECS[name]
    if name == "cpu":
        # Imported here so that GPU-only users never touch the probe (it reads /sys).
        from cost_model.cpu_probe import cpu_spec

        return cpu_spec(measure=True)
    raise ValueError(f"unknown device {name!r}; known devices: {', '.join(KNOWN_DEVICES)}")
