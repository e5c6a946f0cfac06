// Decode attention straight from the paged KV pool on x86 CPUs (AVX2 and FMA; built beside blockq.cpp, in the same
// extension). One query token per request; its keys and values are read where they sit in the pool, through the
// request's row of pool indices, instead of being gathered into a [requests, heads, context, dim] copy first: at a
// 1,000-token context that copy moved as many bytes per layer as the layer's weights. The query heads that share a
// KV head are computed together, so each key and value row is read once per KV head.
//
// Work is split over (request, KV head, chunk of kChunk keys). A chunk's scores are computed, exponentiated and
// summed in one go; chunks of the same (request, KV head) are then merged with their maxima and sums (the
// FlashAttention rescaling), so the result is softmax(q k^T * scale) v over the whole context, in fp32.
//
// Where `loc` is given, the key at pool index loc[b] (the new token, whose K/V the compiled step writes to the pool
// only after the step) comes from new_k / new_v instead of the pool. See attention.py for where this runs.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <memory>

#include "simd.h"

namespace {

using radixflow::hmax;
using radixflow::hsum;

constexpr int64_t kChunk = 128;   // keys per task
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

// The row a masked key (or a key past the end of the context, up to the next multiple of 8) reads.
alignas(32) constexpr float kZeros[kMaxDim] = {};

// One chunk's partial result per query head, `dim + 2` floats: the scores' maximum, the sum of their exponentials,
// and the values weighted by those exponentials (not yet divided by the sum).
struct Partial {
  float* at;
  float& max() const { return at[0]; }
  float& sum() const { return at[1]; }
  float* acc() const { return at + 2; }
};

at::Tensor decode_attention(const at::Tensor& q_, const at::Tensor& k_cache, const at::Tensor& v_cache,
                            const at::Tensor& kv_indices_, const c10::optional<at::Tensor>& mask_,
                            const c10::optional<at::Tensor>& loc_, const c10::optional<at::Tensor>& new_k_,
                            const c10::optional<at::Tensor>& new_v_, double scale) {
  const at::Tensor q = q_.contiguous(), kv_indices = kv_indices_.contiguous();
  TORCH_CHECK(q.dim() == 3 && q.scalar_type() == at::kFloat, "decode_attention: q must be float32 [B, H, D]");
  const int64_t batch = q.size(0), heads = q.size(1), dim = q.size(2);
  TORCH_CHECK(k_cache.dim() == 3 && v_cache.sizes() == k_cache.sizes() && k_cache.size(2) == dim &&
              k_cache.scalar_type() == at::kFloat && v_cache.scalar_type() == at::kFloat &&
              k_cache.stride(2) == 1 && v_cache.stride(2) == 1,
              "decode_attention: k_cache / v_cache must be float32 [pool, kv_heads, D] with unit stride in D");
  const int64_t kv_heads = k_cache.size(1), group = heads / kv_heads;
  TORCH_CHECK(heads % kv_heads == 0 && group <= kMaxGroup && dim % 8 == 0 && dim <= kMaxDim,
              "decode_attention: needs heads a multiple of kv_heads (at most ", kMaxGroup, " per KV head) and D a "
              "multiple of 8 up to ", kMaxDim);
  TORCH_CHECK(kv_indices.dim() == 2 && kv_indices.size(0) == batch && kv_indices.scalar_type() == at::kLong,
              "decode_attention: kv_indices must be int64 [B, L]");
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
  const int64_t chunks = std::max<int64_t>(1, (ctx + kChunk - 1) / kChunk);
  const int64_t stride = dim + 2;
  std::unique_ptr<float[]> partials(new float[static_cast<size_t>(batch * kv_heads * chunks * group * stride)]);
  const auto partial = [&](int64_t task, int64_t g) { return Partial{partials.get() + (task * group + g) * stride}; };

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
  const int64_t vecs = dim / 8;
  const float fscale = static_cast<float>(scale);

  at::parallel_for(0, batch * kv_heads * chunks, 1, [&](int64_t t0, int64_t t1) {
    alignas(32) float scores[kMaxGroup][kChunk];
    const float* keys[kChunk];
    const float* values[kChunk];
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / (kv_heads * chunks), h = t / chunks % kv_heads, c = t % chunks;
      const int64_t j0 = c * kChunk, n = std::min(ctx - j0, kChunk), padded = (n + 7) / 8 * 8;
      // Where each key and value row of the chunk is: the pool, the new token's, or (masked, or past the end of the
      // chunk's last 8) a row of zeros whose score is set to -inf below.
      bool any = false;
      for (int64_t j = 0; j < padded; ++j) {
        const bool live = j < n && (mp == nullptr || mp[b * ctx + j0 + j]);
        any |= live;
        const int64_t at = live ? idx[b * ctx + j0 + j] : -1;
        if (!live) {
          keys[j] = values[j] = kZeros;
        } else if (locp != nullptr && at == locp[b]) {
          keys[j] = nkp + (b * kv_heads + h) * dim;
          values[j] = nvp + (b * kv_heads + h) * dim;
        } else {
          TORCH_CHECK(at >= 0 && at < pool, "decode_attention: pool index ", at, " out of range [0, ", pool, ")");
          keys[j] = kp + at * k_row + h * k_head;
          values[j] = vp + at * v_row + h * v_head;
        }
      }
      for (int g = 0; g < group; ++g) {
        const Partial p = partial(t, g);
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
        __m256 acc[kMaxDim / 8];
        for (int64_t i = 0; i < vecs; ++i) acc[i] = _mm256_setzero_ps();
        for (int64_t j = 0; j < n; ++j) {
          const __m256 w = _mm256_set1_ps(scores[g][j]);
          for (int64_t i = 0; i < vecs; ++i) acc[i] = _mm256_fmadd_ps(w, _mm256_loadu_ps(values[j] + 8 * i), acc[i]);
        }
        for (int64_t i = 0; i < vecs; ++i) _mm256_storeu_ps(p.acc() + 8 * i, acc[i]);
      }
    }
  });

  // Merge the chunks of each (request, query head): rescale each to the overall maximum, then divide by the sum.
  float* op = out.data_ptr<float>();
  at::parallel_for(0, batch * heads, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t b = r / heads, h = r % heads / group, g = r % group;
      const int64_t first = (b * kv_heads + h) * chunks;  // the task of chunk 0
      float top = -std::numeric_limits<float>::infinity();
      for (int64_t c = 0; c < chunks; ++c) top = std::max(top, partial(first + c, g).max());
      float* o = op + r * dim;
      std::fill(o, o + dim, 0.f);
      float total = 0.f;
      for (int64_t c = 0; c < chunks; ++c) {
        const Partial p = partial(first + c, g);
        if (p.sum() == 0.f) continue;  // a chunk with every key masked
        const float w = std::exp(p.max() - top);
        total += w * p.sum();
        for (int64_t i = 0; i < dim; ++i) o[i] += w * p.acc()[i];
      }
      // Every key masked (no row does that here; SDPA would return NaN): zeros.
      const float inv = total > 0.f ? 1.f / total : 0.f;
      for (int64_t i = 0; i < dim; ++i) o[i] *= inv;
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY(radixflow_attention, m) {
  m.def("decode_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor kv_indices, Tensor? mask, Tensor? loc, "
        "Tensor? new_k, Tensor? new_v, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(radixflow_attention, CPU, m) {
  m.impl("decode_attention", &decode_attention);
}
