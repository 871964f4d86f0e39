// Vector sigmoid, tanh and 1 / sqrt for the CPU step kernels, inlined.
//
// at::vec's exp is an out-of-line Sleef call: every vector register is caller-saved, so
// each of the five calls a step makes per vector spills the live gate values around it,
// and the divisions behind sigmoid and tanh queue on the one divider. In float32 both
// have cheaper forms within a few ulp: Cephes' exp (range reduction by ln 2 and a degree-5
// polynomial, 2^n applied exactly) and a reciprocal estimate refined by one Newton step.
// float64 keeps Sleef and exact division: it is the precision tests check against, not
// the one timed. Each is forced inline (C10_ALWAYS_INLINE): left to itself GCC kept
// fast_tanh out of line, called through the PLT from the step kernels, with the same spills.
#pragma once

#include <ATen/cpu/vec/vec.h>
#include <c10/macros/Macros.h>

#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
#include <immintrin.h>
#endif

namespace bnlstm {

template <typename T>
using Vec = at::vec::Vectorized<T>;

// exp(x). The float32 form clamps x to [-87, 80]: sigmoid and tanh, its only callers, are
// then 0 or 1 to float precision, and the reciprocal below never sees infinity.
template <typename T>
C10_ALWAYS_INLINE Vec<T> exp_clamped(const Vec<T>& x) {
  return x.exp();
}

// 1 / d for d >= 1 (sigmoid's and tanh's denominators are 1 + exp(...) >= 1).
template <typename T>
C10_ALWAYS_INLINE Vec<T> reciprocal_of_at_least_one(const Vec<T>& d) {
  return Vec<T>(T(1)) / d;
}

#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
template <>
C10_ALWAYS_INLINE Vec<float> exp_clamped(const Vec<float>& x_in) {
  using V = Vec<float>;
  // Cephes expf: x = n ln2 + r, |r| <= ln2 / 2, ln2 split in two for an exact n ln2.
  const V x = at::vec::clamp(x_in, V(-87.0f), V(80.0f));
  const V n = at::vec::fmadd(x, V(1.44269504088896341f), V(0.5f)).floor();
  V r = at::vec::fmadd(n, V(-0.693359375f), x);
  r = at::vec::fmadd(n, V(2.12194440e-4f), r);
  V p(1.9875691500e-4f);
  p = at::vec::fmadd(p, r, V(1.3981999507e-3f));
  p = at::vec::fmadd(p, r, V(8.3334519073e-3f));
  p = at::vec::fmadd(p, r, V(4.1665795894e-2f));
  p = at::vec::fmadd(p, r, V(1.6666665459e-1f));
  p = at::vec::fmadd(p, r, V(5.0000001201e-1f));
  // 1 + (r + p r^2): the small terms summed first, one rounding at the end.
  const V y = at::vec::fmadd(p, r * r, r) + V(1.0f);
#if defined(CPU_CAPABILITY_AVX512)
  return _mm512_scalef_ps(y, n);
#else
  // 2^n through the exponent field; n is in [-126, 116] after the clamp.
  const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return y * V(_mm256_castsi256_ps(bits));
#endif
}

template <>
C10_ALWAYS_INLINE Vec<float> reciprocal_of_at_least_one(const Vec<float>& d) {
  using V = Vec<float>;
#if defined(CPU_CAPABILITY_AVX512)
  // One Newton step squares the estimate's relative error, 2^-14, to below 2^-28: within
  // float32's rounding, so a saturated sigmoid (d = 1) is exactly 1.
  const V estimate = _mm512_rcp14_ps(d);
  return at::vec::fmadd(estimate, at::vec::fnmadd(d, estimate, V(1.0f)), estimate);
#else
  // The AVX2 estimate's 1.5 * 2^-12 becomes ~2^-22 after one step, 2 ulp: a saturated
  // sigmoid or tanh came out 1 - 2^-24, so saturated units leaked gradient (sigma' of
  // 6e-8 instead of 0). A second step (two FMAs) brings it within rounding.
  V r = _mm256_rcp_ps(d);
  r = at::vec::fmadd(r, at::vec::fnmadd(d, r, V(1.0f)), r);
  return at::vec::fmadd(r, at::vec::fnmadd(d, r, V(1.0f)), r);
#endif
}
#endif

// 1 / sqrt(x) for x > 0 (a variance plus eps). at::vec's rsqrt is a square root and a
// division, both on the one divider; with AVX-512, float32 refines the hardware estimate
// (relative error 2^-14) by a Newton step, y (1.5 - (x / 2) y^2), to within an ulp or two.
// AVX2's estimate would need two steps, and float32 results there moved past a bound of
// the checkpoint tests (tests/test_checkpoints.py) whose AVX2 calibration is the exact
// form's: AVX2 and float64 keep it.
template <typename T>
C10_ALWAYS_INLINE Vec<T> inverse_sqrt(const Vec<T>& x) {
  return x.rsqrt();
}

#if defined(CPU_CAPABILITY_AVX512)
template <>
C10_ALWAYS_INLINE Vec<float> inverse_sqrt(const Vec<float>& x) {
  using V = Vec<float>;
  const V y = _mm512_rsqrt14_ps(x);
  return y * at::vec::fnmadd(x * V(0.5f) * y, y, V(1.5f));
}
#endif

template <typename T>
C10_ALWAYS_INLINE Vec<T> sigmoid(const Vec<T>& x) {
  return reciprocal_of_at_least_one(Vec<T>(T(1)) + exp_clamped(x.neg()));
}

// tanh. Sleef's tanh costs several Sleef exps; float32 uses Cephes' odd polynomial below
// |x| = 0.625 and 1 - 2 / (exp(2|x|) + 1) with the sign of x above (no cancellation there,
// tanh > 0.55), a few ulp of relative error. float64 keeps Sleef's tanh.
template <typename T>
C10_ALWAYS_INLINE Vec<T> fast_tanh(const Vec<T>& x) {
  return x.tanh();
}

template <>
C10_ALWAYS_INLINE Vec<float> fast_tanh(const Vec<float>& x) {
  using V = Vec<float>;
  const V one(1.0f), two(2.0f);
  const V z = x * x;
  V p(-5.70498872745e-3f);
  p = at::vec::fmadd(p, z, V(2.06390887954e-2f));
  p = at::vec::fmadd(p, z, V(-5.37397155531e-2f));
  p = at::vec::fmadd(p, z, V(1.33314422036e-1f));
  p = at::vec::fmadd(p, z, V(-3.33332819422e-1f));
  const V small = at::vec::fmadd(p * z, x, x);
  const V magnitude = x.abs();
  const V large = at::vec::fnmadd(two, reciprocal_of_at_least_one(exp_clamped(magnitude + magnitude) + one), one);
  const V signed_large = V::blendv(large, V(0.0f) - large, x < V(0.0f));
  return V::blendv(signed_large, small, magnitude < V(0.625f));
}

}  // namespace bnlstm
