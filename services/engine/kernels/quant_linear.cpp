// y = x @ W.T for GGUF Q4_1 and Q8_0 weights with float32 activations and accumulation.
//
// Weights are the file's own blocks regrouped by 16 output features ("tiles", see
// services/engine/kernels/packing.py): a tile holds, for 16 outputs and 32 inputs, the 16
// float16 scales (and Q4_1's 16 minimums) and the quantized values laid out input-major, so one
// 16-byte load gives one input's weight for 16 outputs. A weight is dequantized exactly as
// the file defines it (d * q + m, in float32) and every output accumulates its 32-input blocks
// in one fixed order, in one lane: inputs p (p = 0..15) of every block into one sum, inputs
// p + 16 into another, the two added at the end. Nothing in a row's result depends on the
// other rows of the call or on how the work is tiled, so output is batch invariant.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "simd.h"

namespace llmserve {
namespace {

constexpr int kOut = 16;  // outputs per tile
constexpr int kIn = 32;   // inputs per tile (one GGUF block)

struct Q4_1 {
  static constexpr int64_t kTileBytes = 2 * kOut * 2 + kOut * kIn / 2;  // d, m, nibbles
  static void scales(const uint8_t* t, V& d, V& m) {
    d = load_half(reinterpret_cast<const uint16_t*>(t));
    m = load_half(reinterpret_cast<const uint16_t*>(t + 2 * kOut));
  }
  // Inputs p and p + 16 of the block, for the tile's 16 outputs.
  static void weights(const uint8_t* t, int p, V d, V m, V& lo, V& hi) {
    U8x16 q = load_u8(t + 4 * kOut + p * kOut);
    lo = u8_to_float(q & 15) * d + m;
    hi = u8_to_float(q >> 4) * d + m;
  }
};

struct Q8_0 {
  static constexpr int64_t kTileBytes = 2 * kOut + kOut * kIn;  // d, int8 values
  static void scales(const uint8_t* t, V& d, V& m) {
    d = load_half(reinterpret_cast<const uint16_t*>(t));
    m = V{};
  }
  static void weights(const uint8_t* t, int p, V d, V, V& lo, V& hi) {
    lo = i8_to_float(load_i8(t + 2 * kOut + p * kOut)) * d;
    hi = i8_to_float(load_i8(t + 2 * kOut + (p + 16) * kOut)) * d;
  }
};

// Register tiles (rows x groups of 16 outputs), two accumulators each.
#if defined(__AVX512F__)
constexpr int kDirectRows = 4, kPanelRows = 6, kPanelGroups = 2;
#else
constexpr int kDirectRows = 2, kPanelRows = 2, kPanelGroups = 1;
#endif
constexpr int64_t kPanelMinRows = 16;  // from here on a dequantized panel pays for itself
constexpr int64_t kRowChunk = 128;     // rows per pass over a panel (their x stays in cache)

struct Problem {
  const float* x;
  int64_t ldx;
  const uint8_t* w;  // tile (group, block) at w + (group * num_blocks + block) * tile_bytes
  int64_t num_blocks;
  float* y;
  int64_t ldy;
};

// Two sums per (row, output) lane: inputs p of each block, and inputs p + 16.
template <int R, int G>
struct Accumulators {
  V lo[R][G] = {}, hi[R][G] = {};

  // Inputs i and i + 16 of a block: x rows at xk (stride ldx), weights wl / wh per group.
  void add(const float* xk, int64_t ldx, int i, const V* wl, const V* wh) {
    for (int r = 0; r < R; ++r) {
      V xl = splat(xk[r * ldx + i]), xh = splat(xk[r * ldx + i + 16]);
      for (int g = 0; g < G; ++g) {
        lo[r][g] = xl * wl[g] + lo[r][g];
        hi[r][g] = xh * wh[g] + hi[r][g];
      }
    }
  }

  void store(const Problem& p, int64_t row, int64_t group) const {
    for (int r = 0; r < R; ++r)
      for (int g = 0; g < G; ++g)
        llmserve::store(p.y + (row + r) * p.ldy + (group + g) * kOut, lo[r][g] + hi[r][g]);
  }
};

// Rows [row, row + R) x groups [group, group + G), dequantizing in registers.
template <class F, int R, int G>
void direct_tile(const Problem& p, int64_t row, int64_t group) {
  Accumulators<R, G> acc;
  for (int64_t kb = 0; kb < p.num_blocks; ++kb) {
    const uint8_t* t[G];
    V d[G], m[G];
    for (int g = 0; g < G; ++g) {
      t[g] = p.w + ((group + g) * p.num_blocks + kb) * F::kTileBytes;
      F::scales(t[g], d[g], m[g]);
    }
    for (int i = 0; i < kIn / 2; ++i) {
      V lo[G], hi[G];
      for (int g = 0; g < G; ++g) F::weights(t[g], i, d[g], m[g], lo[g], hi[g]);
      acc.add(p.x + row * p.ldx + kb * kIn, p.ldx, i, lo, hi);
    }
  }
  acc.store(p, row, group);
}

// Same arithmetic as direct_tile, reading weights from a dequantized panel
// [num_blocks, 32, G * 16] (input-major within a block, in the block's p, p + 16 order).
template <int R, int G>
void panel_tile(const Problem& p, const float* panel, int64_t row, int64_t group) {
  Accumulators<R, G> acc;
  for (int64_t kb = 0; kb < p.num_blocks; ++kb) {
    const float* wk = panel + kb * kIn * G * kOut;
    for (int i = 0; i < kIn / 2; ++i) {
      V lo[G], hi[G];
      for (int g = 0; g < G; ++g) {
        lo[g] = load(wk + (2 * i) * G * kOut + g * kOut);
        hi[g] = load(wk + (2 * i + 1) * G * kOut + g * kOut);
      }
      acc.add(p.x + row * p.ldx + kb * kIn, p.ldx, i, lo, hi);
    }
  }
  acc.store(p, row, group);
}

template <class F, int G>
void fill_panel(const Problem& p, int64_t group, float* panel) {
  for (int64_t kb = 0; kb < p.num_blocks; ++kb) {
    float* wk = panel + kb * kIn * G * kOut;
    for (int g = 0; g < G; ++g) {
      const uint8_t* t = p.w + ((group + g) * p.num_blocks + kb) * F::kTileBytes;
      V d, m;
      F::scales(t, d, m);
      for (int i = 0; i < kIn / 2; ++i) {
        V lo, hi;
        F::weights(t, i, d, m, lo, hi);
        store(wk + (2 * i) * G * kOut + g * kOut, lo);
        store(wk + (2 * i + 1) * G * kOut + g * kOut, hi);
      }
    }
  }
}

// Rows [begin, end) in tiles of R, the remainder one tile of fewer rows.
template <int R, class Tile>
void over_rows(int64_t begin, int64_t end, Tile&& tile) {
  int64_t row = begin;
  for (; row + R <= end; row += R) tile(row, std::integral_constant<int, R>{});
  if constexpr (R > 1) {
    if (row < end) over_rows<R - 1>(row, end, tile);
  }
}

template <class F, int G>
void direct_groups(const Problem& p, int64_t num_rows, int64_t group_begin, int64_t group_end) {
  for (int64_t group = group_begin; group < group_end; group += G) {
    over_rows<kDirectRows>(0, num_rows, [&](int64_t row, auto rows) {
      constexpr int R = decltype(rows)::value;
      // Fewer groups per tile as rows grow, so the accumulators stay in registers.
      constexpr int GT = R <= 1 ? G : (G < 2 ? G : 2);
      for (int g = 0; g < G; g += GT) direct_tile<F, R, GT>(p, row, group + g);
    });
  }
}

template <class F>
void panel_groups(const Problem& p, int64_t num_rows, int64_t group_begin, int64_t group_end) {
  constexpr int G = kPanelGroups;
  thread_local std::vector<float> panel;
  panel.resize(p.num_blocks * kIn * G * kOut);
  for (int64_t chunk = 0; chunk < num_rows; chunk += kRowChunk) {
    int64_t chunk_end = std::min(num_rows, chunk + kRowChunk);
    for (int64_t group = group_begin; group < group_end; group += G) {
      fill_panel<F, G>(p, group, panel.data());
      over_rows<kPanelRows>(chunk, chunk_end, [&](int64_t row, auto rows) {
        panel_tile<decltype(rows)::value, G>(p, panel.data(), row, group);
      });
    }
  }
}

template <class F>
at::Tensor quant_linear(const at::Tensor& x, const at::Tensor& tiles, int64_t in_features) {
  TORCH_CHECK(x.scalar_type() == at::kFloat, "quantized linear takes float32 activations");
  TORCH_CHECK(tiles.scalar_type() == at::kByte && tiles.dim() == 3 && tiles.is_contiguous());
  TORCH_CHECK(in_features % kIn == 0 && tiles.size(1) * kIn == in_features);
  TORCH_CHECK(tiles.size(2) == F::kTileBytes, "tile bytes do not match the format");
  TORCH_CHECK(x.size(-1) == in_features, "x has ", x.size(-1), " features, want ", in_features);
  at::Tensor x2 = x.reshape({-1, in_features}).contiguous();
  const int64_t num_rows = x2.size(0), num_groups = tiles.size(0);
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = num_groups * kOut;
  at::Tensor y = at::empty({num_rows, num_groups * kOut}, x.options());
  Problem p{x2.data_ptr<float>(), in_features, tiles.data_ptr<uint8_t>(), tiles.size(1),
            y.data_ptr<float>(), num_groups * kOut};
  const bool use_panel = num_rows >= kPanelMinRows && num_groups % kPanelGroups == 0;
  // Groups per work item: as many as still leave 8 items, so small matrices split evenly.
  int64_t step = use_panel ? kPanelGroups : 1;
  for (int64_t wider : {2, 4})
    if (!use_panel && num_groups % wider == 0 && num_groups / wider >= 8) step = wider;
  at::parallel_for(0, num_groups / step, 1, [&](int64_t begin, int64_t end) {
    const int64_t first = begin * step, last = end * step;
    if (use_panel) {
      panel_groups<F>(p, num_rows, first, last);
    } else if (step == 4) {
      direct_groups<F, 4>(p, num_rows, first, last);
    } else if (step == 2) {
      direct_groups<F, 2>(p, num_rows, first, last);
    } else {
      direct_groups<F, 1>(p, num_rows, first, last);
    }
  });
  return y.view(out_shape);
}

}  // namespace
}  // namespace llmserve

TORCH_LIBRARY_FRAGMENT(llmserve, m) {
  m.def("q4_1_linear(Tensor x, Tensor tiles, int in_features) -> Tensor");
  m.def("q8_0_linear(Tensor x, Tensor tiles, int in_features) -> Tensor");
}

TORCH_LIBRARY_IMPL(llmserve, CPU, m) {
  m.impl("q4_1_linear", &llmserve::quant_linear<llmserve::Q4_1>);
  m.impl("q8_0_linear", &llmserve::quant_linear<llmserve::Q8_0>);
}
