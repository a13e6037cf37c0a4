// Shared by the kernels that use ATen's vector types (batchnorm_act_cpu.cpp, depthwise_cpu.cpp, attention_cpu.cpp):
// the vector ISA selection, which must precede <ATen/cpu/vec/vec.h> (the build is -march=native), the exp they use
// and GELU's math.
#pragma once

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512DQ__) && defined(__AVX512VL__)
#define CPU_CAPABILITY AVX512
#define CPU_CAPABILITY_AVX512
#elif defined(__AVX2__) && defined(__FMA__)
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#else
#define CPU_CAPABILITY DEFAULT
#endif

#include <ATen/cpu/vec/vec.h>

#include <cmath>
#include <type_traits>
#include <utility>

namespace hybridvision_native {

// exp: for float ATen's exp_u20 (a degree-5 polynomial, ~20 ulp; see normal_cdf_pdf for what Sleef's 1-ulp exp
// cost), for double ATen's accurate exp.
template <typename T> inline at::vec::Vectorized<T> fast_exp(const at::vec::Vectorized<T>& x) {
  if constexpr (std::is_same<T, float>::value) {
    return x.exp_u20();
  } else {
    return x.exp();
  }
}

// (Phi(z), phi(z)): the standard normal CDF and density, so that gelu(z) = z * Phi(z), gelu'(z) = Phi(z) + z * phi(z).
// float: erf by Abramowitz & Stegun 7.1.26 (|error| < 1.5e-7), the formula of ATen's own vectorised float erf, whose
// exp(-z^2 / 2) is the density's too: one exp per element, fast_exp (ATen's exp_u20 for float; with
// Sleef's 1-ulp exp, BatchNorm + GELU at 384 channels @112, batch 8, took 55.5 / 75.4 ms forward / backward against
// 27.1 / 38.2 ms without GELU on an AVX2 EPYC, scratch timing). gelu(z) stays within 3.7e-7 of the float64
// formula over [-12, 12] (torch's fp32 gelu: 3.0e-7). double: ATen's accurate erf and exp.
template <typename T>
inline std::pair<at::vec::Vectorized<T>, at::vec::Vectorized<T>> normal_cdf_pdf(const at::vec::Vectorized<T>& z) {
  using V = at::vec::Vectorized<T>;
  const V half(T(0.5)), one(T(1)), rsqrt2(T(M_SQRT1_2)), rsqrt2pi(T(0.5 * M_2_SQRTPI * M_SQRT1_2));
  const V e = fast_exp(V(T(-0.5)) * z * z);
  if constexpr (std::is_same<T, float>::value) {
    const V t = one / at::vec::fmadd(V(0.3275911f), z.abs() * rsqrt2, one);
    V r = at::vec::fmadd(V(1.061405429f), t, V(-1.453152027f));
    r = at::vec::fmadd(r, t, V(1.421413741f));
    r = at::vec::fmadd(r, t, V(-0.284496736f));
    r = at::vec::fmadd(r, t, V(0.254829592f));
    const V erf_abs = one - r * t * e;                                        // erf(|z| / sqrt 2)
    const V cdf = half + half * V::blendv(erf_abs, V(0.f) - erf_abs, z < V(0.f));
    return {cdf, e * rsqrt2pi};
  } else {
    return {half * (one + (z * rsqrt2).erf()), e * rsqrt2pi};
  }
}

}  // namespace hybridvision_native
