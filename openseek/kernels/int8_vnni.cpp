// Weight-only int8 matmul for decode, on AVX-512 VNNI: y = x · (q · scale)ᵀ with activations quantised per row.
//
// Decode multiplies a few rows of activations by every weight once per step, so it is bound by how fast the
// weights stream in. The weights are packed as [N/16][K/4][16][4] int8: one 64-byte load holds 4 input columns of
// 16 output rows, exactly what `vpdpbusd` multiplies against 4 broadcast activation bytes, accumulating 16 outputs
// in one register with no horizontal sums. Activations are quantised per row to int8 (absmax / 127, as llama.cpp's
// Q8_0 does for its dot products) and shifted to uint8 (+128), because vpdpbusd multiplies unsigned by signed
// bytes; the shift is undone with the precomputed row sums of the weights: Σ(x+128)·w = Σx·w + 128·Σw.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <cmath>

namespace {

constexpr int64_t kRows = 8;  // activation rows per pass over the weights (accumulators held in registers)

// Per-row absmax quantisation: xu[m, k] = round(x[m, k] / scale[m]) + 128, scale[m] = max|x[m]| / 127.
template <typename T>
void quantise_rows(const T* x, int64_t M, int64_t K, uint8_t* xu, float* scale) {
  for (int64_t m = 0; m < M; ++m) {
    const T* row = x + m * K;
    float absmax = 0.f;
    for (int64_t k = 0; k < K; ++k) absmax = std::max(absmax, std::fabs(static_cast<float>(row[k])));
    const float s = absmax > 0.f ? absmax / 127.f : 1.f;
    const float inv = 1.f / s;
    for (int64_t k = 0; k < K; ++k)
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
  // output blocks per pass: at one row (decode at batch 1) 8, so that 8 accumulators are in flight; with more rows
  // the rows give that, and one block measured faster (round 4)
  const int64_t blocks = M == 1 ? 8 : 1;
  const Kernel<Out>* group = blocks == 8 ? kKernels<8, Out> : kKernels<1, Out>;
  at::parallel_for(0, N / 16, 8, [&](int64_t begin, int64_t end) {
    for (int64_t nb = begin; nb < end;) {
      const int64_t take = nb + blocks <= end ? blocks : 1;  // a band's last blocks go one at a time
      const Kernel<Out>* kernels = take == blocks ? group : kKernels<1, Out>;
      for (int64_t m0 = 0; m0 < M; m0 += kRows)  // more rows: the next pass finds these blocks in cache
        kernels[std::min(kRows, M - m0) - 1](xp + m0 * K, sxp + m0, wp, swp, rp, yp + m0 * N, K, N, nb);
      nb += take;
    }
  });
}

}  // namespace

// x [M, K] float32 or bfloat16; packed [N/16, K/4, 16, 4] int8; scales [N] float32; rowsum [N] int32 -> [M, N] in
// bfloat16 for bfloat16 x, else float32.
torch::Tensor int8_matmul(const torch::Tensor& x, const torch::Tensor& packed, const torch::Tensor& scales,
                          const torch::Tensor& rowsum) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "x must be a contiguous [M, K] matrix");
  const int64_t M = x.size(0), K = x.size(1), N = scales.size(0);
  TORCH_CHECK(K % 4 == 0 && N % 16 == 0 && packed.numel() == N * K, "packed weight does not match x and scales");
  auto xu = torch::empty({M, K}, torch::dtype(torch::kUInt8));
  auto sx = torch::empty({M}, torch::dtype(torch::kFloat32));
  if (x.scalar_type() == torch::kBFloat16)
    quantise_rows(x.data_ptr<at::BFloat16>(), M, K, xu.data_ptr<uint8_t>(), sx.data_ptr<float>());
  else
    quantise_rows(x.contiguous().to(torch::kFloat32).data_ptr<float>(), M, K, xu.data_ptr<uint8_t>(),
                  sx.data_ptr<float>());
  const uint8_t* xp = xu.data_ptr<uint8_t>();
  const float* sxp = sx.data_ptr<float>();
  const int8_t* wp = packed.data_ptr<int8_t>();
  const float* swp = scales.data_ptr<float>();
  const int32_t* rp = rowsum.data_ptr<int32_t>();
  // bf16 activations get bf16 results straight from the kernel (no separate conversion pass); others float32
  const bool bf16 = x.scalar_type() == torch::kBFloat16;
  auto y = torch::empty({M, N}, torch::dtype(bf16 ? torch::kBFloat16 : torch::kFloat32));
  if (bf16)
    run(xp, sxp, wp, swp, rp, y.data_ptr<at::BFloat16>(), M, K, N);
  else
    run(xp, sxp, wp, swp, rp, y.data_ptr<float>(), M, K, N);
  return y;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("int8_matmul", &int8_matmul, "weight-only int8 matmul with per-row int8 activations (AVX-512 VNNI)");
}

// The same function as an operator, torch.ops.openseek.int8_matmul, so that torch.compile keeps a decode step
// that calls it in one graph (a pybind call is opaque to it and splits the graph).
TORCH_LIBRARY_FRAGMENT(openseek, m) {
  m.def("int8_matmul(Tensor x, Tensor packed, Tensor scales, Tensor rowsum) -> Tensor");
}
TORCH_LIBRARY_IMPL(openseek, CPU, m) { m.impl("int8_matmul", &int8_matmul); }
