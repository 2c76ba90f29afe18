// stitch_math.h: float32 math that GCC vectorises (no libm calls in inner loops).
// exp: Cephes-style range reduction + degree-5 polynomial (~1 ulp); erf: Eigen's rational
// approximation on [-4, 4] (a few ulp); tanh and sigmoid through exp. NaN and inf propagate.
#pragma once
#include <cstdint>
#include <cstring>
#include <cmath>

static inline float st_exp(float x) {
  const float hi = 88.3762626647950f, lo = -87.3365447505531f;
  float xc = x > hi ? hi : x;
  xc = xc < lo ? lo : xc;
  float fl = std::floor(xc * 1.44269504088896341f + 0.5f);
  float r = xc - fl * 0.693359375f + fl * 2.12194440e-4f;
  float z = r * r;
  float y = 1.9875691500e-4f;
  y = y * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * z + r + 1.0f;
  union { uint32_t u; float f; } p;
  p.u = (uint32_t)((int32_t)fl + 127) << 23;
  float out = y * p.f;
  out = x > hi ? INFINITY : out;
  out = x < lo ? 0.0f : out;
  return x != x ? x : out;
}

static inline double st_exp(double x) { return std::exp(x); }

static inline float st_erf(float x) {
  float xc = x > 4.0f ? 4.0f : (x < -4.0f ? -4.0f : x);
  float x2 = xc * xc;
  float p = -2.72614225801306e-10f;
  p = p * x2 + 2.77068142495902e-08f;
  p = p * x2 + -2.10102402082508e-06f;
  p = p * x2 + -5.69250639462346e-05f;
  p = p * x2 + -7.34990630326855e-04f;
  p = p * x2 + -2.95459980854025e-03f;
  p = p * x2 + -1.60960333262415e-02f;
  p = p * xc;
  float q = -1.45660718464996e-05f;
  q = q * x2 + -2.13374055278905e-04f;
  q = q * x2 + -1.68282697438203e-03f;
  q = q * x2 + -7.37332916720468e-03f;
  q = q * x2 + -1.42647390514189e-02f;
  return x != x ? x : p / q;
}

static inline double st_erf(double x) { return std::erf(x); }

static inline float st_tanh(float x) {
  float a = x < 0.0f ? -x : x;
  float e = st_exp(-2.0f * a);
  float t = (1.0f - e) / (1.0f + e);
  t = a < 1e-4f ? a : t;                              // tanh(a) = a to float precision
  t = x < 0.0f ? -t : t;
  return x != x ? x : t;
}

static inline double st_tanh(double x) { return std::tanh(x); }

static inline float st_sigmoid(float x) {
  float e = st_exp(-(x < 0.0f ? -x : x));
  float s = 1.0f / (1.0f + e);
  return x >= 0.0f ? s : e * s;
}

static inline double st_sigmoid(double x) { return 1.0 / (1.0 + std::exp(-x)); }

template <typename T> static inline T st_rsqrt(T x) { return T(1) / std::sqrt(x); }
template <typename T> static inline T st_relu(T x) { return x != x ? x : (x > T(0) ? x : T(0)); }
template <typename T> static inline T st_max(T a, T b) { return a != a ? a : (b != b ? b : (a > b ? a : b)); }
template <typename T> static inline T st_min(T a, T b) { return a != a ? a : (b != b ? b : (a < b ? a : b)); }
template <typename T> static inline T st_sign(T x) { return x > T(0) ? T(1) : (x < T(0) ? T(-1) : T(0)); }
template <typename T> static inline T st_floordiv_f(T a, T b) { return std::floor(a / b); }
template <typename T> static inline T st_remainder_f(T a, T b) { T r = std::fmod(a, b); return (r != 0 && ((r < 0) != (b < 0))) ? r + b : r; }
static inline int64_t st_floordiv_i(int64_t a, int64_t b) { int64_t q = a / b; return (a % b != 0 && ((a < 0) != (b < 0))) ? q - 1 : q; }
static inline int64_t st_remainder_i(int64_t a, int64_t b) { int64_t r = a % b; return (r != 0 && ((r < 0) != (b < 0))) ? r + b : r; }
