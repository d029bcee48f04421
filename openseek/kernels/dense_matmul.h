// Part of dense.cpp, which includes its parts in order after simd.h: they share its translation unit and its
// anonymous namespace, each using what the parts before it define.
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
#pragma once

namespace {

using simd::Vec;
using simd::bf16;
constexpr int64_t L = simd::kLanes;

constexpr int64_t kMaxRows = 8;  // activation rows per pass over a weight tile
constexpr int64_t kPrefetchTileBytes = 16 * 1024;  // largest tile whose successor tile() prefetches into L1

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
  // Prefetch the next tile's weights, which follow this tile's in memory, a slice of lines per step: the tile
  // reads NB rows side by side, NB short streams (a bf16 row of 896 is 28 lines) that the hardware prefetcher
  // learns too late to keep the memory busy; one software stream over the next tile does (docs/kernels.md). Only
  // while two tiles fit the smallest L1 (32 KiB, Zen 3): a float32 tile of 8 rows of 896 is 28 KiB, and
  // prefetching the next one evicted the current, 0.78x of the stream without prefetch on Zen 3.
  const char* next = reinterpret_cast<const char*>(w + NB * K);
  constexpr int64_t kSliceBytes = NB * S * sizeof(typename Kind::T);
  const bool prefetch = NB * K * static_cast<int64_t>(sizeof(typename Kind::T)) <= kPrefetchTileBytes;
  int64_t k = 0;
  for (; k + S <= K; k += S) {
    if (prefetch)
#pragma GCC unroll 8
      for (int64_t line = 0; line < kSliceBytes; line += 64)
        _mm_prefetch(next + k * NB * sizeof(typename Kind::T) + line, _MM_HINT_T0);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
      for (int j = 0; j < NB; ++j) acc[r][j] = Kind::mac(acc[r][j], x + r * K + k, w + j * K + k);
  }
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

}  // namespace
