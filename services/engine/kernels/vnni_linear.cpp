// y = x @ W.T for GGUF Q4_1 and Q8_0 weights on CPUs with AVX-512 VNNI: integer products of
// the file's quantized values q with activations rounded to int16, one float32 scale per
// row and 32-input block.
//
// vpdpwssd multiplies 32 int16 pairs per instruction, twice the products of a float32 FMA,
// and q needs no conversion to float. Each row's block of 32 inputs becomes a = round(x / s)
// with s = max|x| / 32767 (relative error at most 2^-16 of the block's largest value; greedy
// tokens still match float32 transformers, logits within 1e-2). Weights are the file's q in
// the tiles of packing.py, laid out in the (p, p + 16) input pairs vpdpwssd takes. Per
// (row, output), a block's 32 products sum exactly in int32 (|sum| < 2^24, so it converts
// to float exactly), then total += float(sum) * (d * s), and
// for Q4_1 total += m * s * (the block's sum of a): the product of the rounded x with the
// file's weights, in the same float order for every lane whatever the rows or tiling of the
// call: batch invariance.
#if defined(__AVX512VNNI__)
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "amx_tiles.h"
#include "quant_tiles.h"
#include "simd.h"
#include "thread_pool.h"

namespace llmserve {
namespace {

using V = __m512i;  // 16 int32 lanes, one per output of a tile

inline __m128i load16(const uint8_t* p) {
  return _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
}

// sum += q * a, 16 lanes of two int16 products each. In asm: GCC 12 copies the intrinsic's
// accumulator to and from a spare register around every instruction.
inline void dot_pairs(V& sum, V q, V a) {
  asm("vpdpwssd %2, %1, %0" : "+v"(sum) : "v"(q), "v"(a));
}

// Formats give, for inputs p and p + 16 of a block, one int32 lane per output holding their
// two q as int16 (p low, p + 16 high): the pair vpdpwssd multiplies with (a[p], a[p + 16]).
// pairs(t, i, first, second) gives those of p = i and p = i + 8 (i < 8), from the tiles'
// pair layout (packing.py).
struct Q4_1 : Q4_1Tile {
  // Row i: per output, q[i] | q[i + 8] << 4, then q[i + 16] | q[i + 24] << 4.
  static void pairs(const uint8_t* t, int i, V& first, V& second) {
    const auto* row = reinterpret_cast<const __m256i*>(t + kValues + i * 2 * kOut);
    const V w = _mm512_cvtepu8_epi16(_mm256_loadu_si256(row));
    first = _mm512_and_si512(w, _mm512_set1_epi16(15));
    second = _mm512_srli_epi16(w, 4);
  }
};

struct Q8_0 : Q8_0Tile {
  // Row p: per output, q[p] and q[p + 16].
  static void pairs(const uint8_t* t, int i, V& first, V& second) {
    const auto* rows = reinterpret_cast<const __m256i*>(t + kValues);
    first = _mm512_cvtepi8_epi16(_mm256_loadu_si256(rows + i));
    second = _mm512_cvtepi8_epi16(_mm256_loadu_si256(rows + i + 8));
  }
};

// Rows of x as the kernels read them: per block and row, 16 int32 of (a[p], a[p + 16]) pairs,
// the scale s and the block's sum of s * a (for the minimums). Block-major: a tile's rows of
// one block lie together, at fixed offsets from one pointer.
struct QuantizedRows {
  std::vector<int32_t> pairs;  // [blocks, rows, 16], unless the rows are in halves
  std::vector<float> scale, xsum;  // [blocks, rows], then kTileRows zeros
  int64_t num_rows, num_blocks;
#if defined(__AMX_BF16__)
  // For AMX tiles: a as bfloat16 halves (amx_tiles.h), [row tiles, blocks, 16, kBlockHalves],
  // so a row tile reads its blocks from consecutive memory; rows past num_rows are zeros.
  std::vector<uint16_t> halves;

  int64_t halves_at(int64_t row, int64_t block) const {
    return ((row / kTileRows * num_blocks + block) * kTileRows + row % kTileRows) * kBlockHalves;
  }
#endif

  int64_t at(int64_t row, int64_t block) const { return block * num_rows + row; }
};

constexpr int kTailRows = 16;  // rows of zeros after scale and xsum: a tile's padding rows

void quantize_rows(const float* x, int64_t num_rows, int64_t num_blocks,
                   [[maybe_unused]] bool as_halves, QuantizedRows& q) {
  q.num_rows = num_rows;
  q.num_blocks = num_blocks;
  if (!as_halves) q.pairs.resize(num_rows * num_blocks * 16);
  q.scale.resize(num_rows * num_blocks + kTailRows);
  q.xsum.resize(num_rows * num_blocks + kTailRows);
  std::fill(q.scale.end() - kTailRows, q.scale.end(), 0.0f);
  std::fill(q.xsum.end() - kTailRows, q.xsum.end(), 0.0f);
#if defined(__AMX_BF16__)
  if (as_halves) {
    const int64_t tiles = (num_rows + kTileRows - 1) / kTileRows;
    q.halves.resize(tiles * num_blocks * kTileRows * kBlockHalves);
    for (int64_t row = num_rows; row < tiles * kTileRows; ++row)  // the last tile's padding
      for (int64_t block = 0; block < num_blocks; ++block)
        std::fill_n(q.halves.data() + q.halves_at(row, block), kBlockHalves, 0);
  }
#endif
  parallel_for(num_rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin * num_blocks; i < end * num_blocks; ++i) {
      const int64_t at = q.at(i / num_blocks, i % num_blocks);
      W lo = load_w(x + i * kIn), hi = load_w(x + i * kIn + 16);
      const float absmax = hmax(vmax(vmax(lo, -lo), vmax(hi, -hi)));
      const float scale = absmax / 32767.0f, inv = absmax > 0.0f ? 32767.0f / absmax : 0.0f;
      V a = _mm512_cvtps_epi32(lo * inv), b = _mm512_cvtps_epi32(hi * inv);  // nearest even
      q.scale[at] = scale;
      q.xsum[at] = hsum(_mm512_cvtepi32_ps(_mm512_add_epi32(a, b))) * scale;  // exact sum of a
#if defined(__AMX_BF16__)
      if (as_halves) {
        store_block_halves(a, b, q.halves.data() + q.halves_at(i / num_blocks, i % num_blocks));
        continue;
      }
#endif
      V pair = _mm512_ternarylogic_epi32(a, _mm512_slli_epi32(b, 16), _mm512_set1_epi32(0xffff),
                                         0xec);  // (a & 0xffff) | b << 16
      _mm512_storeu_si512(q.pairs.data() + at * 16, pair);
    }
  });
}

// total plus one block's products for one row and group: float(sum) * (d * s), then, for
// formats with minimums, + m * (the block's sum of s * a), with s at *s and that sum at *xsum.
// Every tile adds blocks through this (the int16 kernels give the sum as int32, the AMX tiles
// as its exact float), so a row's outputs are the same whichever tile computes them.
template <bool kHasMin>
inline W add_block(W total, W sum, W d, W m, const float* s, const float* xsum) {
  total = sum * (d * broadcast_w(s)) + total;
  if constexpr (kHasMin) total = broadcast_w(xsum) * m + total;
  return total;
}

template <bool kHasMin>
inline W add_block(W total, V sum, W d, W m, const QuantizedRows& x, int64_t i) {
  return add_block<kHasMin>(total, _mm512_cvtepi32_ps(sum), d, m, &x.scale[i], &x.xsum[i]);
}

struct Problem {
  const QuantizedRows* x;
  const uint8_t* w;  // tile (group, block) at w + (group * num_blocks + block) * tile_bytes
  float* y;
  int64_t ldy;
};

// Per (row, group of 16 outputs): the block's int32 sums and the float total.
template <int R, int G>
struct Accumulators {
  V sum[R][G];
  W total[R][G] = {};

  void begin_block() {
    for (int r = 0; r < R; ++r)
      for (int g = 0; g < G; ++g) sum[r][g] = _mm512_setzero_si512();
  }

  // Pair p of the block: a pairs of rows at ap (stride 16), q pairs per group.
  void add(const int32_t* ap, const V* q) {
    for (int r = 0; r < R; ++r) {
      const V a = _mm512_set1_epi32(ap[r * 16]);  // the row's pair, loaded once for G groups
      for (int g = 0; g < G; ++g) dot_pairs(sum[r][g], q[g], a);
    }
  }

  // i: x.at(first row, block), the index of its scale and sum.
  template <bool kHasMin>
  void end_block(const QuantizedRows& x, int64_t i, const W* d, const W* m) {
    for (int r = 0; r < R; ++r)
      for (int g = 0; g < G; ++g)
        total[r][g] = add_block<kHasMin>(total[r][g], sum[r][g], d[g], m[g], x, i + r);
  }

  void store(const Problem& p, int64_t row, int64_t group) const {
    for (int r = 0; r < R; ++r)
      for (int g = 0; g < G; ++g)
        store_w(p.y + (row + r) * p.ldy + (group + g) * kOut, total[r][g]);
  }
};

// The tiles of format F for run_tiles (quant_tiles.h). Register budget (32 zmm): two per
// (row, group) accumulator, one per group's q.
template <class F>
struct Kernel {
  static constexpr int kDirectRows = 6, kPanelRows = 6, kPanelGroups = 2, kMaxTile = 12;
  static constexpr int kWideRows = 16, kWideMinRows = 8;
  // A panel holds kPanelGroups groups' q pairs unpacked, [blocks, 16 pairs, groups, 16
  // lanes], and their scales, [blocks, 2 (d, m), groups, 16]: formed once, read by every
  // row tile.
  struct Panel {
    std::vector<int32_t> q;
    std::vector<float> scales;
  };
  const Problem& p;

  // Rows [row, row + R) x groups [group, group + G), q pairs formed in registers.
  template <int R, int G>
  void direct_tile(int64_t row, int64_t group) const {
    const QuantizedRows& x = *p.x;
    Accumulators<R, G> acc;
    for (int64_t kb = 0; kb < x.num_blocks; ++kb) {
      const uint8_t* t[G];
      for (int g = 0; g < G; ++g) {
        t[g] = p.w + ((group + g) * x.num_blocks + kb) * F::kTileBytes;
        // One row streams the weights: the hardware prefetcher alone keeps up, and these
        // loads only slowed it (a batch-1 step 12% longer with them).
        if constexpr (R > 1)
          for (int64_t line = 0; line < F::kTileBytes; line += 64)
            __builtin_prefetch(t[g] + kPrefetchTiles * F::kTileBytes + line);
      }
      const int32_t* ap = x.pairs.data() + x.at(row, kb) * 16;
      acc.begin_block();
      for (int i = 0; i < 8; ++i) {
        V first[G], second[G];
        for (int g = 0; g < G; ++g) F::pairs(t[g], i, first[g], second[g]);
        acc.add(ap + i, first);
        acc.add(ap + i + 8, second);
      }
      W d[G], m[G];
      for (int g = 0; g < G; ++g) F::scales(t[g], 0, d[g], m[g]);
      acc.template end_block<F::kHasMin>(x, x.at(row, kb), d, m);
    }
    acc.store(p, row, group);
  }

  // Rows [row, row + R) x one group: each q pair is unpacked once for up to kWideRows rows,
  // whose block sums fill the registers; the float totals stay in memory (a load and a store
  // per row and block).
  template <int R>
  void wide_tile(int64_t row, int64_t group) const {
    const QuantizedRows& x = *p.x;
    alignas(64) float total[R][kOut] = {};
    for (int64_t kb = 0; kb < x.num_blocks; ++kb) {
      const uint8_t* t = p.w + (group * x.num_blocks + kb) * F::kTileBytes;
      for (int64_t line = 0; line < F::kTileBytes; line += 64)
        __builtin_prefetch(t + kPrefetchTiles * F::kTileBytes + line);
      const int64_t at = x.at(row, kb);
      const int32_t* ap = x.pairs.data() + at * 16;
      V sum[R];
      for (int r = 0; r < R; ++r) sum[r] = _mm512_setzero_si512();
      for (int i = 0; i < 8; ++i) {
        V first, second;
        F::pairs(t, i, first, second);
        for (int r = 0; r < R; ++r) dot_pairs(sum[r], first, _mm512_set1_epi32(ap[r * 16 + i]));
        for (int r = 0; r < R; ++r)
          dot_pairs(sum[r], second, _mm512_set1_epi32(ap[r * 16 + i + 8]));
      }
      W d, m;
      F::scales(t, 0, d, m);
      for (int r = 0; r < R; ++r)
        store_w(total[r], add_block<F::kHasMin>(load_w(total[r]), sum[r], d, m, x, at + r));
    }
    for (int r = 0; r < R; ++r) store_w(p.y + (row + r) * p.ldy + group * kOut, load_w(total[r]));
  }

  void fill_panel(int64_t group, Panel& panel) const {
    constexpr int G = kPanelGroups;
    const int64_t num_blocks = p.x->num_blocks;
    panel.q.resize(num_blocks * 16 * G * kOut);
    panel.scales.resize(num_blocks * 2 * G * kOut);
    for (int64_t kb = 0; kb < num_blocks; ++kb) {
      for (int g = 0; g < G; ++g) {
        const uint8_t* t = p.w + ((group + g) * num_blocks + kb) * F::kTileBytes;
        W d, m;
        F::scales(t, 0, d, m);
        store_w(panel.scales.data() + (kb * 2 * G + g) * kOut, d);
        store_w(panel.scales.data() + (kb * 2 * G + G + g) * kOut, m);
        for (int i = 0; i < 8; ++i) {
          V first, second;
          F::pairs(t, i, first, second);
          _mm512_storeu_si512(panel.q.data() + ((kb * 16 + i) * G + g) * kOut, first);
          _mm512_storeu_si512(panel.q.data() + ((kb * 16 + i + 8) * G + g) * kOut, second);
        }
      }
    }
  }

  // As direct_tile, reading q and scales from the panel.
  template <int R>
  void panel_tile(const Panel& panel, int64_t row, int64_t group) const {
    constexpr int G = kPanelGroups;
    const QuantizedRows& x = *p.x;
    Accumulators<R, G> acc;
    for (int64_t kb = 0; kb < x.num_blocks; ++kb) {
      const int32_t* qk = panel.q.data() + kb * 16 * G * kOut;
      const int32_t* ap = x.pairs.data() + x.at(row, kb) * 16;
      acc.begin_block();
      for (int i = 0; i < 16; ++i) {
        V q[G];
        for (int g = 0; g < G; ++g) q[g] = _mm512_loadu_si512(qk + (i * G + g) * kOut);
        acc.add(ap + i, q);
      }
      const float* sk = panel.scales.data() + kb * 2 * G * kOut;
      W d[G], m[G];
      for (int g = 0; g < G; ++g) {
        d[g] = load_w(sk + g * kOut);
        m[g] = load_w(sk + (G + g) * kOut);
      }
      acc.template end_block<F::kHasMin>(x, x.at(row, kb), d, m);
    }
    acc.store(p, row, group);
  }
};

#if defined(__AMX_BF16__)
// Q4_1 on AMX tiles (amx_tiles.h), from kMinRows rows: per group of 16 outputs, its B tiles
// formed once per kRowChunk rows, then tiles of 16 rows, their totals in registers. Below
// kMinRows rows, forming B tiles costs what the tiles save.
struct AmxQ4_1 {
  static constexpr int64_t kMinRows = 32, kRowChunk = 256;
  struct Panel {
    std::vector<uint16_t> b;  // [blocks, kBTile]
    std::vector<float> scales;  // [blocks, 2 (d, m), 16]
  };
  const Problem& p;

  static bool serves(int64_t num_rows) { return num_rows >= kMinRows && tiles_permitted(); }

  void fill_panel(int64_t group, Panel& panel) const {
    const int64_t num_blocks = p.x->num_blocks;
    panel.b.resize(num_blocks * kBTile);
    panel.scales.resize(num_blocks * 2 * kOut);
    for (int64_t kb = 0; kb < num_blocks; ++kb) {
      const uint8_t* t = p.w + (group * num_blocks + kb) * Q4_1::kTileBytes;
      W d, m;
      Q4_1::scales(t, 0, d, m);
      store_w(panel.scales.data() + kb * 2 * kOut, d);
      store_w(panel.scales.data() + (kb * 2 + 1) * kOut, m);
      store_q4_1_b_tile(t + Q4_1::kValues, panel.b.data() + kb * kBTile);
    }
  }

  // Rows [row, row + 16) x the panel's group; rows past num_rows are computed, not stored.
  void tile(const uint16_t* b, const float* scales, int64_t row, int64_t group) const {
    const QuantizedRows& x = *p.x;
    const uint16_t* a = x.halves.data() + x.halves_at(row, 0);
    const float *row_scale = x.scale.data() + row, *row_xsum = x.xsum.data() + row;
    const int64_t num_blocks = x.num_blocks, num_rows = x.num_rows;
    alignas(64) float sums[2][kTileRows][16];
    auto products = [&](int64_t kb) {
      if (kb % 2 == 0)
        block_products<0>(a + kb * kTileRows * kBlockHalves, b + kb * kBTile, sums[0]);
      else
        block_products<1>(a + kb * kTileRows * kBlockHalves, b + kb * kBTile, sums[1]);
    };
    W total[kTileRows] = {};
    products(0);
    for (int64_t kb = 0; kb < num_blocks; ++kb) {
      const int set = kb % 2;
      // The tile unit's work while this block's sums are rescaled.
      if (kb + 1 < num_blocks) products(kb + 1);
      const W d = load_w(scales + kb * 2 * kOut), m = load_w(scales + (kb * 2 + 1) * kOut);
      const float *s = row_scale + kb * num_rows, *xsum = row_xsum + kb * num_rows;
#pragma GCC unroll 16
      for (int r = 0; r < kTileRows; ++r)
        total[r] = add_block<true>(total[r], load_w(sums[set][r]), d, m, s + r, xsum + r);
    }
    float* y = p.y + row * p.ldy + group * kOut;
    const int64_t rows = std::min<int64_t>(kTileRows, num_rows - row);
#pragma GCC unroll 16
    for (int r = 0; r < kTileRows; ++r)  // constant indices keep total in registers
      if (r < rows) store_w(y + r * p.ldy, total[r]);
  }

  void run(int64_t num_rows, int64_t num_groups) const {
    parallel_for(num_groups, 1, [&](int64_t begin, int64_t end) {
      configure_tiles();
      thread_local Panel panel;
      for (int64_t chunk = 0; chunk < num_rows; chunk += kRowChunk) {
        const int64_t chunk_end = std::min(num_rows, chunk + kRowChunk);
        for (int64_t group = begin; group < end; ++group) {
          fill_panel(group, panel);
          for (int64_t row = chunk; row < chunk_end; row += kTileRows)
            tile(panel.b.data(), panel.scales.data(), row, group);
        }
      }
    });
  }
};
#endif

template <class F>
at::Tensor vnni_linear(const at::Tensor& x, const at::Tensor& tiles, int64_t in_features) {
  at::Tensor x2 = check_linear_args(x, tiles, in_features, F::kTileBytes);
  const int64_t num_rows = x2.size(0), num_groups = tiles.size(0), num_blocks = tiles.size(1);
  at::Tensor y = at::empty({num_rows, num_groups * kOut}, x.options());
  thread_local QuantizedRows rows;
  const Problem p{&rows, tiles.data_ptr<uint8_t>(), y.data_ptr<float>(), num_groups * kOut};
#if defined(__AMX_BF16__)
  if constexpr (std::is_same_v<F, Q4_1>) {
    if (AmxQ4_1::serves(num_rows)) {
      quantize_rows(x2.data_ptr<float>(), num_rows, num_blocks, /*as_halves=*/true, rows);
      AmxQ4_1{p}.run(num_rows, num_groups);
      return y.view(linear_out_shape(x, num_groups));
    }
  }
#endif
  quantize_rows(x2.data_ptr<float>(), num_rows, num_blocks, /*as_halves=*/false, rows);
  run_tiles(Kernel<F>{p}, num_rows, num_groups);
  return y.view(linear_out_shape(x, num_groups));
}

}  // namespace
}  // namespace llmserve

TORCH_LIBRARY_IMPL(llmserve, CPU, m) {
  m.impl("q4_1_linear", &llmserve::vnni_linear<llmserve::Q4_1>);
  m.impl("q8_0_linear", &llmserve::vnni_linear<llmserve::Q8_0>);
}

#if defined(__AMX_BF16__)
TORCH_LIBRARY_FRAGMENT(llmserve, m) {
  m.def("amx_tiles_permitted() -> bool", &llmserve::tiles_permitted);
}
#endif
#endif  // __AVX512VNNI__
