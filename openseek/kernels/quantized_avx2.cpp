// Weight-only int8 and int4 matmuls for decode on AVX2 (x86-64-v3: AVX2, FMA, F16C), for the CPUs without AVX-512:
// the functions of quantized_vnni.cpp with the same arguments, reading the same packed weights (a quantised model
// moves between CPUs as it is) and giving the same results, bit for bit.
//
// Same numbers: the activations are quantised with the VNNI kernel's float32 arithmetic, the integer dot products
// are exact on both, and every float32 step after them (the int8 epilogue, the int4 fmadds, the experts' SwiGLU and
// weighted sum, the bf16 rounding) is the VNNI kernel's operation for operation. Built with -ffp-contract=off so that
// the compiler fuses no multiply and add that the VNNI kernel rounds twice.
//
// AVX2 has no vpdpbusd. Its u8 × s8 multiply, vpmaddubsw, adds each pair of products into an int16 and SATURATES,
// so the VNNI kernel's scheme (activations + 128 as u8 by s8 weights) would clip: 255·127·2 = 64770 > 32767.
//
// int8: the weight's magnitude is the unsigned operand and its sign moves onto the activation (vpsignb), so every
// int16 is |w0|·x0' + |w1|·x1' with |w| ≤ 128 and |x'| = |x| ≤ 127 (the quantised activations never reach -128: see
// quantise_rows), hence at most 2·128·127 = 32512 ≤ 32767 in magnitude: no pair saturates, even for a weight of
// -128 (which int8_pack never writes, but an operator can be handed), and vpmaddwd by ones adds the pairs in int32
// exactly. That is Σ x·w, the VNNI kernel's Σ (x+128)·w − 128·Σw; the epilogue adds 128·Σw back (int32, wrapping as
// vpdpbusd wraps) so that the float conversion rounds the very integer the VNNI kernel's does.
//
// int4: the weights are nibbles 0..15, already unsigned, and the activations signed int8: each int16 of vpmaddubsw
// is at most 2·15·127 = 3810 in magnitude. Four chunks of 8 columns (32 columns: 16 products per int16) sum to at
// most 30480 ≤ 32767, so they are added in int16 and widened once per 32 columns.
//
// One vpdpbusd does the work of four instructions here (sign, maddubs, madd, add), so with several rows the kernel
// multiplies rather than reads sooner than the VNNI one; 16 vector registers instead of 32 bound the tiles.
#include <torch/extension.h>
#include "kernel_checks.h"
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

namespace {

inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const at::BFloat16* p) {  // bf16 to float32: the bits go to the high half
  return _mm256_castsi256_ps(
      _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), 16));
}
inline __m256 abs8(__m256 v) { return _mm256_andnot_ps(_mm256_set1_ps(-0.f), v); }
inline float reduce_max8(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  return _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
}
inline int32_t reduce_add8(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
  return _mm_cvtsi128_si32(_mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1)));
}
// 8 int32 within [-128, 127] to 8 int8
inline void store8_i8(int8_t* p, __m256i v) {
  const __m128i words = _mm_packs_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  _mm_storel_epi64(reinterpret_cast<__m128i*>(p), _mm_packs_epi16(words, words));
}

// 8 results to y, in y's type: float32, or bf16 rounded to nearest even as PyTorch converts (the VNNI kernel's
// integer rounding, so NaN and infinity come out as they do there)
inline void store8(float* y, __m256 v) { _mm256_storeu_ps(y, v); }
inline void store8(at::BFloat16* y, __m256 v) {
  const __m256i bits = _mm256_castps_si256(v);
  const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  const __m256i top = _mm256_srli_epi32(_mm256_add_epi32(bits, _mm256_add_epi32(odd, _mm256_set1_epi32(0x7FFF))), 16);
  // packus works within 128-bit halves: [t0..t3 t0..t3 | t4..t7 t4..t7]; quads 0 and 2 are the 8 results in order
  const __m256i words = _mm256_permute4x64_epi64(_mm256_packus_epi32(top, top), 0x08);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(y), _mm256_castsi256_si128(words));
}

// ---- int8: y = x · (q · scale)ᵀ, weights packed [N/16][K/4][16][4] (quantized_vnni.cpp's layout) ----

// Per-row absmax quantisation: xq[m, k] = round(x[m, k] / scale[m]) to nearest even, scale[m] = max|x[m]| / 127:
// the VNNI kernel's float32 operations, without its +128. |x| · (1 / (absmax / 127)) exceeds 127 by a few ulps at
// most, so xq stays within [-127, 127] (the bound the int8 kernel's no-saturation argument needs).
template <typename T>
void quantise_rows(const T* x, int64_t M, int64_t K, int8_t* xq, float* scale) {
  const int64_t K8 = K - K % 8;
  for (int64_t m = 0; m < M; ++m) {
    const T* row = x + m * K;
    __m256 vmax = _mm256_setzero_ps();
    for (int64_t k = 0; k < K8; k += 8) vmax = _mm256_max_ps(vmax, abs8(load8(row + k)));
    float absmax = reduce_max8(vmax);
    for (int64_t k = K8; k < K; ++k) absmax = std::max(absmax, std::fabs(static_cast<float>(row[k])));
    const float s = absmax > 0.f ? absmax / 127.f : 1.f;
    const float inv = 1.f / s;
    const __m256 vinv = _mm256_set1_ps(inv);
    for (int64_t k = 0; k < K8; k += 8)
      store8_i8(xq + m * K + k, _mm256_cvtps_epi32(_mm256_mul_ps(load8(row + k), vinv)));
    for (int64_t k = K8; k < K; ++k)
      xq[m * K + k] = static_cast<int8_t>(std::nearbyint(static_cast<float>(row[k]) * inv));
    scale[m] = s;
  }
}

// Rows [0, R) of the activations against output blocks [nb, nb + B), 16 outputs a block, in two halves of 8 (one
// register each): 2·B·R int32 accumulators (at most 12 of the 16 registers), each 4-input step one 32-byte load and
// one abs per half, and per half and row sign, maddubs, madd, add.
template <int R, int B, typename Out>
void block_kernel(const int8_t* xq, const float* sx, const int8_t* w, const float* sw, const int32_t* rowsum,
                  Out* y, int64_t K, int64_t N, int64_t nb) {
  const int8_t* block = w + nb * K * 16;
  const __m256i ones = _mm256_set1_epi16(1);
  __m256i acc[B][2][R];
  for (int b = 0; b < B; ++b)
    for (int h = 0; h < 2; ++h)
      for (int r = 0; r < R; ++r) acc[b][h][r] = _mm256_setzero_si256();
  for (int64_t k = 0; k < K; k += 4) {
    __m256i xv[R];
    for (int r = 0; r < R; ++r) {
      int32_t four;
      std::memcpy(&four, xq + r * K + k, 4);
      xv[r] = _mm256_set1_epi32(four);
    }
    for (int b = 0; b < B; ++b)
      for (int h = 0; h < 2; ++h) {
        const __m256i wv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(block + b * K * 16 + k * 16 + h * 32));
        const __m256i magnitude = _mm256_abs_epi8(wv);  // -128 becomes 0x80, 128 as the unsigned operand
        for (int r = 0; r < R; ++r) {
          const __m256i pairs = _mm256_maddubs_epi16(magnitude, _mm256_sign_epi8(xv[r], wv));
          acc[b][h][r] = _mm256_add_epi32(acc[b][h][r], _mm256_madd_epi16(pairs, ones));
        }
      }
  }
  for (int b = 0; b < B; ++b)
    for (int h = 0; h < 2; ++h) {
      const int64_t n0 = (nb + b) * 16 + h * 8;
      const __m256 scales = _mm256_loadu_ps(sw + n0);
      const __m256i shift = _mm256_slli_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(rowsum + n0)), 7);
      const __m256 offsets = _mm256_cvtepi32_ps(shift);
      for (int r = 0; r < R; ++r) {  // the VNNI kernel's epilogue on its own integer, Σ x·w + 128·Σw
        const __m256 dot = _mm256_sub_ps(_mm256_cvtepi32_ps(_mm256_add_epi32(acc[b][h][r], shift)), offsets);
        store8(y + r * N + n0, _mm256_mul_ps(_mm256_mul_ps(dot, scales), _mm256_set1_ps(sx[r])));
      }
    }
}

constexpr int64_t kRows = 2;  // rows per pass with 2 blocks: 8 accumulators

template <typename Out>
using Kernel = void (*)(const int8_t*, const float*, const int8_t*, const float*, const int32_t*, Out*, int64_t,
                        int64_t, int64_t);
template <int B, typename Out>
constexpr Kernel<Out> kKernels[kRows] = {block_kernel<1, B, Out>, block_kernel<2, B, Out>};

// Rows [start, start + rows) against output blocks [begin, end) of one packed weight: at one row 4 blocks a pass
// (8 accumulator chains, 4 weight streams in flight), with more 2 blocks by 2 rows (the next pass over the same 2
// blocks finds them in cache). Measured at 896 × 4864 on one thread (Zen 5, under load): at one row 4 blocks read
// ~10% faster than 2; at 8 rows 2 blocks by 2 rows beat 1 block by 3 rows (~7-9 GB/s against ~6.5), though GCC
// spills two of its 8 accumulators where it spills none of 1 × 3's 6: two weight streams matter more.
template <typename Out>
void band(const int8_t* xq, const float* sx, const int8_t* w, const float* sw, const int32_t* rowsum, Out* y,
          int64_t K, int64_t N, int64_t start, int64_t rows, int64_t begin, int64_t end) {
  if (rows == 1) {
    for (int64_t nb = begin; nb < end;) {
      const int64_t take = nb + 4 <= end ? 4 : 1;
      (take == 4 ? block_kernel<1, 4, Out> : block_kernel<1, 1, Out>)(xq + start * K, sx + start, w, sw, rowsum,
                                                                      y + start * N, K, N, nb);
      nb += take;
    }
    return;
  }
  for (int64_t nb = begin; nb < end;) {
    const int64_t take = nb + 2 <= end ? 2 : 1;
    const Kernel<Out>* kernels = take == 2 ? kKernels<2, Out> : kKernels<1, Out>;
    for (int64_t m0 = start; m0 < start + rows; m0 += kRows)
      kernels[std::min(kRows, start + rows - m0) - 1](xq + m0 * K, sx + m0, w, sw, rowsum, y + m0 * N, K, N, nb);
    nb += take;
  }
}

// ---- int4: y = x · Wᵀ with W = q · scale + low per group of G input columns, q in [0, 15] ----
// quantized_vnni.cpp's records: per 16 output rows and group, G/8 chunks of 64 bytes (byte 4·i + j: row i's column j
// in the low nibble, column 4 + j in the high one), then 16 bf16 scales and 16 bf16 lows. A chunk's first 32 bytes
// are rows 0-7, its last 32 rows 8-15: one register each.

#ifndef PREFETCH
#define PREFETCH 1024
#endif

// Per-row, per-group absmax quantisation, as the VNNI kernel's: xq = round(x / scale), scale = max|x[m, group]| / 127,
// sum[m, g] = scale · Σ xq over the group (which the group's lows multiply).
template <typename T>
void quantise_groups(const T* x, int64_t M, int64_t K, int64_t G, int8_t* xq, float* scale, float* sum) {
  const int64_t groups = K / G;
  for (int64_t m = 0; m < M; ++m)
    for (int64_t g = 0; g < groups; ++g) {
      const T* in = x + m * K + g * G;
      int8_t* out = xq + m * K + g * G;
      float absmax = 0.f;
      for (int64_t k = 0; k < G; ++k) absmax = std::max(absmax, std::fabs(static_cast<float>(in[k])));
      const float s = absmax > 0.f ? absmax / 127.f : 1.f;
      const float inv = 1.f / s;
      int32_t total = 0;
      for (int64_t k = 0; k < G; ++k) {
        out[k] = static_cast<int8_t>(std::nearbyint(static_cast<float>(in[k]) * inv));
        total += out[k];
      }
      scale[m * groups + g] = s;
      sum[m * groups + g] = s * static_cast<float>(total);
    }
}

// Rows [0, R) against output block nb: per group, 2·R integer sums (int16 over 32 columns, then int32), folded into
// 2·R float32 results with the VNNI kernel's two fmadds.
template <int R, typename Out>
void int4_block_kernel(const int8_t* xq, const float* sx, const float* xsum, const uint8_t* w, Out* y, int64_t K,
                       int64_t N, int64_t G, int64_t nb) {
  const int64_t groups = K / G, record = G * 8 + 64;
  const __m256i nibble = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
  __m256 out[2][R];
  for (int h = 0; h < 2; ++h)
    for (int r = 0; r < R; ++r) out[h][r] = _mm256_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    const uint8_t* at = w + (nb * groups + g) * record;
    __m256i acc[2][R];
    for (int h = 0; h < 2; ++h)
      for (int r = 0; r < R; ++r) acc[h][r] = _mm256_setzero_si256();
    for (int64_t c0 = 0; c0 < G / 8; c0 += 4) {  // up to 4 chunks, 32 columns: at most 30480 in an int16
      __m256i sum16[2][R];
      for (int h = 0; h < 2; ++h)
        for (int r = 0; r < R; ++r) sum16[h][r] = _mm256_setzero_si256();
      for (int64_t c = c0; c < std::min(c0 + 4, G / 8); ++c) {
        const int64_t k = g * G + c * 8;
        __m256i low_x[R], high_x[R];
        for (int r = 0; r < R; ++r) {
          int32_t four[2];
          std::memcpy(four, xq + r * K + k, 8);
          low_x[r] = _mm256_set1_epi32(four[0]);
          high_x[r] = _mm256_set1_epi32(four[1]);
        }
        _mm_prefetch(reinterpret_cast<const char*>(at + c * 64 + PREFETCH), _MM_HINT_T0);
        for (int h = 0; h < 2; ++h) {
          const __m256i packed = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(at + c * 64 + h * 32));
          const __m256i low = _mm256_and_si256(packed, nibble);
          const __m256i high = _mm256_and_si256(_mm256_srli_epi16(packed, 4), nibble);
          for (int r = 0; r < R; ++r)
            sum16[h][r] = _mm256_add_epi16(sum16[h][r], _mm256_add_epi16(_mm256_maddubs_epi16(low, low_x[r]),
                                                                         _mm256_maddubs_epi16(high, high_x[r])));
        }
      }
      for (int h = 0; h < 2; ++h)
        for (int r = 0; r < R; ++r) acc[h][r] = _mm256_add_epi32(acc[h][r], _mm256_madd_epi16(sum16[h][r], ones));
    }
    const at::BFloat16* params = reinterpret_cast<const at::BFloat16*>(at + G * 8);
    for (int h = 0; h < 2; ++h) {
      const __m256 scales = load8(params + h * 8), lows = load8(params + 16 + h * 8);
      for (int r = 0; r < R; ++r) {
        const __m256 scaled = _mm256_mul_ps(scales, _mm256_set1_ps(sx[r * groups + g]));
        out[h][r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc[h][r]), scaled, out[h][r]);
        out[h][r] = _mm256_fmadd_ps(lows, _mm256_set1_ps(xsum[r * groups + g]), out[h][r]);
      }
    }
  }
  for (int h = 0; h < 2; ++h)
    for (int r = 0; r < R; ++r) store8(y + r * N + nb * 16 + h * 8, out[h][r]);
}

constexpr int64_t kInt4Rows = 2;  // rows per pass: 4 results, 4 int32 and 4 int16 sums, 4 broadcasts

template <typename Out>
using Int4Kernel = void (*)(const int8_t*, const float*, const float*, const uint8_t*, Out*, int64_t, int64_t,
                            int64_t, int64_t);
template <typename Out>
constexpr Int4Kernel<Out> kInt4ByRows[kInt4Rows] = {int4_block_kernel<1, Out>, int4_block_kernel<2, Out>};

// One block a pass, by up to 2 rows. Unlike the VNNI kernel's (up to 8 blocks at one row), more blocks per pass
// measured slower here at one row (4 blocks ~20 GB/s against ~27 for one, 896 × 4864 on one thread under load): a
// group's sums already keep 2 chains per row in flight, and the prefetch runs ahead of the one stream.
template <typename Out>
void run_int4(const int8_t* xq, const float* sx, const float* xsum, const uint8_t* w, Out* y, int64_t M, int64_t K,
              int64_t N, int64_t G) {
  const int64_t groups = K / G;
  at::parallel_for(0, N / 16, 4, [&](int64_t begin, int64_t end) {
    for (int64_t nb = begin; nb < end; ++nb)
      for (int64_t m0 = 0; m0 < M; m0 += kInt4Rows)
        kInt4ByRows<Out>[std::min(kInt4Rows, M - m0) - 1](xq + m0 * K, sx + m0 * groups, xsum + m0 * groups, w,
                                                          y + m0 * N, K, N, G, nb);
  });
}

// ---- the experts' SwiGLU: the VNNI kernel's e^x and σ(x) (simd.h), 8 lanes, the same roundings ----

// e^x for x ≤ 0: 2^n · e^r, n = round(x / ln 2), e^r by its Taylor series to r^7; x below -104 gives e^-104's
// rounding. vscalef multiplies by 2^n with one rounding; here n ∈ [-150, 0] is split in two halves whose powers are
// normal floats: p · 2^(n >> 1) is exact (p ≈ 1, so it stays normal) and the second multiply is the one rounding.
inline __m256 pow2(__m256i n) {  // 2^n for a normal float's exponent n, from its bits
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(n, _mm256_set1_epi32(127)), 23));
}
inline __m256 exp8(__m256 x) {
  x = _mm256_max_ps(x, _mm256_set1_ps(-104.f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.f / 5040);
  for (const float c : {1.f / 720, 1.f / 120, 1.f / 24, 1.f / 6, 0.5f, 1.f, 1.f})
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
  const __m256i whole = _mm256_cvtps_epi32(n), half = _mm256_srai_epi32(whole, 1);
  return _mm256_mul_ps(_mm256_mul_ps(p, pow2(half)), pow2(_mm256_sub_epi32(whole, half)));
}

// σ(x) for any x: e = e^-|x|, σ = 1 / (1 + e) for x ≥ 0 and e / (1 + e) below
inline __m256 sigmoid8(__m256 x) {
  const __m256 e = exp8(_mm256_sub_ps(_mm256_setzero_ps(), abs8(x)));
  const __m256 inverse = _mm256_div_ps(_mm256_set1_ps(1.f), _mm256_add_ps(_mm256_set1_ps(1.f), e));
  return _mm256_blendv_ps(inverse, _mm256_mul_ps(inverse, e), _mm256_cmp_ps(x, _mm256_setzero_ps(), _CMP_LT_OQ));
}

}  // namespace

// No AMX at this level: kept so that callers of either extension can ask; always False.
bool use_amx(bool) { return false; }

// Quantise w [N, K] (float32) per output row into the int8 kernels' packed layout, in place: quantized_vnni.cpp's
// int8_pack (and Int8Linear's PyTorch arithmetic) bit for bit: scale = max|w[n]| / 127 (at least 1e-12),
// q = round(w / scale) to nearest even within ±127, and the row sums of q.
void int8_pack(const torch::Tensor& w, torch::Tensor& packed, torch::Tensor& scales, torch::Tensor& rowsum) {
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == torch::kFloat && w.is_contiguous(), "w must be [N, K] float32");
  const int64_t N = w.size(0), K = w.size(1);
  TORCH_CHECK(N % 16 == 0 && K % 16 == 0 && packed.numel() == N * K && packed.scalar_type() == torch::kChar &&
              scales.numel() == N && scales.scalar_type() == torch::kFloat && rowsum.numel() == N &&
              rowsum.scalar_type() == torch::kInt && packed.is_contiguous() && scales.is_contiguous() &&
              rowsum.is_contiguous(), "packed, scales, rowsum do not match w");
  const float* wp = w.data_ptr<float>();
  int8_t* pp = packed.data_ptr<int8_t>();
  float* sp = scales.data_ptr<float>();
  int32_t* rp = rowsum.data_ptr<int32_t>();
  at::parallel_for(0, N, 16, [&](int64_t begin, int64_t end) {
    std::vector<int8_t> q(K);
    for (int64_t n = begin; n < end; ++n) {
      const float* row = wp + n * K;
      __m256 vmax = _mm256_setzero_ps();
      for (int64_t k = 0; k < K; k += 8) vmax = _mm256_max_ps(vmax, abs8(_mm256_loadu_ps(row + k)));
      const float scale = std::max(reduce_max8(vmax) / 127.f, 1e-12f);
      const __m256 vscale = _mm256_set1_ps(scale), lo = _mm256_set1_ps(-127.f), hi = _mm256_set1_ps(127.f);
      __m256i total = _mm256_setzero_si256();
      for (int64_t k = 0; k < K; k += 8) {
        const __m256 r = _mm256_round_ps(_mm256_div_ps(_mm256_loadu_ps(row + k), vscale),
                                         _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        const __m256i qi = _mm256_cvtps_epi32(_mm256_min_ps(_mm256_max_ps(r, lo), hi));
        total = _mm256_add_epi32(total, qi);
        store8_i8(q.data() + k, qi);
      }
      sp[n] = scale;
      rp[n] = reduce_add8(total);
      int8_t* block = pp + (n / 16) * K * 16 + (n % 16) * 4;  // [n/16][k/4][n%16][k%4]
      for (int64_t k = 0; k < K; k += 4) std::memcpy(block + k * 16, q.data() + k, 4);
    }
  });
}

// x [..., K] float32, bfloat16 or float16; packed [N/16, K/4, 16, 4] int8; scales [N] float32; rowsum [N] int32 ->
// [..., N] in bfloat16 for bfloat16 x, else float32.
torch::Tensor int8_matmul(const torch::Tensor& x, const torch::Tensor& packed, const torch::Tensor& scales,
                          const torch::Tensor& rowsum) {
  TORCH_CHECK(x.dim() >= 1 && x.is_contiguous() && x.size(-1) > 0, "x must be a contiguous [..., K] tensor");
  TORCH_CHECK(x.scalar_type() == torch::kFloat || x.scalar_type() == torch::kBFloat16 ||
              x.scalar_type() == torch::kHalf, "x must be float32, bfloat16 or float16");
  const int64_t K = x.size(-1), M = x.numel() / K;
  TORCH_CHECK(K % 4 == 0, "x [..., K]: K = ", K, " must be a multiple of 4");
  TORCH_CHECK(packed.dim() == 4 && packed.size(1) == K / 4 && packed.size(2) == 16 && packed.size(3) == 4 &&
              packed.scalar_type() == torch::kChar && packed.is_contiguous(), "packed must be a contiguous "
              "[N/16, K/4, 16, 4] int8 tensor for x [..., ", K, "], got ", packed.sizes(), " ", packed.scalar_type());
  const int64_t N = packed.size(0) * 16;
  check_channel_vector(scales, N, torch::kFloat, "scales");
  check_channel_vector(rowsum, N, torch::kInt, "rowsum");
  // buffers kept by the calling thread, as the VNNI kernel's: at decode's sizes an allocation costs as much as the
  // quantisation
  thread_local std::vector<int8_t> xq;
  thread_local std::vector<float> sx;
  xq.resize(M * K);
  sx.resize(M);
  const bool bf16 = x.scalar_type() == torch::kBFloat16;
  if (bf16)
    quantise_rows(x.data_ptr<at::BFloat16>(), M, K, xq.data(), sx.data());
  else
    quantise_rows(x.to(torch::kFloat32).data_ptr<float>(), M, K, xq.data(), sx.data());
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = N;
  auto y = torch::empty(shape, torch::dtype(bf16 ? torch::kBFloat16 : torch::kFloat32));
  const int8_t* xp = xq.data();
  const float* sxp = sx.data();
  const int8_t* wp = packed.data_ptr<int8_t>();
  const float* swp = scales.data_ptr<float>();
  const int32_t* rp = rowsum.data_ptr<int32_t>();
  auto body = [&](auto* yp) {
    at::parallel_for(0, N / 16, 8, [&](int64_t begin, int64_t end) {
      band(xp, sxp, wp, swp, rp, yp, K, N, 0, M, begin, end);
    });
  };
  if (bf16) body(y.data_ptr<at::BFloat16>());
  else body(y.data_ptr<float>());
  return y;
}

// Grouped: rows [ends[g-1], ends[g]) of x (sorted by group) times the int8 weight of group g, packed
// [G, N/16, K/4, 16, 4] with scales and rowsum [G, N] (quantized_vnni.cpp's grouped_int8_matmul). Each thread takes
// the same band of output blocks in every group that has rows, so every expert's weight is read once.
torch::Tensor grouped_int8_matmul(const torch::Tensor& x, const torch::Tensor& packed, const torch::Tensor& scales,
                                  const torch::Tensor& rowsum, const torch::Tensor& ends) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "x must be a contiguous [M, K] matrix");
  TORCH_CHECK(scales.dim() == 2 && scales.scalar_type() == torch::kFloat && rowsum.sizes() == scales.sizes() &&
              rowsum.scalar_type() == torch::kInt && packed.scalar_type() == torch::kChar && packed.is_contiguous() &&
              scales.is_contiguous() && rowsum.is_contiguous(), "scales, rowsum [G, N] and packed int8 expected");
  const int64_t M = x.size(0), K = x.size(1), G = scales.size(0), N = scales.size(1);
  TORCH_CHECK(K % 4 == 0 && N % 16 == 0 && packed.numel() == G * N * K, "packed weight does not match x and scales");
  TORCH_CHECK(ends.dim() == 1 && ends.size(0) == G && ends.scalar_type() == torch::kLong,
              "ends must be [G] int64 (cumulative row counts)");
  auto ends_c = ends.contiguous();
  const int64_t* ep = ends_c.data_ptr<int64_t>();
  check_group_ends(ep, G, M, "rows of x");
  thread_local std::vector<int8_t> xq;
  thread_local std::vector<float> sx;
  xq.resize(M * K);
  sx.resize(M);
  const bool bf16 = x.scalar_type() == torch::kBFloat16;
  if (bf16)
    quantise_rows(x.data_ptr<at::BFloat16>(), M, K, xq.data(), sx.data());
  else
    quantise_rows(x.to(torch::kFloat32).data_ptr<float>(), M, K, xq.data(), sx.data());
  auto y = torch::empty({M, N}, torch::dtype(bf16 ? torch::kBFloat16 : torch::kFloat32));
  const int8_t* xp = xq.data();
  const float* sxp = sx.data();
  const int8_t* wp = packed.data_ptr<int8_t>();
  const float* swp = scales.data_ptr<float>();
  const int32_t* rp = rowsum.data_ptr<int32_t>();
  auto body = [&](auto* yp) {
    at::parallel_for(0, N / 16, 1, [&](int64_t begin, int64_t end) {
      for (int64_t g = 0, start = 0; g < G; start = ep[g], ++g)
        if (ep[g] > start) band(xp, sxp, wp + g * N * K, swp + g * N, rp + g * N, yp, K, N, start, ep[g] - start,
                                begin, end);
    });
  };
  if (bf16) body(y.data_ptr<at::BFloat16>());
  else body(y.data_ptr<float>());
  return y;
}

// MoE's routed experts in decode, whole (quantized_vnni.cpp's int8_experts, the same arguments and arithmetic):
// y[token[m]] += weight[m] · down(silu(gate(x)) · up(x)) at x = x[token[m]], over the (token, expert) pairs sorted
// by expert. Each thread takes a band of SwiGLU columns (the gate and up rows that make them), then a band of output
// columns (so that its weighted sums touch only its own columns).
torch::Tensor int8_experts(const torch::Tensor& x, const torch::Tensor& token, const torch::Tensor& ends,
                           const torch::Tensor& weight, const torch::Tensor& gate_up, const torch::Tensor& gate_up_scales,
                           const torch::Tensor& gate_up_rowsum, const torch::Tensor& down,
                           const torch::Tensor& down_scales, const torch::Tensor& down_rowsum) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "x must be a contiguous [N, H] matrix");
  const int64_t N = x.size(0), H = x.size(1), M = token.numel(), G = ends.numel();
  TORCH_CHECK(token.scalar_type() == torch::kLong && token.is_contiguous() && weight.numel() == M &&
              weight.scalar_type() == torch::kFloat && weight.is_contiguous() && ends.scalar_type() == torch::kLong &&
              ends.is_contiguous(), "token [M] int64, ends [G] int64 and weight [M] float32 expected");
  TORCH_CHECK(gate_up_scales.dim() == 2 && gate_up_scales.size(0) == G && down_scales.dim() == 2 &&
              down_scales.size(0) == G && down_scales.size(1) == H, "scales must be [G, 2I] and [G, H]");
  const int64_t I2 = gate_up_scales.size(1), I = I2 / 2;
  TORCH_CHECK(I % 16 == 0 && H % 16 == 0 && gate_up.numel() == G * I2 * H && down.numel() == G * H * I &&
              gate_up.scalar_type() == torch::kChar && down.scalar_type() == torch::kChar && gate_up.is_contiguous() &&
              down.is_contiguous() && gate_up_rowsum.sizes() == gate_up_scales.sizes() &&
              down_rowsum.sizes() == down_scales.sizes(), "packed gate/up and down do not match x and the scales");
  TORCH_CHECK(gate_up_scales.scalar_type() == torch::kFloat && down_scales.scalar_type() == torch::kFloat &&
              gate_up_rowsum.scalar_type() == torch::kInt && down_rowsum.scalar_type() == torch::kInt &&
              gate_up_scales.is_contiguous() && down_scales.is_contiguous() && gate_up_rowsum.is_contiguous() &&
              down_rowsum.is_contiguous(), "scales must be contiguous float32 and row sums contiguous int32");
  const int64_t* tp = token.data_ptr<int64_t>();
  const int64_t* ep = ends.data_ptr<int64_t>();
  check_group_ends(ep, G, M, "(token, expert) pairs");
  for (int64_t m = 0; m < M; ++m) TORCH_CHECK(tp[m] >= 0 && tp[m] < N, "token ", tp[m], " out of range for ", N);
  const bool bf16 = x.scalar_type() == torch::kBFloat16;
  TORCH_CHECK(bf16 || x.scalar_type() == torch::kFloat, "x must be float32 or bfloat16");
  std::vector<int8_t> xq(M * H), aq(M * I);
  std::vector<float> sx(M), sa(M), projected(M * I2), act(M * I), out(M * H);
  for (int64_t m = 0; m < M; ++m) {
    if (bf16) quantise_rows(x.data_ptr<at::BFloat16>() + tp[m] * H, 1, H, xq.data() + m * H, sx.data() + m);
    else quantise_rows(x.data_ptr<float>() + tp[m] * H, 1, H, xq.data() + m * H, sx.data() + m);
  }
  const int8_t* gw = gate_up.data_ptr<int8_t>();
  const float* gs = gate_up_scales.data_ptr<float>();
  const int32_t* gr = gate_up_rowsum.data_ptr<int32_t>();
  at::parallel_for(0, I / 16, 1, [&](int64_t begin, int64_t end) {
    for (int64_t g = 0, start = 0; g < G; start = ep[g], ++g) {
      const int64_t rows = ep[g] - start;
      if (rows <= 0) continue;
      for (const int64_t half : {int64_t{0}, I / 16})  // the gate rows' blocks, then the up rows' blocks
        band(xq.data(), sx.data(), gw + g * I2 * H, gs + g * I2, gr + g * I2, projected.data(), H, I2, start, rows,
             begin + half, end + half);
      for (int64_t m = start; m < start + rows; ++m)
        for (int64_t c = begin * 16; c < end * 16; c += 8) {
          const __m256 gate = _mm256_loadu_ps(projected.data() + m * I2 + c);
          const __m256 up = _mm256_loadu_ps(projected.data() + m * I2 + I + c);
          _mm256_storeu_ps(act.data() + m * I + c, _mm256_mul_ps(_mm256_mul_ps(gate, sigmoid8(gate)), up));
        }
    }
  });
  quantise_rows(act.data(), M, I, aq.data(), sa.data());
  auto y = torch::zeros({N, H}, torch::kFloat);
  float* yp = y.data_ptr<float>();
  const float* wp = weight.data_ptr<float>();
  const int8_t* dw = down.data_ptr<int8_t>();
  const float* ds = down_scales.data_ptr<float>();
  const int32_t* dr = down_rowsum.data_ptr<int32_t>();
  at::parallel_for(0, H / 16, 1, [&](int64_t begin, int64_t end) {
    for (int64_t g = 0, start = 0; g < G; start = ep[g], ++g) {
      const int64_t rows = ep[g] - start;
      if (rows <= 0) continue;
      band(aq.data(), sa.data(), dw + g * H * I, ds + g * H, dr + g * H, out.data(), I, H, start, rows, begin, end);
      for (int64_t m = start; m < start + rows; ++m) {
        const __m256 w = _mm256_set1_ps(wp[m]);
        float* row = yp + tp[m] * H;
        for (int64_t c = begin * 16; c < end * 16; c += 8)
          _mm256_storeu_ps(row + c,
                           _mm256_fmadd_ps(_mm256_loadu_ps(out.data() + m * H + c), w, _mm256_loadu_ps(row + c)));
      }
    }
  });
  return bf16 ? y.to(torch::kBFloat16) : y;
}

// x [M, K] float32 or bfloat16; packed [N/16, K/G, G·8 + 64] uint8 (records as above) -> [M, N] in bfloat16 for
// bfloat16 x, else float32.
torch::Tensor int4_matmul(const torch::Tensor& x, const torch::Tensor& packed) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "x must be a contiguous [M, K] matrix");
  TORCH_CHECK(packed.dim() == 3 && packed.scalar_type() == torch::kUInt8 && packed.is_contiguous(),
              "packed must be a contiguous [N/16, K/G, G*8 + 64] uint8 tensor");
  const int64_t G = (packed.size(2) - 64) / 8, M = x.size(0), K = x.size(1), N = packed.size(0) * 16;
  TORCH_CHECK(G > 0 && G % 8 == 0 && packed.size(2) == G * 8 + 64 && packed.size(1) * G == K,
              "packed weight does not match x: ", packed.sizes(), " for K = ", K);
  thread_local std::vector<int8_t> xq;
  thread_local std::vector<float> sx, xsum;
  xq.resize(M * K);
  sx.resize(M * K / G);
  xsum.resize(M * K / G);
  const bool bf16 = x.scalar_type() == torch::kBFloat16;
  if (bf16)
    quantise_groups(x.data_ptr<at::BFloat16>(), M, K, G, xq.data(), sx.data(), xsum.data());
  else
    quantise_groups(x.to(torch::kFloat32).data_ptr<float>(), M, K, G, xq.data(), sx.data(), xsum.data());
  auto y = torch::empty({M, N}, torch::dtype(bf16 ? torch::kBFloat16 : torch::kFloat32));
  if (bf16)
    run_int4(xq.data(), sx.data(), xsum.data(), packed.data_ptr<uint8_t>(), y.data_ptr<at::BFloat16>(), M, K, N, G);
  else
    run_int4(xq.data(), sx.data(), xsum.data(), packed.data_ptr<uint8_t>(), y.data_ptr<float>(), M, K, N, G);
  return y;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("int8_matmul", &int8_matmul, "weight-only int8 matmul with per-row int8 activations (AVX2)");
  m.def("int8_pack", &int8_pack, "quantise a float32 [N, K] weight into the int8 kernel's layout, in place");
  m.def("use_amx", &use_amx, "kept for callers of either extension: no AMX at this level, returns False");
  m.def("int4_matmul", &int4_matmul, "weight-only int4 matmul with per-group int8 activations (AVX2)");
  m.def("grouped_int8_matmul", &grouped_int8_matmul, "rows of x by group g times group g's int8 weight");
  m.def("int8_experts", &int8_experts, "MoE decode: the int8 experts' SwiGLU over sorted (token, expert) pairs, summed");
}

// The same functions as operators, torch.ops.openseek_avx2.*, so that torch.compile keeps a decode step that calls
// them in one graph (a pybind call is opaque to it and splits the graph).
TORCH_LIBRARY_FRAGMENT(openseek_avx2, m) {
  m.def("int8_matmul(Tensor x, Tensor packed, Tensor scales, Tensor rowsum) -> Tensor");
  m.def("int4_matmul(Tensor x, Tensor packed) -> Tensor");
  m.def("grouped_int8_matmul(Tensor x, Tensor packed, Tensor scales, Tensor rowsum, Tensor ends) -> Tensor");
  m.def("int8_experts(Tensor x, Tensor token, Tensor ends, Tensor weight, Tensor gate_up, Tensor gate_up_scales, "
        "Tensor gate_up_rowsum, Tensor down, Tensor down_scales, Tensor down_rowsum) -> Tensor");
}
TORCH_LIBRARY_IMPL(openseek_avx2, CPU, m) {
  m.impl("int8_matmul", &int8_matmul);
  m.impl("int4_matmul", &int4_matmul);
  m.impl("grouped_int8_matmul", &grouped_int8_matmul);
  m.impl("int8_experts", &int8_experts);
}
