// Decode's matmul on AVX-512: y = x · wᵀ for a few rows x [M, K] and a weight w [N, K] in nn.Linear's own layout (no
// packed copy, so the weights are read as they are), in float32 or in bfloat16 (AVX512-BF16).
//
// At decode's few rows the matmul is bound by how fast the weight streams in; MKL's float32 sgemm and oneDNN's bf16
// matmul reach a fraction of the bandwidth at those shapes here (benchmarks/RESULTS.md). This kernel reads each
// weight row once: a tile of NB weight rows is multiplied against R activation rows with R·NB accumulators held in
// registers (16 float lanes each), summed horizontally once at the end. In bf16, `vdpbf16ps` multiplies 32 bf16 pairs
// and accumulates in float32 (as oneDNN's bf16 matmul does) and each result is rounded to bf16 once; in float32 it is
// fused multiply-adds. At more rows the activations are re-read per weight vector and compute wins over bandwidth:
// callers keep PyTorch's kernels there.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

namespace {

constexpr int64_t kMaxRows = 8;  // activation rows per pass over a weight tile

struct Bf16 {
  using T = at::BFloat16;
  static constexpr int64_t kStep = 32;
  static __m512 mac(__m512 acc, const at::BFloat16* x, const at::BFloat16* w, __mmask32 mask) {
    const __m512i xv = _mm512_maskz_loadu_epi16(mask, x), wv = _mm512_maskz_loadu_epi16(mask, w);
    return _mm512_dpbf16_ps(acc, reinterpret_cast<__m512bh>(xv), reinterpret_cast<__m512bh>(wv));
  }
  static __mmask32 tail(int64_t left) { return static_cast<__mmask32>((1ull << left) - 1); }
  static void store(at::BFloat16* y, float v) { *y = at::BFloat16(v); }  // round to nearest even
};

struct Fp32 {
  using T = float;
  static constexpr int64_t kStep = 16;
  static __m512 mac(__m512 acc, const float* x, const float* w, __mmask16 mask) {
    return _mm512_fmadd_ps(_mm512_maskz_loadu_ps(mask, x), _mm512_maskz_loadu_ps(mask, w), acc);
  }
  static __mmask16 tail(int64_t left) { return static_cast<__mmask16>((1u << left) - 1); }
  static void store(float* y, float v) { *y = v; }
};

// y[r, j] = Σ_k x[r, k] · w[j, k] for r < R, j < NB.
template <typename Kind, int R, int NB>
void tile(const typename Kind::T* x, const typename Kind::T* w, typename Kind::T* y, int64_t K, int64_t N) {
  constexpr int64_t S = Kind::kStep;
  // every loop over r and j unrolled, so that each accumulator is a register (with them left rolled, GCC kept the
  // array in memory and stored every accumulator after each multiply-add: 8 rows ran at 2/3 of the speed)
  __m512 acc[R][NB];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
    for (int j = 0; j < NB; ++j) acc[r][j] = _mm512_setzero_ps();
  const auto full = Kind::tail(S);
  int64_t k = 0;
  for (; k + S <= K; k += S)
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
      for (int j = 0; j < NB; ++j) acc[r][j] = Kind::mac(acc[r][j], x + r * K + k, w + j * K + k, full);
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
    for (int j = 0; j < NB; ++j) Kind::store(y + r * N + j, _mm512_reduce_add_ps(acc[r][j]));
}

// Output rows per tile, chosen so that R·NB accumulators + NB weight vectors fit in the 32 vector registers.
constexpr int tile_width(int64_t R) { return R <= 2 ? 8 : R <= 4 ? 4 : 2; }

// Rows [0, R) of x against weight rows [0, NB) of w, for R known only at run time.
template <typename Kind, int NB>
void tile_rows(int64_t R, const typename Kind::T* x, const typename Kind::T* w, typename Kind::T* y, int64_t K,
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
void band(const typename Kind::T* x, const typename Kind::T* w, typename Kind::T* y, int64_t M, int64_t K, int64_t N,
          int64_t begin, int64_t end) {
  int64_t n = begin;
  for (; n + NB <= end; n += NB)
    for (int64_t m0 = 0; m0 < M; m0 += kMaxRows)
      tile_rows<Kind, NB>(std::min(kMaxRows, M - m0), x + m0 * K, w + n * K, y + m0 * N + n, K, N);
  for (; n < end; ++n)
    for (int64_t m0 = 0; m0 < M; m0 += kMaxRows)
      tile_rows<Kind, 1>(std::min(kMaxRows, M - m0), x + m0 * K, w + n * K, y + m0 * N + n, K, N);
}

template <typename Kind>
torch::Tensor linear(const torch::Tensor& x, const torch::Tensor& w) {
  using T = typename Kind::T;
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1), "x [M, K] and w [N, K] expected");
  TORCH_CHECK(x.is_contiguous() && w.is_contiguous(), "x and w must be contiguous");
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  auto y = torch::empty({M, N}, x.options());
  const T* xp = x.data_ptr<T>();
  const T* wp = w.data_ptr<T>();
  T* yp = y.data_ptr<T>();
  const int width = tile_width(std::min(kMaxRows, M));
  // each thread takes a contiguous band of weight rows (multiples of 16)
  at::parallel_for(0, (N + 15) / 16, 1, [&](int64_t first, int64_t last) {
    const int64_t begin = first * 16, end = std::min(N, last * 16);
    if (width == 8) band<Kind, 8>(xp, wp, yp, M, K, N, begin, end);
    else if (width == 4) band<Kind, 4>(xp, wp, yp, M, K, N, begin, end);
    else band<Kind, 2>(xp, wp, yp, M, K, N, begin, end);
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
  TORCH_CHECK(ends.dim() == 1 && ends.size(0) == w.size(0) && ends.scalar_type() == torch::kLong,
              "ends must be [G] int64 (cumulative row counts)");
  const int64_t M = x.size(0), K = x.size(1), G = w.size(0), N = w.size(1);
  auto ends_c = ends.contiguous();
  const int64_t* ep = ends_c.data_ptr<int64_t>();
  TORCH_CHECK(G == 0 || ep[G - 1] == M, "ends[-1] must equal the number of rows of x");
  auto y = torch::empty({M, N}, x.options());
  const T* xp = x.data_ptr<T>();
  const T* wp = w.data_ptr<T>();
  T* yp = y.data_ptr<T>();
  at::parallel_for(0, (N + 15) / 16, 1, [&](int64_t first, int64_t last) {
    const int64_t begin = first * 16, end = std::min(N, last * 16);
    for (int64_t g = 0, start = 0; g < G; start = ep[g], ++g) {
      const int64_t rows = ep[g] - start;
      if (rows <= 0) continue;
      const T* xg = xp + start * K;
      const T* wg = wp + g * N * K;
      T* yg = yp + start * N;
      const int width = tile_width(std::min(kMaxRows, rows));
      if (width == 8) band<Kind, 8>(xg, wg, yg, rows, K, N, begin, end);
      else if (width == 4) band<Kind, 4>(xg, wg, yg, rows, K, N, begin, end);
      else band<Kind, 2>(xg, wg, yg, rows, K, N, begin, end);
    }
  });
  return y;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("linear_bf16", &linear<Bf16>, "x [M, K] · w [N, K]ᵀ in bfloat16 with float32 accumulation (AVX512-BF16)");
  m.def("linear_fp32", &linear<Fp32>, "x [M, K] · w [N, K]ᵀ in float32 (AVX-512)");
  m.def("grouped_linear_bf16", &grouped_linear<Bf16>, "rows of x by group g times w[g]ᵀ, bfloat16");
  m.def("grouped_linear_fp32", &grouped_linear<Fp32>, "rows of x by group g times w[g]ᵀ, float32");
}

// The same functions as operators, torch.ops.openseek.linear_bf16 / linear_fp32, so that torch.compile keeps a
// decode step that calls them in one graph (a pybind call is opaque to it and splits the graph).
TORCH_LIBRARY_FRAGMENT(openseek, m) {
  m.def("linear_bf16(Tensor x, Tensor w) -> Tensor");
  m.def("linear_fp32(Tensor x, Tensor w) -> Tensor");
  m.def("grouped_linear_bf16(Tensor x, Tensor w, Tensor ends) -> Tensor");
  m.def("grouped_linear_fp32(Tensor x, Tensor w, Tensor ends) -> Tensor");
}
TORCH_LIBRARY_IMPL(openseek, CPU, m) {
  m.impl("linear_bf16", &linear<Bf16>);
  m.impl("linear_fp32", &linear<Fp32>);
  m.impl("grouped_linear_bf16", &grouped_linear<Bf16>);
  m.impl("grouped_linear_fp32", &grouped_linear<Fp32>);
}
