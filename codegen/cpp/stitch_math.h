// stitch_math.h: float32 and float64 math that GCC vectorises (no libm calls in inner loops).
// Measured by tests/runtime/test_stitch_math.py against float64: exp <= 2 ulp (Cephes range
// reduction, degree-5 polynomial), erf <= 8 ulp (Eigen's rational approximation on [-4, 4]),
// tanh <= 4 ulp (Cephes polynomial below 0.625, through exp above), sigmoid <= 4 ulp.
// NaN and inf propagate.
#pragma once
#if defined(__AVX__) || defined(__F16C__)
#include <immintrin.h>
#endif
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <cmath>

// ST_FMA: one rounding where the target has fused multiply-add (explicit, so -ffp-contract=off
// does not change it), a*b+c elsewhere.
#if defined(__FMA__) || defined(__aarch64__)
#define ST_FMA(a, b, c) std::fma((a), (b), (c))
#else
#define ST_FMA(a, b, c) ((a) * (b) + (c))
#endif

// c0 x^n + c1 x^(n-1) + ... + cn by Horner's rule with ST_FMA, as one inlined expression (a
// loop over a coefficient array keeps GCC from vectorising the caller's simd loop).
static inline double st_horner(double, double c) { return c; }
template <typename... C>
static inline double st_horner(double x, double c0, double c1, C... rest) {
  return st_horner(x, ST_FMA(c0, x, c1), rest...);
}

// exp(x) = 2^n * p(r), n = round(x / ln2), r = x - n ln2 (two-part ln2). The scale 2^n is added
// to p's exponent bits, so the only selects are the two range ends: no clamps, which GCC turns
// into chains of blends. NaN flows through the arithmetic. Results below exp(-86.98) = 1.8e-38
// are flushed to 0 (subnormal results), above ln(FLT_MAX) they are inf.
static inline float st_exp(float x) {
  const float hi = 88.72283172607421875f, lo = -86.98f;
  float n = std::nearbyint(x * 1.44269504088896341f);
  float r = ST_FMA(n, -0.693359375f, x);
  r = ST_FMA(n, 2.12194440e-4f, r);
  float y = 1.9875691500e-4f;
  y = ST_FMA(y, r, 1.3981999507e-3f);
  y = ST_FMA(y, r, 8.3334519073e-3f);
  y = ST_FMA(y, r, 4.1665795894e-2f);
  y = ST_FMA(y, r, 1.6666665459e-1f);
  y = ST_FMA(y, r, 5.0000001201e-1f);
  y = ST_FMA(y, r * r, r + 1.0f);
  int32_t bits;
  std::memcpy(&bits, &y, 4);
  bits += (int32_t)n << 23;
  float out;
  std::memcpy(&out, &bits, 4);
  out = x > hi ? INFINITY : out;
  return x < lo ? 0.0f : out;
}

// float64 exp, as the float one: 2^n * e^r with |r| <= ln2/2 (two-part ln2), e^r from Cephes'
// rational form 1 + 2 r P(r^2) / (Q(r^2) - r P(r^2)) (<= 1 ulp). Results that are subnormal
// (x below -708.4) take their scale in two steps, so they round once, as libm's do.
static inline double st_exp(double x) {
  const double hi = 709.782712893384, lo = -745.1332191019412;
  // lanes whose result is 0, inf or NaN (selected at the end) compute e^0: their garbage scale
  // made the 2^-54 step below multiply into denormals, a microcode assist per element on
  // Intel cores (a float64 masked softmax, half its row -inf: 19.7 ms against eager's 6.1)
  double xs = x < lo ? 0.0 : x;  // (selects one by one: GCC if-converts these, not an ||)
  xs = x > hi ? 0.0 : xs;
  xs = x != x ? 0.0 : xs;
  double n = std::nearbyint(xs * 1.4426950408889634);
  double r = ST_FMA(n, -6.93145751953125e-1, xs);
  r = ST_FMA(n, -1.42860682030941723212e-6, r);
  double r2 = r * r;
  double p = st_horner(r2, 1.26177193074810590878e-4, 3.02994407707441961300e-2,
                       9.99999999999999999910e-1) * r;
  double q = st_horner(r2, 3.00198505138664455042e-6, 2.52448340349684104192e-3,
                       2.27265548208155028766e-1, 2.00000000000000000009e0);
  double y = 1.0 + 2.0 * (p / (q - p));
  // n's integer from its bits after adding 1.5 * 2^52 (exact for |n| < 2^51): a vector add and
  // subtract where (int64_t)n needs AVX-512DQ's conversion (on AVX2, GCC vectorised no loop
  // calling this function)
  int64_t k;
  const double shifted = n + 6755399441055744.0;
  std::memcpy(&k, &shifted, 8);
  k -= 0x4338000000000000LL;
  bool tiny = k < -1020;
  int64_t bits;
  std::memcpy(&bits, &y, 8);
  bits += (int64_t)((uint64_t)(tiny ? k + 54 : k) << 52);
  double out;
  std::memcpy(&out, &bits, 8);
  out = tiny ? out * 5.551115123125783e-17 : out;  // 2^-54
  out = x > hi ? INFINITY : out;
  out = x < lo ? 0.0 : out;
  return x != x ? x : out;
}

static inline float st_erf(float x) {
  float xc = x > 4.0f ? 4.0f : (x < -4.0f ? -4.0f : x);
  float x2 = xc * xc;
  float p = -2.72614225801306e-10f;
  p = ST_FMA(p, x2, 2.77068142495902e-08f);
  p = ST_FMA(p, x2, -2.10102402082508e-06f);
  p = ST_FMA(p, x2, -5.69250639462346e-05f);
  p = ST_FMA(p, x2, -7.34990630326855e-04f);
  p = ST_FMA(p, x2, -2.95459980854025e-03f);
  p = ST_FMA(p, x2, -1.60960333262415e-02f);
  p = p * xc;
  float q = -1.45660718464996e-05f;
  q = ST_FMA(q, x2, -2.13374055278905e-04f);
  q = ST_FMA(q, x2, -1.68282697438203e-03f);
  q = ST_FMA(q, x2, -7.37332916720468e-03f);
  q = ST_FMA(q, x2, -1.42647390514189e-02f);
  return x != x ? x : p / q;
}

// float64 erf from Cephes' ndtr: x T(x^2) / U(x^2) below 1, 1 - e^(-x^2) P(|x|) / Q(|x|) from 1
// to 8 (the result is 1 beyond), the sign restored.
static inline double st_erf(double x) {
  double a = x < 0.0 ? -x : x;
  double z = x * x;
  double t = st_horner(z, 9.60497373987051638749e0, 9.00260197203842689217e1,
                       2.23200534594684319226e3, 7.00332514112805075473e3,
                       5.55923013010394962768e4);
  double u = st_horner(z, 1.0, 3.35617141647503099647e1, 5.21357949780152679795e2,
                       4.59432382970980127987e3, 2.26290000613890934246e4,
                       4.92673942608635921086e4);
  double small = x * t / u;
  double b = a < 8.0 ? a : 8.0;
  double p = st_horner(b, 2.46196981473530512524e-10, 5.64189564831068821977e-1,
                       7.46321056442269912687e0, 4.86371970985681366614e1,
                       1.96520832956077098242e2, 5.26445194995477358631e2,
                       9.34528527171957607540e2, 1.02755188689515710272e3,
                       5.57535335369399327526e2);
  double q = st_horner(b, 1.0, 1.32281951154744992508e1, 8.67072140885989742329e1,
                       3.54937778887819891062e2, 9.75708501743205489753e2,
                       1.82390916687909736289e3, 2.24633760818710981792e3,
                       1.65666309194161350182e3, 5.57535340817727675546e2);
  double large = 1.0 - st_exp(-b * b) * p / q;
  large = x < 0.0 ? -large : large;
  double out = a < 1.0 ? small : large;
  return x != x ? x : out;
}

static inline float st_tanh(float x) {
  // |x| < 0.625: Cephes' odd polynomial (1 - e) / (1 + e) would cancel there; else through exp.
  float a = x < 0.0f ? -x : x;
  float z = x * x;
  float p = -5.70498872745e-3f;
  p = ST_FMA(p, z, 2.06390887954e-2f);
  p = ST_FMA(p, z, -5.37397155531e-2f);
  p = ST_FMA(p, z, 1.33314422036e-1f);
  p = ST_FMA(p, z, -3.33332819422e-1f);
  float small = ST_FMA(p * z, x, x);
  float e = st_exp(-2.0f * a);
  float t = (1.0f - e) / (1.0f + e);
  t = x < 0.0f ? -t : t;
  t = a < 0.625f ? small : t;
  return x != x ? x : t;
}

static inline double st_tanh(double x) {
  // |x| < 0.625: Cephes' rational form x + x z P(z) / Q(z), z = x^2; else 1 - 2 / (e^2|x| + 1).
  double a = x < 0.0 ? -x : x;
  double z = x * x;
  double p = st_horner(z, -9.64399179425052238628e-1, -9.92877231001918586564e1,
                       -1.61468768441708447952e3);
  double q = st_horner(z, 1.0, 1.12811678491632931402e2, 2.23548839060100448583e3,
                       4.84406305325125486048e3);
  double small = ST_FMA(x * z, p / q, x);
  double t = 1.0 - 2.0 / (st_exp(2.0 * a) + 1.0);
  t = x < 0.0 ? -t : t;
  t = a < 0.625 ? small : t;
  return x != x ? x : t;
}

static inline float st_sigmoid(float x) {
  float e = st_exp(-(x < 0.0f ? -x : x));
  float s = 1.0f / (1.0f + e);
  return x >= 0.0f ? s : e * s;
}

// float64 sigmoid in eager's form (ATen's vectorised and scalar kernels): 1 / (1 + e^-x), so 0
// below x = -709.78 where e^-x overflows, as eager (the e^-|x| form gave e^x's subnormals
// there, and its select and multiply cost 10% of a float64 broadcast chain's kernel).
static inline double st_sigmoid(double x) { return 1.0 / (1.0 + st_exp(-x)); }

template <typename T> static inline T st_rsqrt(T x) { return T(1) / std::sqrt(x); }
template <typename T> static inline T st_relu(T x) { return x != x ? x : (x > T(0) ? x : T(0)); }
template <typename T> static inline T st_max(T a, T b) { return a != a ? a : (b != b ? b : (a > b ? a : b)); }
template <typename T> static inline T st_min(T a, T b) { return a != a ? a : (b != b ? b : (a < b ? a : b)); }
// torch.clamp's bounds when they are constants other than NaN: a NaN value stays NaN, and a
// bound equal to the value (0 against -0) gives the value, as eager's clamp does; one max /
// min instruction (``b > a ? b : a`` is x86's maxps with the value second), where st_max /
// st_min's NaN tests took mask arithmetic through general registers (quant_dequant's bf16
// kernel: 19 mask moves and ors per 32 elements).
template <typename T> static inline T st_max_c(T a, T b) { return b > a ? b : a; }
template <typename T> static inline T st_min_c(T a, T b) { return b < a ? b : a; }
// ``c ? a : b`` as a bit blend, for a condition that does not change in the vector loop (a
// padded read's bounds test, hoisted above it): written as ``?:``, GCC unswitched or threaded
// the loop on each such condition and vectorised nothing (a 3x3 max pool's nine padded taps:
// 15 ms scalar and branching on the data, 1.3 ms blended).
template <typename T> static inline T st_pick(bool c, T a, T b) {
  if constexpr (sizeof(T) == 4 || sizeof(T) == 8) {
    using U = std::conditional_t<sizeof(T) == 4, uint32_t, uint64_t>;
    U ua, ub;
    std::memcpy(&ua, &a, sizeof(T));
    std::memcpy(&ub, &b, sizeof(T));
    const U m = U(0) - U(c);
    const U r = (ua & m) | (ub & ~m);
    T out;
    std::memcpy(&out, &r, sizeof(T));
    return out;
  } else {
    return c ? a : b;
  }
}
template <typename T> static inline T st_sign(T x) { return x > T(0) ? T(1) : (x < T(0) ? T(-1) : T(0)); }
template <typename T> static inline T st_floordiv_f(T a, T b) { return std::floor(a / b); }
template <typename T> static inline T st_remainder_f(T a, T b) { T r = std::fmod(a, b); return (r != 0 && ((r < 0) != (b < 0))) ? r + b : r; }
static inline int64_t st_floordiv_i(int64_t a, int64_t b) { int64_t q = a / b; return (a % b != 0 && ((a < 0) != (b < 0))) ? q - 1 : q; }
static inline int64_t st_remainder_i(int64_t a, int64_t b) { int64_t r = a % b; return (r != 0 && ((r < 0) != (b < 0))) ? r + b : r; }

// A value the optimiser cannot see through (an empty asm that "changes" it): a load's stride
// GCC 12 would not vectorise as a constant (a power of two of 64 bytes or more) but does from a
// register (``Emitter.load_index``).
static inline int64_t st_opaque(int64_t v) {
#if defined(__GNUC__)
  __asm__("" : "+r"(v));
#endif
  return v;
}

// Row movement for the rows strategy. st_prefetch_row asks for the cache lines of the next
// row; st_stream_row copies a finished row from its L1 buffer to memory with streaming stores
// (no read-for-ownership of the destination); a kernel that used it ends with st_stream_fence.
#if defined(__AVX__)
#include <immintrin.h>
#endif
static inline void st_prefetch_row(const void* p, int64_t nbytes) {
  const char* c = (const char*)p;
  for (int64_t b = 0; b < nbytes; b += 64) __builtin_prefetch(c + b);
}
static inline void st_stream_row(void* dst, const void* src, int64_t nbytes) {
  char* d = (char*)dst;
  const char* s = (const char*)src;
#if defined(__AVX__)
  int64_t head = (int64_t)((32 - ((uintptr_t)d & 31)) & 31);
  head = head < nbytes ? head : nbytes;
  std::memcpy(d, s, head);
  d += head, s += head, nbytes -= head;
  for (; nbytes >= 32; nbytes -= 32, d += 32, s += 32)
    _mm256_stream_si256((__m256i*)d, _mm256_loadu_si256((const __m256i*)s));
#endif
  std::memcpy(d, s, nbytes);
}
static inline void st_stream_fence() {
#if defined(__AVX__)
  _mm_sfence();
#endif
}

// The transpose of a staged tile (codegen.cpp.phases.nest_staged): dst[j][i] = src[i][j] for
// i < rows, j < cols, both 32 x 32 arrays in L1. The tile's values were written to src along
// the input's contiguous dim (a vector loop); a tile of 4-byte values is transposed here in
// 16 x 16 blocks in AVX-512 registers (64 shuffles a block; 8 x 8 blocks with AVX), what no
// whole block of a partial tile covers by a scalar loop. The staging loop before, scalar with
// a strided store, took ~1 ns an element (bert's key permute, 2x128x4x64 -> 2x4x64x128: 22.5
// -> 10 us).
template <typename T>
static inline void st_tile_t(T (*__restrict dst)[32], const T (*__restrict src)[32], int64_t rows,
                             int64_t cols) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) dst[c][r] = src[r][c];
}
#if defined(__AVX512F__)
static inline void st_t16x16(float* __restrict dst, const float* __restrict src) {
  // rows of 32 floats: r[i] = src row i; after the three steps o[j] = column j
  __m512 r[16], t[16];
  for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_ps(src + 32 * i);
  for (int i = 0; i < 8; ++i) {  // 32-bit pairs of rows 2i, 2i+1
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  for (int g = 0; g < 4; ++g) {  // u[4g + c], lane k: rows 4g..4g+3 of column 4k + c
    __m512d a = _mm512_castps_pd(t[4 * g]), b = _mm512_castps_pd(t[4 * g + 2]);
    __m512d c = _mm512_castps_pd(t[4 * g + 1]), d = _mm512_castps_pd(t[4 * g + 3]);
    r[4 * g] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, b));
    r[4 * g + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, b));
    r[4 * g + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(c, d));
    r[4 * g + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(c, d));
  }
  for (int c = 0; c < 4; ++c) {  // column 4k + c: lane k of u[c], u[4 + c], u[8 + c], u[12 + c]
    __m512 v = _mm512_shuffle_f32x4(r[c], r[4 + c], 0x88);
    __m512 w = _mm512_shuffle_f32x4(r[8 + c], r[12 + c], 0x88);
    __m512 v1 = _mm512_shuffle_f32x4(r[c], r[4 + c], 0xDD);
    __m512 w1 = _mm512_shuffle_f32x4(r[8 + c], r[12 + c], 0xDD);
    _mm512_storeu_ps(dst + 32 * c, _mm512_shuffle_f32x4(v, w, 0x88));
    _mm512_storeu_ps(dst + 32 * (8 + c), _mm512_shuffle_f32x4(v, w, 0xDD));
    _mm512_storeu_ps(dst + 32 * (4 + c), _mm512_shuffle_f32x4(v1, w1, 0x88));
    _mm512_storeu_ps(dst + 32 * (12 + c), _mm512_shuffle_f32x4(v1, w1, 0xDD));
  }
}
#define ST_TILE_BLOCK 16
#define ST_TILE_BLOCK_T st_t16x16
#elif defined(__AVX__)
static inline void st_t8x8(float* __restrict dst, const float* __restrict src) {
  // rows of 32 floats; 32-bit pairs, then 64-bit pairs, then the 128-bit halves
  __m256 r[8], t[8];
  for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(src + 32 * i);
  for (int i = 0; i < 4; ++i) {
    t[2 * i] = _mm256_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm256_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  for (int g = 0; g < 2; ++g) {  // r[4g + c], half h: rows 4g..4g+3 of column 4h + c
    r[4 * g] = _mm256_shuffle_ps(t[4 * g], t[4 * g + 2], 0x44);
    r[4 * g + 1] = _mm256_shuffle_ps(t[4 * g], t[4 * g + 2], 0xEE);
    r[4 * g + 2] = _mm256_shuffle_ps(t[4 * g + 1], t[4 * g + 3], 0x44);
    r[4 * g + 3] = _mm256_shuffle_ps(t[4 * g + 1], t[4 * g + 3], 0xEE);
  }
  for (int c = 0; c < 4; ++c) {
    _mm256_storeu_ps(dst + 32 * c, _mm256_permute2f128_ps(r[c], r[4 + c], 0x20));
    _mm256_storeu_ps(dst + 32 * (4 + c), _mm256_permute2f128_ps(r[c], r[4 + c], 0x31));
  }
}
#define ST_TILE_BLOCK 8
#define ST_TILE_BLOCK_T st_t8x8
#endif
#if defined(ST_TILE_BLOCK)
// 4-byte values of any type: the register blocks move bits (the intrinsics' loads and stores may
// alias any type), the rest of a partial tile is copied as T -- no float access to int32 memory.
template <typename T>
static inline void st_tile_t_blocks(T (*__restrict dst)[32], const T (*__restrict src)[32],
                                    int64_t rows, int64_t cols) {
  static_assert(sizeof(T) == 4, "register blocks of 4-byte values");
  const int64_t B = ST_TILE_BLOCK;
  for (int64_t bi = 0; bi < rows; bi += B)
    for (int64_t bj = 0; bj < cols; bj += B) {
      if (bi + B <= rows && bj + B <= cols) {  // a whole register block
        ST_TILE_BLOCK_T((float*)&dst[bj][bi], (const float*)&src[bi][bj]);
        continue;
      }
      const int64_t re = bi + B < rows ? bi + B : rows, ce = bj + B < cols ? bj + B : cols;
      for (int64_t r = bi; r < re; ++r)
        for (int64_t c = bj; c < ce; ++c) dst[c][r] = src[r][c];
    }
}
template <>
inline void st_tile_t<float>(float (*__restrict dst)[32], const float (*__restrict src)[32],
                             int64_t rows, int64_t cols) {
  st_tile_t_blocks(dst, src, rows, cols);
}
template <>
inline void st_tile_t<int32_t>(int32_t (*__restrict dst)[32], const int32_t (*__restrict src)[32],
                               int64_t rows, int64_t cols) {
  st_tile_t_blocks(dst, src, rows, cols);
}
#endif

// Half precision (float16 and bfloat16) is stored as its 16 bits and computed in float, as
// eager's cpu kernels do: every load widens to float, every value of a half type is rounded to
// it (st_round_h / st_round_bf: float -> half -> float), every store narrows. The conversions
// are integer and float selects, not library calls or the scalar F16C instruction GCC emits
// for _Float16, so they vectorise with the loop around them (16 lanes per instruction with
// AVX-512). Both round to nearest even, keep subnormals (as c10::Half / c10::BFloat16 do; the
// AVX512-BF16 instruction would flush them) and keep NaN a NaN (quieted).
static inline uint32_t st_fbits(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }
static inline float st_bitsf(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }
// Written with masks, not ?: -- GCC gives up vectorising a loop whose selects nest too deep.
static inline float st_h2f(uint16_t h) {
  const uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
  const uint32_t em = h & 0x7FFFu;
  // a normal: exponent and mantissa moved to float's places, the exponent rebiased by 112; a
  // subnormal (or zero): its integer mantissa times 2^-24, exact. No float arithmetic on a
  // denormal operand: scaling em << 13 (a float denormal) by 2^112 took a microcode assist
  // per element on Intel cores (~150 cycles), and a float16 GIN training step, whose
  // gradients are float16 subnormals, ran its gather-scatter kernel 16x slower than float32.
  // inf / NaN get float's all-ones exponent.
  const uint32_t normal = (em << 13) + 0x38000000u;
  const uint32_t sub = st_fbits((float)(int32_t)em * 0x1p-24f);
  const uint32_t m_sub = 0u - (uint32_t)(em < 0x400u);
  const uint32_t m_inf = 0u - (uint32_t)(em >= 0x7C00u);
  const uint32_t finite = (sub & m_sub) | (normal & ~m_sub);
  return st_bitsf(sign | (finite & ~m_inf) | (((em << 13) | 0x7F800000u) & m_inf));
}
// st_h2f where the loop around it stays scalar (a float16 gather): the scalar conversion
// instruction where the target has it (same values, NaN quieted).
static inline float st_h2f_s(uint16_t h) {
#if defined(__F16C__)
  return _cvtsh_ss(h);
#else
  return st_h2f(h);
#endif
}
static inline uint16_t st_f2h(float f) {
  uint32_t u = st_fbits(f);
  const uint32_t sign = (u >> 16) & 0x8000u;
  u &= 0x7FFFFFFFu;
  const uint32_t big = 0x7C00u | ((uint32_t)(u > 0x7F800000u) << 9);  // inf, or a quiet NaN
  // below 2^-14 the result is subnormal: adding 0.5 lines the mantissa up, rounding nearest even
  const uint32_t sub = st_fbits(st_bitsf(u) + 0.5f) - 0x3F000000u;
  // normal: rebias the exponent, add half an ulp minus one plus the odd bit (nearest even)
  const uint32_t nrm = (u + 0xC8000FFFu + ((u >> 13) & 1u)) >> 13;
  const uint32_t m_big = 0u - (uint32_t)(u >= 0x47800000u);
  const uint32_t m_sub = 0u - (uint32_t)(u < 0x38800000u);
  return (uint16_t)(((big & m_big) | (sub & m_sub) | (nrm & ~(m_big | m_sub))) | sign);
}
static inline float st_bf2f(uint16_t h) { return st_bitsf((uint32_t)h << 16); }
static inline uint16_t st_f2bf(float f) {
  const uint32_t u = st_fbits(f);
  const uint32_t r = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  const uint32_t m_nan = 0u - (uint32_t)((u & 0x7FFFFFFFu) > 0x7F800000u);
  return (uint16_t)((r & ~m_nan) | (((u >> 16) | 0x40u) & m_nan));
}
// A row of float16 widened to float, or a row of float narrowed to float16 (nearest even), by
// the F16C / AVX-512 conversion instructions where the target has them: one instruction per 8
// or 16 lanes, where st_h2f / st_f2h take 10-15 (GCC emits only the scalar form of these
// instructions for _Float16, so the rows strategy converts whole rows with these before and
// after its vector loops). Same values as st_h2f / st_f2h (a NaN stays a NaN, quieted).
static inline void st_h2f_row(float* __restrict dst, const uint16_t* __restrict src, int64_t n) {
  int64_t done = 0;
#if defined(__AVX512F__)
  done = n - n % 16;
  for (int64_t i = 0; i < done; i += 16)
    _mm512_storeu_ps(dst + i, _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(src + i))));
#elif defined(__F16C__)
  done = n - n % 8;
  for (int64_t i = 0; i < done; i += 8)
    _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(src + i))));
#endif
  for (int64_t i = done; i < n; ++i) dst[i] = st_h2f(src[i]);
}
static inline void st_f2h_row(uint16_t* __restrict dst, const float* __restrict src, int64_t n) {
  int64_t done = 0;
#if defined(__AVX512F__)
  done = n - n % 16;
  for (int64_t i = 0; i < done; i += 16)
    _mm256_storeu_si256((__m256i*)(dst + i),
                        _mm512_cvtps_ph(_mm512_loadu_ps(src + i),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
#elif defined(__F16C__)
  done = n - n % 8;
  for (int64_t i = 0; i < done; i += 8)
    _mm_storeu_si128((__m128i*)(dst + i),
                     _mm256_cvtps_ph(_mm256_loadu_ps(src + i),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
#endif
  for (int64_t i = done; i < n; ++i) dst[i] = st_f2h(src[i]);
}
// float16 rounding without the trip through 16 bits: adding and taking away 2^(e+13), where 2^e
// is |x|'s binade clamped to float16's normal range [2^-14, 2^15], rounds |x| to float16's
// spacing there (11 significant bits, or a multiple of 2^-24 below 2^-14; nearest even, the
// float adder's own rounding); scaling by 2^112 and back turns 2^16 and beyond into inf; the
// sign is put back (so -0 and negative values rounding to zero stay -0). A NaN stays a NaN
// (quieted). Equal to st_h2f(st_f2h(x)) on all 2^32 inputs (NaN as NaN); about 10 vector
// instructions where the bit-mask form took 15 (1.65x faster in a loop of roundings).
static inline float st_round_h(float x) {
  const uint32_t u = st_fbits(x);
  uint32_t e = u & 0x7F800000u;
  e = e < 0x38800000u ? 0x38800000u : e;
  e = e > 0x47000000u ? 0x47000000u : e;
  const float m = st_bitsf(e + (13u << 23));
  const float a = st_bitsf(u & 0x7FFFFFFFu);
  const float r = ((a + m) - m) * 0x1p112f * 0x1p-112f;
  return st_bitsf(st_fbits(r) | (u & 0x80000000u));
}
// A row of float values rounded to float16 in place (st_round_h of each): the conversion
// instructions there and back where the target has them, 2 vector instructions per 16 lanes
// where st_round_h takes about 10. The rows strategy rounds a float16 value a discontinuous
// function reads this way: computed unrounded into a row buffer by one vector loop, rounded
// whole, and read by the next (quant_dequant's x / scale before round()). Same values.
static inline void st_round_h_row(float* __restrict p, int64_t n) {
  int64_t done = 0;
#if defined(__AVX512F__)
  done = n - n % 16;
  for (int64_t i = 0; i < done; i += 16)
    _mm512_storeu_ps(p + i, _mm512_cvtph_ps(_mm512_cvtps_ph(
        _mm512_loadu_ps(p + i), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)));
#elif defined(__F16C__)
  done = n - n % 8;
  for (int64_t i = 0; i < done; i += 8)
    _mm256_storeu_ps(p + i, _mm256_cvtph_ps(_mm256_cvtps_ph(
        _mm256_loadu_ps(p + i), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)));
#endif
  for (int64_t i = done; i < n; ++i) p[i] = st_round_h(p[i]);
}
// bfloat16 rounding without the trip through 16 bits: the same nearest-even carry into the
// upper half, the lower half cleared; a NaN stays the NaN it is (a store quiets it). Half the
// vector instructions of st_bf2f(st_f2bf(x)) (no narrowing and widening, no NaN payload).
static inline float st_round_bf(float x) {
  const uint32_t u = st_fbits(x);
  const float r = st_bitsf((u + 0x7FFFu + ((u >> 16) & 1u)) & 0xFFFF0000u);
  return x != x ? x : r;
}

// Random numbers: Philox4x32-10 keyed by the seed, counter (c, 0, 0, 0); the first word becomes
// a float in [0, 1) as Triton's tl.rand makes it, so the cpu, Triton and the interpreter
// (stitch_ir.interpreter.philox_uniform) draw the same stream. Vectorises: 32 x 32 -> 64-bit
// products and xors, once the rounds are unrolled -- GCC 12 left the round loop rolled in a
// loop that also stores a byte (the draw kept as a float beside its mask) and the whole loop
// then ran scalar: ~7.5 ns a number on this EPYC against ~2 vectorised.
static inline float st_rand(int64_t seed, uint32_t c0) {
  uint32_t c1 = 0, c2 = 0, c3 = 0;
  uint32_t k0 = (uint32_t)((uint64_t)seed & 0xFFFFFFFFu), k1 = (uint32_t)((uint64_t)seed >> 32);
#pragma GCC unroll 10
  for (int r = 0; r < 10; ++r) {
    const uint64_t p0 = (uint64_t)0xD2511F53u * c0, p2 = (uint64_t)0xCD9E8D57u * c2;
    const uint32_t n0 = (uint32_t)(p2 >> 32) ^ c1 ^ k0, n2 = (uint32_t)(p0 >> 32) ^ c3 ^ k1;
    c1 = (uint32_t)p2, c3 = (uint32_t)p0, c0 = n0, c2 = n2;
    k0 += 0x9E3779B9u, k1 += 0xBB67AE85u;
  }
  int32_t x;
  std::memcpy(&x, &c0, 4);
  x = x < 0 ? -x - 1 : x;
  return (float)x * 4.6566127342e-10f;
}
