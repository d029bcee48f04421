// Kernels in float32 arithmetic, one section each: decode's matmul, decode's attention over the cache, and the
// training pass's softmaxes, RMSNorm, SwiGLU and rotary embedding (forward and backward).
//
// One source for every instruction-set level: written in simd.h's vector operations, it is compiled once per level
// (kernels/__init__.py's EXTENSIONS): `dense_avx512` with -march=native (16 float lanes; its operators are
// torch.ops.openseek.*) and `dense_avx2` with -march=x86-64-v3 (AVX2 + FMA + F16C, 8 lanes; torch.ops.openseek_avx2.*),
// with the same functions, arguments and results. Where the best code differs by level (bf16 dot products, how many
// accumulators fit in the registers) a small per-level choice sits next to the code it parameterises.
//
// Decode's matmul: y = x · wᵀ for a few rows x [M, K] and a weight w [N, K] in nn.Linear's own layout (no
// packed copy, so the weights are read as they are), in float32 or in bfloat16.
//
// At decode's few rows the matmul is bound by how fast the weight streams in; MKL's float32 sgemm and oneDNN's bf16
// matmul reach a fraction of the bandwidth at those shapes here (benchmarks/RESULTS.md). This kernel reads each
// weight row once: a tile of NB weight rows is multiplied against R activation rows with R·NB accumulators held in
// registers (one vector of float lanes each), summed horizontally once at the end. In bf16 on AVX-512, `vdpbf16ps`
// multiplies 32 bf16 pairs and accumulates in float32 (as oneDNN's bf16 matmul does); on AVX2, which has no bf16
// dot product, the bf16 values are widened to float32 (a shift or a mask of 16 bits: exact) and fused-multiply-added,
// still bound by the weights' bandwidth at decode's rows. Either way each result is rounded to bf16 once; in float32 it is
// fused multiply-adds. At more rows the activations are re-read per weight vector and compute wins over bandwidth:
// callers keep PyTorch's kernels there.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cmath>
#include <type_traits>
#include <utility>
#include <vector>

#include "kernel_checks.h"
#include "simd.h"

#if defined(OPENSEEK_SIMD_AVX512) && !defined(__AVX512BF16__)
#error "the AVX-512 level of dense.cpp needs AVX512-BF16 (vdpbf16ps); CPUs without it build the AVX2 level"
#endif

namespace {

using simd::Vec;
using simd::bf16;
constexpr int64_t L = simd::kLanes;

constexpr int64_t kMaxRows = 8;  // activation rows per pass over a weight tile

#if defined(OPENSEEK_SIMD_AVX512)
struct Bf16 {  // 32 bf16 pairs per vdpbf16ps
  using T = bf16;  // the weights and the result
  using X = bf16;  // the activations as the tiles read them
  static torch::Tensor activations(const torch::Tensor& x) { return x; }
  static constexpr int64_t kStep = 32;
  using Tail = __mmask32;
  static Vec mac(Vec acc, const bf16* x, const bf16* w) {
    return _mm512_dpbf16_ps(acc, reinterpret_cast<__m512bh>(_mm512_loadu_si512(x)),
                            reinterpret_cast<__m512bh>(_mm512_loadu_si512(w)));
  }
  static Vec mac(Vec acc, const bf16* x, const bf16* w, Tail mask) {
    const __m512i xv = _mm512_maskz_loadu_epi16(mask, x), wv = _mm512_maskz_loadu_epi16(mask, w);
    return _mm512_dpbf16_ps(acc, reinterpret_cast<__m512bh>(xv), reinterpret_cast<__m512bh>(wv));
  }
  static Tail tail(int64_t left) { return static_cast<Tail>((1ull << left) - 1); }
  static void store(bf16* y, float v) { *y = bf16(v); }  // round to nearest even
};
#else
// AVX2 has no bf16 dot product: the weights are widened to float32 (exact) and multiply-added. A 32-bit lane holding
// two bf16 weights is two floats without any shuffle: shifted left by 16 it is the even one, masked to its high half
// the odd one. So 16 weights cost one load, a shift, an AND and two FMAs, against the activations arranged to match:
// widened to float32 once per call (x is a few rows), each block of 16 as its 8 even then its 8 odd elements; a
// tail shorter than 16 stays in order. (Widening with vpmovzxwd instead, 8 weights at a time, held one thread to
// 17 GB/s on Zen 5, against 24 GB/s for float32.)
struct Bf16 {
  using T = bf16;
  using X = float;
  static constexpr int64_t kStep = 16;
  static torch::Tensor activations(const torch::Tensor& x) {
    const int64_t M = x.size(0), K = x.size(1), full = K / kStep * kStep;
    auto out = torch::empty({M, K}, x.options().dtype(torch::kFloat));
    const bf16* src = x.data_ptr<bf16>();
    float* dst = out.data_ptr<float>();
    for (int64_t r = 0; r < M; ++r, src += K, dst += K) {
      for (int64_t k = 0; k < full; k += kStep)
        for (int64_t i = 0; i < kStep / 2; ++i) {
          dst[k + i] = static_cast<float>(src[k + 2 * i]);
          dst[k + kStep / 2 + i] = static_cast<float>(src[k + 2 * i + 1]);
        }
      for (int64_t k = full; k < K; ++k) dst[k] = static_cast<float>(src[k]);
    }
    return out;
  }
  static Vec mac(Vec acc, const float* x, const bf16* w) {
    const __m256i pairs = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w));
    const Vec even = _mm256_castsi256_ps(_mm256_slli_epi32(pairs, 16));
    const Vec odd = _mm256_castsi256_ps(_mm256_and_si256(pairs, _mm256_set1_epi32(static_cast<int>(0xFFFF0000u))));
    return simd::fmadd(simd::load(x + L), odd, simd::fmadd(simd::load(x), even, acc));
  }
  struct Tail {
    int64_t left;  // < kStep elements, in order
  };
  static Tail tail(int64_t left) { return {left}; }
  static Vec mac(Vec acc, const float* x, const bf16* w, Tail t) {
    if (t.left >= L) {
      acc = simd::fmadd(simd::load(x), simd::load(w), acc);
      x += L, w += L, t.left -= L;
    }
    if (t.left > 0) {
      const auto lanes = simd::tail(t.left);
      acc = simd::fmadd(simd::load(x, lanes), simd::load(w, lanes), acc);
    }
    return acc;
  }
  static void store(bf16* y, float v) { *y = bf16(v); }
};
#endif

struct Fp32 {
  using T = float;
  using X = float;
  static torch::Tensor activations(const torch::Tensor& x) { return x; }
  static constexpr int64_t kStep = L;
  using Tail = simd::Tail;
  static Vec mac(Vec acc, const float* x, const float* w) { return simd::fmadd(simd::load(x), simd::load(w), acc); }
  static Vec mac(Vec acc, const float* x, const float* w, Tail t) {
    return simd::fmadd(simd::load(x, t), simd::load(w, t), acc);
  }
  static Tail tail(int64_t left) { return simd::tail(left); }
  static void store(float* y, float v) { *y = v; }
};

// y[r, j] = Σ_k x[r, k] · w[j, k] for r < R, j < NB.
template <typename Kind, int R, int NB>
void tile(const typename Kind::X* x, const typename Kind::T* w, typename Kind::T* y, int64_t K, int64_t N) {
  constexpr int64_t S = Kind::kStep;
  // every loop over r and j unrolled, so that each accumulator is a register (with them left rolled, GCC kept the
  // array in memory and stored every accumulator after each multiply-add: 8 rows ran at 2/3 of the speed)
  Vec acc[R][NB];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
    for (int j = 0; j < NB; ++j) acc[r][j] = simd::zero();
  int64_t k = 0;
  for (; k + S <= K; k += S)
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
      for (int j = 0; j < NB; ++j) acc[r][j] = Kind::mac(acc[r][j], x + r * K + k, w + j * K + k);
  if (k < K) {
    const auto mask = Kind::tail(K - k);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
      for (int j = 0; j < NB; ++j) acc[r][j] = Kind::mac(acc[r][j], x + r * K + k, w + j * K + k, mask);
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
    for (int j = 0; j < NB; ++j) Kind::store(y + r * N + j, simd::hsum(acc[r][j]));
}

// Output rows per tile, chosen so that the R·NB accumulators and the vectors they are fed from fit in the vector
// registers: 32 on AVX-512, 16 on AVX2.
constexpr int tile_width(int64_t R) {
  return L == 16 ? (R <= 2 ? 8 : R <= 4 ? 4 : 2) : (R == 1 ? 8 : R <= 2 ? 4 : R <= 4 ? 2 : 1);
}

// Rows [0, R) of x against weight rows [0, NB) of w, for R known only at run time.
template <typename Kind, int NB>
void tile_rows(int64_t R, const typename Kind::X* x, const typename Kind::T* w, typename Kind::T* y, int64_t K,
               int64_t N) {
  switch (R) {
    case 1: return tile<Kind, 1, NB>(x, w, y, K, N);
    case 2: return tile<Kind, 2, NB>(x, w, y, K, N);
    case 3: return tile<Kind, 3, NB>(x, w, y, K, N);
    case 4: return tile<Kind, 4, NB>(x, w, y, K, N);
    case 5: return tile<Kind, 5, NB>(x, w, y, K, N);
    case 6: return tile<Kind, 6, NB>(x, w, y, K, N);
    case 7: return tile<Kind, 7, NB>(x, w, y, K, N);
    default: return tile<Kind, 8, NB>(x, w, y, K, N);
  }
}

// Weight rows [begin, end) against every activation row: each tile of NB weight rows is read from memory once and
// multiplied by the activation rows kMaxRows at a time (a second pass finds the tile in cache).
template <typename Kind, int NB>
void band(const typename Kind::X* x, const typename Kind::T* w, typename Kind::T* y, int64_t M, int64_t K, int64_t N,
          int64_t begin, int64_t end) {
  int64_t n = begin;
  for (; n + NB <= end; n += NB)
    for (int64_t m0 = 0; m0 < M; m0 += kMaxRows)
      tile_rows<Kind, NB>(std::min(kMaxRows, M - m0), x + m0 * K, w + n * K, y + m0 * N + n, K, N);
  for (; n < end; ++n)
    for (int64_t m0 = 0; m0 < M; m0 += kMaxRows)
      tile_rows<Kind, 1>(std::min(kMaxRows, M - m0), x + m0 * K, w + n * K, y + m0 * N + n, K, N);
}

// band with the tile width for M rows
template <typename Kind>
void band_for(const typename Kind::X* x, const typename Kind::T* w, typename Kind::T* y, int64_t M, int64_t K,
              int64_t N, int64_t begin, int64_t end) {
  switch (tile_width(std::min(kMaxRows, M))) {
    case 8: return band<Kind, 8>(x, w, y, M, K, N, begin, end);
    case 4: return band<Kind, 4>(x, w, y, M, K, N, begin, end);
    case 2: return band<Kind, 2>(x, w, y, M, K, N, begin, end);
    default: return band<Kind, 1>(x, w, y, M, K, N, begin, end);
  }
}

// x and w both of the kernel's dtype (the AVX2 level widens bf16 activations first, and must not widen others)
template <typename T>
void check_dtypes(const torch::Tensor& x, const torch::Tensor& w) {
  const auto dtype = c10::CppTypeToScalarType<T>::value;
  TORCH_CHECK(x.scalar_type() == dtype && w.scalar_type() == dtype, "x and w must both be ", c10::toString(dtype),
              ", got ", x.scalar_type(), " and ", w.scalar_type());
}

template <typename Kind>
torch::Tensor linear(const torch::Tensor& x, const torch::Tensor& w) {
  using T = typename Kind::T;
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1), "x [M, K] and w [N, K] expected");
  TORCH_CHECK(x.is_contiguous() && w.is_contiguous(), "x and w must be contiguous");
  check_dtypes<T>(x, w);
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  auto y = torch::empty({M, N}, x.options());
  const auto xs = Kind::activations(x);
  const typename Kind::X* xp = xs.template data_ptr<typename Kind::X>();
  const T* wp = w.data_ptr<T>();
  T* yp = y.data_ptr<T>();
  // each thread takes a contiguous band of weight rows (multiples of 16)
  at::parallel_for(0, (N + 15) / 16, 1, [&](int64_t first, int64_t last) {
    band_for<Kind>(xp, wp, yp, M, K, N, first * 16, std::min(N, last * 16));
  });
  return y;
}

// Grouped: rows [ends[g-1], ends[g]) of x (sorted by group) times w[g] [N, K], for every group g with rows — MoE's
// routed experts in decode, one call per projection instead of one per busy expert. One parallel region: each thread
// takes the same band of output columns in every group.
template <typename Kind>
torch::Tensor grouped_linear(const torch::Tensor& x, const torch::Tensor& w, const torch::Tensor& ends) {
  using T = typename Kind::T;
  TORCH_CHECK(x.dim() == 2 && w.dim() == 3 && x.size(1) == w.size(2), "x [M, K] and w [G, N, K] expected");
  TORCH_CHECK(x.is_contiguous() && w.is_contiguous(), "x and w must be contiguous");
  check_dtypes<T>(x, w);
  TORCH_CHECK(ends.dim() == 1 && ends.size(0) == w.size(0) && ends.scalar_type() == torch::kLong,
              "ends must be [G] int64 (cumulative row counts)");
  const int64_t M = x.size(0), K = x.size(1), G = w.size(0), N = w.size(1);
  auto ends_c = ends.contiguous();
  const int64_t* ep = ends_c.data_ptr<int64_t>();
  check_group_ends(ep, G, M, "rows of x");
  auto y = torch::empty({M, N}, x.options());
  const auto xs = Kind::activations(x);
  const typename Kind::X* xp = xs.template data_ptr<typename Kind::X>();
  const T* wp = w.data_ptr<T>();
  T* yp = y.data_ptr<T>();
  at::parallel_for(0, (N + 15) / 16, 1, [&](int64_t first, int64_t last) {
    const int64_t begin = first * 16, end = std::min(N, last * 16);
    for (int64_t g = 0, start = 0; g < G; start = ep[g], ++g) {
      const int64_t rows = ep[g] - start;
      if (rows <= 0) continue;
      band_for<Kind>(xp + start * K, wp + g * N * K, yp + start * N, rows, K, N, begin, end);
    }
  });
  return y;
}


// ---- Decode's attention over the cache ----
// out[b, t, h·D + d] = Σ_s p_s · v[b, h / group, s, d], p = softmax over the slots s the mask allows of
// scale · q[b, h, t] · k[b, h / group, s]: grouped-query attention for a few new tokens per row against the keys and
// values cached so far. Written out in PyTorch it was a third of a 16-row decode step (two batched matmuls, a softmax,
// a mask, and the conversion of the whole bf16 cache to float32 in every layer); here each (row, key head) is one
// task that reads its keys and values once for all the query heads sharing them, in float32 arithmetic whatever q and
// the cache hold. Tasks are split among threads whole, so a result does not depend on the thread count.
using simd::load;
using simd::store;

// scores[r, s] = scale · q[r] · k[s] for R query rows (float32, [R, D]) against keys s < S: each key is read and
// converted once for all R rows.
template <int R, typename CT>
void score_rows(const float* q, const CT* k, int64_t k_s, int64_t S, int64_t D, float scale, float* scores) {
  for (int64_t s = 0; s < S; ++s) {
    Vec dot[R];
    for (int r = 0; r < R; ++r) dot[r] = simd::zero();
    for (int64_t d = 0; d < D; d += L) {
      const Vec key = load(k + s * k_s + d);
      for (int r = 0; r < R; ++r) dot[r] = simd::fmadd(load(q + r * D + d), key, dot[r]);
    }
    for (int r = 0; r < R; ++r) scores[r * S + s] = simd::hsum(dot[r]) * scale;
  }
}

// out[r, d0 : d0 + L·J] = Σ_s p[r, s] · v[s, d0 : d0 + L·J] for R rows: each value vector is read once for
// all rows.
template <int R, int J, typename CT>
void weigh_rows(const float* p, const CT* v, int64_t v_s, int64_t S, int64_t d0, float* out, int64_t D) {
  Vec acc[R][J];
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < J; ++j) acc[r][j] = simd::zero();
  for (int64_t s = 0; s < S; ++s) {
    Vec value[J];
    for (int j = 0; j < J; ++j) value[j] = load(v + s * v_s + d0 + L * j);
    for (int r = 0; r < R; ++r) {
      const Vec weight = simd::set1(p[r * S + s]);
      for (int j = 0; j < J; ++j) acc[r][j] = simd::fmadd(weight, value[j], acc[r][j]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < J; ++j) store(out + r * D + d0 + L * j, acc[r][j]);
}

// value vectors per weigh_rows pass: kQueryRows·J accumulators and J values in the registers (32 on AVX-512, 16 on
// AVX2)
constexpr int kWeighVectors = L == 16 ? 4 : 2;

// the last columns, fewer than kWeighVectors vectors: J of them or fewer
template <int R, int J, typename CT>
void weigh_rest(const float* p, const CT* v, int64_t v_s, int64_t S, int64_t d0, float* out, int64_t D) {
  if constexpr (J > 0) {
    if ((D - d0) / L == J) return weigh_rows<R, J>(p, v, v_s, S, d0, out, D);
    weigh_rest<R, J - 1>(p, v, v_s, S, d0, out, D);
  }
}

template <int R, typename CT>
void weigh_all(const float* p, const CT* v, int64_t v_s, int64_t S, float* out, int64_t D) {
  int64_t d0 = 0;
  for (; d0 + kWeighVectors * L <= D; d0 += kWeighVectors * L) weigh_rows<R, kWeighVectors>(p, v, v_s, S, d0, out, D);
  weigh_rest<R, kWeighVectors - 1>(p, v, v_s, S, d0, out, D);
}

// softmax of each row's scores over the slots its mask allows, in place (0 where it does not)
inline void softmax_rows(float* scores, const bool* const* allowed, int R, int64_t S) {
  const Vec minus_inf = simd::set1(-INFINITY);
  for (int r = 0; r < R; ++r) {
    float* row = scores + r * S;
    float top = -INFINITY;
    for (int64_t s = 0; s < S; ++s) {
      if (!allowed[r][s]) row[s] = -INFINITY;
      top = std::max(top, row[s]);
    }
    Vec total = simd::zero();
    const Vec shift = simd::set1(top);
    for (int64_t s = 0; s < S; s += L) {
      const auto lanes = simd::tail(S - s);
      const Vec x = simd::select(simd::mask_of(lanes), load(row + s, lanes), minus_inf);
      const Vec e = simd::zero_unless(simd::not_equal(x, minus_inf), simd::exp(simd::sub(x, shift)));
      store(row + s, e, lanes);
      total = simd::add(total, e);
    }
    const Vec inverse = simd::set1(1.f / simd::hsum(total));
    for (int64_t s = 0; s < S; s += L) {
      const auto lanes = simd::tail(S - s);
      store(row + s, simd::mul(load(row + s, lanes), inverse), lanes);
    }
  }
}

constexpr int kQueryRows = 4;  // query rows per pass over the keys and values: accumulators in registers

// One (row, key head): its group·T query rows (head h, token t) against the head's keys and values, kQueryRows at a
// time. q_rows: the rows as float32 [R, D]; the rest of the buffers are scratch of the calling thread.
template <typename QT, typename CT>
void attend_task(const QT* q, const CT* k, const CT* v, const bool* mask, QT* out, int64_t group, int64_t T,
                 int64_t S, int64_t D, float scale, int64_t q_head, int64_t q_t, int64_t k_s, int64_t v_s,
                 int64_t mask_t, int64_t out_t, std::vector<float>& q_rows, std::vector<float>& scores,
                 std::vector<float>& results) {
  for (int64_t first = 0; first < group * T; first += kQueryRows) {
    const int R = static_cast<int>(std::min<int64_t>(kQueryRows, group * T - first));
    const bool* allowed[kQueryRows];
    for (int r = 0; r < R; ++r) {
      const int64_t h = (first + r) / T, t = (first + r) % T;
      for (int64_t d = 0; d < D; d += L) store(q_rows.data() + r * D + d, load(q + h * q_head + t * q_t + d));
      allowed[r] = mask + t * mask_t;
    }
    switch (R) {
      case 1: score_rows<1>(q_rows.data(), k, k_s, S, D, scale, scores.data()); break;
      case 2: score_rows<2>(q_rows.data(), k, k_s, S, D, scale, scores.data()); break;
      case 3: score_rows<3>(q_rows.data(), k, k_s, S, D, scale, scores.data()); break;
      default: score_rows<4>(q_rows.data(), k, k_s, S, D, scale, scores.data()); break;
    }
    softmax_rows(scores.data(), allowed, R, S);
    switch (R) {
      case 1: weigh_all<1>(scores.data(), v, v_s, S, results.data(), D); break;
      case 2: weigh_all<2>(scores.data(), v, v_s, S, results.data(), D); break;
      case 3: weigh_all<3>(scores.data(), v, v_s, S, results.data(), D); break;
      default: weigh_all<4>(scores.data(), v, v_s, S, results.data(), D); break;
    }
    for (int r = 0; r < R; ++r) {
      const int64_t h = (first + r) / T, t = (first + r) % T;
      for (int64_t d = 0; d < D; d += L) store(out + t * out_t + h * D + d, load(results.data() + r * D + d));
    }
  }
}

template <typename QT, typename CT>
void attend_all(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v, const torch::Tensor& mask,
                torch::Tensor& out, float scale) {
  const int64_t B = q.size(0), H = q.size(1), T = q.size(2), D = q.size(3), KV = k.size(1), S = k.size(2);
  const int64_t group = H / KV;
  const QT* qp = q.data_ptr<QT>();
  const CT* kp = k.data_ptr<CT>();
  const CT* vp = v.data_ptr<CT>();
  const bool* mp = mask.data_ptr<bool>();
  QT* op = out.data_ptr<QT>();
  at::parallel_for(0, B * KV, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> q_rows(kQueryRows * D), scores(kQueryRows * S), results(kQueryRows * D);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / KV, g = task % KV;
      attend_task<QT, CT>(qp + b * q.stride(0) + g * group * q.stride(1), kp + b * k.stride(0) + g * k.stride(1),
                          vp + b * v.stride(0) + g * v.stride(1), mp + b * mask.stride(0),
                          op + b * T * H * D + g * group * D, group, T, S, D, scale, q.stride(1), q.stride(2),
                          k.stride(2), v.stride(2), mask.stride(2), H * D, q_rows, scores, results);
    }
  });
}

// q [B, H, T, D], k and v [B, KV, S, D] (strided, as sliced from the cache; the last dimension contiguous),
// mask [B, 1, T, S] bool (True = may attend) -> [B, T, H·D] in q's dtype.
torch::Tensor attend_cache(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                           const torch::Tensor& mask, double scale) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.sizes() == k.sizes() && mask.dim() == 4, "q [B, H, T, D], k and v "
              "[B, KV, S, D], mask [B, 1, T, S] expected");
  const int64_t B = q.size(0), H = q.size(1), T = q.size(2), D = q.size(3), KV = k.size(1), S = k.size(2);
  TORCH_CHECK(k.size(0) == B && k.size(3) == D && KV > 0 && H % KV == 0 && D % 16 == 0,
              "k/v do not match q, or the head size is not a multiple of 16");
  TORCH_CHECK(mask.scalar_type() == torch::kBool && mask.size(0) == B && mask.size(2) == T && mask.size(3) == S &&
              mask.stride(3) == 1, "mask must be [B, 1, T, S] bool, contiguous in its last dimension");
  TORCH_CHECK(q.stride(3) == 1 && k.stride(3) == 1 && v.stride(3) == 1 && k.scalar_type() == v.scalar_type(),
              "q, k, v must be contiguous in their last dimension; k and v of one dtype");
  auto out = torch::empty({B, T, H * D}, q.options());
  const bool q_bf16 = q.scalar_type() == torch::kBFloat16, c_bf16 = k.scalar_type() == torch::kBFloat16;
  TORCH_CHECK((q_bf16 || q.scalar_type() == torch::kFloat) && (c_bf16 || k.scalar_type() == torch::kFloat),
              "q and the cache must be float32 or bfloat16");
  const float s = static_cast<float>(scale);
  if (q_bf16 && c_bf16) attend_all<at::BFloat16, at::BFloat16>(q, k, v, mask, out, s);
  else if (q_bf16) attend_all<at::BFloat16, float>(q, k, v, mask, out, s);
  else if (c_bf16) attend_all<float, at::BFloat16>(q, k, v, mask, out, s);
  else attend_all<float, float>(q, k, v, mask, out, s);
  return out;
}


// ---- MLA's absorbed decode over the latent cache ----
// With kv_b_proj viewed per head h as w[h] = [W_UK (nope rows) | W_UV (v rows)], each [·, r]: the query's latent part
// is q_nope · W_UK, every head attends over the one cached [latent | rope key] per slot, and the head's output is
// W_UV · (P · latent). Written out in PyTorch that was some twenty small ops a layer (four batched matmuls, casts of
// the weight and the whole cache to float32, transposes), a quarter of a deepseek_v3 decode step at batch 8
// (benchmarks/RESULTS.md, round 12); here each batch row is one task that reads its cached slots once for all heads,
// in float32 arithmetic whatever the weights and cache hold.
template <typename QT, typename CT>
void attend_latent_row(const QT* q_nope, const float* q_pe, const CT* kv, const bool* mask, const QT* w, QT* out,
                       int64_t H, int64_t T, int64_t S, int64_t nope, int64_t rope, int64_t r, int64_t v_dim,
                       int64_t qn_h, int64_t qn_t, int64_t qp_h, int64_t qp_t, int64_t kv_s, int64_t mask_t,
                       float scale, std::vector<float>& q_rows, std::vector<float>& scores,
                       std::vector<float>& results) {
  const int64_t D = r + rope, w_h = (nope + v_dim) * r;
  for (int64_t first = 0; first < H * T; first += kQueryRows) {
    const int R = static_cast<int>(std::min<int64_t>(kQueryRows, H * T - first));
    const bool* allowed[kQueryRows];
    for (int i = 0; i < R; ++i) {
      const int64_t h = (first + i) / T, t = (first + i) % T;
      float* row = q_rows.data() + i * D;
      for (int64_t c = 0; c < r; c += L) store(row + c, simd::zero());
      for (int64_t n = 0; n < nope; ++n) {  // row[:r] = Σ_n q_nope[n] · W_UK[n, :]
        const Vec qn = simd::set1(static_cast<float>(q_nope[h * qn_h + t * qn_t + n]));
        const QT* wn = w + h * w_h + n * r;
        for (int64_t c = 0; c < r; c += L) store(row + c, simd::fmadd(qn, load(wn + c), load(row + c)));
      }
      for (int64_t d = 0; d < rope; d += L) store(row + r + d, load(q_pe + h * qp_h + t * qp_t + d));
      allowed[i] = mask + t * mask_t;
    }
    switch (R) {
      case 1: score_rows<1>(q_rows.data(), kv, kv_s, S, D, scale, scores.data()); break;
      case 2: score_rows<2>(q_rows.data(), kv, kv_s, S, D, scale, scores.data()); break;
      case 3: score_rows<3>(q_rows.data(), kv, kv_s, S, D, scale, scores.data()); break;
      default: score_rows<4>(q_rows.data(), kv, kv_s, S, D, scale, scores.data()); break;
    }
    softmax_rows(scores.data(), allowed, R, S);
    switch (R) {  // the values are the latents: the first r columns of each slot
      case 1: weigh_all<1>(scores.data(), kv, kv_s, S, results.data(), r); break;
      case 2: weigh_all<2>(scores.data(), kv, kv_s, S, results.data(), r); break;
      case 3: weigh_all<3>(scores.data(), kv, kv_s, S, results.data(), r); break;
      default: weigh_all<4>(scores.data(), kv, kv_s, S, results.data(), r); break;
    }
    for (int i = 0; i < R; ++i) {  // out[t, h·v + j] = W_UV[j, :] · (P · latent)
      const int64_t h = (first + i) / T, t = (first + i) % T;
      const float* latent = results.data() + i * r;
      for (int64_t j = 0; j < v_dim; ++j) {
        const QT* wj = w + h * w_h + (nope + j) * r;
        Vec dot = simd::zero();
        for (int64_t c = 0; c < r; c += L) dot = simd::fmadd(load(latent + c), load(wj + c), dot);
        out[t * H * v_dim + h * v_dim + j] = static_cast<QT>(simd::hsum(dot));
      }
    }
  }
}

template <typename QT, typename CT>
void attend_latent_all(const torch::Tensor& q_nope, const torch::Tensor& q_pe, const torch::Tensor& kv,
                       const torch::Tensor& mask, const torch::Tensor& w, torch::Tensor& out, float scale) {
  const int64_t B = q_nope.size(0), H = q_nope.size(1), T = q_nope.size(2), nope = q_nope.size(3);
  const int64_t rope = q_pe.size(3), S = kv.size(2), r = kv.size(3) - rope, v_dim = w.size(0) / H - nope;
  const QT* qn = q_nope.data_ptr<QT>();
  const float* qp = q_pe.data_ptr<float>();
  const CT* kvp = kv.data_ptr<CT>();
  const bool* mp = mask.data_ptr<bool>();
  const QT* wp = w.data_ptr<QT>();
  QT* op = out.data_ptr<QT>();
  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> q_rows(kQueryRows * (r + rope)), scores(kQueryRows * S), results(kQueryRows * r);
    for (int64_t b = begin; b < end; ++b)
      attend_latent_row<QT, CT>(qn + b * q_nope.stride(0), qp + b * q_pe.stride(0), kvp + b * kv.stride(0),
                                mp + b * mask.stride(0), wp, op + b * T * H * v_dim, H, T, S, nope, rope, r, v_dim,
                                q_nope.stride(1), q_nope.stride(2), q_pe.stride(1), q_pe.stride(2), kv.stride(2),
                                mask.stride(2), scale, q_rows, scores, results);
  });
}

// q_nope [B, H, T, nope] and q_pe [B, H, T, rope] float32 (strided, last dimension contiguous), kv [B, 1, S, r + rope] (the
// cache: normalised latent, then rotated rope key), mask [B, 1, T, S] bool, w = kv_b_proj's weight [H·(nope + v), r]
// in q's dtype -> [B, T, H·v] in q's dtype.
torch::Tensor attend_latent(const torch::Tensor& q_nope, const torch::Tensor& q_pe, const torch::Tensor& kv,
                            const torch::Tensor& mask, const torch::Tensor& w, double scale) {
  TORCH_CHECK(q_nope.dim() == 4 && q_pe.dim() == 4 && kv.dim() == 4 && mask.dim() == 4 && w.dim() == 2,
              "q_nope, q_pe [B, H, T, ·], kv [B, 1, S, r + rope], mask [B, 1, T, S], w [H·(nope + v), r] expected");
  const int64_t B = q_nope.size(0), H = q_nope.size(1), T = q_nope.size(2), nope = q_nope.size(3);
  const int64_t rope = q_pe.size(3), S = kv.size(2), r = kv.size(3) - rope;
  TORCH_CHECK(q_pe.size(0) == B && q_pe.size(1) == H && q_pe.size(2) == T && kv.size(0) == B && kv.size(1) == 1 &&
              r > 0 && r % 16 == 0 && rope % 16 == 0 && w.size(1) == r && w.size(0) % H == 0 && w.size(0) / H > nope,
              "q_nope, q_pe, kv and w do not match, or the latent or rope width is not a multiple of 16");
  TORCH_CHECK(mask.scalar_type() == torch::kBool && mask.size(0) == B && mask.size(2) == T && mask.size(3) == S &&
              mask.stride(3) == 1, "mask must be [B, 1, T, S] bool, contiguous in its last dimension");
  TORCH_CHECK(q_nope.stride(3) == 1 && q_pe.stride(3) == 1 && kv.stride(3) == 1 && w.is_contiguous(),
              "q_nope, q_pe, kv must be contiguous in their last dimension, w contiguous");
  const bool q_bf16 = q_nope.scalar_type() == torch::kBFloat16, c_bf16 = kv.scalar_type() == torch::kBFloat16;
  TORCH_CHECK(q_pe.scalar_type() == torch::kFloat && w.scalar_type() == q_nope.scalar_type() &&
              (q_bf16 || q_nope.scalar_type() == torch::kFloat) && (c_bf16 || kv.scalar_type() == torch::kFloat),
              "q_nope and w must share one dtype, float32 or bfloat16; q_pe float32; the cache float32 or bfloat16");
  auto out = torch::empty({B, T, H * (w.size(0) / H - nope)}, q_nope.options());
  const float s = static_cast<float>(scale);
  if (q_bf16 && c_bf16) attend_latent_all<at::BFloat16, at::BFloat16>(q_nope, q_pe, kv, mask, w, out, s);
  else if (q_bf16) attend_latent_all<at::BFloat16, float>(q_nope, q_pe, kv, mask, w, out, s);
  else if (c_bf16) attend_latent_all<float, at::BFloat16>(q_nope, q_pe, kv, mask, w, out, s);
  else attend_latent_all<float, float>(q_nope, q_pe, kv, mask, w, out, s);
  return out;
}

// ---- MoE routing and combining in decode ----
// DeepSeekMoE's router and the dispatch that sorts the chosen (token, expert) pairs by expert: in PyTorch some twenty
// small ops a layer (the scores' matmul and sigmoid, group scores, two top-ks, masks, gathers, a sort, counts), each
// costing more to launch than its few hundred values take to compute; at decode's batch of 8 they and the combine
// below were a fifth of a deepseek_v3 step (benchmarks/RESULTS.md, round 12). The arithmetic is the router's in
// float32: score = sigmoid(x · w), choice = score + bias picks the experts (within the topk_group groups whose two
// best choices sum highest, when n_group > 1), their scores are the weights, normalised to sum 1 if asked, times
// `scaling`. Ties go to the lower index. `always_on` experts after the E routed ones (a shared expert folded into
// the stack) take every token with weight 1.
template <typename T>
void router_scores(const T* x, const float* w, float* scores, int64_t N, int64_t E, int64_t H) {
  for (int64_t n = 0; n < N; ++n)
    for (int64_t e = 0; e < E; ++e) {
      Vec dot = simd::zero();
      for (int64_t c = 0; c < H; c += L) dot = simd::fmadd(load(x + n * H + c), load(w + e * H + c), dot);
      scores[n * E + e] = 1.f / (1.f + std::exp(-simd::hsum(dot)));
    }
}

// x [N, H] float32 or bfloat16 (H a multiple of 16), w [E, H] and bias [E] float32 -> token [N·(k + always_on)],
// ends [E + always_on] (cumulative counts), weight [N·(k + always_on)] float32, sorted by expert.
std::vector<torch::Tensor> route_experts(const torch::Tensor& x, const torch::Tensor& w, const torch::Tensor& bias,
                                         int64_t top_k, int64_t n_group, int64_t topk_group, bool normalise,
                                         double scaling, int64_t always_on) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.size(1) % 16 == 0 &&
              (x.scalar_type() == torch::kFloat || x.scalar_type() == torch::kBFloat16),
              "x must be a contiguous [N, H] float32 or bfloat16 tensor, H a multiple of 16");
  TORCH_CHECK(w.dim() == 2 && w.size(1) == x.size(1) && w.scalar_type() == torch::kFloat && w.is_contiguous(),
              "the router weight must be [E, H] float32");
  const int64_t N = x.size(0), E = w.size(0), H = x.size(1);
  TORCH_CHECK(bias.numel() == E && bias.scalar_type() == torch::kFloat && bias.is_contiguous(),
              "bias must be [E] float32");
  TORCH_CHECK(n_group >= 1 && E % n_group == 0 && topk_group >= 1 && topk_group <= n_group && top_k >= 1 &&
              top_k <= topk_group * (E / n_group) && (n_group == 1 || E / n_group >= 2),
              "top_k, n_group and topk_group do not fit ", E, " experts");
  std::vector<float> scores(N * E);
  if (x.scalar_type() == torch::kBFloat16) router_scores(x.data_ptr<at::BFloat16>(), w.data_ptr<float>(), scores.data(), N, E, H);
  else router_scores(x.data_ptr<float>(), w.data_ptr<float>(), scores.data(), N, E, H);
  const float* sp = scores.data();
  const float* bp = bias.data_ptr<float>();
  TORCH_CHECK(always_on >= 0, "always_on must be >= 0");
  std::vector<int64_t> ids(N * top_k), count(E + always_on, 0);
  std::vector<float> weights(N * top_k), choice(E);
  std::vector<char> allowed(E);
  const int64_t per_group = E / n_group;
  for (int64_t n = 0; n < N; ++n) {
    const float* row = sp + n * E;
    for (int64_t e = 0; e < E; ++e) choice[e] = row[e] + bp[e];
    std::fill(allowed.begin(), allowed.end(), n_group == 1);
    if (n_group > 1) {
      std::vector<float> group_score(n_group);
      for (int64_t g = 0; g < n_group; ++g) {
        float first = -INFINITY, second = -INFINITY;
        for (int64_t e = g * per_group; e < (g + 1) * per_group; ++e) {
          if (choice[e] > first) second = first, first = choice[e];
          else if (choice[e] > second) second = choice[e];
        }
        group_score[g] = first + second;
      }
      std::vector<char> kept(n_group, 0);
      for (int64_t i = 0; i < topk_group; ++i) {
        int64_t best = -1;
        for (int64_t g = 0; g < n_group; ++g)
          if (!kept[g] && (best < 0 || group_score[g] > group_score[best])) best = g;
        kept[best] = 1;
        std::fill(allowed.begin() + best * per_group, allowed.begin() + (best + 1) * per_group, 1);
      }
    }
    float total = 0.f;
    for (int64_t i = 0; i < top_k; ++i) {  // in order of choice, as topk returns them
      int64_t best = -1;
      for (int64_t e = 0; e < E; ++e)
        if (allowed[e] && (best < 0 || choice[e] > choice[best])) best = e;
      allowed[best] = 0;
      ids[n * top_k + i] = best;
      weights[n * top_k + i] = row[best];
      total += row[best];
      ++count[best];
    }
    for (int64_t i = 0; normalise && i < top_k; ++i) weights[n * top_k + i] /= total + 1e-20f;
    for (int64_t i = 0; i < top_k; ++i) weights[n * top_k + i] *= static_cast<float>(scaling);
  }
  for (int64_t j = 0; j < always_on; ++j) count[E + j] = N;
  // (token, weight) pairs sorted by expert, tokens in order within an expert; ends: cumulative counts per expert
  const int64_t pairs = N * (top_k + always_on);
  auto token = torch::empty({pairs}, torch::kLong);
  auto ends = torch::empty({E + always_on}, torch::kLong);
  auto sorted_weights = torch::empty({pairs}, torch::kFloat);
  int64_t* tp = token.data_ptr<int64_t>();
  int64_t* ep = ends.data_ptr<int64_t>();
  float* wp = sorted_weights.data_ptr<float>();
  std::vector<int64_t> next(E + always_on);
  for (int64_t e = 0, start = 0; e < E + always_on; ++e) next[e] = start, start += count[e], ep[e] = start;
  for (int64_t n = 0; n < N; ++n)
    for (int64_t i = 0; i < top_k; ++i) {
      const int64_t at = next[ids[n * top_k + i]]++;
      tp[at] = n;
      wp[at] = weights[n * top_k + i];
    }
  for (int64_t j = 0; j < always_on; ++j)
    for (int64_t n = 0; n < N; ++n) tp[next[E + j] + n] = n, wp[next[E + j] + n] = 1.f;
  return {token, ends, sorted_weights};
}

// y[token[m]] += weight[m] · out[m] over the experts' output rows out [M, H] -> y [N, H] in out's dtype: the
// weighted sum of each token's experts, in float32, rounded once.
template <typename T>
void combine_rows(const T* out, const int64_t* token, const float* weight, float* sums, int64_t M, int64_t H) {
  for (int64_t m = 0; m < M; ++m) {
    const Vec w = simd::set1(weight[m]);
    float* row = sums + token[m] * H;
    for (int64_t c = 0; c < H; c += L) store(row + c, simd::fmadd(load(out + m * H + c), w, load(row + c)));
  }
}

torch::Tensor combine_experts(const torch::Tensor& out, const torch::Tensor& token, const torch::Tensor& weight,
                              int64_t N) {
  TORCH_CHECK(out.dim() == 2 && out.is_contiguous() && out.size(1) % 16 == 0, "out must be a contiguous [M, H] "
              "tensor with H a multiple of 16");
  const int64_t M = out.size(0), H = out.size(1);
  TORCH_CHECK(token.numel() == M && token.scalar_type() == torch::kLong && weight.numel() == M &&
              weight.scalar_type() == torch::kFloat && token.is_contiguous() && weight.is_contiguous(),
              "token [M] int64 and weight [M] float32 expected");
  const int64_t* tp = token.data_ptr<int64_t>();
  for (int64_t m = 0; m < M; ++m) TORCH_CHECK(tp[m] >= 0 && tp[m] < N, "token ", tp[m], " out of range for ", N);
  auto sums = torch::zeros({N, H}, torch::kFloat);
  if (out.scalar_type() == torch::kBFloat16)
    combine_rows(out.data_ptr<at::BFloat16>(), tp, weight.data_ptr<float>(), sums.data_ptr<float>(), M, H);
  else if (out.scalar_type() == torch::kFloat)
    combine_rows(out.data_ptr<float>(), tp, weight.data_ptr<float>(), sums.data_ptr<float>(), M, H);
  else
    TORCH_CHECK(false, "out must be float32 or bfloat16");
  return out.scalar_type() == torch::kFloat ? sums : sums.to(out.scalar_type());
}

// ---- The training pass's softmaxes ----
// Attention's probabilities and the log-probs of sampled tokens are softmaxes over rows that PyTorch computes in
// several passes over memory, each its own kernel: a cast of bf16 scores to float32, the scale, the mask, the softmax,
// the cast back, and as many again in the backward pass (a seventh of a GRPO step at the benchmark's shape,
// benchmarks/RESULTS.md). Here each row is one pass in float32 arithmetic: it is read, reduced and written once, and
// per row the forward keeps only its maximum and the sum of exponentials, from which the backward recomputes exactly
// the probabilities the forward used. Rows are split among threads whole: results do not depend on the thread count.

// Items per parallel task: at least kTaskValues values each, since below that OpenMP's fork and join (~10 µs) costs
// more than the work (a decode step's RMSNorm of 16 × 512 took 17 µs split over two threads, 2 µs on one).
constexpr int64_t kTaskValues = 1 << 15;
inline int64_t grain(int64_t values_per_item) { return std::max<int64_t>(1, kTaskValues / std::max<int64_t>(1, values_per_item)); }

// Scaled, masked softmax of one row: x = scale · score where the mask allows, probabilities p = e^(x - top) / total.
// Returns (top, total); `exps` gets e^(x - top) (0 where masked).
template <typename T>
std::pair<float, float> softmax_row(const T* row, const bool* allowed, int64_t S, float scale, float* exps) {
  Vec top = simd::set1(-INFINITY);
  for (int64_t s = 0; s < S; s += L) {
    const auto lanes = simd::tail(S - s);
    const auto m = simd::allowed(allowed + s, lanes);
    top = simd::max_where(m, top, simd::mul(load(row + s, lanes), simd::set1(scale)));
  }
  const float top_value = simd::hmax(top);
  if (top_value == -INFINITY) {  // nothing allowed: the row's probabilities are all 0
    std::fill(exps, exps + S, 0.f);
    return {0.f, 0.f};
  }
  const Vec shift = simd::set1(top_value);
  Vec total = simd::zero();
  for (int64_t s = 0; s < S; s += L) {
    const auto lanes = simd::tail(S - s);
    const auto m = simd::allowed(allowed + s, lanes);
    const Vec x = simd::mul(load(row + s, lanes), simd::set1(scale));
    const Vec e = simd::zero_unless(m, simd::exp(simd::sub(x, shift)));
    store(exps + s, e, lanes);
    total = simd::add(total, e);
  }
  return {top_value, simd::hsum(total)};
}

// scores [B, X, T, S] (contiguous), mask [B or 1, 1, T, S] bool -> (probs [B, X, T, S] in scores' dtype, stats
// [B, X, T, 2] float32: each row's top and total, for the backward)
template <typename T>
void masked_softmax_all(const torch::Tensor& scores, const torch::Tensor& mask, double scale, torch::Tensor& probs,
                        torch::Tensor& stats) {
  const int64_t B = scores.size(0), X = scores.size(1), Tq = scores.size(2), S = scores.size(3);
  const int64_t mask_b = mask.size(0) == 1 ? 0 : mask.stride(0), mask_t = mask.stride(2);
  const T* sp = scores.data_ptr<T>();
  const bool* mp = mask.data_ptr<bool>();
  T* pp = probs.data_ptr<T>();
  float* st = stats.data_ptr<float>();
  at::parallel_for(0, B * X * Tq, grain(S), [&](int64_t begin, int64_t end) {
    std::vector<float> exps(S);
    for (int64_t r = begin; r < end; ++r) {
      const int64_t b = r / (X * Tq), t = r % Tq;
      const auto [top, total] = softmax_row(sp + r * S, mp + b * mask_b + t * mask_t, S, scale, exps.data());
      st[2 * r] = top;
      st[2 * r + 1] = total;
      const Vec inverse = simd::set1(total > 0 ? 1.f / total : 0.f);
      for (int64_t s = 0; s < S; s += L) {
        const auto lanes = simd::tail(S - s);
        store(pp + r * S + s, simd::mul(load(exps.data() + s, lanes), inverse), lanes);
      }
    }
  });
}

void check_scores(const torch::Tensor& scores, const torch::Tensor& mask) {
  TORCH_CHECK(scores.dim() == 4 && scores.is_contiguous(), "scores must be contiguous [B, X, T, S]");
  TORCH_CHECK(scores.scalar_type() == torch::kFloat || scores.scalar_type() == torch::kBFloat16,
              "scores must be float32 or bfloat16");
  TORCH_CHECK(mask.dim() == 4 && mask.scalar_type() == torch::kBool && mask.size(1) == 1 &&
              (mask.size(0) == 1 || mask.size(0) == scores.size(0)) && mask.size(2) == scores.size(2) &&
              mask.size(3) == scores.size(3) && mask.stride(3) == 1,
              "mask must be [B or 1, 1, T, S] bool, contiguous in its last dimension");
}

std::vector<torch::Tensor> masked_softmax(const torch::Tensor& scores, const torch::Tensor& mask, double scale) {
  check_scores(scores, mask);
  auto probs = torch::empty_like(scores);
  auto stats = torch::empty({scores.size(0), scores.size(1), scores.size(2), 2}, scores.options().dtype(torch::kFloat));
  if (scores.scalar_type() == torch::kBFloat16) masked_softmax_all<at::BFloat16>(scores, mask, scale, probs, stats);
  else masked_softmax_all<float>(scores, mask, scale, probs, stats);
  return {probs, stats};
}

// d scores = scale · p ⊙ (d p - Σ p ⊙ d p), p recomputed from the scores and the forward's stats exactly as the forward
// computed it.
template <typename T>
void masked_softmax_backward_all(const torch::Tensor& grad, const torch::Tensor& scores, const torch::Tensor& mask,
                                 const torch::Tensor& stats, double scale, torch::Tensor& out) {
  const int64_t B = scores.size(0), X = scores.size(1), Tq = scores.size(2), S = scores.size(3);
  const int64_t mask_b = mask.size(0) == 1 ? 0 : mask.stride(0), mask_t = mask.stride(2);
  const T* sp = scores.data_ptr<T>();
  const T* gp = grad.data_ptr<T>();
  const bool* mp = mask.data_ptr<bool>();
  const float* st = stats.data_ptr<float>();
  T* op = out.data_ptr<T>();
  const Vec sc = simd::set1(static_cast<float>(scale));
  at::parallel_for(0, B * X * Tq, grain(S), [&](int64_t begin, int64_t end) {
    std::vector<float> probs(S);
    for (int64_t r = begin; r < end; ++r) {
      const int64_t b = r / (X * Tq), t = r % Tq;
      const bool* allowed = mp + b * mask_b + t * mask_t;
      const Vec shift = simd::set1(st[2 * r]);
      const Vec inverse = simd::set1(st[2 * r + 1] > 0 ? 1.f / st[2 * r + 1] : 0.f);
      Vec dot = simd::zero();
      for (int64_t s = 0; s < S; s += L) {
        const auto lanes = simd::tail(S - s);
        const auto m = simd::allowed(allowed + s, lanes);
        const Vec x = simd::mul(load(sp + r * S + s, lanes), sc);
        const Vec p = simd::mul(simd::zero_unless(m, simd::exp(simd::sub(x, shift))), inverse);
        store(probs.data() + s, p, lanes);
        dot = simd::fmadd(p, load(gp + r * S + s, lanes), dot);
      }
      const Vec total = simd::set1(simd::hsum(dot));
      for (int64_t s = 0; s < S; s += L) {
        const auto lanes = simd::tail(S - s);
        const Vec p = load(probs.data() + s, lanes);
        const Vec d = simd::mul(simd::mul(p, simd::sub(load(gp + r * S + s, lanes), total)), sc);
        store(op + r * S + s, d, lanes);
      }
    }
  });
}

torch::Tensor masked_softmax_backward(const torch::Tensor& grad, const torch::Tensor& scores, const torch::Tensor& mask,
                                      const torch::Tensor& stats, double scale) {
  check_scores(scores, mask);
  TORCH_CHECK(grad.sizes() == scores.sizes() && grad.scalar_type() == scores.scalar_type() && grad.is_contiguous(),
              "grad must be contiguous, shaped and typed as scores");
  TORCH_CHECK(stats.scalar_type() == torch::kFloat && stats.is_contiguous() && stats.numel() == 2 * scores.numel() / scores.size(3),
              "stats must be the forward's [B, X, T, 2] float32");
  auto out = torch::empty_like(scores);
  if (scores.scalar_type() == torch::kBFloat16) masked_softmax_backward_all<at::BFloat16>(grad, scores, mask, stats, scale, out);
  else masked_softmax_backward_all<float>(grad, scores, mask, stats, scale, out);
  return out;
}

// logits / temperature, skipped at temperature 1; a division, as PyTorch's `logits / T` rounds
struct Temperature {
  explicit Temperature(double t) : value(static_cast<float>(t)), divide(t != 1.0), vec(simd::set1(value)) {}
  Vec apply(Vec x) const { return divide ? simd::div(x, vec) : x; }
  float apply(float x) const { return divide ? x / value : x; }
  float value;
  bool divide;
  Vec vec;
};

// Log-probs of sampled tokens: for logits [N, V] and targets [N], log softmax(logits / temperature) at each target and
// (optionally) the entropy of each row's distribution, without a [N, V] float32 copy, log-softmax or exp of it.
// stats [N, 2] keeps each row's top and total for the backward.
template <typename T>
void token_logprobs_all(const torch::Tensor& logits, const torch::Tensor& targets, double temperature, bool entropy,
                        torch::Tensor& logp, torch::Tensor& entropies, torch::Tensor& stats) {
  const int64_t N = logits.size(0), V = logits.size(1);
  const T* lp = logits.data_ptr<T>();
  const int64_t* tp = targets.data_ptr<int64_t>();
  float* out = logp.data_ptr<float>();
  float* ent = entropy ? entropies.data_ptr<float>() : nullptr;
  float* st = stats.data_ptr<float>();
  const Temperature temp(temperature);
  at::parallel_for(0, N, grain(V), [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      const T* row = lp + n * V;
      Vec top = simd::set1(-INFINITY);
      for (int64_t v = 0; v < V; v += L) {
        const auto lanes = simd::tail(V - v);
        const Vec x = load(row + v, lanes);
        top = simd::max_where(simd::mask_of(lanes), top, temp.apply(x));
      }
      const float top_value = simd::hmax(top);
      const Vec shift = simd::set1(top_value);
      Vec total = simd::zero(), weighted = simd::zero();
      for (int64_t v = 0; v < V; v += L) {
        const auto lanes = simd::tail(V - v);
        const Vec x = load(row + v, lanes);
        const Vec centred = simd::sub(temp.apply(x), shift);
        const Vec e = simd::zero_unless(simd::mask_of(lanes), simd::exp(centred));
        total = simd::add(total, e);
        if (entropy) weighted = simd::fmadd(e, centred, weighted);
      }
      const float sum = simd::hsum(total), log_sum = std::log(sum);
      const float target = static_cast<float>(row[tp[n]]);
      out[n] = temp.apply(target) - top_value - log_sum;
      // H = -Σ p log p with p = e / sum, log p = centred - log sum
      if (entropy) ent[n] = log_sum - simd::hsum(weighted) / sum;
      st[2 * n] = top_value;
      st[2 * n + 1] = sum;
    }
  });
}

std::vector<torch::Tensor> token_logprobs(const torch::Tensor& logits, const torch::Tensor& targets,
                                          double temperature, bool entropy) {
  TORCH_CHECK(logits.dim() == 2 && logits.is_contiguous(), "logits must be contiguous [N, V]");
  TORCH_CHECK(logits.scalar_type() == torch::kFloat || logits.scalar_type() == torch::kBFloat16,
              "logits must be float32 or bfloat16");
  TORCH_CHECK(targets.dim() == 1 && targets.size(0) == logits.size(0) && targets.scalar_type() == torch::kLong &&
              targets.is_contiguous(), "targets must be [N] int64");
  TORCH_CHECK(temperature > 0, "temperature must be positive");
  const int64_t N = logits.size(0), V = logits.size(1);
  TORCH_CHECK(N == 0 || (targets.min().item<int64_t>() >= 0 && targets.max().item<int64_t>() < V),
              "a target token id is outside the vocabulary of ", V);
  auto options = logits.options().dtype(torch::kFloat);
  auto logp = torch::empty({N}, options), entropies = torch::empty({entropy ? N : 0}, options);
  auto stats = torch::empty({N, 2}, options);
  if (logits.scalar_type() == torch::kBFloat16)
    token_logprobs_all<at::BFloat16>(logits, targets, temperature, entropy, logp, entropies, stats);
  else token_logprobs_all<float>(logits, targets, temperature, entropy, logp, entropies, stats);
  return {logp, entropies, stats};
}

// d logits[n] = grad[n] · (onehot(target) - p) / temperature, in the logits' dtype
template <typename T>
void token_logprobs_backward_all(const torch::Tensor& grad, const torch::Tensor& logits, const torch::Tensor& targets,
                                 const torch::Tensor& stats, double temperature, torch::Tensor& out) {
  const int64_t N = logits.size(0), V = logits.size(1);
  const T* lp = logits.data_ptr<T>();
  const int64_t* tp = targets.data_ptr<int64_t>();
  const float* gp = grad.data_ptr<float>();
  const float* st = stats.data_ptr<float>();
  T* op = out.data_ptr<T>();
  const Temperature temp(temperature);
  at::parallel_for(0, N, grain(V), [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      const T* row = lp + n * V;
      T* drow = op + n * V;
      const float g = gp[n];
      const Vec shift = simd::set1(st[2 * n]);
      // -grad · p / T for every token; the target then gets grad / T added
      const Vec coeff = simd::set1(temp.apply(-g / st[2 * n + 1]));
      for (int64_t v = 0; v < V; v += L) {
        const auto lanes = simd::tail(V - v);
        const Vec x = load(row + v, lanes);
        const Vec e = simd::exp(simd::sub(temp.apply(x), shift));
        Vec d = simd::mul(e, coeff);
        const int64_t target = tp[n] - v;
        if (target >= 0 && target < L) {
          float lane[L];
          store(lane, d);
          lane[target] += temp.apply(g);
          d = load(lane);
        }
        store(drow + v, d, lanes);
      }
    }
  });
}

torch::Tensor token_logprobs_backward(const torch::Tensor& grad, const torch::Tensor& logits,
                                      const torch::Tensor& targets, const torch::Tensor& stats, double temperature) {
  TORCH_CHECK(grad.dim() == 1 && grad.size(0) == logits.size(0) && grad.scalar_type() == torch::kFloat &&
              grad.is_contiguous(), "grad must be [N] float32");
  TORCH_CHECK(stats.scalar_type() == torch::kFloat && stats.is_contiguous() && stats.numel() == 2 * logits.size(0),
              "stats must be the forward's [N, 2] float32");
  auto out = torch::empty_like(logits);
  if (logits.scalar_type() == torch::kBFloat16)
    token_logprobs_backward_all<at::BFloat16>(grad, logits, targets, stats, temperature, out);
  else token_logprobs_backward_all<float>(grad, logits, targets, stats, temperature, out);
  return out;
}


// ---- RMSNorm and SwiGLU, forward and backward ----
// Each is a handful of elementwise PyTorch ops (RMSNorm: square, mean, rsqrt, two products, casts; SwiGLU: silu and a
// product), every one a trip through memory, and as many again backward. Here a row is read and written once, in
// float32 arithmetic, with results rounded to the inputs' dtype where PyTorch rounds them.

inline Vec round_to(const float*, Vec v) { return v; }
inline Vec round_to(const bf16*, Vec v) { return simd::round_bf16(v); }  // v rounded to bf16, back in float32

// y = w · (x / rms(x)) for x [R, D] (rms over each row, + eps), rounded as RMSNorm rounds: the normalised row to x's
// dtype, then the product. rstd [R] keeps 1 / rms for the backward.
template <typename T>
void rms_norm_all(const T* x, const T* w, T* y, float* rstd, int64_t R, int64_t D, float eps) {
  at::parallel_for(0, R, grain(D), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* row = x + r * D;
      Vec squares = simd::zero();
      for (int64_t d = 0; d < D; d += L) {
        const Vec v = load(row + d, simd::tail(D - d));
        squares = simd::fmadd(v, v, squares);
      }
      const float inverse = 1.f / std::sqrt(simd::hsum(squares) / D + eps);
      rstd[r] = inverse;
      const Vec scale = simd::set1(inverse);
      for (int64_t d = 0; d < D; d += L) {
        const auto lanes = simd::tail(D - d);
        const Vec normed = round_to(row, simd::mul(load(row + d, lanes), scale));
        store(y + r * D + d, simd::mul(load(w + d, lanes), normed), lanes);
      }
    }
  });
}

std::vector<torch::Tensor> rms_norm(const torch::Tensor& x, const torch::Tensor& w, double eps) {
  // x [..., D]: any leading shape, so that decode's callers need no reshape (each op costs microseconds there)
  TORCH_CHECK(x.dim() >= 1 && x.is_contiguous() && w.dim() == 1 && w.size(0) == x.size(-1) && w.is_contiguous() &&
              x.scalar_type() == w.scalar_type(), "x [..., D] and w [D] of one dtype, contiguous, expected");
  const int64_t D = x.size(-1), R = D > 0 ? x.numel() / D : 0;
  auto y = torch::empty_like(x);
  auto rstd = torch::empty({R}, x.options().dtype(torch::kFloat));
  if (x.scalar_type() == torch::kBFloat16)
    rms_norm_all(x.data_ptr<at::BFloat16>(), w.data_ptr<at::BFloat16>(), y.data_ptr<at::BFloat16>(),
                 rstd.data_ptr<float>(), R, D, static_cast<float>(eps));
  else {
    TORCH_CHECK(x.scalar_type() == torch::kFloat, "x must be float32 or bfloat16");
    rms_norm_all(x.data_ptr<float>(), w.data_ptr<float>(), y.data_ptr<float>(), rstd.data_ptr<float>(), R, D,
                 static_cast<float>(eps));
  }
  return {y, rstd};
}

constexpr int64_t kNormRowsPerPart = 32;  // dw sums rows in fixed parts, then the parts in order: thread-independent

// With u = x · rstd and dy the incoming gradient: dw = Σ_rows dy ⊙ u, and
// dx = rstd · (dy ⊙ w) - x · rstd³ · mean(dy ⊙ w ⊙ x).
template <typename T>
void rms_norm_backward_all(const T* dy, const T* x, const T* w, const float* rstd, T* dx, float* dw, int64_t R,
                           int64_t D) {
  const int64_t parts = (R + kNormRowsPerPart - 1) / kNormRowsPerPart;
  std::vector<float> partial(parts * D, 0.f);
  at::parallel_for(0, parts, grain(kNormRowsPerPart * D), [&](int64_t begin, int64_t end) {
    for (int64_t part = begin; part < end; ++part) {
      float* acc = partial.data() + part * D;
      for (int64_t r = part * kNormRowsPerPart; r < std::min(R, (part + 1) * kNormRowsPerPart); ++r) {
        const T* g = dy + r * D;
        const T* row = x + r * D;
        const Vec inverse = simd::set1(rstd[r]);
        Vec dot = simd::zero();
        for (int64_t d = 0; d < D; d += L) {
          const auto lanes = simd::tail(D - d);
          const Vec gv = load(g + d, lanes), xv = load(row + d, lanes);
          dot = simd::fmadd(simd::mul(gv, load(w + d, lanes)), xv, dot);
          const Vec normed = round_to(row, simd::mul(xv, inverse));
          store(acc + d, simd::fmadd(gv, normed, load(acc + d, lanes)), lanes);
        }
        const float r3 = rstd[r] * rstd[r] * rstd[r];
        const Vec correction = simd::set1(r3 * simd::hsum(dot) / D);
        for (int64_t d = 0; d < D; d += L) {
          const auto lanes = simd::tail(D - d);
          const Vec gw = simd::mul(load(g + d, lanes), load(w + d, lanes));
          const Vec v = simd::fnmadd(load(row + d, lanes), correction, simd::mul(gw, inverse));
          store(dx + r * D + d, v, lanes);
        }
      }
    }
  });
  at::parallel_for(0, (D + L - 1) / L, grain(L * parts), [&](int64_t begin, int64_t end) {
    for (int64_t d = begin * L; d < std::min(D, end * L); d += L) {
      const auto lanes = simd::tail(D - d);
      Vec total = simd::zero();
      for (int64_t part = 0; part < parts; ++part)
        total = simd::add(total, load(partial.data() + part * D + d, lanes));
      store(dw + d, total, lanes);
    }
  });
}

// -> (dx in x's dtype, dw in float32)
std::vector<torch::Tensor> rms_norm_backward(const torch::Tensor& dy, const torch::Tensor& x, const torch::Tensor& w,
                                             const torch::Tensor& rstd) {
  TORCH_CHECK(dy.sizes() == x.sizes() && dy.scalar_type() == x.scalar_type() && dy.is_contiguous() &&
              x.is_contiguous() && rstd.numel() == x.size(0) && rstd.scalar_type() == torch::kFloat,
              "dy like x [R, D], rstd [R] float32 expected");
  auto dx = torch::empty_like(x);
  auto dw = torch::empty({x.size(1)}, x.options().dtype(torch::kFloat));
  if (x.scalar_type() == torch::kBFloat16)
    rms_norm_backward_all(dy.data_ptr<at::BFloat16>(), x.data_ptr<at::BFloat16>(), w.data_ptr<at::BFloat16>(),
                          rstd.data_ptr<float>(), dx.data_ptr<at::BFloat16>(), dw.data_ptr<float>(), x.size(0),
                          x.size(1));
  else
    rms_norm_backward_all(dy.data_ptr<float>(), x.data_ptr<float>(), w.data_ptr<float>(), rstd.data_ptr<float>(),
                          dx.data_ptr<float>(), dw.data_ptr<float>(), x.size(0), x.size(1));
  return {dx, dw};
}


// silu(gate) · up, elementwise over [n] values; silu's result is rounded to the dtype before the product (as
// F.silu(gate) * up rounds)
template <typename T>
void swiglu_all(const T* gate, const T* up, T* out, int64_t n) {
  at::parallel_for(0, (n + L - 1) / L, grain(L), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin * L; i < std::min(n, end * L); i += L) {
      const auto lanes = simd::tail(n - i);
      const Vec g = load(gate + i, lanes);
      const Vec silu = round_to(gate, simd::mul(g, simd::sigmoid(g)));
      store(out + i, simd::mul(silu, load(up + i, lanes)), lanes);
    }
  });
}

// d up = dy · silu(gate), d gate = dy · up · σ(gate) · (1 + gate · (1 - σ(gate)))
template <typename T>
void swiglu_backward_all(const T* dy, const T* gate, const T* up, T* dgate, T* dup, int64_t n) {
  const Vec one = simd::set1(1.f);
  at::parallel_for(0, (n + L - 1) / L, grain(L), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin * L; i < std::min(n, end * L); i += L) {
      const auto lanes = simd::tail(n - i);
      const Vec g = load(gate + i, lanes), grad = load(dy + i, lanes);
      const Vec sig = simd::sigmoid(g);
      const Vec silu = round_to(gate, simd::mul(g, sig));
      store(dup + i, simd::mul(grad, silu), lanes);
      const Vec slope = simd::mul(sig, simd::fmadd(g, simd::sub(one, sig), one));
      store(dgate + i, simd::mul(simd::mul(grad, load(up + i, lanes)), slope), lanes);
    }
  });
}

void check_swiglu(const torch::Tensor& a, const torch::Tensor& b) {
  TORCH_CHECK(a.sizes() == b.sizes() && a.scalar_type() == b.scalar_type() && a.is_contiguous() && b.is_contiguous(),
              "gate and up must be contiguous, of one shape and dtype");
  TORCH_CHECK(a.scalar_type() == torch::kFloat || a.scalar_type() == torch::kBFloat16, "float32 or bfloat16 expected");
}

torch::Tensor swiglu(const torch::Tensor& gate, const torch::Tensor& up) {
  check_swiglu(gate, up);
  auto out = torch::empty_like(gate);
  if (gate.scalar_type() == torch::kBFloat16)
    swiglu_all(gate.data_ptr<at::BFloat16>(), up.data_ptr<at::BFloat16>(), out.data_ptr<at::BFloat16>(), gate.numel());
  else swiglu_all(gate.data_ptr<float>(), up.data_ptr<float>(), out.data_ptr<float>(), gate.numel());
  return out;
}

std::vector<torch::Tensor> swiglu_backward(const torch::Tensor& dy, const torch::Tensor& gate, const torch::Tensor& up) {
  check_swiglu(gate, up);
  check_swiglu(dy, gate);
  auto dgate = torch::empty_like(gate), dup = torch::empty_like(up);
  if (gate.scalar_type() == torch::kBFloat16)
    swiglu_backward_all(dy.data_ptr<at::BFloat16>(), gate.data_ptr<at::BFloat16>(), up.data_ptr<at::BFloat16>(),
                        dgate.data_ptr<at::BFloat16>(), dup.data_ptr<at::BFloat16>(), gate.numel());
  else swiglu_backward_all(dy.data_ptr<float>(), gate.data_ptr<float>(), up.data_ptr<float>(), dgate.data_ptr<float>(),
                           dup.data_ptr<float>(), gate.numel());
  return {dgate, dup};
}


// ---- Rotary position embedding ----
// out = [x1·cos - x2·sin | x2·cos + x1·sin] for x = [x1 | x2] [B, H, T, D] (any strides, the last dimension
// contiguous) and cos, sin [B or 1, 1, T, D/2]: PyTorch's chunk, four products, two sums and a cat in one pass.
// Products and sums are rounded to the dtype PyTorch computes them in (x's and cos's promoted), the result to `out`'s
// dtype. `inverse` rotates the other way (sin negated): the backward pass. `interleaved` (DeepSeek's layout) pairs
// x's elements (2i, 2i+1) instead of (i, D/2 + i), and the result is still [first | second]; its backward
// (`inverse`) takes that halves layout and writes the pairs back interleaved.
constexpr int64_t ROPE_MAX_HALF = 256;

template <typename XT, typename CT, typename OT>
void rope_all(const torch::Tensor& x, const torch::Tensor& cos, const torch::Tensor& sin, torch::Tensor& out,
              bool inverse, bool interleaved) {
  using Compute = std::conditional_t<std::is_same_v<XT, float> || std::is_same_v<CT, float>, float, at::BFloat16>;
  const Compute* rounding = nullptr;  // round_to's tag: the dtype the products are rounded to
  const int64_t B = x.size(0), H = x.size(1), T = x.size(2), half = x.size(3) / 2;
  const int64_t cos_b = cos.size(0) == 1 ? 0 : cos.stride(0);
  const bool pairs_in = interleaved && !inverse, pairs_out = interleaved && inverse;
  const XT* xp = x.data_ptr<XT>();
  const CT* cp = cos.data_ptr<CT>();
  const CT* sp = sin.data_ptr<CT>();
  OT* op = out.data_ptr<OT>();
  const Vec sign = simd::set1(inverse ? -1.f : 1.f);
  at::parallel_for(0, B * H * T, grain(2 * half), [&](int64_t begin, int64_t end) {
    XT split[2 * ROPE_MAX_HALF];  // an interleaved row as [evens | odds]
    OT halves[2 * ROPE_MAX_HALF];  // a result to be written back interleaved
    for (int64_t r = begin; r < end; ++r) {
      const int64_t b = r / (H * T), h = r / T % H, t = r % T;
      const XT* row = xp + b * x.stride(0) + h * x.stride(1) + t * x.stride(2);
      if (pairs_in) {
        for (int64_t i = 0; i < half; ++i) split[i] = row[2 * i], split[half + i] = row[2 * i + 1];
        row = split;
      }
      const CT* c = cp + b * cos_b + t * cos.stride(2);
      const CT* si = sp + b * cos_b + t * sin.stride(2);
      OT* o = pairs_out ? halves : op + r * 2 * half;
      for (int64_t i = 0; i < half; i += L) {
        const auto lanes = simd::tail(half - i);
        const Vec x1 = load(row + i, lanes), x2 = load(row + half + i, lanes);
        const Vec cv = load(c + i, lanes), sv = simd::mul(load(si + i, lanes), sign);
        const Vec first = simd::sub(round_to(rounding, simd::mul(x1, cv)), round_to(rounding, simd::mul(x2, sv)));
        const Vec second = simd::add(round_to(rounding, simd::mul(x2, cv)), round_to(rounding, simd::mul(x1, sv)));
        store(o + i, round_to(rounding, first), lanes);
        store(o + half + i, round_to(rounding, second), lanes);
      }
      if (pairs_out) {
        OT* dst = op + r * 2 * half;
        for (int64_t i = 0; i < half; ++i) dst[2 * i] = halves[i], dst[2 * i + 1] = halves[half + i];
      }
    }
  });
}

template <typename XT, typename CT>
void rope_to(const torch::Tensor& x, const torch::Tensor& cos, const torch::Tensor& sin, torch::Tensor& out,
             bool inverse, bool interleaved) {
  if (out.scalar_type() == torch::kBFloat16) rope_all<XT, CT, at::BFloat16>(x, cos, sin, out, inverse, interleaved);
  else rope_all<XT, CT, float>(x, cos, sin, out, inverse, interleaved);
}

torch::Tensor rope(const torch::Tensor& x, const torch::Tensor& cos, const torch::Tensor& sin,
                   torch::ScalarType out_dtype, bool inverse, bool interleaved) {
  TORCH_CHECK(x.dim() == 4 && x.stride(3) == 1 && x.size(3) % 2 == 0, "x [B, H, T, D] with a contiguous last "
              "dimension of even size expected");
  TORCH_CHECK(!interleaved || x.size(3) <= 2 * ROPE_MAX_HALF, "interleaved rotary dimensions up to ",
              2 * ROPE_MAX_HALF, " expected, got ", x.size(3));
  TORCH_CHECK(cos.dim() == 4 && cos.sizes() == sin.sizes() && cos.scalar_type() == sin.scalar_type() &&
              (cos.size(0) == 1 || cos.size(0) == x.size(0)) && cos.size(2) == x.size(2) &&
              cos.size(3) == x.size(3) / 2 && cos.stride(3) == 1 && sin.stride(3) == 1 && cos.strides() == sin.strides(),
              "cos and sin [B or 1, 1, T, D/2] alike, contiguous in their last dimension, expected");
  for (const auto dtype : {x.scalar_type(), cos.scalar_type(), out_dtype})
    TORCH_CHECK(dtype == torch::kFloat || dtype == torch::kBFloat16, "float32 or bfloat16 expected");
  auto out = torch::empty(x.sizes(), x.options().dtype(out_dtype));
  const bool x_bf16 = x.scalar_type() == torch::kBFloat16, c_bf16 = cos.scalar_type() == torch::kBFloat16;
  if (x_bf16 && c_bf16) rope_to<at::BFloat16, at::BFloat16>(x, cos, sin, out, inverse, interleaved);
  else if (x_bf16) rope_to<at::BFloat16, float>(x, cos, sin, out, inverse, interleaved);
  else if (c_bf16) rope_to<float, at::BFloat16>(x, cos, sin, out, inverse, interleaved);
  else rope_to<float, float>(x, cos, sin, out, inverse, interleaved);
  return out;
}

// ---- MLA decode's cache write ----
// The new tokens' cache content from kv_a [B, T, r + rope] (kv_a_proj's output, rows strided, the last dimension
// contiguous): the latent RMS-normalised by w [r] (RMSNorm's rounding: normalised in float32, rounded to the dtype,
// then scaled), the rope key rotated by cos, sin [B or 1, 1, T, rope/2] (as `rope` rotates it, interleaved pairs
// coming out as [evens | odds]), both written into buffer [rows, S, r + rope] at (batch_rows[b], slots[b, t]).
// Written out in PyTorch this was a split, a view, the rotation, a copy and the norm, a cat, a cast and an indexed
// write: ten ops a layer, each costing more to launch than its few hundred values take.
void store_latent(const torch::Tensor& kv_a, const torch::Tensor& w, double eps, const torch::Tensor& cos,
                  const torch::Tensor& sin, bool interleaved, const torch::Tensor& buffer, const torch::Tensor& batch_rows,
                  const torch::Tensor& slots) {
  TORCH_CHECK(kv_a.dim() == 3 && kv_a.stride(2) == 1 && w.dim() == 1 && w.is_contiguous() && buffer.dim() == 3 &&
              buffer.is_contiguous() && buffer.size(2) == kv_a.size(2) && w.size(0) < kv_a.size(2),
              "kv_a [B, T, r + rope] (last dimension contiguous), w [r], buffer [rows, S, r + rope] expected");
  TORCH_CHECK(kv_a.scalar_type() == w.scalar_type() && kv_a.scalar_type() == buffer.scalar_type() &&
              (kv_a.scalar_type() == torch::kFloat || kv_a.scalar_type() == torch::kBFloat16),
              "kv_a, w and the cache must share one dtype, float32 or bfloat16");
  const int64_t B = kv_a.size(0), T = kv_a.size(1), D = kv_a.size(2), r = w.size(0), S = buffer.size(1);
  TORCH_CHECK(batch_rows.numel() == B && batch_rows.scalar_type() == torch::kLong && slots.dim() == 2 &&
              slots.size(0) == B && slots.size(1) == T && slots.scalar_type() == torch::kLong,
              "batch_rows [B] and slots [B, T] int64 expected");
  auto key = rope(kv_a.narrow(2, r, D - r).unsqueeze(1), cos, sin,
                  c10::promoteTypes(kv_a.scalar_type(), cos.scalar_type()), false, interleaved).contiguous();
  auto rows_c = batch_rows.contiguous();
  auto slots_c = slots.contiguous();
  const int64_t* rp = rows_c.data_ptr<int64_t>();
  const int64_t* sp = slots_c.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b)
    for (int64_t t = 0; t < T; ++t)
      TORCH_CHECK(rp[b] >= 0 && rp[b] < buffer.size(0) && sp[b * T + t] >= 0 && sp[b * T + t] < S,
                  "cache row ", rp[b], " or slot ", sp[b * T + t], " out of range");
  auto write = [&](auto* kind, auto* key_kind) {
    using T_ = std::remove_pointer_t<decltype(kind)>;
    using K_ = std::remove_pointer_t<decltype(key_kind)>;
    const T_* xp = kv_a.data_ptr<T_>();
    const T_* wp = w.data_ptr<T_>();
    const K_* kp = key.data_ptr<K_>();
    T_* bp = buffer.data_ptr<T_>();
    float rstd;
    for (int64_t b = 0; b < B; ++b)
      for (int64_t t = 0; t < T; ++t) {
        T_* dest = bp + (rp[b] * S + sp[b * T + t]) * D;
        rms_norm_all(xp + b * kv_a.stride(0) + t * kv_a.stride(1), wp, dest, &rstd, 1, r, static_cast<float>(eps));
        const K_* rotated = kp + (b * T + t) * (D - r);
        for (int64_t d = 0; d < D - r; d += L) {
          const auto lanes = simd::tail(D - r - d);
          store(dest + r + d, load(rotated + d, lanes), lanes);
        }
      }
  };
  const bool is_bf16 = kv_a.scalar_type() == torch::kBFloat16, key_bf16 = key.scalar_type() == torch::kBFloat16;
  if (is_bf16 && key_bf16) write(static_cast<at::BFloat16*>(nullptr), static_cast<at::BFloat16*>(nullptr));
  else if (is_bf16) write(static_cast<at::BFloat16*>(nullptr), static_cast<float*>(nullptr));
  else write(static_cast<float*>(nullptr), static_cast<float*>(nullptr));
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = simd::kLevel;  // the instruction-set level this build was compiled for
  m.def("linear_bf16", &linear<Bf16>, "x [M, K] · w [N, K]ᵀ in bfloat16 with float32 accumulation");
  m.def("linear_fp32", &linear<Fp32>, "x [M, K] · w [N, K]ᵀ in float32");
  m.def("grouped_linear_bf16", &grouped_linear<Bf16>, "rows of x by group g times w[g]ᵀ, bfloat16");
  m.def("grouped_linear_fp32", &grouped_linear<Fp32>, "rows of x by group g times w[g]ᵀ, float32");
  m.def("attend_cache", &attend_cache, "decode's grouped-query attention over the cache, float32 arithmetic");
  m.def("attend_latent", &attend_latent, "MLA's absorbed decode over the latent cache, float32 arithmetic");
  m.def("route_experts", &route_experts, "DeepSeekMoE routing of x -> (token, ends, weight) sorted by expert");
  m.def("combine_experts", &combine_experts, "y[token[m]] += weight[m] · out[m] -> [N, H]");
  m.def("store_latent", &store_latent, "MLA decode: normalise and rotate kv_a's new tokens into the latent cache");
  m.def("masked_softmax", &masked_softmax, "softmax(scale · scores) where the mask allows -> (probs, stats)");
  m.def("masked_softmax_backward", &masked_softmax_backward, "(grad probs, scores, mask, stats, scale) -> grad scores");
  m.def("token_logprobs", &token_logprobs, "log softmax(logits / T) at the targets, entropy, stats");
  m.def("token_logprobs_backward", &token_logprobs_backward, "(grad, logits, targets, stats, T) -> grad logits");
  m.def("rms_norm", &rms_norm, "RMSNorm of x [..., D] by w [D] -> (y, rstd)");
  m.def("rms_norm_backward", &rms_norm_backward, "(dy, x, w, rstd) -> (dx, dw float32)");
  m.def("swiglu", &swiglu, "silu(gate) * up");
  m.def("swiglu_backward", &swiglu_backward, "(dy, gate, up) -> (d gate, d up)");
  m.def("rope", &rope, "rotate x [B, H, T, D] by cos, sin [B or 1, 1, T, D/2] (inverse: the other way; interleaved: pairs (2i, 2i+1))");
}

// The same functions as operators, so that torch.compile keeps a decode step that calls them in one graph (a pybind
// call is opaque to it and splits the graph): torch.ops.openseek.* from the AVX-512 build, torch.ops.openseek_avx2.*
// from the AVX2 one, so that both can be loaded in one process.
#if defined(OPENSEEK_SIMD_AVX512)
#define OPENSEEK_OPERATORS openseek
#else
#define OPENSEEK_OPERATORS openseek_avx2
#endif
TORCH_LIBRARY_FRAGMENT(OPENSEEK_OPERATORS, m) {
  m.def("linear_bf16(Tensor x, Tensor w) -> Tensor");
  m.def("linear_fp32(Tensor x, Tensor w) -> Tensor");
  m.def("grouped_linear_bf16(Tensor x, Tensor w, Tensor ends) -> Tensor");
  m.def("grouped_linear_fp32(Tensor x, Tensor w, Tensor ends) -> Tensor");
  m.def("attend_cache(Tensor q, Tensor k, Tensor v, Tensor mask, float scale) -> Tensor");
  m.def("attend_latent(Tensor q_nope, Tensor q_pe, Tensor kv, Tensor mask, Tensor w, float scale) -> Tensor");
  m.def("route_experts(Tensor x, Tensor w, Tensor bias, int top_k, int n_group, int topk_group, bool normalise, "
        "float scaling, int always_on) -> Tensor[]");
  m.def("combine_experts(Tensor out, Tensor token, Tensor weight, int N) -> Tensor");
}
TORCH_LIBRARY_IMPL(OPENSEEK_OPERATORS, CPU, m) {
  m.impl("linear_bf16", &linear<Bf16>);
  m.impl("linear_fp32", &linear<Fp32>);
  m.impl("grouped_linear_bf16", &grouped_linear<Bf16>);
  m.impl("grouped_linear_fp32", &grouped_linear<Fp32>);
  m.impl("attend_cache", &attend_cache);
  m.impl("attend_latent", &attend_latent);
  m.impl("route_experts", &route_experts);
  m.impl("combine_experts", &combine_experts);
}
