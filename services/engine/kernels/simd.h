// One register of float lanes, W (kW lanes: 16 on AVX-512, 8 on AVX2, 4 elsewhere), over GCC
// vector extensions plus a few intrinsics. Kernels tile by this width: a wider GCC vector
// type would be legal on narrower machines too, but GCC keeps such variables in memory (5x
// slower matmuls on AVX2). Every operation is lane-wise or reduces in an order fixed in
// this file, so a value never depends on how many rows or tokens a call holds.
#pragma once

#include <c10/util/Half.h>

#include <cstdint>
#include <cstring>

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

namespace llmserve {

constexpr int kLanes = 16;  // outputs of a weight tile, keys of a KV block's vector rows
#if defined(__AVX512F__)
constexpr int kW = 16;
#elif defined(__AVX2__)
constexpr int kW = 8;
#else
constexpr int kW = 4;  // SSE2, NEON
#endif
typedef float W __attribute__((vector_size(4 * kW)));
typedef int32_t WI __attribute__((vector_size(4 * kW)));

inline W load_w(const float* p) {
  W w;
  std::memcpy(&w, p, sizeof w);
  return w;
}

inline void store_w(float* p, W w) { std::memcpy(p, &w, sizeof w); }

inline W splat_w(float x) { return W{} + x; }

// *p in every lane, loaded straight into the register (on AVX2 no shuffle uop).
inline W broadcast_w(const float* p) {
#if defined(__AVX512F__)
  return _mm512_set1_ps(*p);
#elif defined(__AVX2__)
  return _mm256_broadcast_ss(p);
#else
  return splat_w(*p);
#endif
}

// kW float16 values widened to float32 (exact).
inline W load_half_w(const uint16_t* p) {
#if defined(__AVX512F__)
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
#elif defined(__AVX2__)
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
#else
  float out[kW];
  for (int i = 0; i < kW; ++i) out[i] = c10::detail::fp16_ieee_to_fp32_value(p[i]);
  return load_w(out);
#endif
}

// kW float32 values rounded to float16 (to nearest even, as torch's .half()).
inline void store_half_w(uint16_t* p, W w) {
#if defined(__AVX512F__)
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p),
                      _mm512_cvtps_ph(w, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
#elif defined(__AVX2__)
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p),
                   _mm256_cvtps_ph(w, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
#else
  float in[kW];
  store_w(in, w);
  for (int i = 0; i < kW; ++i) p[i] = c10::detail::fp16_ieee_from_fp32_value(in[i]);
#endif
}

// kW signed bytes as floats.
inline W i8_to_float_w(const uint8_t* p) {
#if defined(__AVX512F__)
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
#elif defined(__AVX2__)
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
#else
  float out[kW];
  for (int i = 0; i < kW; ++i) out[i] = static_cast<int8_t>(p[i]);
  return load_w(out);
#endif
}

// kW bytes of two 4-bit values each, as floats: lo = low nibbles, hi = high nibbles.
// lo = byte - 16 * hi is exact in float32 and saves a mask and a conversion.
inline void nibbles_to_float_w(const uint8_t* p, W& lo, W& hi) {
#if defined(__AVX512F__)
  __m512i bytes = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  hi = _mm512_cvtepi32_ps(_mm512_srli_epi32(bytes, 4));
  lo = _mm512_fmadd_ps(hi, _mm512_set1_ps(-16.0f), _mm512_cvtepi32_ps(bytes));
#elif defined(__AVX2__)
  __m256i bytes = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
  hi = _mm256_cvtepi32_ps(_mm256_srli_epi32(bytes, 4));
  lo = _mm256_fmadd_ps(hi, _mm256_set1_ps(-16.0f), _mm256_cvtepi32_ps(bytes));
#else
  float l[kW], h[kW];
  for (int i = 0; i < kW; ++i) {
    l[i] = p[i] & 15;
    h[i] = p[i] >> 4;
  }
  lo = load_w(l);
  hi = load_w(h);
#endif
}

inline W vmax(W a, W b) { return a > b ? a : b; }

// The lanes of v combined as a fixed pairwise tree.
template <class Op>
inline float reduce_lanes(W v, Op op) {
  float s[kW];
  store_w(s, v);
  for (int width = kW / 2; width > 0; width /= 2)
    for (int i = 0; i < width; ++i) s[i] = op(s[i], s[i + width]);
  return s[0];
}

inline float hsum(W v) {
  return reduce_lanes(v, [](float a, float b) { return a + b; });
}

inline float hmax(W v) {
  return reduce_lanes(v, [](float a, float b) { return a > b ? a : b; });
}

// The largest value of row[0, n); `nan` says whether the row holds a NaN (the largest of
// the other values is returned then).
inline float row_max(const float* row, int64_t n, bool& nan) {
  W best = splat_w(-__builtin_inff());
  WI unordered = {};  // lanes that saw a NaN
  int64_t i = 0;
  for (; i + kW <= n; i += kW) {
    const W v = load_w(row + i);
    best = vmax(best, v);
    unordered |= v != v;
  }
  float top = hmax(best);
  nan = false;
  for (int j = 0; j < kW; ++j) nan |= unordered[j] != 0;
  for (; i < n; ++i) {
    nan |= row[i] != row[i];
    top = row[i] > top ? row[i] : top;
  }
  return top;
}

// A 16-lane value held in kParts registers, summed as one 16-lane pairwise tree: the same
// order whatever kW is. The parts are summed in place.
constexpr int kParts = kLanes / kW;
inline float hsum16(W (&parts)[kParts]) {
  for (int width = kParts / 2; width > 0; width /= 2)
    for (int i = 0; i < width; ++i) parts[i] = parts[i] + parts[i + width];
  return hsum(parts[0]);
}

// e^x for x <= 0, relative error below 2e-7; lanes under -87 give 0.
inline W vexp(W x) {
  const W lo = splat_w(-87.0f);
  W clamped = x < lo ? lo : x;
  // x = n ln2 + r, |r| <= ln2 / 2; n rounded with the 1.5 * 2^23 trick.
  W n = (clamped * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  W r = clamped - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  W p = splat_w(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  WI bits = (__builtin_convertvector(n, WI) + 127) << 23;  // 2^n
  W scale;
  std::memcpy(&scale, &bits, sizeof scale);
  W out = p * scale;
  return x < lo ? W{} : out;
}

}  // namespace llmserve
