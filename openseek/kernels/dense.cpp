// Kernels in float32 arithmetic, in parts: decode's matmul (dense_matmul.h), decode's attention and MoE routing
// (dense_decode.h), the training pass's softmaxes, RMSNorm, SwiGLU and rotary embedding, forward and backward
// (dense_training.h); here, MLA decode's cache write (built from the norm and the rotation) and the registration.
//
// One source for every instruction-set level: written in simd.h's vector operations, it is compiled once per level
// (kernels/__init__.py's EXTENSIONS): `dense_avx512` with -march=native (16 float lanes; its operators are
// torch.ops.openseek.*) and `dense_avx2` with -march=x86-64-v3 (AVX2 + FMA + F16C, 8 lanes; torch.ops.openseek_avx2.*),
// with the same functions, arguments and results. Where the best code differs by level (bf16 dot products, how many
// accumulators fit in the registers) a small per-level choice sits next to the code it parameterises.
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

#include "dense_matmul.h"
#include "dense_decode.h"
#include "dense_training.h"

namespace {

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
