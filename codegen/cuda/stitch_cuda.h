// stitch_cuda.h: what stitch's CUDA C kernels share. The same kernel source builds with nvcc
// (sm_80 / sm_90) and, with -DST_EMULATE=1, with a C++ compiler for the cpu emulation
// (stitch_emu.h: threads as fibers, real barriers). Nothing here is a barrier: every
// __syncthreads() and grid.sync() is in the kernel text itself, where a test can see it.
#pragma once
#if defined(ST_EMULATE)
#include "stitch_emu.h"
#define ST_DEV static inline
#define ST_MEMBER inline
#else
#include <cstdint>
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <cooperative_groups.h>
#define ST_DEV __device__ __forceinline__
#define ST_MEMBER __device__ __forceinline__
#endif

// The block's dynamic shared memory (sized at launch); kernels carve it at fixed offsets.
#if defined(ST_EMULATE)
#define ST_SHARED_BASE(name) unsigned char* name = st_emu::state().block->smem.data()
#else
#define ST_SHARED_BASE(name) extern __shared__ __align__(16) unsigned char name[]
#endif

// -- math, overloaded for the computed type (float for f32 / f16 / bf16, double for f64) ------
ST_DEV float st_exp(float x) { return expf(x); }
ST_DEV double st_exp(double x) { return exp(x); }
ST_DEV float st_exp2(float x) { return exp2f(x); }
ST_DEV double st_exp2(double x) { return exp2(x); }
ST_DEV float st_log(float x) { return logf(x); }
ST_DEV double st_log(double x) { return log(x); }
ST_DEV float st_log2(float x) { return log2f(x); }
ST_DEV double st_log2(double x) { return log2(x); }
ST_DEV float st_log1p(float x) { return log1pf(x); }
ST_DEV double st_log1p(double x) { return log1p(x); }
ST_DEV float st_expm1(float x) { return expm1f(x); }
ST_DEV double st_expm1(double x) { return expm1(x); }
ST_DEV float st_sqrt(float x) { return sqrtf(x); }
ST_DEV double st_sqrt(double x) { return sqrt(x); }
// 1 / sqrt(x) with both roundings IEEE (rsqrtf is approximate: eager divides)
ST_DEV float st_rsqrt(float x) { return 1.0f / sqrtf(x); }
ST_DEV double st_rsqrt(double x) { return 1.0 / sqrt(x); }
ST_DEV float st_sin(float x) { return sinf(x); }
ST_DEV double st_sin(double x) { return sin(x); }
ST_DEV float st_cos(float x) { return cosf(x); }
ST_DEV double st_cos(double x) { return cos(x); }
ST_DEV float st_tan(float x) { return tanf(x); }
ST_DEV double st_tan(double x) { return tan(x); }
ST_DEV float st_tanh(float x) { return tanhf(x); }
ST_DEV double st_tanh(double x) { return tanh(x); }
ST_DEV float st_erf(float x) { return erff(x); }
ST_DEV double st_erf(double x) { return erf(x); }
ST_DEV float st_floor(float x) { return floorf(x); }
ST_DEV double st_floor(double x) { return floor(x); }
ST_DEV float st_ceil(float x) { return ceilf(x); }
ST_DEV double st_ceil(double x) { return ceil(x); }
ST_DEV float st_rint(float x) { return rintf(x); }
ST_DEV double st_rint(double x) { return rint(x); }
ST_DEV float st_trunc(float x) { return truncf(x); }
ST_DEV double st_trunc(double x) { return trunc(x); }
ST_DEV float st_pow(float a, float b) { return powf(a, b); }
ST_DEV double st_pow(double a, double b) { return pow(a, b); }
ST_DEV float st_atan2(float a, float b) { return atan2f(a, b); }
ST_DEV double st_atan2(double a, double b) { return atan2(a, b); }
ST_DEV float st_fmod(float a, float b) { return fmodf(a, b); }
ST_DEV double st_fmod(double a, double b) { return fmod(a, b); }
ST_DEV bool st_isinf(float x) { return x == INFINITY || x == -INFINITY; }
ST_DEV bool st_isinf(double x) { return x == (double)INFINITY || x == -(double)INFINITY; }
ST_DEV float st_sigmoid(float x) { return 1.0f / (1.0f + expf(-x)); }
ST_DEV double st_sigmoid(double x) { return 1.0 / (1.0 + exp(-x)); }
template <typename T> ST_DEV T st_abs(T x) { return x < T(0) ? -x : x; }
template <typename T> ST_DEV T st_relu(T x) { return x != x ? x : (x > T(0) ? x : T(0)); }
// torch.maximum / minimum: NaN wins
template <typename T> ST_DEV T st_max(T a, T b) { return a != a ? a : (b != b ? b : (a > b ? a : b)); }
template <typename T> ST_DEV T st_min(T a, T b) { return a != a ? a : (b != b ? b : (a < b ? a : b)); }
template <typename T> ST_DEV T st_sign(T x) { return x != x ? x : (x > T(0) ? T(1) : (x < T(0) ? T(-1) : T(0))); }
template <typename T> ST_DEV T st_floordiv_f(T a, T b) { return st_floor(a / b); }
template <typename T> ST_DEV T st_remainder_f(T a, T b) {
  T r = st_fmod(a, b);
  return (r != 0 && ((r < 0) != (b < 0))) ? r + b : r;
}
ST_DEV int64_t st_floordiv_i(int64_t a, int64_t b) {
  int64_t q = a / b;
  return (a % b != 0 && ((a < 0) != (b < 0))) ? q - 1 : q;
}
ST_DEV int64_t st_remainder_i(int64_t a, int64_t b) {
  int64_t r = a % b;
  return (r != 0 && ((r < 0) != (b < 0))) ? r + b : r;
}

// -- half types: stored as their 16 bits, computed in float, rounded once per op (as eager) ---
#if defined(ST_EMULATE)
ST_DEV float st_h2f(uint16_t h) { _Float16 v; std::memcpy(&v, &h, 2); return (float)v; }
ST_DEV uint16_t st_f2h(float f) { _Float16 v = (_Float16)f; uint16_t h; std::memcpy(&h, &v, 2); return h; }
ST_DEV float st_bits_f(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }
ST_DEV uint32_t st_f_bits(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }
#else
ST_DEV float st_h2f(uint16_t h) { return __half2float(__ushort_as_half(h)); }
ST_DEV uint16_t st_f2h(float f) { return __half_as_ushort(__float2half_rn(f)); }
ST_DEV float st_bits_f(uint32_t u) { return __uint_as_float(u); }
ST_DEV uint32_t st_f_bits(float f) { return __float_as_uint(f); }
#endif
ST_DEV float st_bf2f(uint16_t h) { return st_bits_f((uint32_t)h << 16); }
ST_DEV uint16_t st_f2bf(float f) {
  // round to nearest even; a NaN stays a (quiet) NaN
  uint32_t u = st_f_bits(f);
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) return (uint16_t)((u >> 16) | 0x40u);
  return (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}
ST_DEV float st_round_h(float x) { return st_h2f(st_f2h(x)); }
ST_DEV float st_round_bf(float x) { return st_bf2f(st_f2bf(x)); }

// -- vector loads and stores: N bytes at once (ld.global.v4 for 16), through a local array
// aligned to 16 bytes; the address is a multiple of N bytes (the runtime checks the base).
template <int N> struct StBits;
template <> struct StBits<16> { typedef uint4 T; };
template <> struct StBits<8> { typedef unsigned long long T; };
template <> struct StBits<4> { typedef unsigned T; };
template <> struct StBits<2> { typedef unsigned short T; };
template <> struct StBits<1> { typedef unsigned char T; };
template <int N, typename T> ST_DEV void st_loadv(T* dst, const T* src) {
#if defined(ST_EMULATE)
  std::memcpy(dst, src, N);
#else
  *reinterpret_cast<typename StBits<N>::T*>(dst) = *reinterpret_cast<const typename StBits<N>::T*>(src);
#endif
}
template <int N, typename T> ST_DEV void st_storev(T* dst, const T* src) {
#if defined(ST_EMULATE)
  std::memcpy(dst, src, N);
#else
  *reinterpret_cast<typename StBits<N>::T*>(dst) = *reinterpret_cast<const typename StBits<N>::T*>(src);
#endif
}

// -- atomics (scatters) ------------------------------------------------------------------------
#if defined(ST_EMULATE)
template <typename T> ST_DEV void st_atomic_add(T* p, T v) { atomicAdd(p, v); }
#else
ST_DEV void st_atomic_add(float* p, float v) { atomicAdd(p, v); }
ST_DEV void st_atomic_add(double* p, double v) { atomicAdd(p, v); }
ST_DEV void st_atomic_add(int32_t* p, int32_t v) { atomicAdd(p, v); }
ST_DEV void st_atomic_add(int64_t* p, int64_t v) {
  atomicAdd(reinterpret_cast<unsigned long long*>(p), (unsigned long long)v);  // two's complement
}
#endif

// -- combining two partial results (reductions), torch's semantics ---------------------------
struct StSum { template <typename T> ST_MEMBER T operator()(T a, T b) const { return a + b; } };
struct StProd { template <typename T> ST_MEMBER T operator()(T a, T b) const { return a * b; } };
struct StMax { template <typename T> ST_MEMBER T operator()(T a, T b) const { return st_max(a, b); } };
struct StMin { template <typename T> ST_MEMBER T operator()(T a, T b) const { return st_min(a, b); } };
struct StAny { template <typename T> ST_MEMBER T operator()(T a, T b) const { return a | b; } };

// All lanes of each `width`-lane segment of a warp end with the segment's combined value
// (butterfly: the same order of combination in every lane, so every lane holds the same bits).
template <typename T, typename Op> ST_DEV T st_warp_allreduce(T v, Op op, int width) {
  for (int m = width / 2; m > 0; m /= 2) v = op(v, __shfl_xor_sync(0xffffffffu, v, m, width));
  return v;
}

// argmax / argmin: NaN counts as the largest (smallest) value; among equals the first index.
template <typename T> ST_DEV bool st_arg_first(bool is_max, T v1, int64_t i1, T v2, int64_t i2) {
  bool n1 = v1 != v1, n2 = v2 != v2;
  bool better = is_max ? (v1 > v2) : (v1 < v2);
  return (better && !n2) || (n1 && !n2) || (((v1 == v2) || (n1 && n2)) && i1 < i2);
}
template <typename T>
ST_DEV void st_warp_allreduce_arg(bool is_max, T& v, int64_t& i, int width) {
  for (int m = width / 2; m > 0; m /= 2) {
    T v2 = __shfl_xor_sync(0xffffffffu, v, m, width);
    int64_t i2 = __shfl_xor_sync(0xffffffffu, i, m, width);
    if (!st_arg_first(is_max, v, i, v2, i2)) { v = v2; i = i2; }
  }
}
