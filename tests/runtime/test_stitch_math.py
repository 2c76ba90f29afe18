"""The float32 math of the cpu target (codegen/cpp/stitch_math.h) against float64 numpy.

Each function is evaluated by a small kernel built with the kernels' own flags over a sweep of
values: dense in the range where the result is a normal float, the ends of that range, and the
special values (NaN, +-inf, +-0, subnormals). The loop is the vectorised one the kernels use.
"""

from __future__ import annotations

import math
import platform
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from runtime import build  # noqa: E402

MATH_H = (ROOT / "codegen" / "cpp" / "stitch_math.h").read_text()

SOURCE = MATH_H + r"""
extern "C" int eval(void* const* args) {
  const float* __restrict x = (const float*)args[0];
  float* __restrict out = (float*)args[1];
  const int64_t n = *(const int64_t*)args[2];
  const int64_t which = *(const int64_t*)args[3];
  #pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const float v = x[i];
    out[i] = which == 0 ? st_exp(v) : which == 1 ? st_erf(v) : which == 2 ? st_tanh(v)
           : st_sigmoid(v);
  }
  return 0;
}
"""

FUNCS = {"exp": (0, np.exp), "erf": (1, np.vectorize(math.erf)), "tanh": (2, np.tanh),
         "sigmoid": (3, lambda x: 1.0 / (1.0 + np.exp(-x)))}
SPECIAL = np.array([np.nan, np.inf, -np.inf, 0.0, -0.0, 1e-45, -1e-45, 1e-38, -1e-38,
                    88.0, 88.72, 88.7229, 89.0, 1e30, -86.9, -87.0, -87.4, -104.0, -1e30],
                   dtype=np.float32)


@pytest.fixture(scope="module")
def kernel(tmp_path_factory):
    import os

    os.environ.setdefault("STITCH_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
    return build.load_kernel(SOURCE, "eval", name="stitch_math_eval")


def evaluate(kernel, name: str, x: np.ndarray) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    out = np.empty_like(x)
    n = np.array([x.size], dtype=np.int64)
    which = np.array([FUNCS[name][0]], dtype=np.int64)
    kernel(x.ctypes.data, out.ctypes.data, n.ctypes.data, which.ctypes.data)
    return out


def ulps(got: np.ndarray, want64: np.ndarray) -> np.ndarray:
    """Distance in units of the float32 spacing at the true value."""
    want = want64.astype(np.float32)
    spacing = np.spacing(np.abs(want)).astype(np.float64)
    return np.abs(got.astype(np.float64) - want64) / spacing


@pytest.mark.parametrize("name,lo,hi,max_ulp", [
    ("exp", -86.9, 88.7, 2.0),
    ("erf", -6.0, 6.0, 8.0),
    ("tanh", -12.0, 12.0, 4.0),
    ("sigmoid", -80.0, 30.0, 4.0),
])
def test_accuracy_over_range(kernel, name, lo, hi, max_ulp):
    rng = np.random.default_rng(1)
    x = np.concatenate([np.linspace(lo, hi, 200_003, dtype=np.float32),
                        rng.uniform(-1, 1, 10_001).astype(np.float32),
                        rng.uniform(lo, hi, 10_001).astype(np.float32)])
    got = evaluate(kernel, name, x)
    want = FUNCS[name][1](x.astype(np.float64))
    u = ulps(got, want)
    if name in ("erf", "tanh"):  # near 0 the result is tiny; judge by absolute error there
        u = np.where(np.abs(want) < 1e-3, np.abs(got - want) / 1e-9, u)
    worst = int(np.argmax(u))
    assert u[worst] <= max_ulp, f"{name}({x[worst]!r}) = {got[worst]!r}, want {want[worst]!r}"


@pytest.mark.parametrize("name", list(FUNCS))
def test_special_values(kernel, name):
    got = evaluate(kernel, name, SPECIAL)
    with np.errstate(all="ignore"):
        want = FUNCS[name][1](SPECIAL.astype(np.float64)).astype(np.float32)
    assert np.array_equal(np.isnan(got), np.isnan(want)), (SPECIAL, got, want)
    ok = np.isnan(want) | np.isclose(got, want, rtol=3e-7, atol=2e-38)
    assert ok.all(), [(float(a), float(b), float(c)) for a, b, c, k in
                      zip(SPECIAL, got, want, ok) if not k]


HALF_SOURCE = MATH_H + r"""
extern "C" int widen(void* const* args) {
  const uint16_t* __restrict h = (const uint16_t*)args[0];
  float* __restrict out = (float*)args[1];
  const int64_t n = *(const int64_t*)args[2];
  const int64_t bf = *(const int64_t*)args[3];
  #pragma omp simd
  for (int64_t i = 0; i < n; ++i) out[i] = bf ? st_bf2f(h[i]) : st_h2f(h[i]);
  return 0;
}
extern "C" int round_bf(void* const* args) {
  const float* __restrict x = (const float*)args[0];
  float* __restrict out = (float*)args[1];
  const int64_t n = *(const int64_t*)args[2];
  #pragma omp simd
  for (int64_t i = 0; i < n; ++i) out[i] = st_round_bf(x[i]);
  return 0;
}
extern "C" int round_h(void* const* args) {
  const float* __restrict x = (const float*)args[0];
  float* __restrict out = (float*)args[1];
  const int64_t n = *(const int64_t*)args[2];
  #pragma omp simd
  for (int64_t i = 0; i < n; ++i) out[i] = st_round_h(x[i]);
  return 0;
}
extern "C" int round_h_row(void* const* args) {
  const float* __restrict x = (const float*)args[0];
  float* __restrict out = (float*)args[1];
  const int64_t n = *(const int64_t*)args[2];
  std::memcpy(out, x, n * sizeof(float));
  st_round_h_row(out, n);
  return 0;
}
extern "C" int narrow(void* const* args) {
  const float* __restrict x = (const float*)args[0];
  uint16_t* __restrict out = (uint16_t*)args[1];
  const int64_t n = *(const int64_t*)args[2];
  const int64_t bf = *(const int64_t*)args[3];
  #pragma omp simd
  for (int64_t i = 0; i < n; ++i) out[i] = bf ? st_f2bf(x[i]) : st_f2h(x[i]);
  return 0;
}
"""


@pytest.mark.parametrize("bf", [False, True], ids=["f16", "bf16"])
def test_half_conversions_match_torch_bit_for_bit(kernel, bf):
    """Every f16 / bf16 bit pattern widens as torch widens it; random float32 bit patterns (all
    exponents: subnormals, overflow, inf, NaN), normal values and the rounding edges narrow as
    torch narrows them (nearest even, NaN stays NaN)."""
    import torch

    half = torch.bfloat16 if bf else torch.float16
    widen = build.load_kernel(HALF_SOURCE, "widen", name="stitch_half_widen")
    narrow = build.load_kernel(HALF_SOURCE, "narrow", name="stitch_half_narrow")
    flag = np.array([int(bf)], dtype=np.int64)
    bits = torch.arange(65536, dtype=torch.int32).to(torch.int16)
    out = torch.empty(65536, dtype=torch.float32)
    widen(bits.data_ptr(), out.data_ptr(), np.array([65536], dtype=np.int64).ctypes.data,
          flag.ctypes.data)
    want = bits.view(half).float()
    same = (out == want) | (out.isnan() & want.isnan())
    assert bool(same.all()), bits[~same][:8]
    gen = torch.Generator().manual_seed(0)
    x = torch.cat([
        torch.randint(-2**31, 2**31 - 1, (1 << 20,), generator=gen, dtype=torch.int64)
        .to(torch.int32).view(torch.float32),
        torch.randn(1 << 18, generator=gen) * 300, torch.randn(1 << 18, generator=gen) * 1e-5,
        torch.tensor([65504.0, 65519.99, 65520.0, 65536.0, 2.0**-24, 2.0**-25, 3 * 2.0**-26,
                      6.1e-5, 3.3895e38, 3.4e38, float("inf"), -float("inf"), float("nan"),
                      0.0, -0.0, 1e-45])])
    got = torch.empty(x.numel(), dtype=torch.int16)
    narrow(x.data_ptr(), got.data_ptr(), np.array([x.numel()], dtype=np.int64).ctypes.data,
           flag.ctypes.data)
    want = x.to(half)
    ok = (got == want.view(torch.int16)) | (got.view(half).isnan() & want.isnan())
    assert bool(ok.all()), (x[~ok][:8], got[~ok][:8], want.view(torch.int16)[~ok][:8])


DAZ_SOURCE = MATH_H + r"""
#include <xmmintrin.h>
extern "C" int widen_daz(void* const* args) {
  const uint16_t* __restrict h = (const uint16_t*)args[0];
  float* __restrict out = (float*)args[1];
  const int64_t n = *(const int64_t*)args[2];
  const unsigned int saved = _mm_getcsr();
  _mm_setcsr(saved | 0x8040u);  // denormal operands are zero, denormal results flush to zero
  #pragma omp simd
  for (int64_t i = 0; i < n; ++i) out[i] = st_h2f(h[i]);
  _mm_setcsr(saved);
  return 0;
}
"""


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"),
                    reason="sets x86's denormals-are-zero flag (MXCSR); other CPUs have none")
def test_float16_widening_does_no_arithmetic_on_denormals():
    """Every float16 widens exactly even with denormal operands read as zero (MXCSR DAZ): the
    widening never feeds a float denormal to an arithmetic instruction, which costs a microcode
    assist per element on Intel cores (a float16 GIN training step whose gradients were float16
    subnormals ran 16x slower than in float32)."""
    import torch

    widen = build.load_kernel(DAZ_SOURCE, "widen_daz", name="stitch_half_widen_daz")
    bits = torch.arange(65536, dtype=torch.int32).to(torch.int16)
    out = torch.empty(65536, dtype=torch.float32)
    widen(bits.data_ptr(), out.data_ptr(), np.array([65536], dtype=np.int64).ctypes.data)
    want = bits.view(torch.float16).float()
    same = (out == want) | (out.isnan() & want.isnan())
    assert bool(same.all()), (bits[~same][:8], out[~same][:8])


@pytest.mark.parametrize("name", ["round_h", "round_h_row", "round_bf"])
def test_half_rounding_in_float_matches_a_round_trip(kernel, name):
    """st_round_h / st_round_bf (a kernel's rounding of a half intermediate, in float) and
    st_round_h_row (a row of them, by the conversion instructions; the tail of a row not a
    multiple of 16 by st_round_h) are torch's float -> half -> float for every float32 bit
    pattern class: random bits (subnormals, overflow to inf, NaN), normal values, half's
    subnormal range and the rounding edges."""
    import torch

    bf = name == "round_bf"
    fn = build.load_kernel(HALF_SOURCE, name, name=f"stitch_half_{name}")
    half = torch.bfloat16 if bf else torch.float16
    gen = torch.Generator().manual_seed(1)
    x = torch.cat([
        torch.randint(-2**31, 2**31 - 1, (1 << 20,), generator=gen, dtype=torch.int64)
        .to(torch.int32).view(torch.float32),
        torch.randn(1 << 18, generator=gen) * 300, torch.randn(1 << 18, generator=gen) * 1e-5,
        torch.randn(1 << 16, generator=gen) * 2.0**-20,
        torch.tensor([3.3895e38, 3.4e38, float("inf"), -float("inf"), float("nan"), 0.0, -0.0,
                      1e-45, 1.0 + 2.0**-8, 1.0 + 3 * 2.0**-8, -(1.0 + 2.0**-8), 65504.0,
                      65519.99, 65520.0, -65520.0, 65536.0, 2.0**-24, 2.0**-25, 3 * 2.0**-26,
                      2.0**-14, 2.0**-14 - 2.0**-25, 6.1e-5, 1.0 + 2.0**-11, 1.0 + 3 * 2.0**-11])])
    got = torch.empty_like(x)
    fn(x.data_ptr(), got.data_ptr(), np.array([x.numel()], dtype=np.int64).ctypes.data)
    want = x.to(half).float()
    ok = (got == want) | (got.isnan() & want.isnan())
    assert bool(ok.all()), (x[~ok][:8], got[~ok][:8], want[~ok][:8])


DOUBLE_SOURCE = MATH_H + r"""
// one loop per function, as a kernel has it (a run-time choice inside one loop kept GCC from
// if-converting it once sigmoid became branch-free arithmetic)
template <typename F> static inline void each(const double* __restrict x, double* __restrict out,
                                              int64_t n, F f) {
  #pragma omp simd
  for (int64_t i = 0; i < n; ++i) out[i] = f(x[i]);
}
extern "C" int eval64(void* const* args) {
  const double* __restrict x = (const double*)args[0];
  double* __restrict out = (double*)args[1];
  const int64_t n = *(const int64_t*)args[2];
  const int64_t which = *(const int64_t*)args[3];
  if (which == 0) each(x, out, n, [](double v) { return st_exp(v); });
  else if (which == 1) each(x, out, n, [](double v) { return st_erf(v); });
  else if (which == 2) each(x, out, n, [](double v) { return st_tanh(v); });
  else each(x, out, n, [](double v) { return st_sigmoid(v); });
  return 0;
}
"""


@pytest.mark.parametrize("name,max_ulp", [("exp", 2.0), ("erf", 2.0), ("tanh", 2.0),
                                          ("sigmoid", 3.0)])
def test_float64_math_against_libm(tmp_path_factory, name, max_ulp):
    """float64 exp, erf, tanh and sigmoid: within a few ulp of libm over their whole range (exp's
    subnormal results included; sigmoid in eager's form, 1 / (1 + e^-x)), special values as
    libm's, and vectorised by GCC."""
    import os

    os.environ.setdefault("STITCH_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
    k = build.load_kernel(DOUBLE_SOURCE, "eval64", name="stitch_math_eval64")
    rng = np.random.default_rng(2)
    x = np.concatenate([np.linspace(-745.2, 709.9, 300_007), rng.normal(0, 4, 50_001),
                        rng.uniform(-1, 1, 50_001),
                        [np.nan, np.inf, -np.inf, 0.0, -0.0, 5e-324, -5e-324, 1e-300, 0.625,
                         -0.625, 20.0, -20.0, -708.39, -708.4, -745.13, -745.14, 709.78,
                         709.79]])
    out = np.empty_like(x)
    n = np.array([x.size], dtype=np.int64)
    which = np.array([{"exp": 0, "erf": 1, "tanh": 2, "sigmoid": 3}[name]], dtype=np.int64)
    k(x.ctypes.data, out.ctypes.data, n.ctypes.data, which.ctypes.data)
    with np.errstate(all="ignore"):
        want = {"exp": np.exp, "tanh": np.tanh, "erf": np.vectorize(math.erf),
                # eager's form: 0 where e^-x overflows (x < -709.78), as torch.sigmoid gives
                "sigmoid": lambda v: 1 / (1 + np.exp(-v))}[name](x)
    assert np.array_equal(np.isnan(out), np.isnan(want))
    fin = np.isfinite(want)
    assert np.array_equal(out[~fin & ~np.isnan(want)], want[~fin & ~np.isnan(want)])
    u = np.abs(out[fin] - want[fin]) / np.spacing(np.abs(want[fin]))
    worst = int(np.argmax(u))
    assert u[worst] <= max_ulp, f"{name}({x[fin][worst]!r}) = {out[fin][worst]!r}, " \
                                f"want {want[fin][worst]!r}"
    path = tmp_path_factory.mktemp("vec") / "m.cpp"
    path.write_text(DOUBLE_SOURCE)
    flags = [f for f in build.default_flags() if f != "-shared"]
    r = subprocess.run([build.compiler(), *flags, "-c", str(path), "-o", str(path.with_suffix(".o")),
                        "-fopt-info-vec-optimized"], capture_output=True, text=True)
    # every function's loop: a report per instantiation at the widest vectors (the epilogues
    # report narrower ones)
    widths = [int(w) for w in re.findall(r"loop vectorized using (\d+) byte vectors", r.stderr)]
    assert r.returncode == 0 and widths and widths.count(max(widths)) >= 4, r.stderr


UNDERFLOW_SOURCE = MATH_H + r"""
#include <cfenv>
extern "C" int exp64_underflows(void* const* args) {
  const double* __restrict x = (const double*)args[0];
  double* __restrict out = (double*)args[1];
  const int64_t n = *(const int64_t*)args[2];
  std::feclearexcept(FE_ALL_EXCEPT);
  #pragma omp simd
  for (int64_t i = 0; i < n; ++i) out[i] = st_exp(x[i]);
  return std::fetestexcept(FE_UNDERFLOW) ? 1 : 0;
}
"""


def test_float64_exp_of_what_ends_zero_or_inf_makes_no_denormals():
    """st_exp(double) on inputs whose result is 0, inf or NaN (-inf, below the subnormal range,
    overflow, NaN) and on ordinary ones raises no floating-point underflow: those lanes compute
    e^0 and are selected at the end, where their garbage scale used to multiply into denormals
    (a microcode assist per element on Intel: a float64 masked softmax ran 3x eager's time)."""
    xs = np.array([-np.inf, -1e4, -800.0, -746.0, 710.0, 1e4, np.inf, np.nan, 0.0, -1.5, 3.0,
                   -700.0] * 8, dtype=np.float64)  # (no input in the subnormal range: those do)
    out = np.empty_like(xs)
    fn = build.load_kernel(UNDERFLOW_SOURCE, "exp64_underflows", name="stitch_exp64_underflow")
    n = np.array([xs.size], dtype=np.int64)
    assert fn.call_list([xs.ctypes.data, out.ctypes.data, n.ctypes.data]) == 0, "underflow"
    with np.errstate(over="ignore", under="ignore"):
        want = np.exp(xs)
    np.testing.assert_allclose(out, want, rtol=1e-15, atol=0)


ERF_LOOP_SOURCE = MATH_H + r"""
extern "C" void erf_loop(const float* __restrict x, float* __restrict out, int64_t n) {
  #pragma omp simd
  for (int64_t i = 0; i < n; ++i) out[i] = st_erf(x[i]);
}
"""


def test_float_polynomials_are_fused_multiply_adds(tmp_path):
    """Kernels build with ``-ffp-contract=off`` (a product and a sum round twice, as eager's
    do), so a polynomial step written ``p * x + c`` is a multiply and an add: st_erf(float)'s
    eleven Horner steps were, which made it 40% slower than with ST_FMA (a GELU kernel 0.49 ->
    0.33 ms on 1M floats, one thread). Every step in the header is written with ST_FMA, and
    st_erf's loop compiles to fused multiply-adds where the target has them."""
    unfused = re.findall(r"^\s*(\w+) = \1 \* \w+ \+ [-\w.]+;", MATH_H, flags=re.M)
    assert not unfused, f"Horner steps without ST_FMA in stitch_math.h: {unfused}"
    cpu = Path("/proc/cpuinfo")
    if not cpu.exists() or " fma " not in cpu.read_text():
        pytest.skip("the check reads x86 assembly for FMA instructions: this CPU has no FMA "
                    "(the header check above still ran)")
    path = tmp_path / "erf.cpp"
    path.write_text(ERF_LOOP_SOURCE)
    flags = [f for f in build.default_flags() if f != "-shared"]
    r = subprocess.run([build.compiler(), *flags, "-S", str(path), "-o", str(tmp_path / "erf.s")],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    asm = (tmp_path / "erf.s").read_text()
    assert len(re.findall(r"\bvfn?m(add|sub)\d+ps\b", asm)) >= 10, "st_erf's steps are not fused"


TILE_SOURCE = MATH_H + r"""
extern "C" int tile_t(void* const* args) {
  float (*dst)[32] = (float (*)[32])args[0];
  const float (*src)[32] = (const float (*)[32])args[1];
  int32_t (*idst)[32] = (int32_t (*)[32])args[2];
  const int32_t (*isrc)[32] = (const int32_t (*)[32])args[3];
  const int64_t rows = *(const int64_t*)args[4], cols = *(const int64_t*)args[5];
  st_tile_t(dst, src, rows, cols);
  st_tile_t(idst, isrc, rows, cols);
  return 0;
}
"""


@pytest.mark.parametrize("isa", ["native", "avx2"])
@pytest.mark.parametrize("rows,cols", [(32, 32), (32, 17), (5, 32), (1, 1), (31, 31),
                                       (16, 24), (24, 9), (17, 16)])
def test_tile_transpose(rows, cols, isa):
    """st_tile_t (staged tiles' transpose; for 4-byte values 16 x 16 register blocks on
    AVX-512, 8 x 8 on AVX (``avx2`` builds without AVX-512), the rest of a partial tile scalar)
    writes dst[j][i] = src[i][j] inside rows x cols and nothing outside it."""
    flags = None
    if isa == "avx2":
        if platform.machine() not in ("x86_64", "AMD64"):
            pytest.skip("the AVX build of st_tile_t needs an x86 CPU (this one is "
                        f"{platform.machine()}); the native build is tested")
        flags = [*build.default_flags(), "-mno-avx512f"]
    fn = build.load_kernel(TILE_SOURCE, "tile_t", name=f"stitch_tile_t_{isa}", flags=flags)
    rng = np.random.default_rng(rows * 100 + cols)
    src = rng.standard_normal((32, 32)).astype(np.float32)
    isrc = rng.integers(-2**31, 2**31 - 1, (32, 32), dtype=np.int32)
    dst, idst = np.full((32, 32), 7.0, np.float32), np.full((32, 32), 7, np.int32)
    r, c = np.array([rows], np.int64), np.array([cols], np.int64)
    fn.call_list([dst.ctypes.data, src.ctypes.data, idst.ctypes.data, isrc.ctypes.data,
                  r.ctypes.data, c.ctypes.data])
    for got, x, fill in ((dst, src, 7.0), (idst, isrc, 7)):
        want = np.full((32, 32), fill, x.dtype)
        want[:cols, :rows] = x[:rows, :cols].T
        assert np.array_equal(got, want)
