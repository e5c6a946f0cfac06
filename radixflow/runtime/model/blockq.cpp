// Block-quantized GEMM for decode-sized calls (a few rows) on x86 CPUs: AVX512-VNNI, or AVX2 where the CPU has no
// AVX-512 (the file is built once per instruction set, with that set's flags; blockq.py picks the build).
//
// The weights stay in GGUF's blocks of 32 along the input: Q4_0 / Q4_1 as 4-bit codes with an fp16 scale d and
// offset m per block (w = d * code + m), Q8_0 as signed bytes with an fp16 scale (w = d * q). Each call rounds its
// input to two signed bytes per value with one scale per block of 32 (x ~ d * (128 * hi + lo) / 128: about 15
// significant bits, where llama.cpp rounds to one byte), so a block's dot product is integer multiply-adds, scaled
// once per block: vpdpbusd on AVX512-VNNI (32 byte products into 8 int32 lanes per 256 bits); on AVX2, vpmaddubsw
// into 16-bit pair sums (at most 2 * 2 * 15 * 127 here: no saturation) widened by vpmaddwd, the same integers.
// See blockq.py for the layouts and the numerics.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <immintrin.h>

#include <cmath>
#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <utility>

#include "simd.h"

#if defined(__AVX512VNNI__) && defined(__AVX512VL__) && defined(__AVX512BW__)
#define RF_VNNI 1  // 512-bit steps of four blocks; otherwise (AVX2) 256-bit steps of two
#elif !defined(__AVX2__) || !defined(__FMA__) || !defined(__F16C__)
#error "blockq.cpp needs AVX512-VNNI, or AVX2 with FMA and F16C"
#endif

namespace {

using radixflow::hmax;
using radixflow::hsum;

constexpr int64_t kBlock = 32;

// The input rounded to bytes, block by block: hi[k] = round(x[k] / d_b) with d_b = max|x| / 127 over block b of 32,
// then the remainder, lo[k] = round(128 * (x[k] / d_b - hi[k])) in [-64, 64], so x[k] ~ (d_b / 128) * (128 * hi[k] +
// lo[k]); with each block's scale d_b / 128 and exact sum of x (for Q4's offset term).
//
// For the 4-bit kernel the bytes of each four blocks are reordered to match the nibbles ([b0 0..15, b1 0..15,
// b2 0..15, b3 0..15, b0 16..31, ...]; a last pair of blocks likewise as [b0 0..15, b1 0..15, b0 16..31, b1 16..31]),
// and each block's scale and sum are spread over the four int32 lanes of the dot product it lands in (lanes 4b..4b+3;
// a quarter of the sum per lane).
struct Quantized {
  at::Tensor q, scale, sum;  // int8 [rows, (hi, lo), k]; fp32 [rows, k/32] (q8) or [rows, k/32 * 4] (q4, spread)
};

#ifdef RF_VNNI
constexpr bool kQuads = true;  // the 4-bit kernel steps through four blocks at a time (a last pair at half width)

// Rounds 16 values (already divided by their block's scale) to high bytes at `hi` and low bytes at `lo`.
inline void round_half_block(__m512 scaled, int8_t* hi, int8_t* lo) {
  const __m512 whole = _mm512_roundscale_ps(scaled, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 rest = _mm512_mul_ps(_mm512_sub_ps(scaled, whole), _mm512_set1_ps(128.f));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(hi), _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(whole)));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(lo), _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(rest)));
}

// Rounds block `xb` (32 values): its first 16 values' bytes go to q + at1 (high) and q + k + at1 (low), the last
// 16's to at2. Returns (max |x|, sum of x).
inline std::pair<float, float> round_block(const float* xb, int8_t* q, int64_t k, int64_t at1, int64_t at2) {
  const __m512 first = _mm512_loadu_ps(xb), second = _mm512_loadu_ps(xb + 16);
  const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(first), _mm512_abs_ps(second)));
  const float total = _mm512_reduce_add_ps(_mm512_add_ps(first, second));
  const float d = amax / 127.f;
  const __m512 inv = _mm512_set1_ps(d > 0.f ? 1.f / d : 0.f);
  round_half_block(_mm512_mul_ps(first, inv), q + at1, q + k + at1);
  round_half_block(_mm512_mul_ps(second, inv), q + at2, q + k + at2);
  return {amax, total};
}
#else
constexpr bool kQuads = false;  // the 4-bit kernel steps through pairs of blocks

// 32 int32 values (four vectors, in order) saturated to 32 signed bytes in order: packs interleave 128-bit lanes,
// the permute puts the 4-byte groups back.
inline __m256i to_bytes(const __m256i v[4]) {
  const __m256i bytes = _mm256_packs_epi16(_mm256_packs_epi32(v[0], v[1]), _mm256_packs_epi32(v[2], v[3]));
  return _mm256_permutevar8x32_epi32(bytes, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
}

// The same as the AVX-512 round_block, 8 values at a time: the same bytes (round to nearest even, saturating).
inline std::pair<float, float> round_block(const float* xb, int8_t* q, int64_t k, int64_t at1, int64_t at2) {
  __m256 v[4];
  for (int i = 0; i < 4; ++i) v[i] = _mm256_loadu_ps(xb + 8 * i);
  const __m256 sign = _mm256_set1_ps(-0.f);
  const float amax = hmax(_mm256_max_ps(_mm256_max_ps(_mm256_andnot_ps(sign, v[0]), _mm256_andnot_ps(sign, v[1])),
                                        _mm256_max_ps(_mm256_andnot_ps(sign, v[2]), _mm256_andnot_ps(sign, v[3]))));
  const float total = hsum(_mm256_add_ps(_mm256_add_ps(v[0], v[1]), _mm256_add_ps(v[2], v[3])));
  const float d = amax / 127.f;
  const __m256 inv = _mm256_set1_ps(d > 0.f ? 1.f / d : 0.f);
  __m256i hi[4], lo[4];
  for (int i = 0; i < 4; ++i) {
    const __m256 scaled = _mm256_mul_ps(v[i], inv);
    const __m256 whole = _mm256_round_ps(scaled, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    hi[i] = _mm256_cvtps_epi32(whole);
    lo[i] = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_sub_ps(scaled, whole), _mm256_set1_ps(128.f)));
  }
  const __m256i hb = to_bytes(hi), lb = to_bytes(lo);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(q + at1), _mm256_castsi256_si128(hb));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(q + at2), _mm256_extracti128_si256(hb, 1));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(q + k + at1), _mm256_castsi256_si128(lb));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(q + k + at2), _mm256_extracti128_si256(lb, 1));
  return {amax, total};
}
#endif

Quantized quantize(const at::Tensor& x, bool pairs) {
  const int64_t rows = x.size(0), k = x.size(1), blocks = k / kBlock;
  Quantized out{at::empty({rows, 2, k}, x.options().dtype(at::kChar)),
                at::empty({rows, pairs ? blocks * 4 : blocks}, x.options()),
                at::empty({rows, pairs ? blocks * 4 : blocks}, x.options())};
  const int64_t whole = kQuads ? k / 128 * 4 : 0;  // blocks in whole fours (the 4-bit kernel's wide steps)
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = x.data_ptr<float>() + r * k;
    int8_t* q = out.q.data_ptr<int8_t>() + r * 2 * k;
    float* scale = out.scale.data_ptr<float>() + r * out.scale.size(1);
    float* sum = out.sum.data_ptr<float>() + r * out.sum.size(1);
    for (int64_t b = 0; b < blocks; ++b) {
      // Where each half of the block goes: in order, or (4-bit kernel) beside the same halves of its four's blocks
      // (of its pair's, for a last pair or on AVX2).
      const int64_t at1 = !pairs ? b * kBlock : b < whole ? (b / 4) * 128 + (b % 4) * 16 : (b / 2) * 64 + (b % 2) * 16;
      const int64_t at2 = !pairs ? at1 + 16 : b < whole ? at1 + 64 : at1 + 32;
      const auto [amax, total] = round_block(xr + b * kBlock, q, k, at1, at2);
      const float d = amax / 127.f;
      if (pairs) {
        for (int lane = 0; lane < 4; ++lane) {
          scale[b * 4 + lane] = d / 128.f;
          sum[b * 4 + lane] = 0.25f * total;
        }
      } else {
        scale[b] = d / 128.f;
        sum[b] = total;
      }
    }
  }
  return out;
}

// Output features per tile (the unit of parallel work and of prefetching), and input rows per pass over a tile's
// weights (Q8_0; the 4-bit kernel's are kQ4Rows).
constexpr int kCols = 4;
constexpr int kRows = 2;
#ifdef RF_VNNI
constexpr int kQ4Rows = 2;
#else
// On AVX2 the 4-bit kernel takes a tile one feature at a time, four rows per pass: a pass's accumulators and
// unpacked weights fit AVX2's sixteen registers, where four features at once spilled them to the stack. 1.3x faster
// than two rows by four features at 4 to 16 rows, no slower at one (bench/RESULTS.md, 2026-12-07).
constexpr int kQ4Rows = 4;
#endif
// Rows per call. Whole SmolLM2 decode steps on AVX2: 1.18x oneDNN's fp32 GEMM at 20 rows, 1.11x at 24, 0.98x at 32.
constexpr int64_t kMaxRows = 24;

// One pair of 4-bit blocks times an input row, in integers: eight int32 lanes, 0-3 summing the first block's
// products and 4-7 the second's. w1 / w2 are the low / high nibbles of the pair's 32 bytes of codes (GGUF's order);
// the row's bytes for them are at x (high bytes: 32 meeting w1, then 32 meeting w2) and x + k (low bytes).
inline __m256i pair_dot(__m256i w1, __m256i w2, const int8_t* x, int64_t k) {
  const auto load = [](const int8_t* at) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(at)); };
#ifdef RF_VNNI
  const __m256i dot = _mm256_dpbusd_epi32(_mm256_dpbusd_epi32(_mm256_setzero_si256(), w1, load(x)), w2, load(x + 32));
  return _mm256_dpbusd_epi32(_mm256_dpbusd_epi32(_mm256_slli_epi32(dot, 7), w1, load(x + k)), w2, load(x + k + 32));
#else
  const __m256i hi = _mm256_add_epi16(_mm256_maddubs_epi16(w1, load(x)), _mm256_maddubs_epi16(w2, load(x + 32)));
  const __m256i lo = _mm256_add_epi16(_mm256_maddubs_epi16(w1, load(x + k)),
                                      _mm256_maddubs_epi16(w2, load(x + k + 32)));
  return _mm256_add_epi32(_mm256_madd_epi16(hi, _mm256_set1_epi16(128)), _mm256_madd_epi16(lo, _mm256_set1_epi16(1)));
#endif
}

// Pairs of blocks [p0, p1) of C features from n (of the tile of q4_tile below) times R rows, at 256 bits, into acc:
// the whole input on AVX2, the last pair (inputs not a whole number of fours) on AVX512-VNNI.
template <int C, int R>
inline void q4_pairs(const int8_t* xq, const float* xd, const float* xs, int64_t k, const uint8_t* codes,
                     const uint16_t* dm, int64_t n, int64_t p0, int64_t p1, __m256 (&acc)[C][R]) {
  const int64_t blocks = k / kBlock;
  const __m256i nibble = _mm256_set1_epi8(0x0F);
  const __m256i spread_d = _mm256_setr_epi32(0, 0, 0, 0, 2, 2, 2, 2);
  const __m256i spread_m = _mm256_setr_epi32(1, 1, 1, 1, 3, 3, 3, 3);
  for (int64_t p = p0; p < p1; ++p) {
    for (int c = 0; c < C; ++c) {
      const __m256i packed = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(codes + (n + c) * (k / 2) + p * 32));
      const __m256i w1 = _mm256_and_si256(packed, nibble);
      const __m256i w2 = _mm256_and_si256(_mm256_srli_epi16(packed, 4), nibble);
      const __m256 dm4 = _mm256_castps128_ps256(_mm_cvtph_ps(
          _mm_loadl_epi64(reinterpret_cast<const __m128i*>(dm + (n + c) * blocks * 2 + p * 4))));
      const __m256 d = _mm256_permutevar8x32_ps(dm4, spread_d);
      const __m256 m = _mm256_permutevar8x32_ps(dm4, spread_m);
      for (int r = 0; r < R; ++r) {
        const __m256i dot = pair_dot(w1, w2, xq + r * 2 * k + p * 64, k);
        const __m256 scale = _mm256_mul_ps(d, _mm256_loadu_ps(xd + r * blocks * 4 + p * 8));
        acc[c][r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), scale, acc[c][r]);
        acc[c][r] = _mm256_fmadd_ps(m, _mm256_loadu_ps(xs + r * blocks * 4 + p * 8), acc[c][r]);
      }
    }
  }
}

#ifdef RF_VNNI
// Fours of blocks [0, quads) of the tile of q4_tile below, at 512 bits, into acc.
template <int R>
inline void q4_quads(const int8_t* xq, const float* xd, const float* xs, int64_t k, const uint8_t* codes,
                     const uint16_t* dm, int64_t n, int64_t quads, __m512 acc[kCols][R]) {
  const int64_t blocks = k / kBlock;
  // Four blocks (64 bytes of codes) per step: the low nibbles meet inputs 0-15 of each block, the high ones 16-31;
  // lanes 4b..4b+3 of a step's dot product belong to its block b, as do the spread scales and sums.
  const __m512i nibble = _mm512_set1_epi8(0x0F);
  const __m512i spread_d = _mm512_setr_epi32(0, 0, 0, 0, 2, 2, 2, 2, 4, 4, 4, 4, 6, 6, 6, 6);
  const __m512i spread_m = _mm512_setr_epi32(1, 1, 1, 1, 3, 3, 3, 3, 5, 5, 5, 5, 7, 7, 7, 7);
  for (int64_t q = 0; q < quads; ++q) {
    // Per input row: the high and low bytes of the inputs that meet the low nibbles (x1) and the high ones (x2).
    __m512i x1_hi[R], x2_hi[R], x1_lo[R], x2_lo[R];
    for (int r = 0; r < R; ++r) {
      const int8_t* row = xq + r * 2 * k + q * 128;
      x1_hi[r] = _mm512_loadu_si512(row);
      x2_hi[r] = _mm512_loadu_si512(row + 64);
      x1_lo[r] = _mm512_loadu_si512(row + k);
      x2_lo[r] = _mm512_loadu_si512(row + k + 64);
    }
    for (int c = 0; c < kCols; ++c) {
      const __m512i packed = _mm512_loadu_si512(codes + (n + c) * (k / 2) + q * 64);
      const __m512i w1 = _mm512_and_si512(packed, nibble);
      const __m512i w2 = _mm512_and_si512(_mm512_srli_epi16(packed, 4), nibble);
      // (d0, m0, ..., d3, m3) -> d and m each spread over the four lanes of its block.
      const __m512 dm8 = _mm512_castps256_ps512(_mm256_cvtph_ps(
          _mm_loadu_si128(reinterpret_cast<const __m128i*>(dm + (n + c) * blocks * 2 + q * 8))));
      const __m512 d = _mm512_permutexvar_ps(spread_d, dm8);
      const __m512 m = _mm512_permutexvar_ps(spread_m, dm8);
      for (int r = 0; r < R; ++r) {
        __m512i dot = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), w1, x1_hi[r]), w2, x2_hi[r]);
        dot = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(_mm512_slli_epi32(dot, 7), w1, x1_lo[r]), w2, x2_lo[r]);
        const __m512 scale = _mm512_mul_ps(d, _mm512_loadu_ps(xd + r * blocks * 4 + q * 16));
        acc[c][r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), scale, acc[c][r]);
        acc[c][r] = _mm512_fmadd_ps(m, _mm512_loadu_ps(xs + r * blocks * 4 + q * 16), acc[c][r]);
      }
    }
  }
}
#endif

// out[r, n] = sum_k x[r, k] * w[n, k] for R input rows and kCols output features from n, 4-bit weights: codes
// [n, k/2] (GGUF's blocks: byte j holds codes j and j + 16), dm [n, k/32, 2] fp16 (d, m) per block.
template <int R>
void q4_tile(const int8_t* xq, const float* xd, const float* xs, int64_t k, const uint8_t* codes,
             const uint16_t* dm, int64_t n, float* out, int64_t ldo) {
#ifdef RF_VNNI
  const int64_t quads = k / 128;
  __m512 wide[kCols][R];
  __m256 acc[kCols][R];
  for (int c = 0; c < kCols; ++c)
    for (int r = 0; r < R; ++r) {
      wide[c][r] = _mm512_setzero_ps();
      acc[c][r] = _mm256_setzero_ps();
    }
  q4_quads<R>(xq, xd, xs, k, codes, dm, n, quads, wide);
  q4_pairs<kCols, R>(xq, xd, xs, k, codes, dm, n, quads * 2, k / 64, acc);
  for (int c = 0; c < kCols; ++c)
    for (int r = 0; r < R; ++r) out[r * ldo + n + c] = _mm512_reduce_add_ps(wide[c][r]) + hsum(acc[c][r]);
#else
  for (int c = 0; c < kCols; ++c) {  // one feature per pass (kQ4Rows)
    __m256 acc[1][R];
    for (int r = 0; r < R; ++r) acc[0][r] = _mm256_setzero_ps();
    q4_pairs<1, R>(xq, xd, xs, k, codes, dm, n + c, 0, k / 64, acc);
    for (int r = 0; r < R; ++r) out[r * ldo + n + c] = hsum(acc[0][r]);
  }
#endif
}

// Sums of the eight int32 lanes of each of v[0..7], as eight floats in that order.
inline __m256 lane_sums(const __m256i v[8]) {
  const __m256i h0123 = _mm256_hadd_epi32(_mm256_hadd_epi32(v[0], v[1]), _mm256_hadd_epi32(v[2], v[3]));
  const __m256i h4567 = _mm256_hadd_epi32(_mm256_hadd_epi32(v[4], v[5]), _mm256_hadd_epi32(v[6], v[7]));
  return _mm256_cvtepi32_ps(_mm256_add_epi32(_mm256_permute2x128_si256(h0123, h4567, 0x20),
                                             _mm256_permute2x128_si256(h0123, h4567, 0x31)));
}

// One Q8_0 block's integer dot product in eight lanes, with the input's high bytes at `x` and its low bytes k
// further on. The byte products take an unsigned operand, so they multiply |w| by x with w's sign moved onto x.
inline __m256i q8_dot(__m256i w, const int8_t* x, int64_t k) {
  const __m256i wabs = _mm256_sign_epi8(w, w);
  const __m256i hi = _mm256_sign_epi8(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(x)), w);
  const __m256i lo = _mm256_sign_epi8(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + k)), w);
#ifdef RF_VNNI
  const __m256i dot = _mm256_dpbusd_epi32(_mm256_setzero_si256(), wabs, hi);
  return _mm256_dpbusd_epi32(_mm256_slli_epi32(dot, 7), wabs, lo);
#else
  // Pair sums of at most 2 * 128 * 127: no saturation.
  return _mm256_add_epi32(_mm256_madd_epi16(_mm256_maddubs_epi16(wabs, hi), _mm256_set1_epi16(128)),
                          _mm256_madd_epi16(_mm256_maddubs_epi16(wabs, lo), _mm256_set1_epi16(1)));
#endif
}

// The same as q4_tile for Q8_0 weights: q [n, k] int8, d [n, k/32] fp16. Eight blocks at a time, their dot products
// reduced to one float each and scaled together; the blocks after the last eight one at a time.
template <int R>
void q8_tile(const int8_t* xq, const float* xd, int64_t k, const int8_t* q, const uint16_t* dw, int64_t n,
             float* out, int64_t ldo) {
  const int64_t blocks = k / kBlock;
  __m256 acc[kCols][R];
  for (int c = 0; c < kCols; ++c)
    for (int r = 0; r < R; ++r) acc[c][r] = _mm256_setzero_ps();
  int64_t bl = 0;
  for (; bl + 8 <= blocks; bl += 8) {
    for (int c = 0; c < kCols; ++c) {
      const int8_t* wrow = q + (n + c) * k + bl * kBlock;
      const __m256 d = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(dw + (n + c) * blocks + bl)));
      __m256i dots[R][8];
      for (int j = 0; j < 8; ++j) {
        const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wrow + j * kBlock));
        for (int r = 0; r < R; ++r)
          dots[r][j] = q8_dot(w, xq + r * 2 * k + (bl + j) * kBlock, k);
      }
      for (int r = 0; r < R; ++r)
        acc[c][r] = _mm256_fmadd_ps(lane_sums(dots[r]), _mm256_mul_ps(d, _mm256_loadu_ps(xd + r * blocks + bl)),
                                    acc[c][r]);
    }
  }
  for (; bl < blocks; ++bl) {
    for (int c = 0; c < kCols; ++c) {
      const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + (n + c) * k + bl * kBlock));
      const float d = _cvtsh_ss(dw[(n + c) * blocks + bl]);
      for (int r = 0; r < R; ++r) {
        const __m256i dot = q8_dot(w, xq + r * 2 * k + bl * kBlock, k);
        acc[c][r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_set1_ps(d * xd[r * blocks + bl]), acc[c][r]);
      }
    }
  }
  for (int c = 0; c < kCols; ++c)
    for (int r = 0; r < R; ++r) out[r * ldo + n + c] = hsum(acc[c][r]);
}

// `per_block`: scales per block of 32 (Q4: d and m; Q8_0: d).
void check_input(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scales, int64_t n, int64_t k,
                 int64_t k_multiple, int64_t per_block) {
  TORCH_CHECK(weight.is_contiguous() && scales.is_contiguous() && scales.numel() == n * (k / kBlock) * per_block,
              "radixflow blockq: the weight and its scales must be contiguous and sized as BlockWeight packs them");
  TORCH_CHECK(n % kCols == 0 && k % k_multiple == 0, "radixflow blockq: weight [", n, ", ", k, "] needs output size a "
              "multiple of ", kCols, " and input size a multiple of ", k_multiple);
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.size(1) == k,
              "radixflow blockq: input must be float32 [rows, ", k, "], got ", x.sizes(), " ", x.scalar_type());
  TORCH_CHECK(x.size(0) <= kMaxRows, "radixflow blockq: at most ", kMaxRows, " rows per call, got ", x.size(0));
}

// Output features per parallel task: enough for both cores to share the smallest layer.
constexpr int64_t kGrain = 32;

// Where a weight's rows live: `bytes` per output feature from `base` (the codes, or the scales).
struct Rows {
  const void* base;
  int64_t bytes;
};

// Asks for the cache lines of output features [n, n + count) of each of `rows`: the loads of one layer are too short
// for the hardware prefetcher to ramp up on its own.
inline void prefetch(std::initializer_list<Rows> rows, int64_t n, int64_t count) {
  for (const Rows& r : rows) {
    const char* begin = static_cast<const char*>(r.base) + n * r.bytes;
    for (int64_t at = 0; at < count * r.bytes; at += 64) _mm_prefetch(begin + at, _MM_HINT_T0);
  }
}

// Tiles of output features fetched ahead of the one being computed.
constexpr int64_t kAhead = 2;

// Runs `tile(r, count, n)` over all input rows, at most MaxRows at a time, and all output features (a multiple of
// kCols) from n.
template <int MaxRows, typename Tile>
void for_tiles(int64_t rows, int64_t features, std::initializer_list<Rows> weight, Tile tile) {
  at::parallel_for(0, features / kCols, kGrain / kCols, [&](int64_t t0, int64_t t1) {
    prefetch(weight, t0 * kCols, std::min(kAhead, t1 - t0) * kCols);
    for (int64_t t = t0; t < t1; ++t) {
      if (t + kAhead < t1) prefetch(weight, (t + kAhead) * kCols, kCols);
      for (int64_t r = 0; r < rows; r += MaxRows) tile(r, std::min<int64_t>(MaxRows, rows - r), t * kCols);
    }
  });
}

// Calls f(std::integral_constant<int, R>) for R = count, 1 <= count <= Max: a row count as a template argument.
template <int Max, typename F>
inline void with_rows(int64_t count, F f) {
  if constexpr (Max > 1) {
    if (count < Max) return with_rows<Max - 1>(count, f);
  }
  f(std::integral_constant<int, Max>());
}

at::Tensor q4_mm(const at::Tensor& x_, const at::Tensor& codes, const at::Tensor& dm) {
  const int64_t n = codes.size(0), k = codes.size(1) * 2;
  const at::Tensor x = x_.contiguous();
  check_input(x, codes, dm, n, k, 2 * kBlock, 2);
  const int64_t rows = x.size(0);
  const Quantized xq = quantize(x, true);
  at::Tensor out = at::empty({rows, n}, x.options());
  const auto* c = codes.data_ptr<uint8_t>();
  const auto* s = reinterpret_cast<const uint16_t*>(dm.data_ptr<at::Half>());
  const int8_t* q = xq.q.data_ptr<int8_t>();
  const float* xd = xq.scale.data_ptr<float>();
  const float* xs = xq.sum.data_ptr<float>();
  float* o = out.data_ptr<float>();
  const int64_t lane_stride = xq.scale.size(1);
  for_tiles<kQ4Rows>(rows, n, {{c, k / 2}, {s, k / kBlock * 4}}, [&](int64_t r, int64_t count, int64_t col) {
    with_rows<kQ4Rows>(count, [&](auto R) {
      q4_tile<R>(q + r * 2 * k, xd + r * lane_stride, xs + r * lane_stride, k, c, s, col, o + r * n, n);
    });
  });
  return out;
}

at::Tensor q8_mm(const at::Tensor& x_, const at::Tensor& w, const at::Tensor& d) {
  const int64_t n = w.size(0), k = w.size(1);
  const at::Tensor x = x_.contiguous();
  check_input(x, w, d, n, k, kBlock, 1);
  const int64_t rows = x.size(0);
  const Quantized xq = quantize(x, false);
  at::Tensor out = at::empty({rows, n}, x.options());
  const auto* wq = w.data_ptr<int8_t>();
  const auto* s = reinterpret_cast<const uint16_t*>(d.data_ptr<at::Half>());
  const int8_t* q = xq.q.data_ptr<int8_t>();
  const float* xd = xq.scale.data_ptr<float>();
  float* o = out.data_ptr<float>();
  const int64_t blocks = k / kBlock;
  for_tiles<kRows>(rows, n, {{wq, k}, {s, blocks * 2}}, [&](int64_t r, int64_t count, int64_t col) {
    with_rows<kRows>(count, [&](auto R) { q8_tile<R>(q + r * 2 * k, xd + r * blocks, k, wq, s, col, o + r * n, n); });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY(radixflow_blockq, m) {
  m.def("q4_mm(Tensor x, Tensor codes, Tensor dm) -> Tensor");
  m.def("q8_mm(Tensor x, Tensor q, Tensor d) -> Tensor");
}

TORCH_LIBRARY_IMPL(radixflow_blockq, CPU, m) {
  m.impl("q4_mm", &q4_mm);
  m.impl("q8_mm", &q8_mm);
}
