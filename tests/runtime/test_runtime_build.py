"""Tests for runtime/build.py: compiling, caching and loading the cpu target's C++ kernels.

Every test gets its own STITCH_CACHE_DIR, so "compiles nothing" is checked against a cache
the test itself filled. Kernels take numpy buffers by address (``arr.ctypes.data``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from runtime import build  # noqa: E402

# out[i] = a * x[i] + y[i]; args: x, y, a (1 float), n (1 int64), out, threads (1 int32).
SAXPY = r"""
#include <cstdint>
#if STITCH_OPENMP
#include <omp.h>
#endif

extern "C" int saxpy(void* const* args) {
  const float* x = static_cast<const float*>(args[0]);
  const float* y = static_cast<const float*>(args[1]);
  const float a = *static_cast<const float*>(args[2]);
  const int64_t n = *static_cast<const int64_t*>(args[3]);
  float* out = static_cast<float*>(args[4]);
  int32_t* threads = static_cast<int32_t*>(args[5]);
  // Which build ran: the OpenMP thread count, or -1 when built without OpenMP.
#if STITCH_OPENMP
  *threads = omp_get_max_threads();
#else
  *threads = -1;
#endif
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < n; ++i) out[i] = a * x[i] + y[i];
  return 0;
}
"""


@pytest.fixture(autouse=True)
def kernel_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("STITCH_CACHE_DIR", str(tmp_path / "stitch_cache"))
    return tmp_path / "stitch_cache" / "kernels"


def run_saxpy(kernel: build.Kernel, n: int = 100_003) -> tuple[np.ndarray, np.ndarray, int]:
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal(n, dtype=np.float32), rng.standard_normal(n, dtype=np.float32)
    a, count = np.array([1.5], np.float32), np.array([n], np.int64)
    out, threads = np.empty(n, np.float32), np.zeros(1, np.int32)
    kernel(*(arr.ctypes.data for arr in (x, y, a, count, out, threads)))
    return out, a[0] * x + y, int(threads[0])


def files(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()}


def python(script: str, **env: str) -> subprocess.Popen[str]:
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **env}
    return subprocess.Popen(
        [sys.executable, "-c", script],
        cwd=ROOT,
        env=full_env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def test_openmp_saxpy_matches_numpy(kernel_cache: Path) -> None:
    before = build.stats()
    kernel = build.load_kernel(SAXPY, "saxpy", name="../saxpy kernel!")
    out, expected, threads = run_saxpy(kernel)
    np.testing.assert_allclose(out, expected, rtol=1e-6, atol=1e-6)
    assert build.stats()["compiled"] == before["compiled"] + 1
    # The name is only a sanitised prefix; library and source share one stem in the cache.
    assert kernel.path.parent == kernel_cache and kernel.path.name.startswith("saxpy_kernel-")
    assert kernel.source_path == kernel.path.with_suffix(".cpp")
    assert kernel.source_path.read_text() == SAXPY
    assert (threads >= 1) == build.openmp_available()
    assert ("-fopenmp" in build.default_flags()) == build.openmp_available()


def test_second_load_compiles_nothing_even_in_a_fresh_process(kernel_cache: Path) -> None:
    first = build.load_kernel(SAXPY, "saxpy")
    snapshot, before = files(kernel_cache), build.stats()
    second = build.load_kernel(SAXPY, "saxpy")
    after = build.stats()
    assert (after["compiled"], after["cache_hits"]) == (before["compiled"], before["cache_hits"] + 1)
    assert after["loaded"] == before["loaded"] and second.library is first.library
    assert files(kernel_cache) == snapshot

    script = f"""
import json, numpy as np
from runtime import build
k = build.load_kernel({SAXPY!r}, "saxpy")
x = np.ones(8, np.float32); a = np.array([2], np.float32); n = np.array([8], np.int64)
out = np.zeros(8, np.float32); t = np.zeros(1, np.int32)
k(x.ctypes.data, x.ctypes.data, a.ctypes.data, n.ctypes.data, out.ctypes.data, t.ctypes.data)
print(json.dumps({{**build.stats(), "out": float(out.sum()), "path": str(k.path)}}))
"""
    proc = python(script)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr
    report = json.loads(stdout)
    assert (report["compiled"], report["cache_hits"], report["loaded"]) == (0, 1, 1)
    assert report["out"] == 24.0 and report["path"] == str(first.path)
    assert files(kernel_cache) == snapshot  # not even the OpenMP probe ran again


def test_concurrent_builds_of_one_kernel_all_succeed(kernel_cache: Path, tmp_path: Path) -> None:
    source = SAXPY.replace("saxpy", "saxpy_race")
    go = tmp_path / "go"
    # Each worker warms up (imports, OpenMP probe), says it is ready, and builds on "go".
    script = f"""
import json, pathlib, sys, time
from runtime import build
build.default_flags()
pathlib.Path(sys.argv[1]).touch()
while not pathlib.Path({str(go)!r}).exists():
    time.sleep(0.002)
k = build.load_kernel({source!r}, "saxpy_race")
print(json.dumps({{**build.stats(), "path": str(k.path)}}))
"""
    workers = [python(script.replace("sys.argv[1]", repr(str(tmp_path / f"ready{i}")))) for i in range(4)]
    deadline = time.monotonic() + 60
    while not all((tmp_path / f"ready{i}").exists() for i in range(4)):
        assert time.monotonic() < deadline and all(w.poll() is None for w in workers), "a worker died"
        time.sleep(0.01)
    go.touch()
    reports = []
    for worker in workers:
        stdout, stderr = worker.communicate(timeout=60)
        assert worker.returncode == 0, stderr
        reports.append(json.loads(stdout))

    assert len({r["path"] for r in reports}) == 1
    assert sum(r["compiled"] for r in reports) >= 2, "the workers did not race; the test proves nothing"
    names = files(kernel_cache)
    assert len([n for n in names if n.endswith(".so")]) == 1
    assert not [n for n in names if ".tmp" in n], names  # no temporaries left behind
    out, expected, _ = run_saxpy(build.load_kernel(source, "saxpy_race"))
    np.testing.assert_allclose(out, expected, rtol=1e-6, atol=1e-6)


def test_broken_kernel_raises_build_error_and_keeps_the_source(kernel_cache: Path) -> None:
    broken = 'extern "C" int broken(void* const* args) {\n  return undeclared_thing + 1;\n}\n'
    with pytest.raises(build.BuildError) as info:
        build.load_kernel(broken, "broken")
    err, message = info.value, str(info.value)
    assert "was not declared" in message or "undeclared identifier" in message
    assert err.source_path is not None and err.source_path.exists()
    assert err.source_path.read_text() == broken and err.source_path.parent == kernel_cache
    # The diagnostics and the command name the kept file (the user can open "path:line").
    assert f"{err.source_path}:2" in message and build.compiler() in message
    assert err.command is not None and str(err.source_path) in err.command
    assert not [n for n in files(kernel_cache) if n.endswith(".so") or ".tmp" in n]

    # Thousands of errors: the message keeps the first ~20k characters, not nothing.
    flood = "void f() {\n" + "".join(f"  undeclared_{i} = {i};\n" for i in range(3000)) + "}\n"
    with pytest.raises(build.BuildError) as info:
        build.build_library(flood, name="flood")
    assert "undeclared_0" in str(info.value) and "more characters cut" in str(info.value)
    assert len(info.value.stderr) < 21_000


def test_without_openmp_pragmas_are_ignored_and_results_match(monkeypatch: pytest.MonkeyPatch) -> None:
    with_omp = build.load_kernel(SAXPY, "saxpy") if build.openmp_available() else None
    monkeypatch.setattr(build, "openmp_available", lambda: False)
    flags = build.default_flags()
    assert "-fopenmp" not in flags and "-DSTITCH_OPENMP=0" in flags
    kernel = build.load_kernel(SAXPY, "saxpy")
    out, expected, threads = run_saxpy(kernel)
    np.testing.assert_allclose(out, expected, rtol=1e-6, atol=1e-6)
    assert threads == -1  # built with STITCH_OPENMP=0
    if with_omp is not None:  # other flags, other cache entry
        assert with_omp.path != kernel.path and run_saxpy(with_omp)[2] >= 1


def test_nonzero_return_and_missing_symbol_raise() -> None:
    source = r"""
#include <cstdint>
extern "C" int status(void* const* args) {
  if (args[0] == nullptr) return 5;  // a null buffer (pointer 0 or None)
  return *static_cast<const int32_t*>(args[0]);
}
"""
    kernel = build.load_kernel(source, "status")
    code = np.zeros(1, np.int32)
    kernel(code.ctypes.data)  # returns 0: no error
    code[0] = 7
    with pytest.raises(RuntimeError, match="status.*returned 7"):
        kernel(code.ctypes.data)
    for null in (0, None):
        with pytest.raises(RuntimeError, match="returned 5"):
            kernel(null)
    with pytest.raises(RuntimeError, match="returned 7"):
        kernel.call_packed(kernel.pack(code.ctypes.data))
    with pytest.raises(AttributeError, match="extern"):
        build.load_kernel(source, "no_such_symbol", name="status")


def test_compiler_flags_and_cache_dir_follow_the_environment(
    monkeypatch: pytest.MonkeyPatch, kernel_cache: Path
) -> None:
    assert build.cache_dir() == kernel_cache and kernel_cache.is_dir()
    monkeypatch.setenv("STITCH_CXXFLAGS", "-DEXTRA=1 -g")
    flags = build.default_flags()
    assert flags[-2:] == ["-DEXTRA=1", "-g"] and "-ffast-math" not in flags
    for flag in ("-O3", "-march=native", "-std=c++17", "-fPIC", "-shared", "-fno-math-errno"):
        assert flag in flags
    monkeypatch.setenv("CXX", "no-such-compiler-xyz")
    with pytest.raises(build.BuildError, match="no-such-compiler-xyz"):
        build.compiler()


PRELUDE = "#include <cstdint>\nstatic inline float twice(float x) { return 2.0f * x; }\n"


def scale_kernel(symbol: str, k: float) -> tuple[str, str]:
    return symbol, (f'extern "C" int {symbol}(void* const* args) {{\n'
                    f"  const float* x = (const float*)args[0]; float* y = (float*)args[1];\n"
                    f"  for (int i = 0; i < 5; ++i) y[i] = twice(x[i]) * {k}f;\n  return 0;\n}}\n")


def test_batched_kernels_share_units_and_each_is_found_again(kernel_cache: Path) -> None:
    kernels = [scale_kernel(f"k{i}", i + 0.5) for i in range(5)]
    before = build.stats()
    libs = build.build_kernels(kernels, PRELUDE, parts=2)
    assert build.stats()["compiled"] == before["compiled"] + 2  # two units, five kernels
    assert len(set(libs.values())) == 2
    x = np.arange(5, dtype=np.float32) - 2.0
    for i, (symbol, _) in enumerate(kernels):
        y = np.zeros(5, np.float32)
        build.load_built(libs[symbol], symbol)(x.ctypes.data, y.ctypes.data)
        np.testing.assert_array_equal(y, 2 * x * np.float32(i + 0.5))
    # a later batch that repeats three of them compiles only the new one
    mid = build.stats()
    again = build.build_kernels(kernels[1:4] + [scale_kernel("k9", 9.5)], PRELUDE)
    assert build.stats()["compiled"] == mid["compiled"] + 1
    assert all(again[s] == libs[s] for s, _ in kernels[1:4])


def test_broken_kernel_in_a_batch_names_the_unit_source(kernel_cache: Path) -> None:
    bad = ("broken", 'extern "C" int broken(void* const* args) { return undefined_name; }\n')
    with pytest.raises(build.BuildError) as info:
        build.build_kernels([scale_kernel("fine", 1.0), bad], PRELUDE, parts=1)
    err = info.value
    assert "undefined_name" in str(err) and err.source_path.exists()
    assert "undefined_name" in err.source_path.read_text()
