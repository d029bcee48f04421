// The vector operations our kernels are written in, for one instruction-set level per build: float32 lanes, bf16
// <-> float32 conversion, tails shorter than a vector, lane masks, sums, e^x and σ(x). A kernel source written in
// these compiles unchanged at each level, the way ATen compiles one source per CPU_CAPABILITY; the compiler's own
// macros pick the level, from the flags the extension is built with (kernels/__init__.py's EXTENSIONS):
// - AVX-512 (-march=native on a CPU with avx512f/bw/bf16): `Vec` is __m512, 16 lanes; tails and masks are the
//   hardware's mask registers. These are the instructions the kernels were first written in, so its results
//   are unchanged.
// - AVX2 + FMA + F16C (-march=x86-64-v3): `Vec` is __m256, 8 lanes; a mask is a vector of all-ones or zero lanes,
//   tails are masked loads (float32) or go through a small buffer (bf16: AVX2 has no 16-bit masked load).
// Both give bit-identical e^x, σ(x), bf16 rounding and elementwise products; only sums over lanes (and anything
// blocked by the lane count) are added in another order.
// Included by path: torch's extension builder rebuilds on a change of the .cpp files, not of this header.
#pragma once
#include <immintrin.h>
#include <c10/util/BFloat16.h>
#include <cstdint>
#include <cstring>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define OPENSEEK_SIMD_AVX512 1
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define OPENSEEK_SIMD_AVX2 1
#else
#error "simd.h needs AVX-512 (F, BW, VL) or AVX2 with FMA and F16C: build with -march=native or -march=x86-64-v3"
#endif

namespace simd {
namespace {  // each extension's own copy: the levels' functions share names

using bf16 = at::BFloat16;

#if defined(OPENSEEK_SIMD_AVX512)

constexpr int kLanes = 16;
constexpr const char* kLevel = "AVX-512";
using Vec = __m512;
using Mask = __mmask16;  // lanes on
using Tail = __mmask16;  // the first n lanes on

inline Vec zero() { return _mm512_setzero_ps(); }
inline Vec set1(float v) { return _mm512_set1_ps(v); }
inline Vec add(Vec a, Vec b) { return _mm512_add_ps(a, b); }
inline Vec sub(Vec a, Vec b) { return _mm512_sub_ps(a, b); }
inline Vec mul(Vec a, Vec b) { return _mm512_mul_ps(a, b); }
inline Vec div(Vec a, Vec b) { return _mm512_div_ps(a, b); }
inline Vec max(Vec a, Vec b) { return _mm512_max_ps(a, b); }
inline Vec fmadd(Vec a, Vec b, Vec c) { return _mm512_fmadd_ps(a, b, c); }    // a·b + c
inline Vec fnmadd(Vec a, Vec b, Vec c) { return _mm512_fnmadd_ps(a, b, c); }  // c - a·b
inline float hsum(Vec v) { return _mm512_reduce_add_ps(v); }
inline float hmax(Vec v) { return _mm512_reduce_max_ps(v); }

inline Tail tail(int64_t left) { return left >= 16 ? Tail(0xFFFF) : static_cast<Tail>((1u << left) - 1); }
inline Mask mask_of(Tail t) { return t; }
inline Vec zero_unless(Mask m, Vec v) { return _mm512_maskz_mov_ps(m, v); }
inline Vec select(Mask m, Vec on, Vec off) { return _mm512_mask_mov_ps(off, m, on); }
inline Vec max_where(Mask m, Vec acc, Vec v) { return _mm512_mask_max_ps(acc, m, acc, v); }  // acc where m is off
inline Mask not_equal(Vec a, Vec b) { return _mm512_cmp_ps_mask(a, b, _CMP_NEQ_OQ); }
inline Mask less(Vec a, Vec b) { return _mm512_cmp_ps_mask(a, b, _CMP_LT_OQ); }
// which lanes a bool mask allows (bytes 0 or 1), within the tail
inline Mask allowed(const bool* m, Tail t) {
  return _mm_mask_cmpneq_epi8_mask(t, _mm_maskz_loadu_epi8(t, m), _mm_setzero_si128());
}

// v rounded to bf16 (nearest even, as PyTorch converts): the bf16 bits in the low half of each 32-bit lane
inline __m512i bf16_bits(Vec v) {
  const __m512i bits = _mm512_castps_si512(v);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  return _mm512_srli_epi32(_mm512_add_epi32(bits, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7FFF))), 16);
}
inline Vec round_bf16(Vec v) { return _mm512_castsi512_ps(_mm512_slli_epi32(bf16_bits(v), 16)); }

inline Vec load(const float* p) { return _mm512_loadu_ps(p); }
inline Vec load(const bf16* p) {
  return _mm512_castsi512_ps(
      _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16));
}
inline Vec load(const float* p, Tail t) { return _mm512_maskz_loadu_ps(t, p); }  // 0 beyond the tail
inline Vec load(const bf16* p, Tail t) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(t, p)), 16));
}
inline void store(float* p, Vec v) { _mm512_storeu_ps(p, v); }
inline void store(bf16* p, Vec v) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(bf16_bits(v)));
}
inline void store(float* p, Vec v, Tail t) { _mm512_mask_storeu_ps(p, t, v); }
inline void store(bf16* p, Vec v, Tail t) { _mm256_mask_storeu_epi16(p, t, _mm512_cvtepi32_epi16(bf16_bits(v))); }

inline Vec round_nearest(Vec v) { return _mm512_roundscale_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
inline Vec times_pow2(Vec p, Vec n) { return _mm512_scalef_ps(p, n); }  // p · 2^n, one rounding
inline Vec abs(Vec v) { return _mm512_abs_ps(v); }

#else  // AVX2 + FMA + F16C

constexpr int kLanes = 8;
constexpr const char* kLevel = "AVX2";
using Vec = __m256;
using Mask = __m256;  // all-ones lanes on, zero lanes off
struct Tail {         // the first n lanes on (n ≤ 8), as a lane mask too
  int n;
  __m256i bits;
};

inline Vec zero() { return _mm256_setzero_ps(); }
inline Vec set1(float v) { return _mm256_set1_ps(v); }
inline Vec add(Vec a, Vec b) { return _mm256_add_ps(a, b); }
inline Vec sub(Vec a, Vec b) { return _mm256_sub_ps(a, b); }
inline Vec mul(Vec a, Vec b) { return _mm256_mul_ps(a, b); }
inline Vec div(Vec a, Vec b) { return _mm256_div_ps(a, b); }
inline Vec max(Vec a, Vec b) { return _mm256_max_ps(a, b); }
inline Vec fmadd(Vec a, Vec b, Vec c) { return _mm256_fmadd_ps(a, b, c); }
inline Vec fnmadd(Vec a, Vec b, Vec c) { return _mm256_fnmadd_ps(a, b, c); }
inline float hsum(Vec v) {  // (lanes 0-3 + 4-7), then pairs, then the last two
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}
inline float hmax(Vec v) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_max_ss(s, _mm_movehdup_ps(s)));
}

inline Tail tail(int64_t left) {
  const int n = left >= 8 ? 8 : static_cast<int>(left);
  return {n, _mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7))};
}
inline Mask mask_of(Tail t) { return _mm256_castsi256_ps(t.bits); }
inline Vec zero_unless(Mask m, Vec v) { return _mm256_and_ps(m, v); }
inline Vec select(Mask m, Vec on, Vec off) { return _mm256_blendv_ps(off, on, m); }
inline Vec max_where(Mask m, Vec acc, Vec v) { return _mm256_blendv_ps(acc, _mm256_max_ps(acc, v), m); }
inline Mask not_equal(Vec a, Vec b) { return _mm256_cmp_ps(a, b, _CMP_NEQ_OQ); }
inline Mask less(Vec a, Vec b) { return _mm256_cmp_ps(a, b, _CMP_LT_OQ); }
inline Mask allowed(const bool* m, Tail t) {
  int64_t bytes = 0;  // the tail's bools, zero beyond it
  std::memcpy(&bytes, m, t.n);
  const __m256i lanes = _mm256_cvtepu8_epi32(_mm_cvtsi64_si128(bytes));
  return _mm256_castsi256_ps(_mm256_cmpgt_epi32(lanes, _mm256_setzero_si256()));
}

inline __m256i bf16_bits(Vec v) {  // as the AVX-512 one: the rounded bf16 bits in the low half of each lane
  const __m256i bits = _mm256_castps_si256(v);
  const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  return _mm256_srli_epi32(_mm256_add_epi32(bits, _mm256_add_epi32(odd, _mm256_set1_epi32(0x7FFF))), 16);
}
inline Vec round_bf16(Vec v) { return _mm256_castsi256_ps(_mm256_slli_epi32(bf16_bits(v), 16)); }
inline __m128i bf16_pack(Vec v) {  // 8 rounded bf16 values, in order
  const __m256i bits = bf16_bits(v);
  return _mm_packus_epi32(_mm256_castsi256_si128(bits), _mm256_extracti128_si256(bits, 1));
}
inline Vec widen_bf16(__m128i h) { return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16)); }

inline Vec load(const float* p) { return _mm256_loadu_ps(p); }
inline Vec load(const bf16* p) { return widen_bf16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
inline Vec load(const float* p, Tail t) { return t.n == 8 ? _mm256_loadu_ps(p) : _mm256_maskload_ps(p, t.bits); }
inline Vec load(const bf16* p, Tail t) {
  if (t.n == 8) return load(p);
  __m128i h = _mm_setzero_si128();
  std::memcpy(&h, p, t.n * sizeof(bf16));
  return widen_bf16(h);
}
inline void store(float* p, Vec v) { _mm256_storeu_ps(p, v); }
inline void store(bf16* p, Vec v) { _mm_storeu_si128(reinterpret_cast<__m128i*>(p), bf16_pack(v)); }
inline void store(float* p, Vec v, Tail t) {
  if (t.n == 8) _mm256_storeu_ps(p, v);
  else _mm256_maskstore_ps(p, t.bits, v);
}
inline void store(bf16* p, Vec v, Tail t) {
  if (t.n == 8) return store(p, v);
  const __m128i h = bf16_pack(v);
  std::memcpy(p, &h, t.n * sizeof(bf16));
}

inline Vec round_nearest(Vec v) { return _mm256_round_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
// p · 2^n for integral n in [-252, 254] (exp passes n ≥ -150) and p in [0.5, 2], rounded as scalef rounds it: 2^n
// as two normal halves, so that the first product is exact and only the second (where the result falls below the
// normal range) rounds
inline Vec times_pow2(Vec p, Vec n) {
  const __m256i ni = _mm256_cvtps_epi32(n), half = _mm256_srai_epi32(ni, 1);
  const auto pow2 = [](__m256i e) {  // 2^e for e in [-126, 127]: the biased exponent in place
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(e, _mm256_set1_epi32(127)), 23));
  };
  return _mm256_mul_ps(_mm256_mul_ps(p, pow2(half)), pow2(_mm256_sub_epi32(ni, half)));
}
inline Vec abs(Vec v) { return _mm256_andnot_ps(_mm256_set1_ps(-0.f), v); }

#endif

// e^x for x ≤ 0: 2^n · e^r with n = round(x / ln 2) and |r| ≤ ln 2 / 2 (ln 2 in two parts, so r is exact), e^r by
// its Taylor series to r^7 (truncation below 1e-8 relative); x below -104 gives 0.
inline Vec exp(Vec x) {
  x = max(x, set1(-104.f));
  const Vec n = round_nearest(mul(x, set1(1.44269504088896341f)));
  Vec r = fnmadd(n, set1(0.693359375f), x);
  r = fnmadd(n, set1(-2.12194440e-4f), r);
  Vec p = set1(1.f / 5040);
  for (const float c : {1.f / 720, 1.f / 120, 1.f / 24, 1.f / 6, 0.5f, 1.f, 1.f}) p = fmadd(p, r, set1(c));
  return times_pow2(p, n);
}

// σ(x) for any x: e = e^-|x|, σ = 1 / (1 + e) for x ≥ 0 and e / (1 + e) below
inline Vec sigmoid(Vec x) {
  const Vec e = exp(sub(zero(), abs(x)));
  const Vec inverse = div(set1(1.f), add(set1(1.f), e));
  return select(less(x, zero()), mul(inverse, e), inverse);
}

}  // namespace
}  // namespace simd
