// Rotary embedding, KV store and causal attention read in place from the paged KV cache, one
// query token at a time.
//
// Per layer the cache holds, per block and KV head, K transposed ([head_dim, block_size]) and
// V as rows ([block_size, head_dim]): 16 keys' scores are then 16 lanes of one vector, summed
// over head_dim without any horizontal reduction, and V is read a row per key. A token's
// output depends only on its query, its position and its own sequence's cache, computed in an
// order fixed by its position: the same whatever else is in the batch or how the prompt was
// chunked (batch invariance).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <vector>

#include "simd.h"

namespace llmserve {
namespace {

struct Cache {
  float* k;  // [num_blocks, num_kv_heads, head_dim, block_size]
  float* v;  // [num_blocks, num_kv_heads, block_size, head_dim]
  int64_t num_kv_heads, head_dim, block_size;

  int64_t head_offset(int64_t block, int64_t kv_head) const {
    return (block * num_kv_heads + kv_head) * head_dim * block_size;
  }
};

Cache cache_of(const at::Tensor& kv_cache, int64_t num_kv_heads, int64_t head_dim) {
  // kv_cache: [2, num_blocks, num_kv_heads, block_size * head_dim]
  TORCH_CHECK(kv_cache.scalar_type() == at::kFloat && kv_cache.is_contiguous());
  TORCH_CHECK(kv_cache.dim() == 4 && kv_cache.size(0) == 2 && kv_cache.size(2) == num_kv_heads);
  TORCH_CHECK(head_dim % kLanes == 0, "head_dim must be a multiple of ", kLanes);
  int64_t block_size = kv_cache.size(3) / head_dim;
  TORCH_CHECK(block_size % kLanes == 0, "block_size must be a multiple of ", kLanes);
  float* base = kv_cache.data_ptr<float>();
  return {base, base + kv_cache[0].numel(), num_kv_heads, head_dim, block_size};
}

// Rotate-half rotary embedding of one head: x[i], x[i + half] by the position's angle i.
void rotate(const float* x, const float* cos, const float* sin, int64_t head_dim, float* out) {
  const int64_t half = head_dim / 2;
  for (int64_t i = 0; i < half; ++i) {
    out[i] = x[i] * cos[i] - x[i + half] * sin[i];
    out[i + half] = x[i + half] * cos[i] + x[i] * sin[i];
  }
}

struct Layout {
  int64_t num_heads, num_kv_heads, head_dim;
};

// Rotates token t's query heads into q_out and writes its rotated K and its V into its slot.
void rotate_and_store(const float* qkv, const float* cos, const float* sin, const Layout& l,
                      const Cache& c, int64_t slot, float* q_out) {
  for (int64_t h = 0; h < l.num_heads; ++h)
    rotate(qkv + h * l.head_dim, cos, sin, l.head_dim, q_out + h * l.head_dim);
  const int64_t block = slot / c.block_size, offset = slot % c.block_size;
  float k[512];
  for (int64_t h = 0; h < l.num_kv_heads; ++h) {
    rotate(qkv + (l.num_heads + h) * l.head_dim, cos, sin, l.head_dim, k);
    float* kt = c.k + c.head_offset(block, h) + offset;
    for (int64_t d = 0; d < l.head_dim; ++d) kt[d * c.block_size] = k[d];
    const float* v = qkv + (l.num_heads + l.num_kv_heads + h) * l.head_dim;
    std::copy(v, v + l.head_dim, c.v + c.head_offset(block, h) + offset * l.head_dim);
  }
}

struct Query {
  const float* q;  // [head_dim]
  float* out;      // [head_dim]
  const int64_t* blocks;
  int64_t num_keys;  // attends keys [0, num_keys)
};

// One query head over its sequence's keys: scores, softmax, weighted sum of V.
void attend(const Cache& c, const Query& job, int64_t kv_head, float scale, float* scores) {
  const int64_t num_chunks = (job.num_keys + kLanes - 1) / kLanes;
  const int64_t chunks_per_block = c.block_size / kLanes;
  V best = splat(-std::numeric_limits<float>::infinity());
  for (int64_t chunk = 0; chunk < num_chunks; ++chunk) {
    const int64_t block = job.blocks[chunk / chunks_per_block];
    const float* kt = c.k + c.head_offset(block, kv_head) + (chunk % chunks_per_block) * kLanes;
    V s[4] = {};  // four partial sums over head_dim, combined in a fixed order
    for (int64_t d = 0; d < c.head_dim; d += 4)
      for (int j = 0; j < 4; ++j) s[j] = splat(job.q[d + j]) * load(kt + (d + j) * c.block_size) + s[j];
    V score = ((s[0] + s[1]) + (s[2] + s[3])) * scale;
    const int64_t valid = job.num_keys - chunk * kLanes;
    if (valid < kLanes) {
      float lanes[kLanes];
      store(lanes, score);
      for (int64_t i = valid; i < kLanes; ++i) lanes[i] = -std::numeric_limits<float>::infinity();
      score = load(lanes);
    }
    store(scores + chunk * kLanes, score);
    best = vmax(best, score);
  }
  const float max_score = hmax(best);
  V total = {};
  for (int64_t chunk = 0; chunk < num_chunks; ++chunk) {
    V e = vexp(load(scores + chunk * kLanes) - max_score);
    store(scores + chunk * kLanes, e);
    total += e;
  }
  const float inv_total = 1.0f / hsum(total);
  const int64_t dv = c.head_dim / kLanes;
  std::vector<V> acc(dv, V{});
  for (int64_t key = 0; key < job.num_keys; ++key) {
    const int64_t block = job.blocks[key / c.block_size];
    const float* vr = c.v + c.head_offset(block, kv_head) + (key % c.block_size) * c.head_dim;
    const V weight = splat(scores[key]);
    for (int64_t i = 0; i < dv; ++i) acc[i] = weight * load(vr + i * kLanes) + acc[i];
  }
  for (int64_t i = 0; i < dv; ++i) store(job.out + i * kLanes, acc[i] * inv_total);
}

// qkv: [num_tokens, (num_heads + 2 * num_kv_heads) * head_dim], rows may be strided;
// cos, sin: [max_positions, head_dim / 2]. Rotates Q and K, writes each token's K and V into
// its slot, then token t of sequence token_seq[t] at positions[t] attends that sequence's keys
// [0, positions[t]]. Returns [num_tokens, num_heads * head_dim].
at::Tensor rope_attention(const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin,
                          const at::Tensor& kv_cache, const at::Tensor& slot_mapping,
                          const at::Tensor& block_tables, const at::Tensor& token_seq,
                          const at::Tensor& positions, int64_t num_heads, int64_t num_kv_heads,
                          double scale) {
  TORCH_CHECK(qkv.scalar_type() == at::kFloat && qkv.dim() == 2 && qkv.stride(1) == 1);
  const int64_t num_tokens = qkv.size(0);
  const Layout l{num_heads, num_kv_heads, qkv.size(1) / (num_heads + 2 * num_kv_heads)};
  TORCH_CHECK(l.head_dim <= 512 && l.head_dim % 2 == 0 && num_heads % num_kv_heads == 0);
  TORCH_CHECK(cos.is_contiguous() && sin.is_contiguous() && cos.size(1) * 2 == l.head_dim);
  Cache c = cache_of(kv_cache, num_kv_heads, l.head_dim);
  auto tables = block_tables.contiguous();
  auto seqs = token_seq.contiguous();
  auto pos = positions.contiguous();
  auto slots = slot_mapping.contiguous();
  for (const at::Tensor* t : {&tables, &seqs, &pos, &slots})
    TORCH_CHECK(t->scalar_type() == at::kLong, "index tensors must be int64");
  TORCH_CHECK(seqs.numel() == num_tokens && pos.numel() == num_tokens &&
              slots.numel() == num_tokens);
  const int64_t max_blocks = tables.size(1);
  const int64_t* tp = tables.data_ptr<int64_t>();
  const int64_t* sp = seqs.data_ptr<int64_t>();
  const int64_t* pp = pos.data_ptr<int64_t>();
  const int64_t* slot = slots.data_ptr<int64_t>();
  const int64_t num_slots = kv_cache.size(1) * c.block_size;
  for (int64_t t = 0; t < num_tokens; ++t) {
    TORCH_CHECK(slot[t] >= 0 && slot[t] < num_slots, "slot ", slot[t], " outside the cache");
    TORCH_CHECK(pp[t] >= 0 && pp[t] < std::min(max_blocks * c.block_size, cos.size(0)),
                "position ", pp[t], " beyond its block table or the rotary table");
  }
  at::Tensor q = at::empty({num_tokens, num_heads * l.head_dim}, qkv.options());
  float* qp = q.data_ptr<float>();
  const float* cp = cos.data_ptr<float>();
  const float* snp = sin.data_ptr<float>();
  at::parallel_for(0, num_tokens, 16, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t angle = pp[t] * (l.head_dim / 2);
      rotate_and_store(qkv.data_ptr<float>() + t * qkv.stride(0), cp + angle, snp + angle, l, c,
                       slot[t], qp + t * num_heads * l.head_dim);
    }
  });
  at::Tensor out = at::empty({num_tokens, num_heads * l.head_dim}, qkv.options());
  float* op = out.data_ptr<float>();
  const int64_t group = num_heads / num_kv_heads;
  at::parallel_for(0, num_tokens * num_heads, 1, [&](int64_t begin, int64_t end) {
    thread_local std::vector<float> scores;
    scores.resize(max_blocks * c.block_size);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t t = item / num_heads, h = item % num_heads;
      const int64_t at = (t * num_heads + h) * l.head_dim;
      Query job{qp + at, op + at, tp + sp[t] * max_blocks, pp[t] + 1};
      attend(c, job, h / group, static_cast<float>(scale), scores.data());
    }
  });
  return out;
}

}  // namespace
}  // namespace llmserve

TORCH_LIBRARY_FRAGMENT(llmserve, m) {
  m.def(
      "rope_attention(Tensor qkv, Tensor cos, Tensor sin, Tensor(a!) kv_cache, "
      "Tensor slot_mapping, Tensor block_tables, Tensor token_seq, Tensor positions, "
      "int num_heads, int num_kv_heads, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(llmserve, CPU, m) { m.impl("rope_attention", &llmserve::rope_attention); }
