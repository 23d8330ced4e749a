// Top-p over temperature-scaled logits, one row at a time. Sorting a 49k vocabulary took
// 3.7 ms a row (torch, one thread), and the histogram way in torch ops (sampling_filters.py)
// makes a dozen passes over the logits. Here a row is read while it sits in cache: for its
// largest logit; for each token's weight e^(logit - largest), summed whole and per
// quarter-nat bucket below the largest; for the tokens of the leading buckets that hold the
// mass, which alone are sorted; and to write it out with -inf for the tokens dropped. Each
// row is computed alone, in a fixed order, whatever the number of rows.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <utility>
#include <vector>

#include "simd.h"
#include "thread_pool.h"

namespace llmserve {
namespace {

constexpr int kBuckets = 256;            // the last one holds every token further down
constexpr float kBucketsPerNat = 4.0f;
// The buckets' sums may round below the exact mass; asking them for this much more keeps
// every token the exact rule keeps among the candidates.
constexpr double kMassMargin = 1e-4;
// Mass within this share of top_p counts as reaching it: sums in floats cannot tell them apart
// (0.5 + 0.25 + 0.15 reaches 0.9).
constexpr double kReachedShare = 1 - 1e-6;

// The smallest logit of row `row` [n] that top-p `top_p` keeps: tokens in decreasing logit
// order, each dropped once the probability before it reaches top_p (the first always stays).
// NaN for a row with a NaN (nothing is dropped), and the largest logit when it is infinite.
float top_p_floor(const float* row, int64_t n, double top_p, std::vector<float>& weights,
                  std::vector<std::pair<float, float>>& candidates) {
  constexpr float kInf = std::numeric_limits<float>::infinity();
  bool nan;
  const float top = row_max(row, n, nan);
  if (nan) return std::numeric_limits<float>::quiet_NaN();  // nothing to rank
  if (top == -kInf || top == kInf) return top;
  W total_w = {};
  int64_t i = 0;
  for (; i + kW <= n; i += kW) {
    const W w = vexp(load_w(row + i) - top);
    store_w(weights.data() + i, w);
    total_w += w;
  }
  double total = hsum(total_w);
  for (; i < n; ++i) total += weights[i] = std::exp(row[i] - top);
  double mass[kBuckets] = {};
  for (int64_t j = 0; j < n; ++j) {
    const float depth = (top - row[j]) * kBucketsPerNat;
    mass[depth < kBuckets - 1 ? static_cast<int>(depth) : kBuckets - 1] += weights[j];
  }
  const double wanted = (top_p + kMassMargin) * total;
  int last = 0;
  for (double sum = mass[0]; last < kBuckets - 1 && sum < wanted; sum += mass[++last]) {
  }
  const float lowest = last == kBuckets - 1 ? -kInf : top - (last + 1) / kBucketsPerNat;
  candidates.clear();
  for (int64_t j = 0; j < n; ++j)
    if (row[j] > lowest) candidates.emplace_back(row[j], weights[j]);
  std::stable_sort(candidates.begin(), candidates.end(),
                   [](const auto& a, const auto& b) { return a.first > b.first; });
  const double limit = top_p * kReachedShare * total;
  double before = 0.0;
  float floor = candidates.front().first;
  for (const auto& [logit, weight] : candidates) {
    if (before >= limit) break;
    floor = logit;
    before += weight;
  }
  return floor;
}

// logits [rows, vocab] float32, top_ps [rows] float64 -> the logits with -inf for every token
// top-p drops (tokens tied with the last one kept stay).
at::Tensor top_p_filter(const at::Tensor& logits, const at::Tensor& top_ps) {
  TORCH_CHECK(logits.scalar_type() == at::kFloat && logits.dim() == 2 && logits.size(1) > 0);
  TORCH_CHECK(top_ps.scalar_type() == at::kDouble && top_ps.numel() == logits.size(0));
  at::Tensor rows = logits.contiguous();
  at::Tensor ps = top_ps.contiguous();
  const int64_t n = rows.size(1);
  at::Tensor out = at::empty(rows.sizes(), rows.options());
  const float* xp = rows.data_ptr<float>();
  const double* pp = ps.data_ptr<double>();
  float* op = out.data_ptr<float>();
  parallel_for(rows.size(0), 1, [&](int64_t begin, int64_t end) {
    std::vector<float> weights(n);
    std::vector<std::pair<float, float>> candidates;
    for (int64_t r = begin; r < end; ++r) {
      const float* row = xp + r * n;
      const float floor = top_p_floor(row, n, pp[r], weights, candidates);
      constexpr float kDropped = -std::numeric_limits<float>::infinity();
      const W floor_w = splat_w(floor), dropped = splat_w(kDropped);
      int64_t i = 0;
      for (; i + kW <= n; i += kW) {
        const W v = load_w(row + i);
        store_w(op + r * n + i, v < floor_w ? dropped : v);
      }
      for (; i < n; ++i) op[r * n + i] = row[i] < floor ? kDropped : row[i];
    }
  });
  return out;
}

}  // namespace
}  // namespace llmserve

TORCH_LIBRARY_FRAGMENT(llmserve, m) { m.def("top_p_filter(Tensor logits, Tensor top_ps) -> Tensor"); }

TORCH_LIBRARY_IMPL(llmserve, CPU, m) { m.impl("top_p_filter", &llmserve::top_p_filter); }
