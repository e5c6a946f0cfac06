// Attention straight from the paged KV pool on x86 CPUs (AVX2 and FMA; built beside blockq.cpp, in the same
// extension): decode (below) and extend (further down). Keys and values are read where they sit in the pool, through
// each request's row of pool indices, instead of being gathered into a [requests, heads, context, dim] copy first: at
// a 1,000-token context that copy moved as many bytes per layer as the layer's weights.
//
// Decode: one query token per request. The query heads that share a KV head are computed together, so each key and
// value row is read once per KV head. Work is split over (request, chunk of up to kChunk keys); a task takes every KV
// head of its chunk, so it reads whole pool rows. A chunk's scores are computed, exponentiated and summed in one go;
// chunks of the same (request, KV head) are then merged with their maxima and sums (the FlashAttention rescaling), so
// the result is softmax(q k^T * scale) v over the whole context, in fp32.
//
// Where `loc` is given, the key at pool index loc[b] (the new token, whose K/V the compiled step writes to the pool
// only after the step) comes from new_k / new_v instead of the pool. See attention.py for where this runs.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <limits>
#include <memory>

#include "simd.h"

namespace {

using radixflow::hmax;
using radixflow::hsum;

constexpr int64_t kChunk = 128;    // keys per task, at most
constexpr int64_t kMinChunk = 32;  // keys per task, at least (unless the context is shorter)
constexpr int64_t kMasked = -1, kNew = -2;  // a key's row: masked (or padding), or the new token's K/V
constexpr int kMaxGroup = 16;     // query heads per KV head
constexpr int64_t kMaxDim = 256;  // head dimension, a multiple of 8

// e^x for x <= 0 (scores minus their maximum), 8 at a time: x = n ln2 + r with |r| <= ln2 / 2, e^r by its Taylor
// series to degree 6 (relative error below 2e-7), 2^n built in the exponent bits; exactly 0 below -87 (and -inf).
inline __m256 exp_nonpositive(__m256 x) {
  const __m256 in_range = _mm256_cmp_ps(x, _mm256_set1_ps(-87.f), _CMP_GE_OQ);
  x = _mm256_max_ps(x, _mm256_set1_ps(-87.f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693145752f),
                                    _mm256_fnmadd_ps(n, _mm256_set1_ps(1.42860677e-6f), x));
  __m256 p = _mm256_set1_ps(1.f / 720.f);
  for (const float c : {1.f / 120.f, 1.f / 24.f, 1.f / 6.f, 0.5f, 1.f, 1.f}) p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
  const __m256i pow2 = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_and_ps(_mm256_mul_ps(p, _mm256_castsi256_ps(pow2)), in_range);
}

// The sums of the eight lanes of each of v[0..7], as eight floats in that order.
inline __m256 lane_sums(const __m256 v[8]) {
  const __m256 h0123 = _mm256_hadd_ps(_mm256_hadd_ps(v[0], v[1]), _mm256_hadd_ps(v[2], v[3]));
  const __m256 h4567 = _mm256_hadd_ps(_mm256_hadd_ps(v[4], v[5]), _mm256_hadd_ps(v[6], v[7]));
  return _mm256_add_ps(_mm256_permute2f128_ps(h0123, h4567, 0x20), _mm256_permute2f128_ps(h0123, h4567, 0x31));
}

// Keys per task: kChunk, or fewer where that leaves a thread idle (a short context at a small batch), so every
// thread has about two tasks; a multiple of 8.
inline int64_t chunk_size(int64_t batch, int64_t ctx) {
  const int64_t want = 2 * at::get_num_threads();
  if (batch * ((ctx + kChunk - 1) / kChunk) >= want) return kChunk;
  const int64_t per_request = (want + batch - 1) / batch;
  const int64_t chunk = ((ctx + per_request - 1) / per_request + 7) / 8 * 8;
  return std::clamp(chunk, kMinChunk, kChunk);
}

// The row a masked key (or a key past the end of the context, up to the next multiple of 8) reads.
alignas(32) constexpr float kZeros[kMaxDim] = {};

// out[col : col + 8 * kVecs] = factor * out[...] + sum over j < n of w[j * stride] * values[j][col : ...], with out
// not read where factor is 0. A fixed width keeps the accumulators in registers (a run-time width kept them in
// memory: a load, a store and a dependency per value row).
template <int kVecs>
inline void weighted_block(const float* w, int64_t stride, const float* const* values, int64_t n, int64_t col,
                           float factor, float* out) {
  __m256 acc[kVecs];
  for (int i = 0; i < kVecs; ++i)
    acc[i] = factor == 0.f ? _mm256_setzero_ps() : _mm256_mul_ps(_mm256_loadu_ps(out + col + 8 * i),
                                                                 _mm256_set1_ps(factor));
  for (int64_t j = 0; j < n; ++j) {
    const __m256 wj = _mm256_broadcast_ss(w + j * stride);
    const float* v = values[j] + col;
    for (int i = 0; i < kVecs; ++i) acc[i] = _mm256_fmadd_ps(wj, _mm256_loadu_ps(v + 8 * i), acc[i]);
  }
  for (int i = 0; i < kVecs; ++i) _mm256_storeu_ps(out + col + 8 * i, acc[i]);
}

// The same over all `dim` columns, in blocks of a fixed width.
inline void weighted_values(const float* w, int64_t stride, const float* const* values, int64_t n, int64_t dim,
                            float factor, float* out) {
  int64_t col = 0;
  for (; col + 64 <= dim; col += 64) weighted_block<8>(w, stride, values, n, col, factor, out);
  for (; col + 32 <= dim; col += 32) weighted_block<4>(w, stride, values, n, col, factor, out);
  for (; col < dim; col += 8) weighted_block<1>(w, stride, values, n, col, factor, out);
}

// One chunk's partial result per query head, `dim + 2` floats: the scores' maximum, the sum of their exponentials,
// and the values weighted by those exponentials (not yet divided by the sum).
struct Partial {
  float* at;
  float& max() const { return at[0]; }
  float& sum() const { return at[1]; }
  float* acc() const { return at + 2; }
};

// out[0 : dim] = one query head's attention from its `count` partial results (part(c): the c-th), rescaled to their
// overall maximum and divided by the sum (the FlashAttention merge). A part with every key masked adds nothing; if
// every key is masked (the planner builds no such row; SDPA would return NaN), zeros.
template <typename Part>
inline void merge_partials(int64_t count, Part part, int64_t dim, float* out) {
  float top = -std::numeric_limits<float>::infinity();
  for (int64_t c = 0; c < count; ++c) top = std::max(top, part(c).max());
  std::fill(out, out + dim, 0.f);
  float total = 0.f;
  for (int64_t c = 0; c < count; ++c) {
    const Partial p = part(c);
    if (p.sum() == 0.f) continue;
    const float w = std::exp(p.max() - top);
    total += w * p.sum();
    for (int64_t i = 0; i < dim; ++i) out[i] += w * p.acc()[i];
  }
  const float inv = total > 0.f ? 1.f / total : 0.f;
  for (int64_t i = 0; i < dim; ++i) out[i] *= inv;
}

// The checks both kernels make of the pool, the query heads and the index table.
void check_pool(const char* op, const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& kv_indices,
                int64_t batch, int64_t heads, int64_t dim) {
  TORCH_CHECK(k_cache.dim() == 3 && v_cache.sizes() == k_cache.sizes() && k_cache.size(2) == dim &&
              k_cache.scalar_type() == at::kFloat && v_cache.scalar_type() == at::kFloat &&
              k_cache.stride(2) == 1 && v_cache.stride(2) == 1,
              op, ": k_cache / v_cache must be float32 [pool, kv_heads, D] with unit stride in D");
  const int64_t kv_heads = k_cache.size(1);
  TORCH_CHECK(heads % kv_heads == 0 && heads / kv_heads <= kMaxGroup && dim % 8 == 0 && dim <= kMaxDim,
              op, ": needs heads a multiple of kv_heads (at most ", kMaxGroup, " per KV head) and D a multiple of 8 "
              "up to ", kMaxDim);
  TORCH_CHECK(kv_indices.dim() == 2 && kv_indices.size(0) == batch && kv_indices.scalar_type() == at::kLong,
              op, ": kv_indices must be int64 [B, L]");
}

at::Tensor decode_attention(const at::Tensor& q_, const at::Tensor& k_cache, const at::Tensor& v_cache,
                            const at::Tensor& kv_indices_, const c10::optional<at::Tensor>& mask_,
                            const c10::optional<at::Tensor>& loc_, const c10::optional<at::Tensor>& new_k_,
                            const c10::optional<at::Tensor>& new_v_, double scale) {
  const at::Tensor q = q_.contiguous(), kv_indices = kv_indices_.contiguous();
  TORCH_CHECK(q.dim() == 3 && q.scalar_type() == at::kFloat, "decode_attention: q must be float32 [B, H, D]");
  const int64_t batch = q.size(0), heads = q.size(1), dim = q.size(2);
  check_pool("decode_attention", k_cache, v_cache, kv_indices, batch, heads, dim);
  const int64_t kv_heads = k_cache.size(1), group = heads / kv_heads;
  // The new tokens' K/V, when they are not in the pool yet: all three given, or none.
  at::Tensor loc, new_k, new_v;
  if (loc_.has_value()) {
    TORCH_CHECK(new_k_.has_value() && new_v_.has_value(), "decode_attention: loc needs new_k and new_v");
    loc = loc_->contiguous();
    new_k = new_k_->contiguous();
    new_v = new_v_->contiguous();
    TORCH_CHECK(loc.numel() == batch && loc.scalar_type() == at::kLong, "decode_attention: loc must be int64 [B]");
    TORCH_CHECK(new_k.sizes() == at::IntArrayRef({batch, kv_heads, dim}) && new_v.sizes() == new_k.sizes() &&
                new_k.scalar_type() == at::kFloat && new_v.scalar_type() == at::kFloat,
                "decode_attention: new_k / new_v must be float32 [B, kv_heads, D]");
  }
  const int64_t ctx = kv_indices.size(1);
  at::Tensor mask;
  if (mask_.has_value()) {
    mask = mask_->reshape({batch, -1}).contiguous();
    TORCH_CHECK(mask.scalar_type() == at::kBool && mask.size(1) == ctx, "decode_attention: mask must be bool [B, L]");
  }
  at::Tensor out = at::empty({batch, heads, dim}, q.options());
  const int64_t chunk = chunk_size(batch, ctx);
  const int64_t chunks = std::max<int64_t>(1, (ctx + chunk - 1) / chunk);
  const int64_t stride = dim + 2;
  std::unique_ptr<float[]> partials(new float[static_cast<size_t>(batch * chunks * kv_heads * group * stride)]);
  // A task's partials: (request, chunk) major, then KV head, then query head of the group.
  const auto partial = [&](int64_t task, int64_t h, int64_t g) {
    return Partial{partials.get() + ((task * kv_heads + h) * group + g) * stride};
  };

  const float* qp = q.data_ptr<float>();
  const float* kp = k_cache.data_ptr<float>();
  const float* vp = v_cache.data_ptr<float>();
  const int64_t* idx = kv_indices.data_ptr<int64_t>();
  const bool* mp = mask.defined() ? mask.data_ptr<bool>() : nullptr;
  const int64_t* locp = loc.defined() ? loc.data_ptr<int64_t>() : nullptr;
  const float* nkp = new_k.defined() ? new_k.data_ptr<float>() : nullptr;
  const float* nvp = new_v.defined() ? new_v.data_ptr<float>() : nullptr;
  const int64_t k_row = k_cache.stride(0), k_head = k_cache.stride(1);
  const int64_t v_row = v_cache.stride(0), v_head = v_cache.stride(1);
  const int64_t pool = k_cache.size(0);
  const float fscale = static_cast<float>(scale);

  at::parallel_for(0, batch * chunks, 1, [&](int64_t t0, int64_t t1) {
    alignas(32) float scores[kMaxGroup][kChunk];
    int64_t rows[kChunk];  // each key's pool row; kMasked, or kNew for the new token's K/V
    const float* keys[kChunk];
    const float* values[kChunk];
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / chunks, c = t % chunks;
      const int64_t j0 = c * chunk, n = std::min(ctx - j0, chunk), padded = (n + 7) / 8 * 8;
      // Where each key and value row of the chunk is: the pool, the new token's, or (masked, or past the end of the
      // chunk's last 8) a row of zeros whose score is set to -inf below.
      bool any = false;
      for (int64_t j = 0; j < padded; ++j) {
        const bool live = j < n && (mp == nullptr || mp[b * ctx + j0 + j]);
        any |= live;
        const int64_t at = live ? idx[b * ctx + j0 + j] : -1;
        if (!live) {
          rows[j] = kMasked;
        } else if (locp != nullptr && at == locp[b]) {
          rows[j] = kNew;
        } else {
          TORCH_CHECK(at >= 0 && at < pool, "decode_attention: pool index ", at, " out of range [0, ", pool, ")");
          rows[j] = at;
        }
      }
      // Every KV head of the chunk in turn: a pool row holds all its heads side by side, so the task reads whole
      // rows (consecutive tokens: one sequential stream), not every third slice of them.
      for (int64_t h = 0; h < kv_heads; ++h) {
        for (int64_t j = 0; j < padded; ++j) {
          if (rows[j] == kMasked) {
            keys[j] = values[j] = kZeros;
          } else if (rows[j] == kNew) {
            keys[j] = nkp + (b * kv_heads + h) * dim;
            values[j] = nvp + (b * kv_heads + h) * dim;
          } else {
            keys[j] = kp + rows[j] * k_row + h * k_head;
            values[j] = vp + rows[j] * v_row + h * v_head;
          }
        }
        for (int g = 0; g < group; ++g) {
          const Partial p = partial(t, h, g);
          if (!any) {  // every key of the chunk masked: nothing to add
            p.max() = -std::numeric_limits<float>::infinity();
            p.sum() = 0.f;
            continue;
          }
          const float* qg = qp + (b * heads + h * group + g) * dim;
          // Scores of 8 keys at a time: 8 independent dot products, then their lanes summed together.
          __m256 top = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
          for (int64_t j = 0; j < padded; j += 8) {
            __m256 s[8];
            for (int u = 0; u < 8; ++u) s[u] = _mm256_mul_ps(_mm256_loadu_ps(qg), _mm256_loadu_ps(keys[j + u]));
            for (int64_t i = 8; i < dim; i += 8) {
              const __m256 qi = _mm256_loadu_ps(qg + i);
              for (int u = 0; u < 8; ++u) s[u] = _mm256_fmadd_ps(qi, _mm256_loadu_ps(keys[j + u] + i), s[u]);
            }
            __m256 sc = _mm256_mul_ps(lane_sums(s), _mm256_set1_ps(fscale));
            _mm256_store_ps(scores[g] + j, sc);
            for (int u = 0; u < 8; ++u)
              if (keys[j + u] == kZeros) scores[g][j + u] = -std::numeric_limits<float>::infinity();
            top = _mm256_max_ps(top, _mm256_load_ps(scores[g] + j));
          }
          const float best = hmax(top);
          // Weights e^(score - max) and their sum (masked keys: exactly 0), then the weighted sum of the values.
          __m256 total = _mm256_setzero_ps();
          for (int64_t j = 0; j < padded; j += 8) {
            const __m256 e = exp_nonpositive(_mm256_sub_ps(_mm256_load_ps(scores[g] + j), _mm256_set1_ps(best)));
            _mm256_store_ps(scores[g] + j, e);
            total = _mm256_add_ps(total, e);
          }
          p.max() = best;
          p.sum() = hsum(total);
          weighted_values(scores[g], 1, values, n, dim, 0.f, p.acc());
        }
      }
    }
  });

  // Merge the chunks of each (request, query head): rescale each to the overall maximum, then divide by the sum.
  float* op = out.data_ptr<float>();
  at::parallel_for(0, batch * heads, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t b = r / heads, h = r % heads / group, g = r % group;
      merge_partials(chunks, [&](int64_t c) { return partial(b * chunks + c, h, g); }, dim, op + r * dim);
    }
  });
  return out;
}


// -- extend attention --------------------------------------------------------------------------------------------
// Several query tokens per request (a prefill chunk, or the new tokens after a cached prefix) against the request's
// keys read where they sit in the pool, causal or under a bool mask: what gathering the context into a copy and
// calling SDPA computed, in one pass over each key block per KV head for all the query rows that share it.
//
// A task is (request, block of kQueryBlock queries, range of keys); a query block takes all the range unless there
// are too few tasks to keep every thread busy (a short extend behind a long prefix), and then the key ranges' results
// are merged as the decode kernel merges its chunks. Within a task, for each block of kKeyBlock keys and each KV
// head, the scores come out transposed, S[key][row] (a row is one query of the block for one query head of the KV
// head), so the per-row softmax statistics are vertical vector ops, and the query rows are transposed once per task
// (Qt[d][row]) where the keys are broadcast straight from their pool rows. Online softmax (running maximum, sum and
// weighted values per row) carries each row across the key blocks.

constexpr int64_t kQueryBlock = 16;  // queries per task
constexpr int64_t kKeyBlock = 64;    // keys per block: their scores for every row of a task stay in L1 / L2
constexpr int64_t kMaxRows = kQueryBlock * kMaxGroup;

// S^T[u][r0 : r0 + 16] = keys[u] . Qt[:, r0 : r0 + 16] for the kR keys u < kR: 2 x kR accumulators in registers.
template <int kR>
inline void score_tile(const float* const* keys, const float* qt, int64_t rows_padded, int64_t dim, int64_t r0,
                       float* st) {
  __m256 acc[kR][2];
  for (int u = 0; u < kR; ++u) acc[u][0] = acc[u][1] = _mm256_setzero_ps();
  for (int64_t d = 0; d < dim; ++d) {
    const __m256 q0 = _mm256_load_ps(qt + d * rows_padded + r0), q1 = _mm256_load_ps(qt + d * rows_padded + r0 + 8);
    for (int u = 0; u < kR; ++u) {
      const __m256 k = _mm256_broadcast_ss(keys[u] + d);
      acc[u][0] = _mm256_fmadd_ps(k, q0, acc[u][0]);
      acc[u][1] = _mm256_fmadd_ps(k, q1, acc[u][1]);
    }
  }
  for (int u = 0; u < kR; ++u) {
    _mm256_store_ps(st + u * rows_padded + r0, acc[u][0]);
    _mm256_store_ps(st + u * rows_padded + r0 + 8, acc[u][1]);
  }
}

// The extend kernel's weighted values: out[r] = factor[r] * out[r] + sum over j < n of w[j * stride + r] * values[j]
// for every row r < rows (a multiple of kPvRows), in tiles of kPvRows rows by 16 columns (8 for a last odd 8), as a
// GEMM's inner kernel tiles C: each value vector loaded serves kPvRows rows. (Row by row, every row streamed all n
// value rows again; with the queries and scores beside them they do not fit L1: about 8 loads from L2 per pair.)
constexpr int kPvRows = 4;

template <int kVecs>
__attribute__((always_inline)) inline void weighted_rows_tile(const float* w, int64_t stride,
                                                              const float* const* values, int64_t n, int64_t col,
                                                              const float* factor, float* const* out) {
  __m256 acc[kPvRows][kVecs];
  for (int i = 0; i < kPvRows; ++i)
    for (int c = 0; c < kVecs; ++c)
      acc[i][c] = factor[i] == 0.f ? _mm256_setzero_ps()
                                   : _mm256_mul_ps(_mm256_loadu_ps(out[i] + col + 8 * c), _mm256_set1_ps(factor[i]));
  for (int64_t j = 0; j < n; ++j) {
    __m256 v[kVecs];
    for (int c = 0; c < kVecs; ++c) v[c] = _mm256_loadu_ps(values[j] + col + 8 * c);
    for (int i = 0; i < kPvRows; ++i) {
      const __m256 wi = _mm256_broadcast_ss(w + j * stride + i);
      for (int c = 0; c < kVecs; ++c) acc[i][c] = _mm256_fmadd_ps(wi, v[c], acc[i][c]);
    }
  }
  for (int i = 0; i < kPvRows; ++i)
    for (int c = 0; c < kVecs; ++c) _mm256_storeu_ps(out[i] + col + 8 * c, acc[i][c]);
}

// Register allocation, checked in the disassembly (the tile's loop must not touch the stack): inlined into the
// extend kernel's loop, beside the exponential's constants, GCC kept the value vectors on the stack and read them
// back for every FMA; the tile as a function of its own stored its accumulators to the stack after every key. Both
// were slower than the row-by-row loop this replaced.
__attribute__((noinline)) void weighted_rows(const float* w, int64_t stride, int64_t rows, const float* const* values,
                                             int64_t n, int64_t dim, const float* factor, float* const* out) {
  for (int64_t r = 0; r < rows; r += kPvRows) {
    int64_t col = 0;
    for (; col + 16 <= dim; col += 16) weighted_rows_tile<2>(w + r, stride, values, n, col, factor + r, out + r);
    if (col < dim) weighted_rows_tile<1>(w + r, stride, values, n, col, factor + r, out + r);
  }
}

at::Tensor extend_attention(const at::Tensor& q_, const at::Tensor& k_cache, const at::Tensor& v_cache,
                            const at::Tensor& kv_indices_, const c10::optional<at::Tensor>& mask_, bool causal,
                            double scale) {
  const at::Tensor q = q_.contiguous(), kv_indices = kv_indices_.contiguous();
  TORCH_CHECK(q.dim() == 4 && q.scalar_type() == at::kFloat, "extend_attention: q must be float32 [B, Q, H, D]");
  const int64_t batch = q.size(0), queries = q.size(1), heads = q.size(2), dim = q.size(3);
  check_pool("extend_attention", k_cache, v_cache, kv_indices, batch, heads, dim);
  const int64_t kv_heads = k_cache.size(1), group = heads / kv_heads;
  const int64_t ctx = kv_indices.size(1);
  TORCH_CHECK(ctx >= queries, "extend_attention: fewer keys (", ctx, ") than queries (", queries, ")");
  at::Tensor mask;
  if (mask_.has_value()) {
    TORCH_CHECK(!causal, "extend_attention: a mask or causal, not both");
    mask = mask_->reshape({batch, queries, ctx}).contiguous();
    TORCH_CHECK(mask.scalar_type() == at::kBool, "extend_attention: mask must be bool [B, Q, L]");
  }
  const int64_t qblocks = (queries + kQueryBlock - 1) / kQueryBlock;
  const int64_t key_blocks = (ctx + kKeyBlock - 1) / kKeyBlock;
  // Key ranges per query block: one, unless that leaves threads idle.
  const int64_t want = 2 * at::get_num_threads();
  const int64_t splits = std::clamp<int64_t>((want + batch * qblocks - 1) / (batch * qblocks), 1, key_blocks);
  const int64_t blocks_per_split = (key_blocks + splits - 1) / splits;
  const int64_t stride = dim + 2;
  // Each (request, query, head, key range): running maximum, sum and weighted values (Partial's layout).
  std::unique_ptr<float[]> partials(new float[static_cast<size_t>(batch * queries * heads * splits * stride)]);
  const auto partial = [&](int64_t b, int64_t i, int64_t head, int64_t sp) {
    return Partial{partials.get() + (((b * queries + i) * heads + head) * splits + sp) * stride};
  };

  const float* qp = q.data_ptr<float>();
  const float* kp = k_cache.data_ptr<float>();
  const float* vp = v_cache.data_ptr<float>();
  const int64_t* idx = kv_indices.data_ptr<int64_t>();
  const bool* mp = mask.defined() ? mask.data_ptr<bool>() : nullptr;
  const int64_t k_row = k_cache.stride(0), k_head = k_cache.stride(1);
  const int64_t v_row = v_cache.stride(0), v_head = v_cache.stride(1);
  const int64_t pool = k_cache.size(0);
  const float fscale = static_cast<float>(scale);
  const float neg_inf = -std::numeric_limits<float>::infinity();
  const int64_t shift = ctx - queries;  // causal: query i attends keys 0 .. i + shift

  // Tasks are handed out one at a time, the latest query blocks first: under a causal mask they see the most keys
  // (the last of a 1,002-token prompt's 63 blocks 63 times the first's), so contiguous shares of the task list, as
  // parallel_for splits it, left one of two threads a quarter of the work and the other three quarters.
  const int64_t tasks = batch * qblocks * splits;
  std::atomic<int64_t> next_task{0};
  at::parallel_for(0, std::min<int64_t>(tasks, at::get_num_threads()), 1, [&](int64_t, int64_t) {
    const int64_t max_rows_padded = (std::min(queries, kQueryBlock) * group + 15) / 16 * 16;
    std::unique_ptr<float[]> qt_buf(new float[kv_heads * dim * max_rows_padded + 8]);
    std::unique_ptr<float[]> st_buf(new float[kKeyBlock * kMaxRows + 8]);
    float* qt = reinterpret_cast<float*>((reinterpret_cast<uintptr_t>(qt_buf.get()) + 31) & ~uintptr_t{31});
    float* st = reinterpret_cast<float*>((reinterpret_cast<uintptr_t>(st_buf.get()) + 31) & ~uintptr_t{31});
    float padding_acc[kMaxDim];
    alignas(32) float row_max[kMaxRows];
    alignas(32) float row_scale[kMaxRows];
    alignas(32) float row_sum[kMaxRows];
    alignas(32) float allowed[kKeyBlock][kQueryBlock];  // 0, or -inf where a key is masked for a query
    const float* keys[kKeyBlock];
    const float* values[kKeyBlock];
    int64_t rows_at[kKeyBlock];
    for (int64_t t = next_task++; t < tasks; t = next_task++) {
      const int64_t qb = qblocks - 1 - t / (batch * splits), b = t / splits % batch, sp = t % splits;
      const int64_t i0 = qb * kQueryBlock, nq = std::min(queries - i0, kQueryBlock);
      const int64_t rows = nq * group, rows_padded = (rows + 15) / 16 * 16;
      int64_t c0 = sp * blocks_per_split * kKeyBlock, c1 = std::min(ctx, c0 + blocks_per_split * kKeyBlock);
      if (causal) c1 = std::min(c1, i0 + nq + shift);  // no query of the block sees past its last one's position
      // Nothing seen yet. The weighted values need no zeros: a row's first block has factor 0, so it writes them.
      for (int64_t i = 0; i < nq; ++i)
        for (int64_t head = 0; head < heads; ++head) {
          const Partial p = partial(b, i0 + i, head, sp);
          p.max() = neg_inf;
          p.sum() = 0.f;
        }
      // Each KV head's query rows, transposed: Qt[h][d][i * group + g], scaled, padding rows zero.
      for (int64_t h = 0; h < kv_heads && c0 < c1; ++h) {
        for (int64_t i = 0; i < nq; ++i)
          for (int64_t g = 0; g < group; ++g) {
            const float* src = qp + ((b * queries + i0 + i) * heads + h * group + g) * dim;
            for (int64_t d = 0; d < dim; ++d) qt[(h * dim + d) * rows_padded + i * group + g] = src[d] * fscale;
          }
        for (int64_t d = 0; d < dim; ++d)
          std::fill(qt + (h * dim + d) * rows_padded + rows, qt + (h * dim + d + 1) * rows_padded, 0.f);
      }
      for (int64_t k0 = c0; k0 < c1; k0 += kKeyBlock) {
        const int64_t n = std::min(c1 - k0, kKeyBlock), n4 = (n + 3) / 4 * 4;
        // Which keys each query of the block may see: none masked (the common case), or a table; a block no query
        // sees (a later chunk's causal mask) is skipped.
        bool all_allowed = true, any_allowed = false;
        for (int64_t j = 0; j < n; ++j) {
          for (int64_t i = 0; i < nq; ++i) {
            const bool ok = causal ? k0 + j <= i0 + i + shift
                                   : (mp == nullptr || mp[(b * queries + i0 + i) * ctx + k0 + j]);
            allowed[j][i] = ok ? 0.f : neg_inf;
            all_allowed &= ok;
            any_allowed |= ok;
          }
        }
        if (!any_allowed) continue;
        for (int64_t j = 0; j < n; ++j) {
          const int64_t at = idx[b * ctx + k0 + j];
          TORCH_CHECK(at >= 0 && at < pool, "extend_attention: pool index ", at, " out of range [0, ", pool, ")");
          rows_at[j] = at;
        }
        for (int64_t h = 0; h < kv_heads; ++h) {
          for (int64_t j = 0; j < n4; ++j) {
            keys[j] = j < n ? kp + rows_at[j] * k_row + h * k_head : kZeros;
            values[j] = j < n ? vp + rows_at[j] * v_row + h * v_head : kZeros;
          }
          const float* qth = qt + h * dim * rows_padded;
          // Scores S^T[j][r] (the queries carry the scale), masked.
          // Six keys per tile (12 accumulators; 1.00-1.15x four keys in an A/B), then the last 2 or 4.
          int64_t j = 0;
          for (; j + 6 <= n4; j += 6)
            for (int64_t r = 0; r < rows_padded; r += 16)
              score_tile<6>(keys + j, qth, rows_padded, dim, r, st + j * rows_padded);
          for (; j < n4; j += 2)
            for (int64_t r = 0; r < rows_padded; r += 16)
              score_tile<2>(keys + j, qth, rows_padded, dim, r, st + j * rows_padded);
          if (!all_allowed)
            for (int64_t j = 0; j < n; ++j)
              for (int64_t i = 0; i < nq; ++i)
                for (int64_t g = 0; g < group; ++g) st[j * rows_padded + i * group + g] += allowed[j][i];
          // Online softmax: each row's new maximum, the factor its running sum and values are rescaled by, and the
          // weights e^(s - max) in place of the scores.
          for (int64_t r = 0; r < rows_padded; ++r)
            row_max[r] = r < rows ? partial(b, i0 + r / group, h * group + r % group, sp).max() : neg_inf;
          for (int64_t r = 0; r < rows_padded; r += 8) {
            const __m256 old = _mm256_load_ps(row_max + r);
            __m256 top = old;
            for (int64_t j = 0; j < n; ++j) top = _mm256_max_ps(top, _mm256_load_ps(st + j * rows_padded + r));
            // A row with every key so far masked keeps a maximum of -inf; subtract 0 from its scores instead.
            const __m256 safe = _mm256_blendv_ps(top, _mm256_setzero_ps(),
                                                 _mm256_cmp_ps(top, _mm256_set1_ps(neg_inf), _CMP_EQ_OQ));
            _mm256_store_ps(row_scale + r, exp_nonpositive(_mm256_sub_ps(old, safe)));
            _mm256_store_ps(row_max + r, top);
            __m256 total = _mm256_setzero_ps();
            for (int64_t j = 0; j < n; ++j) {
              float* sj = st + j * rows_padded + r;
              const __m256 e = exp_nonpositive(_mm256_sub_ps(_mm256_load_ps(sj), safe));
              _mm256_store_ps(sj, e);
              total = _mm256_add_ps(total, e);
            }
            _mm256_store_ps(row_sum + r, total);
          }
          // Rows past the last (up to the next multiple of kPvRows) are computed into a scratch row, unread.
          float* accs[kMaxRows];
          const int64_t rows_tiled = (rows + kPvRows - 1) / kPvRows * kPvRows;
          for (int64_t r = 0; r < rows_tiled; ++r) {
            if (r >= rows) {
              accs[r] = padding_acc;
              continue;
            }
            const Partial p = partial(b, i0 + r / group, h * group + r % group, sp);
            p.max() = row_max[r];
            p.sum() = p.sum() * row_scale[r] + row_sum[r];
            accs[r] = p.acc();
          }
          weighted_rows(st, rows_padded, rows_tiled, values, n, dim, row_scale, accs);
        }
      }
    }
  });

  // Merge each row's key ranges (one range: just divide by the sum).
  at::Tensor out = at::empty({batch, queries, heads, dim}, q.options());
  float* op = out.data_ptr<float>();
  at::parallel_for(0, batch * queries * heads, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t b = r / (queries * heads), i = r / heads % queries, head = r % heads;
      merge_partials(splits, [&](int64_t sp) { return partial(b, i, head, sp); }, dim, op + r * dim);
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY(radixflow_attention, m) {
  m.def("decode_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor kv_indices, Tensor? mask, Tensor? loc, "
        "Tensor? new_k, Tensor? new_v, float scale) -> Tensor");
  m.def("extend_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor kv_indices, Tensor? mask, bool causal, "
        "float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(radixflow_attention, CPU, m) {
  m.impl("decode_attention", &decode_attention);
  m.impl("extend_attention", &extend_attention);
}
