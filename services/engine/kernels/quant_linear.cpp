// y = x @ W.T for GGUF Q4_1 and Q8_0 weights with float32 activations and accumulation (on
// CPUs with AVX-512 VNNI, vnni_linear.cpp computes these ops instead).
//
// Weights are the file's own blocks regrouped by 16 output features ("tiles", see
// services/engine/kernels/packing.py): a tile holds, for 16 outputs and 32 inputs, the 16
// float16 scales d (and Q4_1's 16 minimums m) and the quantized values q laid out input-major,
// so one 16-byte load gives one input's q for 16 outputs. The file defines w = d * q (+ m);
// per output and block we sum x * q over the block's 32 inputs in float32 (inputs p and
// p + 16 for p = 0..15, into two sums), then add d * (both sums) + m * (sum of the block's x)
// to the output's total. Every output lane follows that one order whatever the number of rows
// or the tiling of the call, so a row's result never depends on the other rows: batch
// invariance.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "quant_tiles.h"
#include "simd.h"
#include "thread_pool.h"

namespace llmserve {
namespace {

struct Q4_1 : Q4_1Tile {
  // q of inputs i and i + 16 of the block, lanes [h * kW, (h + 1) * kW).
  static void values(const uint8_t* t, int i, int h, W& lo, W& hi) {
    nibbles_to_float_w(t + kValues + i * kOut + h * kW, lo, hi);
  }
};

struct Q8_0 : Q8_0Tile {
  static void values(const uint8_t* t, int i, int h, W& lo, W& hi) {
    lo = i8_to_float_w(t + kValues + i * kOut + h * kW);
    hi = i8_to_float_w(t + kValues + (i + 16) * kOut + h * kW);
  }
};

struct Problem {
  const float* x;
  int64_t ldx;
  const uint8_t* w;  // tile (group, block) at w + (group * num_blocks + block) * tile_bytes
  int64_t num_blocks;
  float* y;
  int64_t ldy;
  const float* xsum;  // [rows, num_blocks]: each block's sum of x (for the minimums)
};

// Per (row, output) lane: the block's two sums of x * q, and the running total.
template <int R, int G>
struct Accumulators {
  W total[R][G] = {}, lo[R][G], hi[R][G];

  void begin_block() {
    for (int r = 0; r < R; ++r)
      for (int g = 0; g < G; ++g) lo[r][g] = hi[r][g] = W{};
  }

  // Inputs i and i + 16 of the block: x rows at xk (stride ldx), q per group.
  void add(const float* xk, int64_t ldx, int i, const W* ql, const W* qh) {
    for (int r = 0; r < R; ++r) {
      W xl = broadcast_w(xk + r * ldx + i), xh = broadcast_w(xk + r * ldx + i + 16);
      for (int g = 0; g < G; ++g) {
        lo[r][g] = xl * ql[g] + lo[r][g];
        hi[r][g] = xh * qh[g] + hi[r][g];
      }
    }
  }

  // xsum: the block's sum of x for the first row, the next row num_blocks further on.
  template <bool kHasMin>
  void end_block(const float* xsum, int64_t num_blocks, const W* d, const W* m) {
    for (int r = 0; r < R; ++r) {
      for (int g = 0; g < G; ++g) {
        total[r][g] = (lo[r][g] + hi[r][g]) * d[g] + total[r][g];
        if constexpr (kHasMin) total[r][g] = broadcast_w(xsum + r * num_blocks) * m[g] + total[r][g];
      }
    }
  }

  void store(const Problem& p, int64_t row, int64_t group, int h) const {
    for (int r = 0; r < R; ++r)
      for (int g = 0; g < G; ++g)
        store_w(p.y + (row + r) * p.ldy + (group + g) * kOut + h * kW, total[r][g]);
  }
};

// The tiles of format F for run_tiles (quant_tiles.h). A tile of R rows x G groups holds
// three W accumulators for each; at most kMaxTile of them keep those in registers (32 zmm
// on AVX-512, 16 ymm on AVX2). A group's 16 outputs take kParts passes of kW lanes.
template <class F>
struct Kernel {
#if defined(__AVX512F__)
  static constexpr int kDirectRows = 4, kPanelRows = 4, kPanelGroups = 2, kMaxTile = 8;
#else
  static constexpr int kDirectRows = 4, kPanelRows = 4, kPanelGroups = 1, kMaxTile = 4;
#endif
  static constexpr int kWideRows = 0;  // no wide tiles
  // A panel holds kPanelGroups groups' q as floats, [num_blocks, 32, groups * 16] (inputs
  // i, i + 16 interleaved), and their scales, [num_blocks, 2 (d, m), groups * 16].
  struct Panel {
    std::vector<float> q, scales;
  };
  const Problem& p;

  // Rows [row, row + R) x groups [group, group + G), unpacking q in registers.
  template <int R, int G>
  void direct_tile(int64_t row, int64_t group) const {
    for (int h = 0; h < kParts; ++h) {
      Accumulators<R, G> acc;
      for (int64_t kb = 0; kb < p.num_blocks; ++kb) {
        const uint8_t* t[G];
        for (int g = 0; g < G; ++g) {
          t[g] = p.w + ((group + g) * p.num_blocks + kb) * F::kTileBytes;
          // Weights stream from memory once per step: ask for a later block's lines now.
          if (h == 0)
            for (int64_t line = 0; line < F::kTileBytes; line += 64)
              __builtin_prefetch(t[g] + kPrefetchTiles * F::kTileBytes + line);
        }
        const float* xk = p.x + row * p.ldx + kb * kIn;
        acc.begin_block();
        for (int i = 0; i < kIn / 2; ++i) {
          W ql[G], qh[G];
          for (int g = 0; g < G; ++g) F::values(t[g], i, h, ql[g], qh[g]);
          acc.add(xk, p.ldx, i, ql, qh);
        }
        W d[G], m[G];
        for (int g = 0; g < G; ++g) F::scales(t[g], h, d[g], m[g]);
        acc.template end_block<F::kHasMin>(p.xsum + row * p.num_blocks + kb, p.num_blocks, d, m);
      }
      acc.store(p, row, group, h);
    }
  }

  void fill_panel(int64_t group, Panel& panel) const {
    constexpr int G = kPanelGroups;
    panel.q.resize(p.num_blocks * kIn * G * kOut);
    panel.scales.resize(p.num_blocks * 2 * G * kOut);
    for (int64_t kb = 0; kb < p.num_blocks; ++kb) {
      float* qk = panel.q.data() + kb * kIn * G * kOut;
      float* sk = panel.scales.data() + kb * 2 * G * kOut;
      for (int g = 0; g < G; ++g) {
        const uint8_t* t = p.w + ((group + g) * p.num_blocks + kb) * F::kTileBytes;
        for (int h = 0; h < kParts; ++h) {
          W d, m;
          F::scales(t, h, d, m);
          store_w(sk + g * kOut + h * kW, d);
          store_w(sk + (G + g) * kOut + h * kW, m);
          for (int i = 0; i < kIn / 2; ++i) {
            W lo, hi;
            F::values(t, i, h, lo, hi);
            store_w(qk + (2 * i) * G * kOut + g * kOut + h * kW, lo);
            store_w(qk + (2 * i + 1) * G * kOut + g * kOut + h * kW, hi);
          }
        }
      }
    }
  }

  // Same arithmetic as direct_tile, reading q and scales from a panel.
  template <int R>
  void panel_tile(const Panel& panel, int64_t row, int64_t group) const {
    constexpr int G = kPanelGroups;
    for (int h = 0; h < kParts; ++h) {
      Accumulators<R, G> acc;
      for (int64_t kb = 0; kb < p.num_blocks; ++kb) {
        const float* qk = panel.q.data() + kb * kIn * G * kOut + h * kW;
        const float* xk = p.x + row * p.ldx + kb * kIn;
        acc.begin_block();
        for (int i = 0; i < kIn / 2; ++i) {
          W ql[G], qh[G];
          for (int g = 0; g < G; ++g) {
            ql[g] = load_w(qk + (2 * i) * G * kOut + g * kOut);
            qh[g] = load_w(qk + (2 * i + 1) * G * kOut + g * kOut);
          }
          acc.add(xk, p.ldx, i, ql, qh);
        }
        const float* sk = panel.scales.data() + kb * 2 * G * kOut + h * kW;
        W d[G], m[G];
        for (int g = 0; g < G; ++g) {
          d[g] = load_w(sk + g * kOut);
          m[g] = load_w(sk + (G + g) * kOut);
        }
        acc.template end_block<F::kHasMin>(p.xsum + row * p.num_blocks + kb, p.num_blocks, d, m);
      }
      acc.store(p, row, group, h);
    }
  }
};

template <class F>
at::Tensor quant_linear(const at::Tensor& x, const at::Tensor& tiles, int64_t in_features) {
  at::Tensor x2 = check_linear_args(x, tiles, in_features, F::kTileBytes);
  const int64_t num_rows = x2.size(0), num_groups = tiles.size(0);
  at::Tensor y = at::empty({num_rows, num_groups * kOut}, x.options());
  const int64_t num_blocks = tiles.size(1);
  std::vector<float> xsum(F::kHasMin ? num_rows * num_blocks : 0);
  const float* xp = x2.data_ptr<float>();
  for (size_t i = 0; i < xsum.size(); ++i) {
    W parts[kParts];  // lanes of inputs j and j + 16, then one 16-lane tree
    for (int j = 0; j < kParts; ++j)
      parts[j] = load_w(xp + i * kIn + j * kW) + load_w(xp + i * kIn + 16 + j * kW);
    xsum[i] = hsum16(parts);
  }
  Problem p{xp, in_features, tiles.data_ptr<uint8_t>(), num_blocks, y.data_ptr<float>(),
            num_groups * kOut, xsum.data()};
  run_tiles(Kernel<F>{p}, num_rows, num_groups);
  return y.view(linear_out_shape(x, num_groups));
}

}  // namespace
}  // namespace llmserve

TORCH_LIBRARY_FRAGMENT(llmserve, m) {
  m.def("q4_1_linear(Tensor x, Tensor tiles, int in_features) -> Tensor");
  m.def("q8_0_linear(Tensor x, Tensor tiles, int in_features) -> Tensor");
}

// With AVX-512 VNNI, vnni_linear.cpp computes these instead.
#if !defined(__AVX512VNNI__)
TORCH_LIBRARY_IMPL(llmserve, CPU, m) {
  m.impl("q4_1_linear", &llmserve::quant_linear<llmserve::Q4_1>);
  m.impl("q8_0_linear", &llmserve::quant_linear<llmserve::Q8_0>);
}
#endif
