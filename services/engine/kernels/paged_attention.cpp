// Rotary embedding, KV store and causal attention read in place from the paged KV cache, one
// query token at a time.
//
// Per layer the cache holds, per block and KV head, K transposed ([head_dim, block_size]) and
// V as rows ([block_size, head_dim]): 16 keys' scores are then 16 lanes of one vector, summed
// over head_dim without any horizontal reduction, and V is read a row per key. A token's
// output depends only on its query, its position and its own sequence's cache, computed in an
// order fixed by its position: the same whatever else is in the batch or how the prompt was
// chunked (batch invariance).
//
// The cache holds float32, or float16 (half the memory; values rounded once when stored,
// widened exactly when read, all arithmetic in float32).
//
// A query with more than kPartKeys keys attends in partitions of kPartKeys keys, each a work
// item of its own (so one long sequence still spreads over every thread), whose partial
// results (max score, sum of exponentials, unnormalized output) are then merged in partition
// order. The partitions follow from the query's position alone: batch invariance holds.
#include <ATen/core/Tensor.h>
#include <c10/util/Half.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "simd.h"
#include "thread_pool.h"

namespace llmserve {
namespace {

constexpr int64_t kPartKeys = 256;  // keys per partition of a long query's attention

// T: float or c10::Half, what the cache stores.
template <typename T>
struct Cache {
  T* k;  // [num_blocks, num_kv_heads, head_dim, block_size]
  T* v;  // [num_blocks, num_kv_heads, block_size, head_dim]
  int64_t num_kv_heads, head_dim, block_size;

  int64_t head_offset(int64_t block, int64_t kv_head) const {
    return (block * num_kv_heads + kv_head) * head_dim * block_size;
  }
};

inline W load_kv(const float* p) { return load_w(p); }
inline W load_kv(const c10::Half* p) { return load_half_w(reinterpret_cast<const uint16_t*>(p)); }

template <typename T>
Cache<T> cache_of(const at::Tensor& kv_cache, int64_t num_kv_heads, int64_t head_dim) {
  // kv_cache: [2, num_blocks, num_kv_heads, block_size * head_dim]
  TORCH_CHECK(kv_cache.is_contiguous());
  TORCH_CHECK(kv_cache.dim() == 4 && kv_cache.size(0) == 2 && kv_cache.size(2) == num_kv_heads);
  TORCH_CHECK(head_dim % kLanes == 0, "head_dim must be a multiple of ", kLanes);
  int64_t block_size = kv_cache.size(3) / head_dim;
  TORCH_CHECK(block_size % kLanes == 0, "block_size must be a multiple of ", kLanes);
  T* base = kv_cache.data_ptr<T>();
  return {base, base + kv_cache[0].numel(), num_kv_heads, head_dim, block_size};
}

// Rotate-half rotary embedding of one head: x[i], x[i + half] by the position's angle i.
void rotate(const float* x, const float* cos, const float* sin, int64_t head_dim, float* out) {
  const int64_t half = head_dim / 2;
  int64_t i = 0;
  for (; i + kW <= half; i += kW) {
    const W a = load_w(x + i), b = load_w(x + i + half), c = load_w(cos + i), s = load_w(sin + i);
    store_w(out + i, a * c - b * s);
    store_w(out + i + half, b * c + a * s);
  }
  for (; i < half; ++i) {
    out[i] = x[i] * cos[i] - x[i + half] * sin[i];
    out[i + half] = x[i + half] * cos[i] + x[i] * sin[i];
  }
}

// n values (a multiple of kLanes) in the cache's type: float16 rounded to nearest even.
void to_cache(const float* x, int64_t n, float* out) { std::memcpy(out, x, n * sizeof(float)); }
void to_cache(const float* x, int64_t n, c10::Half* out) {
  for (int64_t i = 0; i < n; i += kW)
    store_half_w(reinterpret_cast<uint16_t*>(out) + i, load_w(x + i));
}

struct Layout {
  int64_t num_heads, num_kv_heads, head_dim;
};

// Rotates token t's query heads into q_out and writes its rotated K and its V into its slot.
template <typename T>
void rotate_and_store(const float* qkv, const float* cos, const float* sin, const Layout& l,
                      const Cache<T>& c, int64_t slot, float* q_out) {
  for (int64_t h = 0; h < l.num_heads; ++h)
    rotate(qkv + h * l.head_dim, cos, sin, l.head_dim, q_out + h * l.head_dim);
  const int64_t block = slot / c.block_size, offset = slot % c.block_size;
  float k[512];
  T k_cached[512];
  for (int64_t h = 0; h < l.num_kv_heads; ++h) {
    rotate(qkv + (l.num_heads + h) * l.head_dim, cos, sin, l.head_dim, k);
    to_cache(k, l.head_dim, k_cached);
    T* kt = c.k + c.head_offset(block, h) + offset;
    for (int64_t d = 0; d < l.head_dim; ++d) kt[d * c.block_size] = k_cached[d];
    const float* v = qkv + (l.num_heads + l.num_kv_heads + h) * l.head_dim;
    to_cache(v, l.head_dim, c.v + c.head_offset(block, h) + offset * l.head_dim);
  }
}

// GS queries that share a KV head (heads of one token, or of a few consecutive tokens of one
// sequence): the keys are read once for all of them.
template <int GS>
struct Queries {
  const float* q[GS];       // [head_dim] each
  float* out[GS];           // [head_dim] each: the output, or a partition's unnormalized one
  float* stats[GS];         // a partition's {max score, sum of exponentials}; null: final
  float* scores[GS];        // [max num_keys rounded up to the block size] each
  int64_t num_keys[GS];     // query g attends keys [0, num_keys[g])
  const int64_t* blocks;    // the sequence's block table
};

constexpr int kPassChunks = 4;  // key chunks (of kW keys) scored per pass over head_dim

// Scores of chunks [chunk, chunk + NC) of keys for GS queries, handed to finish(chunk, sums)
// per chunk: per query and key one sum over head_dim in order of d, whatever NC or GS.
template <int DV, int GS, int NC, typename T, typename KeysOf, typename Finish>
inline void score_pass(const KeysOf& keys_of, const float* const (&q)[GS], int64_t bs,
                       int64_t chunk, int64_t num_chunks, const Finish& finish) {
  // The next pass's keys, a cache line at a time (its chunks are blocks anywhere in the pool).
  const bool line_per_row = bs * sizeof(T) >= 64;
  const T* keys[NC];
  const T* next[NC];
  for (int j = 0; j < NC; ++j) {
    keys[j] = keys_of(chunk + j);
    next[j] = chunk + NC + j < num_chunks ? keys_of(chunk + NC + j) : keys[j];
  }
  W sums[NC][GS] = {};
  for (int64_t d = 0; d < DV * kW; d += 2) {
    for (int j = 0; j < NC; ++j) {
      __builtin_prefetch(next[j] + d * bs);
      if (line_per_row) __builtin_prefetch(next[j] + (d + 1) * bs);
    }
    for (int64_t e = d; e < d + 2; ++e) {
      W k[NC];
      for (int j = 0; j < NC; ++j) k[j] = load_kv(keys[j] + e * bs);
      for (int g = 0; g < GS; ++g) {
        const W qd = broadcast_w(q[g] + e);
        for (int j = 0; j < NC; ++j) sums[j][g] = qd * k[j] + sums[j][g];
      }
    }
  }
  for (int j = 0; j < NC; ++j) finish(chunk + j, sums[j]);
}

// Per query: scores (one sum over head_dim, in order of d), softmax over its own keys, and the
// weighted sum of V. Keys beyond a query's own get weight exactly 0 (adding 0 * v changes no
// sum), so each query's arithmetic is the same whatever else shares its item or its batch.
// DV: head_dim in vectors (sums in registers).
template <int DV, int GS, typename T>
void attend(const Cache<T>& c, const Queries<GS>& job, int64_t kv_head, float scale) {
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  const int64_t bs = c.block_size;
  int64_t max_keys = 0;
  for (int g = 0; g < GS; ++g) max_keys = std::max(max_keys, job.num_keys[g]);
  const int64_t num_blocks = (max_keys + bs - 1) / bs;
  W best[GS];
  for (int g = 0; g < GS; ++g) best[g] = splat_w(kNegInf);
  // Keys in chunks of kW, up to kPassChunks chunks per pass so that each q value loaded
  // serves them all.
  const int64_t num_chunks = (max_keys + kW - 1) / kW;
  auto keys_of = [&](int64_t chunk) {
    const int64_t key = chunk * kW;
    return c.k + c.head_offset(job.blocks[key / bs], kv_head) + key % bs;
  };
  auto finish = [&](int64_t chunk, const W* sums) {
    const int64_t first = chunk * kW;
    for (int g = 0; g < GS; ++g) {
      const int64_t valid = job.num_keys[g] - first;
      if (valid <= 0) {  // wholly past this query's keys: weight 0
        store_w(job.scores[g] + first, W{});
        continue;
      }
      W score = sums[g] * scale;
      if (valid < kW) {
        float lanes[kW];
        store_w(lanes, score);
        for (int64_t i = valid; i < kW; ++i) lanes[i] = kNegInf;
        score = load_w(lanes);
      }
      store_w(job.scores[g] + first, score);
      best[g] = vmax(best[g], score);
    }
  };
  int64_t chunk = 0;
  for (; chunk + kPassChunks <= num_chunks; chunk += kPassChunks)
    score_pass<DV, GS, kPassChunks, T>(keys_of, job.q, bs, chunk, num_chunks, finish);
  switch (num_chunks - chunk) {
    case 1: score_pass<DV, GS, 1, T>(keys_of, job.q, bs, chunk, num_chunks, finish); break;
    case 2: score_pass<DV, GS, 2, T>(keys_of, job.q, bs, chunk, num_chunks, finish); break;
    case 3: score_pass<DV, GS, 3, T>(keys_of, job.q, bs, chunk, num_chunks, finish); break;
  }
  float inv_total[GS], max_scores[GS], totals[GS];
  for (int g = 0; g < GS; ++g) {
    const float max_score = max_scores[g] = hmax(best[g]);
    const int64_t num_chunks = (job.num_keys[g] + kW - 1) / kW;
    W total = {};
    for (int64_t chunk = 0; chunk < num_chunks; ++chunk) {
      W e = vexp(load_w(job.scores[g] + chunk * kW) - max_score);
      store_w(job.scores[g] + chunk * kW, e);
      total += e;
    }
    totals[g] = hsum(total);
    inv_total[g] = 1.0f / totals[g];
  }
  W acc[GS][DV] = {};
  for (int64_t b = 0; b < num_blocks; ++b) {
    const T* vb = c.v + c.head_offset(job.blocks[b], kv_head);
    const T* next = c.v + c.head_offset(job.blocks[b + 1 < num_blocks ? b + 1 : b], kv_head);
    const int64_t n = std::min(bs, max_keys - b * bs);
    for (int64_t key = 0; key < n; ++key) {
      const char* next_row = reinterpret_cast<const char*>(next + key * DV * kW);
      for (size_t line = 0; line < DV * kW * sizeof(T); line += 64)
        __builtin_prefetch(next_row + line);
      W v[DV];
      for (int i = 0; i < DV; ++i) v[i] = load_kv(vb + (key * DV + i) * kW);
      for (int g = 0; g < GS; ++g) {
        const W weight = broadcast_w(job.scores[g] + b * bs + key);
        for (int i = 0; i < DV; ++i) acc[g][i] = weight * v[i] + acc[g][i];
      }
    }
  }
  for (int g = 0; g < GS; ++g) {
    if (job.stats[g] == nullptr) {
      for (int i = 0; i < DV; ++i) store_w(job.out[g] + i * kW, acc[g][i] * inv_total[g]);
    } else {
      for (int i = 0; i < DV; ++i) store_w(job.out[g] + i * kW, acc[g][i]);
      job.stats[g][0] = max_scores[g];
      job.stats[g][1] = totals[g];
    }
  }
}

// A long query's output from its partitions' results (slots of stats then head_dim values,
// in partition order): each partition's weight is exp(its max - the overall max).
void merge_partitions(const float* slots, int64_t num_parts, int64_t head_dim, float* out) {
  const int64_t slot = head_dim + 2;
  float top = -std::numeric_limits<float>::infinity();
  for (int64_t p = 0; p < num_parts; ++p) top = std::max(top, slots[p * slot]);
  float total = 0.0f;
  for (int64_t p = 0; p < num_parts; ++p)
    total += std::exp(slots[p * slot] - top) * slots[p * slot + 1];
  const float inv_total = 1.0f / total;
  for (int64_t i = 0; i < head_dim; i += kW) {
    W sum = {};
    for (int64_t p = 0; p < num_parts; ++p) {
      const float weight = std::exp(slots[p * slot] - top) * inv_total;
      sum = load_w(slots + p * slot + 2 + i) * weight + sum;
    }
    store_w(out + i, sum);
  }
}

int64_t num_parts(int64_t num_keys) { return (num_keys + kPartKeys - 1) / kPartKeys; }

// A work item: tokens [token, token + num_tokens) of one sequence, heads
// [first_head, first_head + num_heads) of one KV head, keys of partition `part`.
struct Item {
  int64_t token, num_tokens, first_head, num_heads, part;
};

struct Batch {
  const float* q;  // [tokens, heads * head_dim] rotated queries
  float* out;      // same shape
  const int64_t* tables;
  int64_t max_blocks;
  const int64_t* token_seq;
  const int64_t* positions;
  float* partials;  // [tokens, heads, max parts, head_dim + 2]: long queries' partitions
  int64_t max_parts;
  int64_t num_heads, group, head_dim;
  float scale;
};

template <int DV, int GS, typename T>
void attend_item(const Cache<T>& c, const Batch& batch, const Item& item, float* scores,
                 int64_t stride) {
  Queries<GS> job;
  const int64_t first_key = item.part * kPartKeys;
  int g = 0;
  for (int64_t t = item.token; t < item.token + item.num_tokens; ++t) {
    for (int64_t h = item.first_head; h < item.first_head + item.num_heads; ++h, ++g) {
      const int64_t at = (t * batch.num_heads + h) * batch.head_dim;
      const int64_t num_keys = batch.positions[t] + 1;
      job.q[g] = batch.q + at;
      job.scores[g] = scores + g * stride;
      job.num_keys[g] = std::min(num_keys - first_key, kPartKeys);
      if (num_keys <= kPartKeys) {
        job.out[g] = batch.out + at;
        job.stats[g] = nullptr;
      } else {
        float* slot = batch.partials + ((t * batch.num_heads + h) * batch.max_parts + item.part) *
                                           (batch.head_dim + 2);
        job.stats[g] = slot;
        job.out[g] = slot + 2;
      }
    }
  }
  job.blocks = batch.tables + batch.token_seq[item.token] * batch.max_blocks +
               first_key / c.block_size;
  attend<DV, GS, T>(c, job, item.first_head / batch.group, batch.scale);
}

template <typename T>
using AttendFn = void (*)(const Cache<T>&, const Batch&, const Item&, float*, int64_t);

template <int DV, typename T>
AttendFn<T> attend_for_queries(int64_t num_queries) {
  switch (num_queries) {
    case 1: return &attend_item<DV, 1, T>;
    case 2: return &attend_item<DV, 2, T>;
    case 3: return &attend_item<DV, 3, T>;
    case 4: return &attend_item<DV, 4, T>;
    case 5: return &attend_item<DV, 5, T>;
    case 6: return &attend_item<DV, 6, T>;
  }
  TORCH_CHECK(false, "unsupported queries per item ", num_queries);
}

// The head sizes attend_for has code for (kernels.ATTENTION_HEAD_DIMS in Python).
bool known_head_dim(int64_t head_dim) {
  return head_dim == 32 || head_dim == 64 || head_dim == 128 || head_dim == 256;
}

template <typename T>
AttendFn<T> attend_for(int64_t head_dim, int64_t num_queries) {
  switch (head_dim) {
    case 32: return attend_for_queries<32 / kW, T>(num_queries);
    case 64: return attend_for_queries<64 / kW, T>(num_queries);
    case 128: return attend_for_queries<128 / kW, T>(num_queries);
    case 256: return attend_for_queries<256 / kW, T>(num_queries);
  }
  TORCH_CHECK(false, "no attention code for head_dim ", head_dim);  // see known_head_dim
}

// Queries per item, by head_dim: as many as the output sums leave registers for.
int64_t max_queries(int64_t head_dim) {
  constexpr int64_t kSumRegisters = kW == 16 ? 24 : 8;  // of 32 zmm, of 16 ymm
  return std::clamp<int64_t>(kSumRegisters / (head_dim / kW), 1, 6);
}

// Items: runs of consecutive tokens of one sequence x runs of heads of one KV head, each
// with at most max_queries(head_dim) queries, x the key partitions of its tokens (each
// partition's item holds the run's tokens that have keys in it).
std::vector<Item> plan_items(const int64_t* token_seq, const int64_t* positions,
                             int64_t num_tokens, int64_t num_heads, int64_t group,
                             int64_t head_dim) {
  const int64_t limit = max_queries(head_dim);
  const int64_t heads_per_item = std::min(group, limit);
  const int64_t tokens_per_item = std::max<int64_t>(1, limit / heads_per_item);
  std::vector<Item> items;
  for (int64_t t = 0; t < num_tokens;) {
    int64_t n = 1;
    while (n < tokens_per_item && t + n < num_tokens && token_seq[t + n] == token_seq[t]) ++n;
    for (int64_t first = 0; first < num_heads; first += heads_per_item) {
      const int64_t kv_end = (first / group + 1) * group;
      const int64_t heads = std::min(heads_per_item, kv_end - first);
      // Positions rise along the run: a partition's tokens are a tail of it.
      const int64_t parts = num_parts(positions[t + n - 1] + 1);
      int64_t begin = t;
      for (int64_t part = 0; part < parts; ++part) {
        while (positions[begin] + 1 <= part * kPartKeys) ++begin;
        items.push_back({begin, t + n - begin, first, heads, part});
      }
      if (heads < heads_per_item) first = kv_end - heads_per_item;  // next KV head
    }
    t += n;
  }
  return items;
}

// qkv: [num_tokens, (num_heads + 2 * num_kv_heads) * head_dim], rows may be strided;
// cos, sin: [max_positions, head_dim / 2]. Rotates Q and K, writes each token's K and V into
// its slot, then token t of sequence token_seq[t] at positions[t] attends that sequence's keys
// [0, positions[t]]. Returns [num_tokens, num_heads * head_dim].
template <typename T>
at::Tensor rope_attention_on(const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin,
                             const at::Tensor& kv_cache, const at::Tensor& slot_mapping,
                             const at::Tensor& block_tables, const at::Tensor& token_seq,
                             const at::Tensor& positions, int64_t num_heads,
                             int64_t num_kv_heads, double scale) {
  TORCH_CHECK(qkv.scalar_type() == at::kFloat && qkv.dim() == 2 && qkv.stride(1) == 1);
  const int64_t num_tokens = qkv.size(0);
  const Layout l{num_heads, num_kv_heads, qkv.size(1) / (num_heads + 2 * num_kv_heads)};
  // Checked here, not where the threads pick their code: an error there would end the process.
  TORCH_CHECK(known_head_dim(l.head_dim), "head_dim ", l.head_dim,
              " is not one of 32, 64, 128, 256");
  TORCH_CHECK(num_heads % num_kv_heads == 0);
  TORCH_CHECK(cos.is_contiguous() && sin.is_contiguous() && cos.size(1) * 2 == l.head_dim);
  Cache<T> c = cache_of<T>(kv_cache, num_kv_heads, l.head_dim);
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
  parallel_for(num_tokens, 4, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t angle = pp[t] * (l.head_dim / 2);
      rotate_and_store(qkv.data_ptr<float>() + t * qkv.stride(0), cp + angle, snp + angle, l, c,
                       slot[t], qp + t * num_heads * l.head_dim);
    }
  });
  at::Tensor out = at::empty({num_tokens, num_heads * l.head_dim}, qkv.options());
  float* op = out.data_ptr<float>();
  const int64_t group = num_heads / num_kv_heads;
  TORCH_CHECK(kPartKeys % c.block_size == 0, "block_size must divide ", kPartKeys);
  const std::vector<Item> items = plan_items(sp, pp, num_tokens, num_heads, group, l.head_dim);
  int64_t max_parts = 1;
  for (int64_t t = 0; t < num_tokens; ++t) max_parts = std::max(max_parts, num_parts(pp[t] + 1));
  // The calling thread's, kept from call to call (at its largest: 39 MB after a 2,048-token
  // pass of the default model) and never zeroed: every slot a long query's partitions use is
  // written before it is read. A fresh, zeroed mapping each layer, faulted in page by page,
  // made a 2,048-token pass's attention 1.6x slower. Workers reach it through partial_slots.
  thread_local std::vector<float> partials;
  if (max_parts > 1)
    partials.resize(std::max<size_t>(partials.size(),
                                     num_tokens * num_heads * max_parts * (l.head_dim + 2)));
  float* const partial_slots = partials.data();
  const Batch batch{qp, op, tp, max_blocks, sp, pp, partial_slots, max_parts, num_heads,
                    group, l.head_dim, static_cast<float>(scale)};
  const int64_t stride = std::min(max_blocks * c.block_size, kPartKeys);
  parallel_for(static_cast<int64_t>(items.size()), 1, [&](int64_t begin, int64_t end) {
    thread_local std::vector<float> scores;
    scores.resize(max_queries(l.head_dim) * stride);
    for (int64_t i = begin; i < end; ++i) {
      const Item& item = items[i];
      attend_for<T>(l.head_dim, item.num_tokens * item.num_heads)(c, batch, item,
                                                                  scores.data(), stride);
    }
  });
  if (max_parts > 1) {
    parallel_for(num_tokens * num_heads, 16, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const int64_t parts = num_parts(pp[i / num_heads] + 1);
        if (parts > 1)
          merge_partitions(partial_slots + i * max_parts * (l.head_dim + 2), parts, l.head_dim,
                           op + i * l.head_dim);
      }
    });
  }
  return out;
}

at::Tensor rope_attention(const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin,
                          const at::Tensor& kv_cache, const at::Tensor& slot_mapping,
                          const at::Tensor& block_tables, const at::Tensor& token_seq,
                          const at::Tensor& positions, int64_t num_heads, int64_t num_kv_heads,
                          double scale) {
  switch (kv_cache.scalar_type()) {
    case at::kFloat:
      return rope_attention_on<float>(qkv, cos, sin, kv_cache, slot_mapping, block_tables,
                                      token_seq, positions, num_heads, num_kv_heads, scale);
    case at::kHalf:
      return rope_attention_on<c10::Half>(qkv, cos, sin, kv_cache, slot_mapping, block_tables,
                                          token_seq, positions, num_heads, num_kv_heads, scale);
    default:
      TORCH_CHECK(false, "the KV cache must be float32 or float16, not ", kv_cache.scalar_type());
  }
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
