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
#include <cmath>
#include <vector>

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


// ---- Decode's attention over the cache ----
// out[b, t, h·D + d] = Σ_s p_s · v[b, h / group, s, d], p = softmax over the slots s the mask allows of
// scale · q[b, h, t] · k[b, h / group, s]: grouped-query attention for a few new tokens per row against the keys and
// values cached so far. Written out in PyTorch it was a third of a 16-row decode step (two batched matmuls, a softmax,
// a mask, and the conversion of the whole bf16 cache to float32 in every layer); here each (row, key head) is one
// task that reads its keys and values once for all the query heads sharing them, in float32 arithmetic whatever q and
// the cache hold. Tasks are split among threads whole, so a result does not depend on the thread count.
inline __m512 load_f32(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load_f32(const at::BFloat16* p) {
  return _mm512_castsi512_ps(
      _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16));
}
inline void store_f32(float* p, __m512 v) { _mm512_storeu_ps(p, v); }
inline void store_f32(at::BFloat16* p, __m512 v) {  // round to nearest even, as PyTorch converts
  const __m512i bits = _mm512_castps_si512(v);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  const __m512i rounded = _mm512_add_epi32(bits, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7FFF)));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(_mm512_srli_epi32(rounded, 16)));
}

// e^x for x ≤ 0: 2^n · e^r with n = round(x / ln 2) and |r| ≤ ln 2 / 2 (ln 2 in two parts, so r is exact), e^r by
// its Taylor series to r^7 (truncation below 1e-8 relative); x below -104 gives 0.
inline __m512 exp16(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-104.f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.f / 5040);
  for (const float c : {1.f / 720, 1.f / 120, 1.f / 24, 1.f / 6, 0.5f, 1.f, 1.f}) p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
  return _mm512_scalef_ps(p, n);
}

// scores[r, s] = scale · q[r] · k[s] for R query rows (float32, [R, D]) against keys s < S: each key is read and
// converted once for all R rows.
template <int R, typename CT>
void score_rows(const float* q, const CT* k, int64_t k_s, int64_t S, int64_t D, float scale, float* scores) {
  for (int64_t s = 0; s < S; ++s) {
    __m512 dot[R];
    for (int r = 0; r < R; ++r) dot[r] = _mm512_setzero_ps();
    for (int64_t d = 0; d < D; d += 16) {
      const __m512 key = load_f32(k + s * k_s + d);
      for (int r = 0; r < R; ++r) dot[r] = _mm512_fmadd_ps(_mm512_loadu_ps(q + r * D + d), key, dot[r]);
    }
    for (int r = 0; r < R; ++r) scores[r * S + s] = _mm512_reduce_add_ps(dot[r]) * scale;
  }
}

// out[r, d0 : d0 + 16·J] = Σ_s p[r, s] · v[s, d0 : d0 + 16·J] for R rows: each value vector is read once for all rows.
template <int R, int J, typename CT>
void weigh_rows(const float* p, const CT* v, int64_t v_s, int64_t S, int64_t d0, float* out, int64_t D) {
  __m512 acc[R][J];
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < J; ++j) acc[r][j] = _mm512_setzero_ps();
  for (int64_t s = 0; s < S; ++s) {
    __m512 value[J];
    for (int j = 0; j < J; ++j) value[j] = load_f32(v + s * v_s + d0 + 16 * j);
    for (int r = 0; r < R; ++r) {
      const __m512 weight = _mm512_set1_ps(p[r * S + s]);
      for (int j = 0; j < J; ++j) acc[r][j] = _mm512_fmadd_ps(weight, value[j], acc[r][j]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < J; ++j) _mm512_storeu_ps(out + r * D + d0 + 16 * j, acc[r][j]);
}

template <int R, typename CT>
void weigh_all(const float* p, const CT* v, int64_t v_s, int64_t S, float* out, int64_t D) {
  int64_t d0 = 0;
  for (; d0 + 64 <= D; d0 += 64) weigh_rows<R, 4>(p, v, v_s, S, d0, out, D);
  switch ((D - d0) / 16) {
    case 3: return weigh_rows<R, 3>(p, v, v_s, S, d0, out, D);
    case 2: return weigh_rows<R, 2>(p, v, v_s, S, d0, out, D);
    case 1: return weigh_rows<R, 1>(p, v, v_s, S, d0, out, D);
    default: return;
  }
}

// softmax of each row's scores over the slots its mask allows, in place (0 where it does not)
inline void softmax_rows(float* scores, const bool* const* allowed, int R, int64_t S) {
  const __m512 minus_inf = _mm512_set1_ps(-INFINITY);
  for (int r = 0; r < R; ++r) {
    float* row = scores + r * S;
    float top = -INFINITY;
    for (int64_t s = 0; s < S; ++s) {
      if (!allowed[r][s]) row[s] = -INFINITY;
      top = std::max(top, row[s]);
    }
    __m512 total = _mm512_setzero_ps();
    const __m512 shift = _mm512_set1_ps(top);
    for (int64_t s = 0; s < S; s += 16) {
      const __mmask16 lanes = S - s >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (S - s)) - 1);
      const __m512 x = _mm512_mask_loadu_ps(minus_inf, lanes, row + s);
      const __m512 e = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(x, minus_inf, _CMP_NEQ_OQ), exp16(_mm512_sub_ps(x, shift)));
      _mm512_mask_storeu_ps(row + s, lanes, e);
      total = _mm512_add_ps(total, e);
    }
    const __m512 inverse = _mm512_set1_ps(1.f / _mm512_reduce_add_ps(total));
    for (int64_t s = 0; s < S; s += 16) {
      const __mmask16 lanes = S - s >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (S - s)) - 1);
      _mm512_mask_storeu_ps(row + s, lanes, _mm512_mul_ps(_mm512_maskz_loadu_ps(lanes, row + s), inverse));
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
      for (int64_t d = 0; d < D; d += 16) _mm512_storeu_ps(q_rows.data() + r * D + d, load_f32(q + h * q_head + t * q_t + d));
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
      for (int64_t d = 0; d < D; d += 16) store_f32(out + t * out_t + h * D + d, _mm512_loadu_ps(results.data() + r * D + d));
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

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("linear_bf16", &linear<Bf16>, "x [M, K] · w [N, K]ᵀ in bfloat16 with float32 accumulation (AVX512-BF16)");
  m.def("linear_fp32", &linear<Fp32>, "x [M, K] · w [N, K]ᵀ in float32 (AVX-512)");
  m.def("grouped_linear_bf16", &grouped_linear<Bf16>, "rows of x by group g times w[g]ᵀ, bfloat16");
  m.def("grouped_linear_fp32", &grouped_linear<Fp32>, "rows of x by group g times w[g]ᵀ, float32");
  m.def("attend_cache", &attend_cache, "decode's grouped-query attention over the cache, float32 arithmetic");
}

// The same functions as operators, torch.ops.openseek.linear_bf16 / linear_fp32, so that torch.compile keeps a
// decode step that calls them in one graph (a pybind call is opaque to it and splits the graph).
TORCH_LIBRARY_FRAGMENT(openseek, m) {
  m.def("linear_bf16(Tensor x, Tensor w) -> Tensor");
  m.def("linear_fp32(Tensor x, Tensor w) -> Tensor");
  m.def("grouped_linear_bf16(Tensor x, Tensor w, Tensor ends) -> Tensor");
  m.def("grouped_linear_fp32(Tensor x, Tensor w, Tensor ends) -> Tensor");
  m.def("attend_cache(Tensor q, Tensor k, Tensor v, Tensor mask, float scale) -> Tensor");
}
TORCH_LIBRARY_IMPL(openseek, CPU, m) {
  m.impl("linear_bf16", &linear<Bf16>);
  m.impl("linear_fp32", &linear<Fp32>);
  m.impl("grouped_linear_bf16", &grouped_linear<Bf16>);
  m.impl("grouped_linear_fp32", &grouped_linear<Fp32>);
  m.impl("attend_cache", &attend_cache);
}
