// Top-k, top-p, min-p and typical-p over temperature-scaled logits, one row at a time, in that
// order (each on what the previous left). Torch sorted the whole 49k vocabulary for top-p (3.7 ms
// a row on one core) and made one pass over all rows per step of each filter. Here a row is
// read while it sits in cache: for its largest logit; for each token's weight
// e^(logit - largest), counted and summed per quarter-nat bucket below the largest; for the
// tokens of the leading buckets that hold the k tokens or the mass, which alone are ranked;
// and to write it out with -inf for the tokens dropped. Typical-p ranks tokens by how far
// their surprise -log p lies from the entropy H; as -log p = lse - logit and H = lse - E_p[logit],
// that is |E_p[logit] - logit|: the same buckets, by distance from the mean logit. Each row is
// computed alone, in a fixed order, whatever the number of rows.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <limits>
#include <utility>
#include <vector>

#include "simd.h"
#include "thread_pool.h"

namespace llmserve {
namespace {

constexpr float kInf = std::numeric_limits<float>::infinity();
constexpr int kBuckets = 256;  // the last one holds every token further down
constexpr float kBucketsPerNat = 4.0f;
// The buckets' sums may round below the exact mass; asking them for this much more keeps
// every token the exact rule keeps among the candidates.
constexpr double kMassMargin = 1e-4;
// Mass within this share of top_p counts as reaching it: sums in floats cannot tell them apart
// (0.5 + 0.25 + 0.15 reaches 0.9). sampling_filters.py does the same.
constexpr double kReachedShare = 1 - 1e-6;

struct Filters {
  int64_t top_k;     // 0 or >= vocab: off
  double top_p;      // 1: off
  double min_p;      // 0: off
  double typical_p;  // 1: off
};

// Per thread: each token's e^(logit - largest) and the candidates being ranked.
struct Scratch {
  std::vector<float> weights, ranked;
  std::vector<std::pair<float, float>> candidates;
  std::vector<std::pair<double, float>> by_distance;
};

// Which bucket below the largest logit `top` a logit falls in.
inline int bucket_of(float logit, float top) {
  const float depth = (top - logit) * kBucketsPerNat;
  return depth < kBuckets - 1 ? static_cast<int>(depth) : kBuckets - 1;
}

// The lowest logit a bucket up to `last` can hold (exclusive): candidates are above it.
inline float bucket_floor(int last, float top) {
  return last == kBuckets - 1 ? -kInf : top - (last + 1) / kBucketsPerNat;
}

// The k-th largest logit of the row (ties all kept by a `< floor` test).
float top_k_floor(const float* row, int64_t n, int64_t k, float top, std::vector<float>& ranked) {
  int64_t count[kBuckets] = {};
  for (int64_t j = 0; j < n; ++j) ++count[bucket_of(row[j], top)];
  int last = 0;
  for (int64_t sum = count[0]; last < kBuckets - 1 && sum < k; sum += count[++last]) {
  }
  const float lowest = bucket_floor(last, top);
  ranked.clear();
  for (int64_t j = 0; j < n; ++j)
    if (row[j] > lowest || last == kBuckets - 1) ranked.push_back(row[j]);
  std::nth_element(ranked.begin(), ranked.begin() + (k - 1), ranked.end(), std::greater<float>());
  return ranked[k - 1];
}

// The smallest logit top-p keeps among the tokens at or above `floor`: tokens in decreasing
// logit order, each dropped once the probability before it reaches top_p (the first always
// stays). `weights` holds e^(logit - top) for every token.
float top_p_floor(const float* row, int64_t n, double top_p, float top, float floor,
                  const std::vector<float>& weights,
                  std::vector<std::pair<float, float>>& candidates) {
  double mass[kBuckets] = {};
  double total = 0.0;
  for (int64_t j = 0; j < n; ++j) {
    if (!(row[j] >= floor)) continue;
    mass[bucket_of(row[j], top)] += weights[j];
    total += weights[j];
  }
  const double wanted = (top_p + kMassMargin) * total;
  int last = 0;
  for (double sum = mass[0]; last < kBuckets - 1 && sum < wanted; sum += mass[++last]) {
  }
  const float lowest = bucket_floor(last, top);
  candidates.clear();
  for (int64_t j = 0; j < n; ++j)
    if (row[j] > lowest && row[j] >= floor) candidates.emplace_back(row[j], weights[j]);
  std::stable_sort(candidates.begin(), candidates.end(),
                   [](const auto& a, const auto& b) { return a.first > b.first; });
  const double limit = top_p * kReachedShare * total;
  double before = 0.0;
  float kept = candidates.front().first;
  for (const auto& [logit, weight] : candidates) {
    if (before >= limit) break;
    kept = logit;
    before += weight;
  }
  return kept;
}

inline int distance_bucket(double distance) {
  const double scaled = distance * kBucketsPerNat;
  return scaled < kBuckets - 1 ? static_cast<int>(scaled) : kBuckets - 1;
}

// The largest distance |center - logit| typical-p keeps among the tokens out[j] left finite:
// tokens in increasing distance, each dropped once the probability before it reaches
// typical_p (the first always stays).
double typical_reach(const float* row, const float* out, int64_t n, double typical_p,
                     double center, Scratch& s) {
  double mass[kBuckets] = {};
  double total = 0.0;
  for (int64_t j = 0; j < n; ++j) {
    if (out[j] == -kInf) continue;
    mass[distance_bucket(std::fabs(center - row[j]))] += s.weights[j];
    total += s.weights[j];
  }
  const double wanted = (typical_p + kMassMargin) * total;
  int last = 0;
  for (double sum = mass[0]; last < kBuckets - 1 && sum < wanted; sum += mass[++last]) {
  }
  s.by_distance.clear();
  for (int64_t j = 0; j < n; ++j) {
    if (out[j] == -kInf) continue;
    const double distance = std::fabs(center - row[j]);
    if (distance_bucket(distance) <= last) s.by_distance.emplace_back(distance, s.weights[j]);
  }
  std::stable_sort(s.by_distance.begin(), s.by_distance.end(),
                   [](const auto& a, const auto& b) { return a.first < b.first; });
  const double limit = typical_p * kReachedShare * total;
  double before = 0.0, reach = s.by_distance.front().first;
  for (const auto& [distance, weight] : s.by_distance) {
    if (before >= limit) break;
    reach = distance;
    before += weight;
  }
  return reach;
}

// Typical-p over the tokens out[j] left finite: the mean logit under their distribution,
// then -inf for the tokens further from it than typical_p's reach.
void apply_typical(const float* row, int64_t n, double typical_p, float* out, Scratch& s) {
  double total = 0.0, moment = 0.0;
  for (int64_t j = 0; j < n; ++j) {
    if (out[j] == -kInf) continue;
    total += s.weights[j];
    moment += s.weights[j] * static_cast<double>(row[j]);
  }
  const double center = moment / total;
  const double reach = typical_reach(row, out, n, typical_p, center, s);
  for (int64_t j = 0; j < n; ++j)
    if (std::fabs(center - row[j]) > reach) out[j] = -kInf;
}

// Writes row `row` [n] into `out` with -inf for what the filters drop. A row with a NaN, or
// whose largest logit is infinite, is written unchanged (nothing to rank).
void filter_row(const float* row, int64_t n, const Filters& f, float* out, Scratch& s) {
  bool nan;
  const float top = row_max(row, n, nan);
  if (nan || top == -kInf || top == kInf) {
    std::copy(row, row + n, out);
    return;
  }
  if (f.top_p < 1.0 || f.typical_p < 1.0) {
    int64_t i = 0;
    for (; i + kW <= n; i += kW) store_w(s.weights.data() + i, vexp(load_w(row + i) - top));
    for (; i < n; ++i) s.weights[i] = std::exp(row[i] - top);
  }
  float floor = -kInf;
  if (f.top_k > 0 && f.top_k < n) floor = top_k_floor(row, n, f.top_k, top, s.ranked);
  if (f.top_p < 1.0) floor = top_p_floor(row, n, f.top_p, top, floor, s.weights, s.candidates);
  // min-p: p < min_p * p_max, compared on logits as logit - largest < log(min_p).
  const float log_min_p = f.min_p > 0.0 ? std::log(static_cast<float>(f.min_p)) : -kInf;
  const W floor_w = splat_w(floor), top_w = splat_w(top), log_min_p_w = splat_w(log_min_p);
  const W dropped = splat_w(-kInf);
  int64_t i = 0;
  for (; i + kW <= n; i += kW) {
    const W v = load_w(row + i);
    store_w(out + i, (v < floor_w) | (v - top_w < log_min_p_w) ? dropped : v);
  }
  for (; i < n; ++i) out[i] = row[i] < floor || row[i] - top < log_min_p ? -kInf : row[i];
  if (f.typical_p < 1.0) apply_typical(row, n, f.typical_p, out, s);
}

// logits [rows, vocab] float32; top_ks [rows] int64; top_ps, min_ps, typical_ps [rows] float64
// -> the logits with -inf for every token the filters drop (ties with the last one kept stay).
at::Tensor filter_logits(const at::Tensor& logits, const at::Tensor& top_ks,
                         const at::Tensor& top_ps, const at::Tensor& min_ps,
                         const at::Tensor& typical_ps) {
  TORCH_CHECK(logits.scalar_type() == at::kFloat && logits.dim() == 2 && logits.size(1) > 0);
  const int64_t num_rows = logits.size(0);
  TORCH_CHECK(top_ks.scalar_type() == at::kLong && top_ks.numel() == num_rows);
  TORCH_CHECK(top_ps.scalar_type() == at::kDouble && top_ps.numel() == num_rows);
  TORCH_CHECK(min_ps.scalar_type() == at::kDouble && min_ps.numel() == num_rows);
  TORCH_CHECK(typical_ps.scalar_type() == at::kDouble && typical_ps.numel() == num_rows);
  at::Tensor rows = logits.contiguous();
  at::Tensor ks = top_ks.contiguous(), ps = top_ps.contiguous(), ms = min_ps.contiguous();
  at::Tensor ts = typical_ps.contiguous();
  const int64_t n = rows.size(1);
  at::Tensor out = at::empty(rows.sizes(), rows.options());
  const float* xp = rows.data_ptr<float>();
  float* op = out.data_ptr<float>();
  parallel_for(num_rows, 1, [&](int64_t begin, int64_t end) {
    Scratch s;
    s.weights.resize(n);
    for (int64_t r = begin; r < end; ++r) {
      const Filters f{ks.data_ptr<int64_t>()[r], ps.data_ptr<double>()[r],
                      ms.data_ptr<double>()[r], ts.data_ptr<double>()[r]};
      filter_row(xp + r * n, n, f, op + r * n, s);
    }
  });
  return out;
}

}  // namespace
}  // namespace llmserve

TORCH_LIBRARY_FRAGMENT(llmserve, m) {
  m.def(
      "filter_logits(Tensor logits, Tensor top_ks, Tensor top_ps, Tensor min_ps, "
      "Tensor typical_ps) -> Tensor");
}

TORCH_LIBRARY_IMPL(llmserve, CPU, m) { m.impl("filter_logits", &llmserve::filter_logits); }
