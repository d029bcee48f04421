// AVX-512 math shared by the kernels (dense_avx512.cpp, quantized_vnni.cpp), 16 float32 lanes at a time.
// Included by path: torch's extension builder rebuilds on a change of the .cpp files, not of this header.
#pragma once
#include <immintrin.h>

namespace {

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

// σ(x) for any x: e = e^-|x|, σ = 1 / (1 + e) for x ≥ 0 and e / (1 + e) below
inline __m512 sigmoid16(__m512 x) {
  const __m512 e = exp16(_mm512_sub_ps(_mm512_setzero_ps(), _mm512_abs_ps(x)));
  const __m512 inverse = _mm512_div_ps(_mm512_set1_ps(1.f), _mm512_add_ps(_mm512_set1_ps(1.f), e));
  return _mm512_mask_mul_ps(inverse, _mm512_cmp_ps_mask(x, _mm512_setzero_ps(), _CMP_LT_OQ), inverse, e);
}

}  // namespace
