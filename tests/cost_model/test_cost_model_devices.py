"""Device specs: the GPU tables, name lookup, the fixed CPU spec, and the CPU probe's cache."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import pytest

import cost_model.cpu_probe as probe
from cost_model import CPU_FIXED, KNOWN_DEVICES, SM_80, SM_90, cpu_spec, get_device
from cost_model.devices import KiB, MiB

GPU_TABLE = [
    # (spec, field, expected)
    (SM_80, "num_sms", 108),
    (SM_80, "mem_bandwidth", 1555e9),
    (SM_80, "l2_bytes", 40 * MiB),
    (SM_80, "smem_per_sm", 164 * KiB),
    (SM_80, "smem_per_block", 163 * KiB),
    (SM_80, "smem_per_block_default", 48 * KiB),
    (SM_80, "regs_per_sm", 65536),
    (SM_80, "regs_per_thread_max", 255),
    (SM_80, "regs_per_block", 65536),
    (SM_80, "threads_per_block_max", 1024),
    (SM_80, "threads_per_sm", 2048),
    (SM_80, "blocks_per_sm_max", 32),
    (SM_80, "warp_size", 32),
    (SM_80, "launch_overhead", 4e-6),
    (SM_80, "fp32_flops", 19.5e12),
    (SM_90, "num_sms", 132),
    (SM_90, "mem_bandwidth", 3350e9),
    (SM_90, "l2_bytes", 50 * MiB),
    (SM_90, "smem_per_sm", 228 * KiB),
    (SM_90, "smem_per_block", 227 * KiB),
    (SM_90, "regs_per_sm", 65536),
    (SM_90, "launch_overhead", 3e-6),
    (SM_90, "fp32_flops", 67e12),
]


@pytest.mark.parametrize(
    ("spec", "field", "expected"), GPU_TABLE, ids=[f"{s.name}-{f}" for s, f, _ in GPU_TABLE]
)
def test_gpu_spec_values(spec, field, expected):
    assert getattr(spec, field) == expected


@pytest.mark.parametrize("spec", [SM_80, SM_90], ids=lambda s: s.name)
def test_gpu_spec_is_consistent(spec):
    assert spec.is_gpu and spec.parallel_units == spec.num_sms
    assert spec.smem_per_block + spec.smem_reserved_per_block <= spec.smem_per_sm
    assert spec.transcendental_rate < spec.fp32_flops  # the SFU is the narrow pipe
    assert 0 < spec.mem_efficiency <= 1


@pytest.mark.parametrize(("name", "spec"), [("sm_80", SM_80), ("sm_90", SM_90)])
def test_get_device_gpu(name, spec):
    assert get_device(name) is spec


@pytest.mark.parametrize("name", ["sm_70", "gpu", "", "CPU"])
def test_get_device_unknown_lists_known(name):
    with pytest.raises(ValueError) as err:
        get_device(name)
    for known in KNOWN_DEVICES:
        assert known in str(err.value)


def test_specs_are_frozen_and_hashable():
    with pytest.raises(dataclasses.FrozenInstanceError):
        SM_80.num_sms = 1  # type: ignore[misc]
    assert len({SM_80, SM_90, CPU_FIXED}) == 3


def test_fixed_cpu_spec_is_deterministic_and_clean():
    assert cpu_spec(measure=False) is CPU_FIXED
    assert cpu_spec(measure=False) == dataclasses.replace(CPU_FIXED)
    assert CPU_FIXED.cores == 2 and not CPU_FIXED.is_gpu
    for table in (CPU_FIXED.copy_bw_1, CPU_FIXED.copy_bw_all):
        sizes = [s for s, _ in table]
        bws = [b for _, b in table]
        assert sizes == sorted(sizes)
        assert bws == sorted(bws, reverse=True)


@pytest.fixture
def quick_probe(monkeypatch):
    """Make the real measurement small (a few ms) and count how often it runs."""
    monkeypatch.setattr(probe, "COPY_SIZES", (64 * KiB, 1 * MiB))
    monkeypatch.setattr(probe, "MIN_BYTES_PER_SAMPLE", 2 * MiB)
    monkeypatch.setattr(probe, "SAMPLES", 3)
    calls = []
    real = probe.measure_cpu

    def counted(cores: int, fp: str):
        calls.append(fp)
        return real(cores, fp)

    monkeypatch.setattr(probe, "measure_cpu", counted)
    return calls


def test_cpu_cache_written_once_and_reused(quick_probe, _private_cache: Path):
    first = get_device("cpu")
    assert len(quick_probe) == 1
    files = list((_private_cache / "devices").glob("cpu-*.json"))
    assert len(files) == 1
    mtime = files[0].stat().st_mtime_ns

    second = get_device("cpu")
    assert len(quick_probe) == 1, "the second lookup must not measure"
    assert files[0].stat().st_mtime_ns == mtime
    assert second == first
    assert first.cores == len(os.sched_getaffinity(0))
    assert first.fingerprint == probe.fingerprint(probe.cpu_model_name(), first.cores)
    assert json.loads(files[0].read_text())["fingerprint"] == first.fingerprint


def test_measured_tables_are_monotone(quick_probe):
    spec = get_device("cpu")
    for table in (spec.copy_bw_1, spec.copy_bw_all):
        bws = [b for _, b in table]
        assert bws == sorted(bws, reverse=True) and bws[-1] > 0
    for (_, one), (_, everyone) in zip(spec.copy_bw_1, spec.copy_bw_all):
        assert everyone >= one
    assert 0 < spec.launch_overhead < 1e-3


def test_cpu_cache_keyed_by_fingerprint(quick_probe, monkeypatch, _private_cache):
    get_device("cpu")
    monkeypatch.setattr(probe, "cpu_model_name", lambda: "Another CPU")
    other = get_device("cpu")
    assert len(quick_probe) == 2 and other.fingerprint.startswith("Another CPU")
    assert len(list((_private_cache / "devices").glob("cpu-*.json"))) == 2


def test_cpu_fingerprint_tells_vector_extensions_apart(quick_probe, monkeypatch, _private_cache):
    """Two VMs both named "AMD EPYC", one with AVX-512 and one without, run different kernels:
    their specs, records and learned models must not be taken for each other's."""
    monkeypatch.setattr(probe, "cpu_model_name", lambda: "AMD EPYC")
    monkeypatch.setattr(probe, "vector_isa", lambda: "avx512")
    wide = get_device("cpu")
    monkeypatch.setattr(probe, "vector_isa", lambda: "avx2")
    narrow = get_device("cpu")
    assert len(quick_probe) == 2
    assert wide.fingerprint == f"AMD EPYC|avx512|{wide.cores} cores"
    assert narrow.fingerprint == f"AMD EPYC|avx2|{narrow.cores} cores"


@pytest.mark.parametrize(
    "content",
    [
        "not json",
        "[1, 2]",
        '{"version": 0}',
        '{"version": 1}',
        '{"version": 1, "fingerprint": "FP"}',
        '{"version": 1, "fingerprint": "FP", "spec": {"no_such_field": 1}}',
    ],
)
def test_bad_cache_file_is_measured_again(quick_probe, _private_cache, content):
    fp = probe.fingerprint(probe.cpu_model_name(), probe.usable_cores())
    path = probe.cache_path(fp)
    path.parent.mkdir(parents=True)
    path.write_text(content.replace("FP", fp))
    spec = get_device("cpu")
    assert len(quick_probe) == 1
    assert json.loads(path.read_text())["fingerprint"] == spec.fingerprint


def test_noisy_measurements_are_cleaned(monkeypatch):
    # A larger copy measured faster (noise) and all cores slower than one thread.
    noisy = {(64 * KiB, 1): 10e9, (1 * MiB, 1): 12e9, (64 * KiB, 2): 8e9, (1 * MiB, 2): 20e9}
    monkeypatch.setattr(probe, "COPY_SIZES", (64 * KiB, 1 * MiB))
    monkeypatch.setattr(probe, "_copy_bandwidth", lambda size, threads: noisy[size, threads])
    spec = probe.measure_cpu(2, "test cpu|2 cores")
    assert spec.copy_bw_1 == ((128 * KiB, 10e9), (2 * MiB, 10e9))
    assert spec.copy_bw_all == ((128 * KiB, 10e9), (2 * MiB, 10e9))


def test_cache_dir_default(monkeypatch):
    monkeypatch.delenv("STITCH_CACHE_DIR")
    assert probe.cache_dir_default() == Path.home() / ".cache" / "stitch"


def _fake_sysfs(root: Path, entries: list[tuple[int, str, str]]) -> Path:
    for i, (level, kind, size) in enumerate(entries):
        d = root / f"index{i}"
        d.mkdir(parents=True)
        (d / "level").write_text(f"{level}\n")
        (d / "type").write_text(f"{kind}\n")
        (d / "size").write_text(f"{size}\n")
    return root


@pytest.mark.parametrize(
    ("entries", "expected"),
    [
        (
            [(1, "Data", "32K"), (1, "Instruction", "64K"), (2, "Unified", "512K"), (3, "Unified", "32768K")],
            (32 * KiB, 512 * KiB, 32 * MiB),
        ),
        ([(1, "Data", "48K"), (2, "Unified", "2M")], (48 * KiB, 2 * MiB, 32 * MiB)),
        ([], (48 * KiB, 1 * MiB, 32 * MiB)),
    ],
)
def test_read_cache_sizes(tmp_path, entries, expected):
    assert probe.read_cache_sizes(_fake_sysfs(tmp_path / "cache", entries)) == expected


def test_read_cache_sizes_unreadable(tmp_path):
    root = _fake_sysfs(tmp_path / "cache", [(1, "Data", "lots")])
    assert probe.read_cache_sizes(root) == (48 * KiB, 1 * MiB, 32 * MiB)


def test_cost_model_imports_neither_torch_nor_passes():
    import subprocess
    import sys

    code = (
        "import sys, cost_model, cost_model.analytic; "
        "bad = [m for m in sys.modules if m.split('.')[0] in ('torch', 'passes')]; "
        "assert not bad, bad"
    )
    root = Path(__file__).resolve().parents[2]
    subprocess.run([sys.executable, "-c", code], check=True, cwd=root)
