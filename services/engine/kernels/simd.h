// 16-lane float vectors over GCC vector extensions: zmm on AVX-512, two ymm on AVX2, plain
// loops elsewhere. Every operation is lane-wise or reduces in an order fixed in this file, so a
// value computed with them never depends on how many rows or tokens a call holds.
#pragma once

#include <c10/util/Half.h>

#include <cstdint>
#include <cstring>

#if defined(__AVX512F__) || defined(__F16C__)
#include <immintrin.h>
#endif

namespace llmserve {

constexpr int kLanes = 16;
#if defined(__AVX512F__)
// One zmm register.
typedef float V __attribute__((vector_size(64)));
typedef int32_t VI __attribute__((vector_size(64)));

inline V select(VI mask, V a, V b) { return mask ? a : b; }
inline V pow2i(V n) {  // 2^n for integral n in [-126, 127]
  VI bits = (__builtin_convertvector(n, VI) + 127) << 23;
  V out;
  std::memcpy(&out, &bits, sizeof out);
  return out;
}
#else
// Narrower machines hold V as parts of their register width. (A 64-byte GCC vector would be
// legal here too, but GCC keeps such variables in memory: 5x slower matmuls on AVX2.)
#if defined(__AVX2__)
constexpr int kPartLanes = 8;
#else
constexpr int kPartLanes = 4;  // SSE2, NEON
#endif
constexpr int kParts = kLanes / kPartLanes;
typedef float VP __attribute__((vector_size(4 * kPartLanes)));
typedef int32_t VIP __attribute__((vector_size(4 * kPartLanes)));

template <class P>
struct Parts {
  P p[kParts];
};
using V = Parts<VP>;
using VI = Parts<VIP>;

#define LLMSERVE_PARTWISE(op)                                            \
  template <class P>                                                     \
  inline Parts<P> operator op(Parts<P> a, Parts<P> b) {                  \
    for (int i = 0; i < kParts; ++i) a.p[i] = a.p[i] op b.p[i];          \
    return a;                                                            \
  }                                                                      \
  inline V operator op(V a, float b) {                                   \
    for (int i = 0; i < kParts; ++i) a.p[i] = a.p[i] op b;               \
    return a;                                                            \
  }                                                                      \
  inline V operator op(float a, V b) {                                   \
    for (int i = 0; i < kParts; ++i) b.p[i] = a op b.p[i];               \
    return b;                                                            \
  }                                                                      \
  template <class P>                                                     \
  inline Parts<P>& operator op##=(Parts<P>& a, Parts<P> b) {             \
    return a = a op b;                                                   \
  }
LLMSERVE_PARTWISE(+)
LLMSERVE_PARTWISE(-)
LLMSERVE_PARTWISE(*)
LLMSERVE_PARTWISE(/)
#undef LLMSERVE_PARTWISE

inline V operator-(V a) {
  for (int i = 0; i < kParts; ++i) a.p[i] = -a.p[i];
  return a;
}
inline VI operator>(V a, V b) {
  VI m;
  for (int i = 0; i < kParts; ++i) m.p[i] = a.p[i] > b.p[i];
  return m;
}
inline VI operator>(V a, float b) {
  VI m;
  for (int i = 0; i < kParts; ++i) m.p[i] = a.p[i] > b;
  return m;
}
inline VI operator<(V a, V b) { return b > a; }
inline V select(VI mask, V a, V b) {
  for (int i = 0; i < kParts; ++i) a.p[i] = mask.p[i] ? a.p[i] : b.p[i];
  return a;
}
inline VP pow2i(VP n) {
  VIP bits = (__builtin_convertvector(n, VIP) + 127) << 23;
  VP out;
  std::memcpy(&out, &bits, sizeof out);
  return out;
}
inline V pow2i(V n) {  // 2^n for integral n in [-126, 127]
  V out;
  for (int i = 0; i < kParts; ++i) out.p[i] = pow2i(n.p[i]);
  return out;
}
#endif

// Lane-wise a or b by a comparison's mask, for native vectors.
template <class T, class M>
inline T select(M mask, T a, T b) {
  return mask ? a : b;
}
typedef uint8_t U8x16 __attribute__((vector_size(16)));
typedef int8_t I8x16 __attribute__((vector_size(16)));

inline V load(const float* p) {
  V v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

inline void store(float* p, V v) { std::memcpy(p, &v, sizeof v); }

inline V splat(float x) {
#if defined(__AVX512F__)
  __m512 w = _mm512_set1_ps(x);
  V v;
  std::memcpy(&v, &w, sizeof v);
  return v;
#else
  V v;
  for (int i = 0; i < kParts; ++i) v.p[i] = VP{} + x;
  return v;
#endif
}

inline U8x16 load_u8(const uint8_t* p) {
  U8x16 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

inline I8x16 load_i8(const uint8_t* p) {
  I8x16 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

// Sixteen float16 values widened to float32 (exact).
inline V load_half(const uint16_t* p) {
#if defined(__AVX512F__)
  V v;
  __m512 w = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  std::memcpy(&v, &w, sizeof v);
  return v;
#elif defined(__F16C__)
  __m256 halves[2] = {
      _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))),
      _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 8)))};
  V v;
  std::memcpy(&v, halves, sizeof v);
  return v;
#else
  float out[kLanes];
  for (int i = 0; i < kLanes; ++i) out[i] = c10::detail::fp16_ieee_to_fp32_value(p[i]);
  return load(out);
#endif
}

// Sixteen bytes widened to float lanes.
template <bool kSigned, class Bytes>
inline V bytes_to_float(Bytes b) {
#if defined(__AVX512F__)
  __m128i raw;
  std::memcpy(&raw, &b, sizeof raw);
  __m512 f = _mm512_cvtepi32_ps(kSigned ? _mm512_cvtepi8_epi32(raw) : _mm512_cvtepu8_epi32(raw));
  V v;
  std::memcpy(&v, &f, sizeof v);
  return v;
#elif defined(__AVX2__)
  __m128i raw;
  std::memcpy(&raw, &b, sizeof raw);
  __m128i high = _mm_srli_si128(raw, 8);
  __m256 f[2] = {
      _mm256_cvtepi32_ps(kSigned ? _mm256_cvtepi8_epi32(raw) : _mm256_cvtepu8_epi32(raw)),
      _mm256_cvtepi32_ps(kSigned ? _mm256_cvtepi8_epi32(high) : _mm256_cvtepu8_epi32(high))};
  V v;
  std::memcpy(&v, f, sizeof v);
  return v;
#else
  float out[kLanes];
  for (int i = 0; i < kLanes; ++i) out[i] = b[i];
  return load(out);
#endif
}

inline V i8_to_float(I8x16 b) { return bytes_to_float<true>(b); }

// Sixteen bytes of two 4-bit values each, as floats: lo = low nibbles, hi = high nibbles.
// lo = byte - 16 * hi is exact in float32 and saves a mask and a conversion.
inline void nibbles_to_float(const uint8_t* p, V& lo, V& hi) {
#if defined(__AVX512F__)
  __m512i bytes = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  __m512 whole = _mm512_cvtepi32_ps(bytes);
  __m512 high = _mm512_cvtepi32_ps(_mm512_srli_epi32(bytes, 4));
  __m512 low = _mm512_fmadd_ps(high, _mm512_set1_ps(-16.0f), whole);
  std::memcpy(&lo, &low, sizeof lo);
  std::memcpy(&hi, &high, sizeof hi);
#else
  U8x16 q = load_u8(p);
  lo = bytes_to_float<false>(q & 15);
  hi = bytes_to_float<false>(q >> 4);
#endif
}

// W: one register's worth of float lanes (kW of them), for kernels that tile by register
// width rather than by V's 16 lanes. A lane's arithmetic is the same whatever kW is.
#if defined(__AVX512F__)
using W = V;
constexpr int kW = kLanes;
inline W load_w(const float* p) { return load(p); }
inline void store_w(float* p, W w) { store(p, w); }
inline W splat_w(float x) { return splat(x); }
inline W broadcast_w(const float* p) { return splat(*p); }
inline W load_half_w(const uint16_t* p) { return load_half(p); }
inline W i8_to_float_w(const uint8_t* p) { return i8_to_float(load_i8(p)); }
inline void nibbles_to_float_w(const uint8_t* p, W& lo, W& hi) { nibbles_to_float(p, lo, hi); }
#else
using W = VP;
constexpr int kW = kPartLanes;
inline W load_w(const float* p) {
  W w;
  std::memcpy(&w, p, sizeof w);
  return w;
}
inline void store_w(float* p, W w) { std::memcpy(p, &w, sizeof w); }
inline W splat_w(float x) { return W{} + x; }
// *p in every lane, loaded straight into the register (no shuffle uop on AVX2).
#if defined(__AVX2__)
inline W broadcast_w(const float* p) { return _mm256_broadcast_ss(p); }
#else
inline W broadcast_w(const float* p) { return splat_w(*p); }
#endif
#if defined(__AVX2__)
inline W load_half_w(const uint16_t* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
inline W i8_to_float_w(const uint8_t* p) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}
// Eight bytes of two 4-bit values each: lo = byte - 16 * hi, as in nibbles_to_float.
inline void nibbles_to_float_w(const uint8_t* p, W& lo, W& hi) {
  __m256i bytes = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
  __m256 high = _mm256_cvtepi32_ps(_mm256_srli_epi32(bytes, 4));
  lo = _mm256_fmadd_ps(high, _mm256_set1_ps(-16.0f), _mm256_cvtepi32_ps(bytes));
  hi = high;
}
#else
inline W load_half_w(const uint16_t* p) {
  float out[kW];
  for (int i = 0; i < kW; ++i) out[i] = c10::detail::fp16_ieee_to_fp32_value(p[i]);
  return load_w(out);
}
inline W i8_to_float_w(const uint8_t* p) {
  float out[kW];
  for (int i = 0; i < kW; ++i) out[i] = static_cast<int8_t>(p[i]);
  return load_w(out);
}
inline void nibbles_to_float_w(const uint8_t* p, W& lo, W& hi) {
  float l[kW], h[kW];
  for (int i = 0; i < kW; ++i) {
    l[i] = p[i] & 15;
    h[i] = p[i] >> 4;
  }
  lo = load_w(l);
  hi = load_w(h);
}
#endif
#endif

template <class T>
inline T vmax(T a, T b) {
  return select(a > b, a, b);
}

// The lanes of v (V or W) combined as a fixed pairwise tree.
template <class T, class Op>
inline float reduce_lanes(T v, Op op) {
  constexpr int n = sizeof(T) / sizeof(float);
  float s[n];
  std::memcpy(s, &v, sizeof s);
  for (int width = n / 2; width > 0; width /= 2)
    for (int i = 0; i < width; ++i) s[i] = op(s[i], s[i + width]);
  return s[0];
}

template <class T>
inline float hsum(T v) {
  return reduce_lanes(v, [](float a, float b) { return a + b; });
}

template <class T>
inline float hmax(T v) {
  return reduce_lanes(v, [](float a, float b) { return a > b ? a : b; });
}

// e^x for x <= 0, relative error below 2e-7; lanes under -87 give 0. T: V or W.
template <class T>
inline T vexp(T x) {
  const T lo = T{} - 87.0f;
  T clamped = select(x < lo, lo, x);
  // x = n ln2 + r, |r| <= ln2 / 2; n rounded with the 1.5 * 2^23 trick.
  T n = (clamped * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  T r = clamped - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  T p = T{} + 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  T out = p * pow2i(n);
  return select(x < lo, T{}, out);
}

}  // namespace llmserve
