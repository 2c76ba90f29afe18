"""The host CPU as a `DeviceSpec`: probed from the OS, copy bandwidth measured with numpy.

Invariants:
- `cpu_spec(measure=False)` is `CPU_FIXED`: identical on every machine, for tests and for
  deterministic plans.
- `cpu_spec(measure=True)` measures at most once per machine fingerprint (cpu model name,
  widest vector extension, usable core count): the result lives in
  `$STITCH_CACHE_DIR/devices/cpu-<hash>.json` (default `~/.cache/stitch`), written
  atomically; a file with the same fingerprint and format version is reused as is, anything
  else is measured again and overwritten.
- Measured bandwidth tables are cleaned so that bandwidth never rises with working-set
  size and the all-core table is never below the one-thread table (noise must not make
  the model non-monotone).
"""

from __future__ import annotations

import hashlib
import json
import os
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np

from cost_model.devices import DeviceSpec, KiB, MiB

CACHE_VERSION = 1

# Array sizes copied by the probe. A copy's working set is twice its size (source and
# destination); the tables are keyed by working set, which is what a kernel's
# bytes_read + bytes_written is compared with.
COPY_SIZES: tuple[int, ...] = (256 * KiB, 4 * MiB, 32 * MiB, 128 * MiB)
# Each timed sample copies at least this many bytes, so that thread dispatch (~50 us)
# stays small next to the copies it times.
MIN_BYTES_PER_SAMPLE = 32 * MiB
SAMPLES = 5

# Not measured (numpy cannot show what a vectorised C++ loop reaches): one core's FP32
# throughput and vectorised exp / erf rate, from the fused C++ kernels of ANCHORS.md
# (bias + GELU(erf), 16.7 M erf in 9.9 ms on 2 cores: ~0.85 G erf/s per core).
FLOPS_PER_CORE = 16e9
TRANSCENDENTALS_PER_CORE = 1e9
# An OpenMP barrier among a few threads costs about a microsecond.
CPU_BARRIER = 1e-6

_DEFAULT_CACHES = (48 * KiB, 1 * MiB, 32 * MiB)

# The fixed spec: a 2-core VM like the one ANCHORS.md measured (64 MiB working set:
# ~35 GB/s with 2 threads, ~10 GB/s with 1; a 128 MiB copy about half as fast as 32 MiB).
CPU_FIXED = DeviceSpec(
    name="cpu",
    kind="cpu",
    description="fixed 2-core CPU spec (deterministic, not measured)",
    mem_bandwidth=17e9,
    launch_overhead=2e-6,
    fp32_flops=2 * FLOPS_PER_CORE,
    transcendental_rate=2 * TRANSCENDENTALS_PER_CORE,
    barrier_base=CPU_BARRIER,
    l1_bytes=_DEFAULT_CACHES[0],
    l2_bytes=_DEFAULT_CACHES[1],
    l3_bytes=_DEFAULT_CACHES[2],
    cores=2,
    copy_bw_1=((512 * KiB, 40e9), (8 * MiB, 20e9), (64 * MiB, 10e9), (256 * MiB, 9e9)),
    copy_bw_all=((512 * KiB, 80e9), (8 * MiB, 50e9), (64 * MiB, 35e9), (256 * MiB, 17e9)),
)


def cpu_spec(measure: bool = True, cache_dir: str | Path | None = None) -> DeviceSpec:
    """The host's spec: cached measurement (`measure=True`) or `CPU_FIXED`."""
    if not measure:
        return CPU_FIXED
    cores = usable_cores()
    fp = fingerprint(cpu_model_name(), cores)
    path = cache_path(fp, cache_dir)
    cached = _load(path, fp)
    if cached is not None:
        return cached
    spec = measure_cpu(cores, fp)
    _store(path, spec)
    return spec


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def cpu_model_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine() or "unknown"


def vector_isa() -> str:
    """The widest vector extension the generated code can use (``-march=native``): a VM's model
    name is often generic ("AMD EPYC"), while its kernels, and so its timings, differ with it."""
    flags: set[str] = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    for isa, needs in (("avx512", {"avx512f", "avx512vl", "avx512bw"}), ("avx2", {"avx2", "fma"}),
                       ("sve", {"sve"}), ("neon", {"asimd"})):
        if needs <= flags:
            return isa
    import platform

    return platform.machine() or "unknown"


def fingerprint(model: str, cores: int, isa: str | None = None) -> str:
    """``model|isa|N cores``: what a measured spec, a record or a learned model is valid for."""
    return f"{model}|{vector_isa() if isa is None else isa}|{cores} cores"


def cache_dir_default() -> Path:
    env = os.environ.get("STITCH_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "stitch"


def cache_path(fp: str, cache_dir: str | Path | None = None) -> Path:
    root = Path(cache_dir) if cache_dir is not None else cache_dir_default()
    digest = hashlib.sha256(fp.encode()).hexdigest()[:16]
    return root / "devices" / f"cpu-{digest}.json"


def read_cache_sizes(root: Path = Path("/sys/devices/system/cpu/cpu0/cache")) -> tuple[int, int, int]:
    """(L1d, L2, L3) bytes of cpu0 from sysfs; defaults for levels it does not show."""
    sizes = dict(zip((1, 2, 3), _DEFAULT_CACHES))
    try:
        for index in sorted(root.glob("index*")):
            kind = (index / "type").read_text().strip()
            if kind == "Instruction":
                continue
            level = int((index / "level").read_text())
            if level in sizes:
                sizes[level] = _parse_size((index / "size").read_text())
    except (OSError, ValueError):
        return _DEFAULT_CACHES
    return sizes[1], sizes[2], sizes[3]


def _parse_size(text: str) -> int:
    text = text.strip().upper()
    scale = {"K": KiB, "M": MiB, "G": 1024 * MiB}.get(text[-1:], 1)
    return int(text.rstrip("KMG")) * scale


def measure_cpu(cores: int, fp: str) -> DeviceSpec:
    """Measure copy bandwidth (1 thread and all cores) and a tiny op's overhead."""
    bw_1, bw_all = [], []
    for size in COPY_SIZES:
        bw_1.append((2 * size, _copy_bandwidth(size, 1)))
        bw_all.append((2 * size, _copy_bandwidth(size, cores)))
    bw_1 = _non_increasing(bw_1)
    bw_all = _non_increasing([(ws, max(a, b)) for (ws, a), (_, b) in zip(bw_all, bw_1)])
    l1, l2, l3 = read_cache_sizes()
    return DeviceSpec(
        name="cpu",
        kind="cpu",
        description=f"{fp} (measured)",
        mem_bandwidth=bw_all[-1][1],
        launch_overhead=_tiny_op_seconds(),
        fp32_flops=cores * FLOPS_PER_CORE,
        transcendental_rate=cores * TRANSCENDENTALS_PER_CORE,
        barrier_base=CPU_BARRIER,
        l1_bytes=l1,
        l2_bytes=l2,
        l3_bytes=l3,
        cores=cores,
        copy_bw_1=tuple(bw_1),
        copy_bw_all=tuple(bw_all),
        fingerprint=fp,
    )


def _copy_bandwidth(size: int, threads: int) -> float:
    """Median bytes/s (read + written) of copying `size` bytes, split over `threads`."""
    src = np.ones(size // 4, dtype=np.float32)
    dst = np.empty_like(src)
    reps = max(1, MIN_BYTES_PER_SAMPLE // size)
    bounds = np.linspace(0, src.size, threads + 1).astype(int)
    chunks = [(dst[a:b], src[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]

    def work(chunk: tuple[np.ndarray, np.ndarray]) -> None:
        d, s = chunk
        for _ in range(reps):
            np.copyto(d, s)  # releases the GIL: the threads copy in parallel

    samples = []
    with ThreadPoolExecutor(max_workers=threads) as pool:
        list(pool.map(work, chunks))  # warm-up: page faults, thread start
        for _ in range(SAMPLES):
            t0 = time.perf_counter()
            list(pool.map(work, chunks))
            samples.append(time.perf_counter() - t0)
    return 2 * size * reps / statistics.median(samples)


def _tiny_op_seconds() -> float:
    """Median time of a 16-element numpy add: a stand-in for one kernel's fixed cost."""
    a = np.ones(16, dtype=np.float32)
    out = np.empty_like(a)
    samples = []
    for _ in range(7):
        t0 = time.perf_counter()
        for _ in range(200):
            np.add(a, a, out=out)
        samples.append((time.perf_counter() - t0) / 200)
    return statistics.median(samples)


def _non_increasing(table: list[tuple[int, float]]) -> list[tuple[int, float]]:
    # A larger working set never fits a faster cache level: a rise is measurement noise.
    out, best = [], float("inf")
    for ws, bw in table:
        best = min(best, bw)
        out.append((ws, best))
    return out


def _load(path: Path, fp: str) -> DeviceSpec | None:
    """The cached spec, or None when the file is missing, stale or unreadable."""
    try:
        data = json.loads(path.read_text())
        if data.get("version") != CACHE_VERSION or data.get("fingerprint") != fp:
            return None
        fields = dict(data["spec"])
        fields["copy_bw_1"] = tuple((int(w), float(b)) for w, b in fields["copy_bw_1"])
        fields["copy_bw_all"] = tuple((int(w), float(b)) for w, b in fields["copy_bw_all"])
        return replace(CPU_FIXED, **fields)
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        # Missing, not JSON, or written by another version of DeviceSpec: measure again.
        return None


def _store(path: Path, spec: DeviceSpec) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"version": CACHE_VERSION, "fingerprint": spec.fingerprint, "spec": asdict(spec)}
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(payload, indent=1))
    os.replace(tmp, path)  # atomic: a concurrent reader sees the old file or the new one
