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
typedef float V __attribute__((vector_size(64)));
typedef int32_t VI __attribute__((vector_size(64)));
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
  for (int i = 0; i < kLanes; ++i) v[i] = x;
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

// Sixteen bytes widened to float lanes (the compiler scalarizes __builtin_convertvector here).
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
  return __builtin_convertvector(b, V);
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

inline V vmax(V a, V b) { return a > b ? a : b; }

// Sum of the lanes as a fixed pairwise tree.
inline float hsum(V v) {
  float s[kLanes];
  store(s, v);
  for (int width = kLanes / 2; width > 0; width /= 2)
    for (int i = 0; i < width; ++i) s[i] += s[i + width];
  return s[0];
}

inline float hmax(V v) {
  float s[kLanes];
  store(s, v);
  for (int width = kLanes / 2; width > 0; width /= 2)
    for (int i = 0; i < width; ++i) s[i] = s[i] > s[i + width] ? s[i] : s[i + width];
  return s[0];
}

// e^x for x <= 0, relative error below 2e-7; lanes under -87 give 0.
inline V vexp(V x) {
  const V lo = splat(-87.0f);
  V clamped = x < lo ? lo : x;
  // x = n ln2 + r, |r| <= ln2 / 2; n rounded with the 1.5 * 2^23 trick.
  V n = (clamped * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  V r = clamped - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  V p = splat(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  VI bits = (__builtin_convertvector(n, VI) + 127) << 23;
  V scale;
  std::memcpy(&scale, &bits, sizeof scale);
  V out = p * scale;
  return x < lo ? V{} : out;
}

}  // namespace llmserve
