// Part of dense.cpp, which includes its parts in order after simd.h: they share its translation unit and its
// anonymous namespace, each using what the parts before it define.
//
// Decode's attention over the cache (GQA, and MLA's absorbed form) and MoE routing and combining.
#pragma once

namespace {

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

}  // namespace
