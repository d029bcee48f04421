// Weight-only int8 and int4 matmuls for decode, on AVX-512 VNNI.
//
// Decode multiplies a few rows of activations by every weight once per step, so it is bound by how fast the
// weights stream in; both kernels read each weight byte once and multiply integers with vpdpbusd.
// On CPUs with AMX (Xeons from Sapphire Rapids) the int8 kernel multiplies 16 rows and more with tile instructions
// instead, which give the same integer sums (quantized_amx.h).
//
// int8: y = x · (q · scale)ᵀ with activations quantised per row. The weights are packed as [N/16][K/4][16][4]
// int8: one 64-byte load holds 4 input columns of 16 output rows, exactly what `vpdpbusd` multiplies against 4
// broadcast activation bytes, accumulating 16 outputs in one register with no horizontal sums. Activations are
// quantised per row to int8 (absmax / 127, as llama.cpp's Q8_0 does for its dot products) and shifted to uint8
// (+128), because vpdpbusd multiplies unsigned by signed bytes; the shift is undone with the precomputed row sums of
// the weights: Σ(x+128)·w = Σx·w + 128·Σw.
#include <torch/extension.h>
#include "kernel_checks.h"
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <cmath>
#include <type_traits>
#include <vector>

#include "simd.h"
#ifdef __AMX_INT8__
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace {

constexpr int64_t kRows = 8;  // activation rows per pass over the weights (accumulators held in registers)

// Per-row absmax quantisation: xu[m, k] = round(x[m, k] / scale[m]) + 128, scale[m] = max|x[m]| / 127.
// 16 values at a time (K % 16 == 0 here; a scalar tail otherwise), with the same float32 arithmetic and rounding
// (to nearest even) as one value at a time: at 16 rows this pass was a fifth of a small projection's time.
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const at::BFloat16* p) {
  return _mm512_castsi512_ps(
      _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16));
}

template <typename T>
void quantise_rows(const T* x, int64_t M, int64_t K, uint8_t* xu, float* scale) {
  const int64_t K16 = K - K % 16;
  for (int64_t m = 0; m < M; ++m) {
    const T* row = x + m * K;
    __m512 vmax = _mm512_setzero_ps();
    for (int64_t k = 0; k < K16; k += 16) vmax = _mm512_max_ps(vmax, _mm512_abs_ps(load16(row + k)));
    float absmax = _mm512_reduce_max_ps(vmax);
    for (int64_t k = K16; k < K; ++k) absmax = std::max(absmax, std::fabs(static_cast<float>(row[k])));
    const float s = absmax > 0.f ? absmax / 127.f : 1.f;
    const float inv = 1.f / s;
    const __m512 vinv = _mm512_set1_ps(inv);
    const __m512i shift = _mm512_set1_epi32(128);
    for (int64_t k = 0; k < K16; k += 16) {
      const __m512i q = _mm512_add_epi32(_mm512_cvtps_epi32(_mm512_mul_ps(load16(row + k), vinv)), shift);
      _mm_storeu_si128(reinterpret_cast<__m128i*>(xu + m * K + k), _mm512_cvtepi32_epi8(q));
    }
    for (int64_t k = K16; k < K; ++k)
      xu[m * K + k] = static_cast<uint8_t>(static_cast<int>(std::nearbyint(static_cast<float>(row[k]) * inv)) + 128);
    scale[m] = s;
  }
}

// Rows [0, R) of the activations against output blocks [nb, nb + B): B·R accumulators, each fed by its own chain of
// vpdpbusd, so one row (decode at batch 1) still keeps several multiply-adds in flight and several weight streams open.
// 16 results to y, in y's type: float32, or bf16 rounded to nearest even as PyTorch converts (with integer ops,
// so the kernel needs no AVX512-BF16)
inline void store16(float* y, __m512 v) { _mm512_storeu_ps(y, v); }
inline void store16(at::BFloat16* y, __m512 v) {
  const __m512i bits = _mm512_castps_si512(v);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  const __m512i rounded = _mm512_add_epi32(bits, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7FFF)));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(y), _mm512_cvtepi32_epi16(_mm512_srli_epi32(rounded, 16)));
}

template <int R, int B, typename Out>
void block_kernel(const uint8_t* xu, const float* sx, const int8_t* w, const float* sw, const int32_t* rowsum,
                  Out* y, int64_t K, int64_t N, int64_t nb) {
  const int8_t* block = w + nb * K * 16;
  __m512i acc[B][R];
  for (int b = 0; b < B; ++b)
    for (int r = 0; r < R; ++r) acc[b][r] = _mm512_setzero_si512();
  for (int64_t k = 0; k < K; k += 4) {
    __m512i xv[R];
    for (int r = 0; r < R; ++r) {
      int32_t four;
      std::memcpy(&four, xu + r * K + k, 4);
      xv[r] = _mm512_set1_epi32(four);
    }
    for (int b = 0; b < B; ++b) {
      const __m512i wv = _mm512_loadu_si512(block + b * K * 16 + k * 16);
      for (int r = 0; r < R; ++r) acc[b][r] = _mm512_dpbusd_epi32(acc[b][r], xv[r], wv);
    }
  }
  for (int b = 0; b < B; ++b) {
    const int64_t n0 = (nb + b) * 16;
    const __m512 scales = _mm512_loadu_ps(sw + n0);
    const __m512 offsets = _mm512_cvtepi32_ps(_mm512_slli_epi32(_mm512_loadu_si512(rowsum + n0), 7));
    for (int r = 0; r < R; ++r) {
      const __m512 dot = _mm512_sub_ps(_mm512_cvtepi32_ps(acc[b][r]), offsets);
      store16(y + r * N + n0, _mm512_mul_ps(_mm512_mul_ps(dot, scales), _mm512_set1_ps(sx[r])));
    }
  }
}

template <typename Out>
using Kernel = void (*)(const uint8_t*, const float*, const int8_t*, const float*, const int32_t*, Out*, int64_t,
                        int64_t, int64_t);
template <int B, typename Out>
constexpr Kernel<Out> kKernels[kRows] = {block_kernel<1, B, Out>, block_kernel<2, B, Out>, block_kernel<3, B, Out>,
                                         block_kernel<4, B, Out>, block_kernel<5, B, Out>, block_kernel<6, B, Out>,
                                         block_kernel<7, B, Out>, block_kernel<8, B, Out>};

template <typename Out>
void run(const uint8_t* xp, const float* sxp, const int8_t* wp, const float* swp, const int32_t* rp, Out* yp,
         int64_t M, int64_t K, int64_t N) {
  // output blocks per pass: at one row (decode at batch 1) 8, so that 8 accumulators are in flight; with 2-8 rows
  // 4 blocks by up to 4 rows a pass (the second pass finds the blocks in cache): four weight streams in flight, which
  // a 4.4 MB projection read from memory needs (2 and 4 rows: 15-30% faster than one block by all rows, measured on
  // the Xeon VM, round 13); beyond 8 rows two blocks share each broadcast row, 10 loads per 16 multiply-adds instead
  // of 9 per 8 (GRPO's 16-row rollouts: 5-15% faster per call, round 8)
  const int64_t blocks = M == 1 ? 8 : M <= kRows ? 4 : 2;
  const int64_t pass = M <= kRows ? 4 : kRows;  // rows per pass
  const Kernel<Out>* group = blocks == 8 ? kKernels<8, Out> : blocks == 4 ? kKernels<4, Out> : kKernels<2, Out>;
  at::parallel_for(0, N / 16, 8, [&](int64_t begin, int64_t end) {
    for (int64_t nb = begin; nb < end;) {
      const int64_t take = nb + blocks <= end ? blocks : 1;  // a band's last blocks go one at a time
      const Kernel<Out>* kernels = take == blocks ? group : kKernels<1, Out>;
      for (int64_t m0 = 0; m0 < M; m0 += pass)  // more rows: the next pass finds these blocks in cache
        kernels[std::min(pass, M - m0) - 1](xp + m0 * K, sxp + m0, wp, swp, rp, yp + m0 * N, K, N, nb);
      nb += take;
    }
  });
}

}  // namespace

#include "quantized_amx.h"

namespace {


// ---- int4: y = x · Wᵀ with W = q · scale + low per group of G input columns, q in [0, 15] ----
//
// The weights of 16 output rows and one group are one contiguous record of G·8 + 64 bytes: G/8 chunks of 64 bytes,
// byte 4·i + j of a chunk holding row i's column j in its low nibble and column 4 + j in its high nibble, then the
// group's 16 scales and 16 lows in bf16. A chunk's low nibbles (and 0x0F) and high nibbles (shift, and 0x0F) are
// each exactly a vpdpbusd operand for 4 columns of 16 rows, and the weights are already unsigned bytes, so the
// activations go in as signed int8 with no offset to undo. Activations are quantised per row and group (absmax / 127,
// as llama.cpp's Q8_0 blocks): a group's integer dot products are scaled by scale · x_scale, and its lows multiply the
// group's sum of quantised activations, so the result is exactly x̂ · Wᵀ for the quantised activations x̂ (summed in
// float32 group by group). One record streams per block of 16 rows: weights and their scales in one pass.

constexpr int64_t kInt4Rows = 4;
#ifndef PREFETCH
#define PREFETCH 1024
#endif  // activation rows per pass: accumulators, results and broadcasts fit in 32 registers

// Per-row, per-group absmax quantisation: xq[m, k] = round(x[m, k] / scale[m, g]), scale = max|x[m, group]| / 127;
// sum[m, g] = scale · Σ xq over the group (the quantised activations' sum, which the group's lows multiply).
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

inline __m512 bf16x16(const uint16_t* p) {  // 16 bf16 values to float32: the bits go to the high half
  return _mm512_castsi512_ps(
      _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16));
}

// Rows [0, R) against blocks [nb, nb + B): per group, B·R integer accumulators, then B·R float32 results.
template <int R, int B, typename Out>
void int4_block_kernel(const int8_t* xq, const float* sx, const float* xsum, const uint8_t* w, Out* y, int64_t K,
                       int64_t N, int64_t G, int64_t nb) {
  const int64_t groups = K / G, record = G * 8 + 64;
  const uint8_t* base = w + nb * groups * record;
  const __m512i nibble = _mm512_set1_epi8(0x0F);
  __m512 out[B][R];
  for (int b = 0; b < B; ++b)
    for (int r = 0; r < R; ++r) out[b][r] = _mm512_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    __m512i acc[B][R];
    for (int b = 0; b < B; ++b)
      for (int r = 0; r < R; ++r) acc[b][r] = _mm512_setzero_si512();
    for (int64_t c = 0; c < G / 8; ++c) {
      const int64_t k = g * G + c * 8;
      __m512i low_x[R], high_x[R];
      for (int r = 0; r < R; ++r) {
        int32_t four[2];
        std::memcpy(four, xq + r * K + k, 8);
        low_x[r] = _mm512_set1_epi32(four[0]);
        high_x[r] = _mm512_set1_epi32(four[1]);
      }
      for (int b = 0; b < B; ++b) {
        const uint8_t* at = base + (b * groups + g) * record + c * 64;
        _mm_prefetch(reinterpret_cast<const char*>(at + PREFETCH), _MM_HINT_T0);
        const __m512i packed = _mm512_loadu_si512(at);
        const __m512i low = _mm512_and_si512(packed, nibble);
        const __m512i high = _mm512_and_si512(_mm512_srli_epi16(packed, 4), nibble);
        for (int r = 0; r < R; ++r) {
          acc[b][r] = _mm512_dpbusd_epi32(acc[b][r], low, low_x[r]);
          acc[b][r] = _mm512_dpbusd_epi32(acc[b][r], high, high_x[r]);
        }
      }
    }
    for (int b = 0; b < B; ++b) {
      const uint16_t* params = reinterpret_cast<const uint16_t*>(base + (b * groups + g) * record + G * 8);
      const __m512 scales = bf16x16(params), lows = bf16x16(params + 16);
      for (int r = 0; r < R; ++r) {
        const __m512 scaled = _mm512_mul_ps(scales, _mm512_set1_ps(sx[r * groups + g]));
        out[b][r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[b][r]), scaled, out[b][r]);
        out[b][r] = _mm512_fmadd_ps(lows, _mm512_set1_ps(xsum[r * groups + g]), out[b][r]);
      }
    }
  }
  for (int b = 0; b < B; ++b)
    for (int r = 0; r < R; ++r) store16(y + r * N + (nb + b) * 16, out[b][r]);
}

template <typename Out>
using Int4Kernel = void (*)(const int8_t*, const float*, const float*, const uint8_t*, Out*, int64_t, int64_t,
                            int64_t, int64_t);
// by rows, at one block per pass; and at one row by blocks per pass (1 to 8)
template <typename Out>
constexpr Int4Kernel<Out> kInt4ByRows[kInt4Rows] = {int4_block_kernel<1, 1, Out>, int4_block_kernel<2, 1, Out>,
                                                    int4_block_kernel<3, 1, Out>, int4_block_kernel<4, 1, Out>};
template <typename Out>
constexpr Int4Kernel<Out> kInt4ByBlocks[8] = {
    int4_block_kernel<1, 1, Out>, int4_block_kernel<1, 2, Out>, int4_block_kernel<1, 3, Out>,
    int4_block_kernel<1, 4, Out>, int4_block_kernel<1, 5, Out>, int4_block_kernel<1, 6, Out>,
    int4_block_kernel<1, 7, Out>, int4_block_kernel<1, 8, Out>};

template <typename Out>
void run_int4(const int8_t* xq, const float* sx, const float* xsum, const uint8_t* w, Out* y, int64_t M, int64_t K,
              int64_t N, int64_t G) {
  const int64_t groups = K / G;
  at::parallel_for(0, N / 16, 4, [&](int64_t begin, int64_t end) {
    if (M == 1) {  // up to 8 blocks per pass, so that 8 accumulator chains and 8 weight streams are in flight
      for (int64_t nb = begin; nb < end; nb += 8)
        kInt4ByBlocks<Out>[std::min<int64_t>(8, end - nb) - 1](xq, sx, xsum, w, y, K, N, G, nb);
      return;
    }
    for (int64_t nb = begin; nb < end; ++nb)  // with more rows the rows give the chains
      for (int64_t m0 = 0; m0 < M; m0 += kInt4Rows)
        kInt4ByRows<Out>[std::min(kInt4Rows, M - m0) - 1](xq + m0 * K, sx + m0 * groups, xsum + m0 * groups, w,
                                                          y + m0 * N, K, N, G, nb);
  });
}

}  // namespace

// AMX where the CPU and the kernel allow it, from 16 rows (at 8 rows it measured no faster than VNNI); use_amx(false)
// turns it off, for comparisons and tests, and returns whether this build and this machine can use it at all.
constexpr int64_t kAmxMinRows = 16;
bool amx_enabled = true;
bool use_amx(bool enable) {
  amx_enabled = enable;
#ifdef __AMX_INT8__
  return amx_granted();
#else
  return false;
#endif
}

// Quantise w [N, K] (float32) per output row into the int8 kernel's packed layout, in place: scale = max|w[n]| / 127
// (at least 1e-12), q = round(w / scale) to nearest even, within ±127, and the row sums of q. The arithmetic of
// Int8Linear's PyTorch code for it, bit for bit, in one pass: GRPO re-quantises its rollout view after every
// optimizer step, and the PyTorch ops (abs, max, divide, round, clamp, cast, permute, sum) took 75 ms a step for
// a 31M model here.
void int8_pack(const torch::Tensor& w, torch::Tensor& packed, torch::Tensor& scales, torch::Tensor& rowsum) {
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == torch::kFloat && w.is_contiguous(), "w must be [N, K] float32");
  const int64_t N = w.size(0), K = w.size(1);
  TORCH_CHECK(N % 16 == 0 && K % 16 == 0 && packed.numel() == N * K && packed.scalar_type() == torch::kChar &&
              scales.numel() == N && scales.scalar_type() == torch::kFloat && rowsum.numel() == N &&
              rowsum.scalar_type() == torch::kInt, "packed, scales, rowsum do not match w");
  const float* wp = w.data_ptr<float>();
  int8_t* pp = packed.data_ptr<int8_t>();
  float* sp = scales.data_ptr<float>();
  int32_t* rp = rowsum.data_ptr<int32_t>();
  at::parallel_for(0, N, 16, [&](int64_t begin, int64_t end) {
    std::vector<int8_t> q(K);
    for (int64_t n = begin; n < end; ++n) {
      const float* row = wp + n * K;
      __m512 vmax = _mm512_setzero_ps();
      for (int64_t k = 0; k < K; k += 16) vmax = _mm512_max_ps(vmax, _mm512_abs_ps(_mm512_loadu_ps(row + k)));
      const float scale = std::max(_mm512_reduce_max_ps(vmax) / 127.f, 1e-12f);
      const __m512 vscale = _mm512_set1_ps(scale), lo = _mm512_set1_ps(-127.f), hi = _mm512_set1_ps(127.f);
      __m512i total = _mm512_setzero_si512();
      for (int64_t k = 0; k < K; k += 16) {
        const __m512 r = _mm512_roundscale_ps(_mm512_div_ps(_mm512_loadu_ps(row + k), vscale),
                                              _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        const __m512i qi = _mm512_cvtps_epi32(_mm512_min_ps(_mm512_max_ps(r, lo), hi));
        total = _mm512_add_epi32(total, qi);
        _mm_storeu_si128(reinterpret_cast<__m128i*>(q.data() + k), _mm512_cvtepi32_epi8(qi));
      }
      sp[n] = scale;
      rp[n] = _mm512_reduce_add_epi32(total);
      int8_t* block = pp + (n / 16) * K * 16 + (n % 16) * 4;  // [n/16][k/4][n%16][k%4]
      for (int64_t k = 0; k < K; k += 4) std::memcpy(block + k * 16, q.data() + k, 4);
    }
  });
}

// x [..., K] float32 or bfloat16; packed [N/16, K/4, 16, 4] int8; scales [N] float32; rowsum [N] int32 -> [..., N]
// in bfloat16 for bfloat16 x, else float32.
torch::Tensor int8_matmul(const torch::Tensor& x, const torch::Tensor& packed, const torch::Tensor& scales,
                          const torch::Tensor& rowsum) {
  // x [..., K]: any leading shape, kept in the result, so that decode's layers need no reshape (each op costs
  // microseconds there, a step has dozens of projections)
  TORCH_CHECK(x.dim() >= 1 && x.is_contiguous() && x.size(-1) > 0, "x must be a contiguous [..., K] tensor");
  TORCH_CHECK(x.scalar_type() == torch::kFloat || x.scalar_type() == torch::kBFloat16 ||
              x.scalar_type() == torch::kHalf, "x must be float32, bfloat16 or float16");
  const int64_t K = x.size(-1), M = x.numel() / K;
  TORCH_CHECK(K % 4 == 0, "x [..., K]: K = ", K, " must be a multiple of 4");
  TORCH_CHECK(packed.dim() == 4 && packed.size(1) == K / 4 && packed.size(2) == 16 && packed.size(3) == 4 &&
              packed.scalar_type() == torch::kChar && packed.is_contiguous(), "packed must be a contiguous "
              "[N/16, K/4, 16, 4] int8 tensor for x [..., ", K, "], got ", packed.sizes(), " ", packed.scalar_type());
  const int64_t N = packed.size(0) * 16;  // the weight says how many outputs; its scales and row sums must agree
  check_channel_vector(scales, N, torch::kFloat, "scales");
  check_channel_vector(rowsum, N, torch::kInt, "rowsum");
  // the quantised activations live in buffers kept by the calling thread: at decode's sizes a tensor allocation
  // for each costs as much as the quantisation (a 128-row projection takes a few microseconds in all)
  thread_local std::vector<uint8_t> xu;
  thread_local std::vector<float> sx;
  xu.resize(M * K);
  sx.resize(M);
  if (x.scalar_type() == torch::kBFloat16)
    quantise_rows(x.data_ptr<at::BFloat16>(), M, K, xu.data(), sx.data());
  else
    quantise_rows(x.to(torch::kFloat32).data_ptr<float>(), M, K, xu.data(), sx.data());
  const uint8_t* xp = xu.data();
  const float* sxp = sx.data();
  const int8_t* wp = packed.data_ptr<int8_t>();
  const float* swp = scales.data_ptr<float>();
  const int32_t* rp = rowsum.data_ptr<int32_t>();
  // bf16 activations get bf16 results straight from the kernel (no separate conversion pass); others float32
  const bool bf16 = x.scalar_type() == torch::kBFloat16;
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = N;
  auto y = torch::empty(shape, torch::dtype(bf16 ? torch::kBFloat16 : torch::kFloat32));
#ifdef __AMX_INT8__
  if (amx_enabled && M >= kAmxMinRows && K % 64 == 0 && amx_granted()) {
    if (bf16)
      run_amx(xp, sxp, wp, swp, rp, y.data_ptr<at::BFloat16>(), M, K, N);
    else
      run_amx(xp, sxp, wp, swp, rp, y.data_ptr<float>(), M, K, N);
    return y;
  }
#endif
  if (bf16)
    run(xp, sxp, wp, swp, rp, y.data_ptr<at::BFloat16>(), M, K, N);
  else
    run(xp, sxp, wp, swp, rp, y.data_ptr<float>(), M, K, N);
  return y;
}


// Rows [start, start + rows) of the quantised activations against output blocks [begin, end) of one expert's packed
// weight w [N/16, K/4, 16, 4], into y (float32, row stride N): several blocks per pass when the expert has few rows,
// so that enough weight loads are in flight to stream from memory (one block at a time read 13 GB/s here, eight 21;
// measured on the benchmark's experts).
template <typename Out>
void expert_band(const uint8_t* xu, const float* sx, const int8_t* w, const float* sw, const int32_t* rowsum, Out* y,
                 int64_t K, int64_t N, int64_t start, int64_t rows, int64_t begin, int64_t end) {
  const int64_t blocks = rows <= 2 ? 8 : rows <= 4 ? 4 : 2;
  const Kernel<Out>* group = blocks == 8 ? kKernels<8, Out> : blocks == 4 ? kKernels<4, Out> : kKernels<2, Out>;
  for (int64_t nb = begin; nb < end;) {
    const int64_t take = nb + blocks <= end ? blocks : 1;
    const Kernel<Out>* kernels = take == blocks ? group : kKernels<1, Out>;
    for (int64_t m0 = start; m0 < start + rows; m0 += kRows)
      kernels[std::min(kRows, start + rows - m0) - 1](xu + m0 * K, sx + m0, w, sw, rowsum, y + m0 * N, K, N, nb);
    nb += take;
  }
}


// Grouped: rows [ends[g-1], ends[g]) of x (sorted by group) times the int8 weight of group g — MoE's routed
// experts in decode, all experts of a projection in one call. packed [G, N/16, K/4, 16, 4], scales and rowsum [G, N]:
// each group packed as `int8_pack` packs one weight. Each thread takes the same band of output blocks in every group
// that has rows, so every expert's weight is read once.
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
  thread_local std::vector<uint8_t> xu;  // as int8_matmul's
  thread_local std::vector<float> sx;
  xu.resize(M * K);
  sx.resize(M);
  const bool bf16 = x.scalar_type() == torch::kBFloat16;
  if (bf16)
    quantise_rows(x.data_ptr<at::BFloat16>(), M, K, xu.data(), sx.data());
  else
    quantise_rows(x.to(torch::kFloat32).data_ptr<float>(), M, K, xu.data(), sx.data());
  auto y = torch::empty({M, N}, torch::dtype(bf16 ? torch::kBFloat16 : torch::kFloat32));
  const uint8_t* xp = xu.data();
  const float* sxp = sx.data();
  const int8_t* wp = packed.data_ptr<int8_t>();
  const float* swp = scales.data_ptr<float>();
  const int32_t* rp = rowsum.data_ptr<int32_t>();
  auto body = [&](auto* yp) {
    using Out = std::remove_pointer_t<decltype(yp)>;
    at::parallel_for(0, N / 16, 1, [&](int64_t begin, int64_t end) {
      for (int64_t g = 0, start = 0; g < G; start = ep[g], ++g)
        if (ep[g] > start)
          expert_band(xp, sxp, wp + g * N * K, swp + g * N, rp + g * N, yp, K, N, start, ep[g] - start, begin, end);
    });
  };
  if (bf16) body(y.data_ptr<at::BFloat16>());
  else body(y.data_ptr<float>());
  return y;
}

// MoE's routed experts in decode, whole, over the (token, expert) pairs sorted by expert (token [M], ends [G],
// weight [M] float32, as the router's `route_experts` gives them): y[token[m]] += weight[m] · down(silu(gate(x)) ·
// up(x)) at x = x[token[m]], every expert's gate/up [G, 2I/16, H/4, 16, 4] and down [G, H/16, I/4, 16, 4] packed as
// `int8_pack` packs one weight, with their scales and row sums [G, 2I] and [G, H]. Around `grouped_int8_matmul` this
// was a gather, two calls, a split, SwiGLU with two copies and the weighted sum: seven ops a layer, each costing more
// to launch than its work here. In one call: activations quantised per row as `int8_matmul` does them (the gathered
// rows, then the SwiGLU rows), gate, up and SwiGLU in float32 with no rounding between, the weighted sum in float32,
// rounded once to x's dtype. Each thread takes a band of SwiGLU columns (the gate and the up rows that make them),
// then a band of output columns (so that its weighted sums touch only its own columns).
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
  std::vector<uint8_t> xu(M * H), au(M * I);
  std::vector<float> sx(M), sa(M), projected(M * I2), act(M * I), out(M * H);
  for (int64_t m = 0; m < M; ++m) {
    if (bf16) quantise_rows(x.data_ptr<at::BFloat16>() + tp[m] * H, 1, H, xu.data() + m * H, sx.data() + m);
    else quantise_rows(x.data_ptr<float>() + tp[m] * H, 1, H, xu.data() + m * H, sx.data() + m);
  }
  const int8_t* gw = gate_up.data_ptr<int8_t>();
  const float* gs = gate_up_scales.data_ptr<float>();
  const int32_t* gr = gate_up_rowsum.data_ptr<int32_t>();
  at::parallel_for(0, I / 16, 1, [&](int64_t begin, int64_t end) {
    for (int64_t g = 0, start = 0; g < G; start = ep[g], ++g) {
      const int64_t rows = ep[g] - start;
      if (rows <= 0) continue;
      for (const int64_t half : {int64_t{0}, I / 16})  // the gate rows' blocks, then the up rows' blocks
        expert_band(xu.data(), sx.data(), gw + g * I2 * H, gs + g * I2, gr + g * I2, projected.data(), H, I2, start,
                    rows, begin + half, end + half);
      for (int64_t m = start; m < start + rows; ++m)
        for (int64_t c = begin * 16; c < end * 16; c += 16) {
          const __m512 gate = _mm512_loadu_ps(projected.data() + m * I2 + c);
          const __m512 up = _mm512_loadu_ps(projected.data() + m * I2 + I + c);
          _mm512_storeu_ps(act.data() + m * I + c, _mm512_mul_ps(_mm512_mul_ps(gate, simd::sigmoid(gate)), up));
        }
    }
  });
  quantise_rows(act.data(), M, I, au.data(), sa.data());
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
      expert_band(au.data(), sa.data(), dw + g * H * I, ds + g * H, dr + g * H, out.data(), I, H, start, rows, begin,
                  end);
      for (int64_t m = start; m < start + rows; ++m) {
        const __m512 w = _mm512_set1_ps(wp[m]);
        float* row = yp + tp[m] * H;
        for (int64_t c = begin * 16; c < end * 16; c += 16)
          _mm512_storeu_ps(row + c, _mm512_fmadd_ps(_mm512_loadu_ps(out.data() + m * H + c), w, _mm512_loadu_ps(row + c)));
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
  thread_local std::vector<int8_t> xq;  // as int8_matmul's
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
  m.def("int8_matmul", &int8_matmul, "weight-only int8 matmul with per-row int8 activations (AVX-512 VNNI)");
  m.def("int8_pack", &int8_pack, "quantise a float32 [N, K] weight into the int8 kernel's layout, in place");
  m.def("use_amx", &use_amx, "int8_matmul on AMX from 16 rows (default on); returns whether AMX is available");
  m.def("int4_matmul", &int4_matmul, "weight-only int4 matmul with per-group int8 activations (AVX-512 VNNI)");
  m.def("grouped_int8_matmul", &grouped_int8_matmul, "rows of x by group g times group g's int8 weight");
  m.def("int8_experts", &int8_experts, "MoE decode: the int8 experts' SwiGLU over sorted (token, expert) pairs, summed");
}

// The same functions as operators, torch.ops.openseek.int8_matmul and int4_matmul, so that torch.compile keeps a decode step
// that calls it in one graph (a pybind call is opaque to it and splits the graph).
TORCH_LIBRARY_FRAGMENT(openseek, m) {
  m.def("int8_matmul(Tensor x, Tensor packed, Tensor scales, Tensor rowsum) -> Tensor");
  m.def("int4_matmul(Tensor x, Tensor packed) -> Tensor");
  m.def("grouped_int8_matmul(Tensor x, Tensor packed, Tensor scales, Tensor rowsum, Tensor ends) -> Tensor");
  m.def("int8_experts(Tensor x, Tensor token, Tensor ends, Tensor weight, Tensor gate_up, Tensor gate_up_scales, "
        "Tensor gate_up_rowsum, Tensor down, Tensor down_scales, Tensor down_rowsum) -> Tensor");
}
TORCH_LIBRARY_IMPL(openseek, CPU, m) {
  m.impl("int8_matmul", &int8_matmul);
  m.impl("int4_matmul", &int4_matmul);
  m.impl("grouped_int8_matmul", &grouped_int8_matmul);
  m.impl("int8_experts", &int8_experts);
}
