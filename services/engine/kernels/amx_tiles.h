// AMX tiles for the Q4_1 matmuls of vnni_linear.cpp: the very int32 block sums that vpdpwssd
// gives, from bfloat16 tile products that are exact.
//
// An int16 activation a is 256 * hi + lo (hi its signed high byte, lo its unsigned low byte),
// and Q4_1's q is 0..15: 256 * hi, lo and q are bfloat16 values exactly (8 significant
// bits). tdpbf16ps multiplies and adds them in float32, and every product and partial sum of
// a block is an integer below 2^24 in magnitude (at most (256 * 128 + 255) * 15 * 32), so
// each step is exact in any order: the tile holds float(sum of a * q) for the block, the
// integer the int16 kernel converts. What follows it (vnni_linear.cpp's add_block) is the
// same code, so a row's outputs are bitwise the same whichever unit computed them.
//
// A tile product multiplies A, 16 rows x 32 bfloat16 (one block of 16 activation rows, its
// 256 * hi or its lo), by B, 16 rows x 16 outputs x 2 bfloat16, into C, 16 rows x 16 float32.
// Inputs go in the order k = 4 i + c <-> block input i + 8 c (i < 8, c < 4): the order in
// which packing.py's pair tiles hold q, so B comes from them with a few shuffles.
#pragma once

#if defined(__AMX_BF16__)
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cstdint>

namespace llmserve {

constexpr int kTileRows = 16;   // activation rows of a tile product
constexpr int kBlockHalves = 64;  // one row's block as tile input: 32 (256 * hi), 32 lo
constexpr int kBTile = 16 * 32;   // one block's B tile, bfloat16 values

// Linux lets a process use the tile registers only once it asks (arch_prctl).
inline bool tiles_permitted() {
  static const bool permitted = [] {
    constexpr int kReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
    return syscall(SYS_arch_prctl, kReqXcompPerm, kXfeatureXtiledata) == 0;
  }();
  return permitted;
}

// Eight tiles of 16 rows x 64 bytes: C in 0 and 1, then (A high, A low, B) in 2-4 and in 5-7,
// so that one block's products run while the previous block's sums are read. Tile
// configuration is per thread, and other code may change it: set before each run of tiles.
inline void configure_tiles() {
  struct alignas(64) Config {
    uint8_t palette = 1, start_row = 0, reserved[14] = {};
    uint16_t colsb[16] = {};
    uint8_t rows[16] = {};
  } config;
  for (int t = 0; t < 8; ++t) config.rows[t] = kTileRows, config.colsb[t] = 64;
  _tile_loadconfig(&config);
}

// One row's block as tile input: a (inputs 0-15) and b (16-31) as int32 lanes (the int16
// values), stored as 256 * hi, then lo, as bfloat16 in the order k.
inline void store_block_halves(__m512i a, __m512i b, uint16_t* out) {
  static const __m512i order = [] {
    alignas(64) int16_t index[32];
    for (int i = 0; i < 8; ++i)
      for (int c = 0; c < 4; ++c) index[4 * i + c] = static_cast<int16_t>(i + 8 * c);
    return _mm512_load_si512(index);
  }();
  const __m512i words = _mm512_permutexvar_epi16(
      order, _mm512_inserti64x4(_mm512_castsi256_si512(_mm512_cvtepi32_epi16(a)),
                                _mm512_cvtepi32_epi16(b), 1));
  const __m512i high = _mm512_slli_epi16(_mm512_srai_epi16(words, 8), 8);  // 256 * hi
  const __m512i low = _mm512_and_si512(words, _mm512_set1_epi16(0xff));
  auto store = [](__m512i v, uint16_t* p) {  // 32 int16 values as 32 bfloat16 (exact)
    const __m512 first = _mm512_cvtepi32_ps(_mm512_cvtepi16_epi32(_mm512_castsi512_si256(v)));
    const __m512 second =
        _mm512_cvtepi32_ps(_mm512_cvtepi16_epi32(_mm512_extracti64x4_epi64(v, 1)));
    _mm512_storeu_si512(p, (__m512i)_mm512_cvtne2ps_pbh(second, first));
  };
  store(high, out);
  store(low, out + 32);
}

// One block's B tile from a Q4_1 pair tile's values (packing.py: row i, per output j, the
// bytes q[i] | q[i + 8] << 4 and q[i + 16] | q[i + 24] << 4): B row 2 i holds per output
// q[i], q[i + 8] and row 2 i + 1 holds q[i + 16], q[i + 24].
inline void store_q4_1_b_tile(const uint8_t* values, uint16_t* out) {
  static const __m512i bf16_of = [] {  // bfloat16 bits of 0..15 (the upper half of the float)
    alignas(64) uint16_t bits[32] = {};
    for (int n = 1; n < 16; ++n) {
      float f = static_cast<float>(n);
      uint32_t u;
      __builtin_memcpy(&u, &f, 4);
      bits[n] = static_cast<uint16_t>(u >> 16);
    }
    return _mm512_load_si512(bits);
  }();
  for (int i = 0; i < 8; ++i) {
    const __m512i w = _mm512_cvtepu8_epi16(
        _mm256_loadu_si256(reinterpret_cast<const __m256i*>(values + i * 32)));
    // Per output j, 16-bit lanes 2 j and 2 j + 1: q[i], q[i + 16] (low) and q[i + 8], q[i + 24].
    const __m512i low = _mm512_permutexvar_epi16(_mm512_and_si512(w, _mm512_set1_epi16(15)), bf16_of);
    const __m512i high = _mm512_permutexvar_epi16(_mm512_srli_epi16(w, 4), bf16_of);
    constexpr __mmask32 kOdd = 0xaaaaaaaa;
    _mm512_storeu_si512(out + (2 * i) * 32,
                        _mm512_mask_blend_epi16(kOdd, low, _mm512_slli_epi32(high, 16)));
    _mm512_storeu_si512(out + (2 * i + 1) * 32,
                        _mm512_mask_blend_epi16(kOdd, _mm512_srli_epi32(low, 16), high));
  }
}

// One block's tile products for 16 rows x one group into c (16 x 16 float32), on the tiles of
// set S (0 or 1): a, the block's 256 * hi rows (lo rows at a + 32; rows kBlockHalves apart),
// b its B tile. Blocks alternate sets, so that one block's products run while the previous
// block's sums are read. The intrinsics take tile numbers as literals: one expansion per set.
#define LLMSERVE_BLOCK_PRODUCTS(C, HIGH, LOW, B)  \
  _tile_zero(C);                                  \
  _tile_loadd(HIGH, a, kBlockHalves * 2);         \
  _tile_loadd(LOW, a + 32, kBlockHalves * 2);     \
  _tile_loadd(B, b, 64);                          \
  _tile_dpbf16ps(C, HIGH, B);                     \
  _tile_dpbf16ps(C, LOW, B);                      \
  _tile_stored(C, c, 64)

template <int S>
inline void block_products(const uint16_t* a, const uint16_t* b, float (*c)[16]) {
  if constexpr (S == 0) {
    LLMSERVE_BLOCK_PRODUCTS(0, 2, 3, 4);
  } else {
    LLMSERVE_BLOCK_PRODUCTS(1, 5, 6, 7);
  }
}
#undef LLMSERVE_BLOCK_PRODUCTS

}  // namespace llmserve
#endif  // __AMX_BF16__
