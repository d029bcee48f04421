// Part of dense.cpp, which includes its parts in order after simd.h: they share its translation unit and its
// anonymous namespace, each using what the parts before it define.
//
// The training pass's row kernels, forward and backward: the softmaxes, RMSNorm and SwiGLU, rotary embedding
// (RMSNorm and the rotation serve decode too).
#pragma once

namespace {

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

}  // namespace
