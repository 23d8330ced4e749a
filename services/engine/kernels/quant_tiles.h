// What the quantized-matmul kernels share: the tiles of packing.py (16 outputs x one 32-input
// GGUF block: float16 scales d, for Q4_1 float16 minimums m, then the quantized values q
// input-major), argument checks and the split of a matrix into rows x groups of 16 outputs.
#pragma once

#include <ATen/core/Tensor.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "simd.h"
#include "thread_pool.h"

namespace llmserve {

constexpr int kOut = 16;  // outputs per tile
constexpr int kIn = 32;   // inputs per tile (one GGUF block)
static_assert(kOut == kLanes);

constexpr int64_t kPanelMinRows = 64;  // from here on a panel of unpacked q pays for itself
constexpr int64_t kRowChunk = 128;     // rows per pass over a panel (their x stays in cache)
constexpr int64_t kPrefetchTiles = 4;  // how far ahead direct tiles prefetch weights

// Scales read a tile's lanes [h * kW, (h + 1) * kW) of its 16 outputs.
struct Q4_1Tile {
  // d, m, then byte j of row p: output j's q[p] | q[p + 16] << 4 (int16 kernels: pairs)
  static constexpr int64_t kValues = 2 * 2 * kOut;
  static constexpr int64_t kTileBytes = kValues + kOut * kIn / 2;
  static constexpr bool kHasMin = true;
  static void scales(const uint8_t* t, int h, W& d, W& m) {
    d = load_half_w(reinterpret_cast<const uint16_t*>(t) + h * kW);
    m = load_half_w(reinterpret_cast<const uint16_t*>(t + 2 * kOut) + h * kW);
  }
};

struct Q8_0Tile {
  // d, then row i: int8 q[i] of the 16 outputs (int16 kernels: pairs)
  static constexpr int64_t kValues = 2 * kOut;
  static constexpr int64_t kTileBytes = kValues + kOut * kIn;
  static constexpr bool kHasMin = false;
  static void scales(const uint8_t* t, int h, W& d, W& m) {
    d = load_half_w(reinterpret_cast<const uint16_t*>(t) + h * kW);
    m = W{};
  }
};

// x as [rows, in_features], contiguous, after checking the arguments of a quantized linear.
inline at::Tensor check_linear_args(const at::Tensor& x, const at::Tensor& tiles, int64_t in_features,
                                    int64_t tile_bytes) {
  TORCH_CHECK(x.scalar_type() == at::kFloat, "quantized linear takes float32 activations");
  TORCH_CHECK(tiles.scalar_type() == at::kByte && tiles.dim() == 3 && tiles.is_contiguous());
  TORCH_CHECK(in_features % kIn == 0 && tiles.size(1) * kIn == in_features);
  TORCH_CHECK(tiles.size(2) == tile_bytes, "tile bytes do not match the format");
  TORCH_CHECK(x.size(-1) == in_features, "x has ", x.size(-1), " features, want ", in_features);
  return x.reshape({-1, in_features}).contiguous();
}

inline std::vector<int64_t> linear_out_shape(const at::Tensor& x, int64_t num_groups) {
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = num_groups * kOut;
  return shape;
}

// Groups per work item of the direct path: as many (1, 2 or 4) as still leave 8 items, so
// small matrices split evenly over the threads.
inline int64_t groups_per_item(int64_t num_groups) {
  int64_t step = 1;
  for (int64_t wider : {2, 4})
    if (num_groups % wider == 0 && num_groups / wider >= 8) step = wider;
  return step;
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

// The split of y = x @ W.T over threads by groups of 16 outputs, each group's rows in
// register tiles. A kernel K gives its tile sizes (kDirectRows, kMaxTile: register tiles
// of unpacked weights; kPanelRows, kPanelGroups: tiles over a panel of q unpacked once per
// kRowChunk rows, for kPanelMinRows rows and more; kWideRows, kWideMinRows: below that, from
// kWideMinRows rows, tiles of up to kWideRows rows x one group, 0 for none), its Panel type,
// and direct_tile<R, G>(row, group), wide_tile<R>(row, group), fill_panel(group, panel),
// panel_tile<R>(panel, row, group).
template <class K, int G>
void direct_groups(const K& k, int64_t num_rows, int64_t group_begin, int64_t group_end) {
  if constexpr (K::kWideRows > 0) {
    if (num_rows >= K::kWideMinRows) {
      for (int64_t group = group_begin; group < group_end; ++group)
        over_rows<K::kWideRows>(0, num_rows, [&](int64_t row, auto rows) {
          k.template wide_tile<decltype(rows)::value>(row, group);
        });
      return;
    }
  }
  for (int64_t group = group_begin; group < group_end; group += G) {
    over_rows<K::kDirectRows>(0, num_rows, [&](int64_t row, auto rows) {
      constexpr int R = decltype(rows)::value;
      // Fewer groups per tile as rows grow, so the accumulators stay in registers.
      constexpr int GT = R * G <= K::kMaxTile ? G : (R * 2 <= K::kMaxTile && G >= 2 ? 2 : 1);
      for (int g = 0; g < G; g += GT) k.template direct_tile<R, GT>(row, group + g);
    });
  }
}

template <class K>
void panel_groups(const K& k, int64_t num_rows, int64_t group_begin, int64_t group_end) {
  thread_local typename K::Panel panel;
  for (int64_t chunk = 0; chunk < num_rows; chunk += kRowChunk) {
    int64_t chunk_end = std::min(num_rows, chunk + kRowChunk);
    for (int64_t group = group_begin; group < group_end; group += K::kPanelGroups) {
      k.fill_panel(group, panel);
      over_rows<K::kPanelRows>(chunk, chunk_end, [&](int64_t row, auto rows) {
        k.template panel_tile<decltype(rows)::value>(panel, row, group);
      });
    }
  }
}

template <class K>
void run_tiles(const K& k, int64_t num_rows, int64_t num_groups) {
  const bool use_panel = num_rows >= kPanelMinRows && num_groups % K::kPanelGroups == 0;
  const int64_t step = use_panel ? K::kPanelGroups : groups_per_item(num_groups);
  parallel_for(num_groups / step, 1, [&](int64_t begin, int64_t end) {
    const int64_t first = begin * step, last = end * step;
    if (use_panel) {
      panel_groups(k, num_rows, first, last);
    } else if (step == 4) {
      direct_groups<K, 4>(k, num_rows, first, last);
    } else if (step == 2) {
      direct_groups<K, 2>(k, num_rows, first, last);
    } else {
      direct_groups<K, 1>(k, num_rows, first, last);
    }
  });
}

}  // namespace llmserve
