// Training-mode BatchNorm (batch statistics) followed by GELU or nothing, in two passes over channels-last memory
// (built with circular_cpu.cpp by hybridvision/ops/native.py; used by hybridvision/ops/norm_act.py).
//
// x is (B, C, H, W) in channels-last memory, i.e. M = B*H*W rows of C contiguous values. With the batch statistics
// mean[c], var[c] (biased) and invstd = 1 / sqrt(var + eps):
//   forward   z = (x - mean) * invstd * weight + bias,   y = gelu(z) = z/2 * (1 + erf(z / sqrt 2))   (or y = z)
//   backward  gz = gy * gelu'(z),  gbias = sum_rows gz,  gweight = sum_rows gz * xhat   (xhat = (x - mean) * invstd)
//             gx = weight * invstd * (gz - gbias / M - xhat * gweight / M)
// Eager PyTorch runs this as batch_norm (two passes: statistics, normalise) + gelu (one), and in the backward as
// gelu_backward (one) + batch_norm_backward (two), each pass reading or writing a full activation, and keeps z as
// well as x and y for autograd. Here the forward reads x twice and writes y once; the backward's first pass reads gy
// and x, writes gz (into gx's memory; gz = gy without GELU) and sums it, the second turns gz into gx; z is recomputed from x and
// not stored. GELU's erf and the density in gelu' share one exp per element (normal_cdf_pdf), where torch's
// gelu_backward evaluates two; the erf is compute-bound work, not memory traffic, on a CPU core.
//
// Statistics: every thread sums (x - x[row 0]) and its square for blocks of 32 rows in the input type, then adds
// the block sums into double accumulators; shifting by the first row keeps E[d^2] - E[d]^2 accurate when the mean
// is large against the spread. The vector code is ATen's at::vec; GELU's math is in vec_gelu.h.
#include "vec_gelu.h"  // first: it selects the vector ISA for ATen/cpu/vec

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

namespace {

using at::vec::Vectorized;
using hybridvision_native::normal_cdf_pdf;

constexpr int64_t BLOCK_ROWS = 32;  // rows summed in the input type before the double accumulators take them

// The rows [begin, end) of a (M, C) row-major matrix, split into the chunks that at::parallel_for hands each thread.
template <typename F> void for_row_chunks(int64_t M, int64_t C, const F& f) {
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 15) / std::max<int64_t>(C, 1));
  at::parallel_for(0, M, grain, f);
}

// Per-channel sums over all M rows of the pair f(row, channel offset, valid lanes) -> (a, b), accumulated as the
// header describes. Returns 2 * Cp doubles (Cp = C rounded up to the vector width): sums of a, then sums of b.
template <typename T, typename F>
std::vector<double> channel_sums(int64_t M, int64_t C, const F& f) {
  using V = Vectorized<T>;
  const int64_t n = V::size(), Cp = (C + n - 1) / n * n;
  const int nthreads = at::get_num_threads();
  std::vector<double> acc(static_cast<size_t>(nthreads) * 2 * Cp, 0.0);
  double* const accp = acc.data();
  // by-value captures (raw pointers, sizes, f's own by-value captures) let the compiler keep them in registers
  for_row_chunks(M, C, [=](int64_t begin, int64_t end) {
    double* mine = accp + static_cast<size_t>(at::get_thread_num()) * 2 * Cp;
    std::vector<T> part(2 * Cp);
    for (int64_t r0 = begin; r0 < end; r0 += BLOCK_ROWS) {
      const int64_t r1 = std::min(end, r0 + BLOCK_ROWS);
      std::fill(part.begin(), part.end(), T(0));
      for (int64_t r = r0; r < r1; ++r) {
        for (int64_t c = 0; c < C; c += n) {
          const auto ab = f(r, c, std::min(n, C - c));
          T* pa = part.data() + c;
          (V::loadu(pa) + std::get<0>(ab)).store(pa);
          (V::loadu(pa + Cp) + std::get<1>(ab)).store(pa + Cp);
        }
      }
      for (int64_t c = 0; c < 2 * Cp; ++c) mine[c] += static_cast<double>(part[c]);
    }
  });
  std::vector<double> total(2 * Cp, 0.0);
  for (int t = 0; t < nthreads; ++t)
    for (int64_t c = 0; c < 2 * Cp; ++c) total[c] += acc[static_cast<size_t>(t) * 2 * Cp + c];
  return total;
}

void check_input(const at::Tensor& x, const char* name) {
  TORCH_CHECK(x.device().is_cpu(), name, " must be a CPU tensor, got ", x.device());
  TORCH_CHECK(x.dim() == 4, name, " must be (B, C, H, W), got ", x.sizes());
  TORCH_CHECK(x.is_contiguous(at::MemoryFormat::ChannelsLast), name, " must be channels-last contiguous (call "
              ".contiguous(memory_format=torch.channels_last)), got strides ", x.strides());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble, name, " must be float32 or float64, got ",
              x.scalar_type());
}

void check_channel_vector(const at::Tensor& v, const at::Tensor& x, const char* name) {
  TORCH_CHECK(v.dim() == 1 && v.size(0) == x.size(1) && v.is_contiguous() && v.scalar_type() == x.scalar_type() &&
                  v.device().is_cpu(),
              name, " must be a contiguous (C,) CPU tensor of the input's dtype with C = ", x.size(1), ", got ",
              v.sizes(), " ", v.scalar_type());
}

// The second forward pass: y = act((x - centre) * scale + shift) over rows [begin, end). Pointers to Cp values.
template <typename T, bool GELU>
void forward_apply(const T* xp, T* yp, const T* centre, const T* scale, const T* shift, int64_t M, int64_t C) {
  using V = Vectorized<T>;
  const int64_t n = V::size();
  for_row_chunks(M, C, [=](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      for (int64_t c = 0; c < C; c += n) {
        const int64_t cnt = std::min(n, C - c);
        V z = at::vec::fmadd(V::loadu(xp + r * C + c, cnt) - V::loadu(centre + c), V::loadu(scale + c),
                             V::loadu(shift + c));
        if constexpr (GELU) z = z * normal_cdf_pdf(z).first;
        z.store(yp + r * C + c, cnt);
      }
    }
  });
}

// The backward's first pass: gz = gy * act'((x - centre) * scale + shift), stored to gzp when GELU (else gz = gy),
// and the channel sums of gz and gz * (x - centre) * inv.
template <typename T, bool GELU>
std::vector<double> backward_sums(const T* xp, const T* gp, T* gzp, const T* centre, const T* inv, const T* scale,
                                  const T* shift, int64_t M, int64_t C) {
  using V = Vectorized<T>;
  return channel_sums<T>(M, C, [=](int64_t r, int64_t c, int64_t cnt) {
    const V d = V::loadu(xp + r * C + c, cnt) - V::loadu(centre + c);
    V gz = V::loadu(gp + r * C + c, cnt);
    if constexpr (GELU) {
      const V z = at::vec::fmadd(d, V::loadu(scale + c), V::loadu(shift + c));
      const auto [cdf, pdf] = normal_cdf_pdf(z);
      gz = gz * at::vec::fmadd(z, pdf, cdf);
      gz.store(gzp + r * C + c, cnt);
    }
    return std::make_tuple(gz, gz * d * V::loadu(inv + c));
  });
}

// -> (y like x, mean (C), biased var (C)); y = gelu(bn(x)) when gelu, else bn(x).
std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_act_forward(const at::Tensor& x, const at::Tensor& weight,
                                                                      const at::Tensor& bias, double eps, bool gelu_on) {
  check_input(x, "x");
  check_channel_vector(weight, x, "weight");
  check_channel_vector(bias, x, "bias");
  const int64_t C = x.size(1), M = x.numel() / std::max<int64_t>(C, 1);
  TORCH_CHECK(M > 1, "batch_norm_act_forward needs more than one value per channel, got input of size ", x.sizes());
  at::Tensor y = at::empty_like(x, at::MemoryFormat::ChannelsLast);
  at::Tensor mean = at::empty({C}, x.options()), var = at::empty({C}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "batch_norm_act_forward", [&] {
    using V = Vectorized<scalar_t>;
    const int64_t n = V::size(), Cp = (C + n - 1) / n * n;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    std::vector<scalar_t> shift0(Cp, scalar_t(0));
    std::copy(xp, xp + C, shift0.begin());  // row 0
    const scalar_t* s0 = shift0.data();
    const std::vector<double> sums = channel_sums<scalar_t>(M, C, [=](int64_t r, int64_t c, int64_t cnt) {
      const V d = V::loadu(xp + r * C + c, cnt) - V::loadu(s0 + c);
      return std::make_tuple(d, d * d);
    });
    // z = (x - mean) * scale + bias: subtracting first keeps z accurate when the mean is large against the spread
    std::vector<scalar_t> centre(Cp, scalar_t(0)), scale(Cp, scalar_t(0)), shift(Cp, scalar_t(0));
    const scalar_t *wp = weight.const_data_ptr<scalar_t>(), *bp = bias.const_data_ptr<scalar_t>();
    scalar_t *mp = mean.mutable_data_ptr<scalar_t>(), *vp = var.mutable_data_ptr<scalar_t>();
    for (int64_t c = 0; c < C; ++c) {
      const double md = sums[c] / M, v = std::max(0.0, sums[Cp + c] / M - md * md), mu = shift0[c] + md;
      mp[c] = centre[c] = static_cast<scalar_t>(mu);
      vp[c] = static_cast<scalar_t>(v);
      scale[c] = static_cast<scalar_t>(wp[c] / std::sqrt(v + eps));
      shift[c] = bp[c];
    }
    scalar_t* yp = y.mutable_data_ptr<scalar_t>();
    (gelu_on ? forward_apply<scalar_t, true> : forward_apply<scalar_t, false>)(
        xp, yp, centre.data(), scale.data(), shift.data(), M, C);
  });
  return {y, mean, var};
}

// -> (gx like x, gweight (C), gbias (C)) for the forward above, given its batch mean and invstd = 1/sqrt(var + eps).
std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_act_backward(const at::Tensor& gy, const at::Tensor& x,
                                                                       const at::Tensor& weight, const at::Tensor& bias,
                                                                       const at::Tensor& mean, const at::Tensor& invstd,
                                                                       bool gelu_on) {
  check_input(x, "x");
  check_input(gy, "gy");
  TORCH_CHECK(gy.sizes() == x.sizes() && gy.scalar_type() == x.scalar_type(), "gy must match x: got ", gy.sizes(), " ",
              gy.scalar_type(), " for x ", x.sizes(), " ", x.scalar_type());
  check_channel_vector(weight, x, "weight");
  check_channel_vector(bias, x, "bias");
  check_channel_vector(mean, x, "mean");
  check_channel_vector(invstd, x, "invstd");
  const int64_t C = x.size(1), M = x.numel() / std::max<int64_t>(C, 1);
  at::Tensor gx = at::empty_like(x, at::MemoryFormat::ChannelsLast);
  at::Tensor gweight = at::empty({C}, x.options()), gbias = at::empty({C}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "batch_norm_act_backward", [&] {
    using V = Vectorized<scalar_t>;
    const int64_t n = V::size(), Cp = (C + n - 1) / n * n;
    const scalar_t *xp = x.const_data_ptr<scalar_t>(), *gp = gy.const_data_ptr<scalar_t>();
    const scalar_t *wp = weight.const_data_ptr<scalar_t>(), *bp = bias.const_data_ptr<scalar_t>();
    const scalar_t *mp = mean.const_data_ptr<scalar_t>(), *ip = invstd.const_data_ptr<scalar_t>();
    // d = x - mean, xhat = d * invstd, z = d * scale + bias  (padded to whole vectors with zeros)
    std::vector<scalar_t> centre(Cp, 0), inv(Cp, 0), scale(Cp, 0), shift(Cp, 0);
    for (int64_t c = 0; c < C; ++c) {
      centre[c] = mp[c];
      inv[c] = ip[c];
      scale[c] = wp[c] * ip[c];
      shift[c] = bp[c];
    }
    // pass 1: gz (written to gx, unless it is gy: no GELU) and its two channel sums; pass 2: gx = k * gz + p * d + q
    scalar_t* gxp = gx.mutable_data_ptr<scalar_t>();
    const scalar_t* gzp = gelu_on ? gxp : gp;
    const std::vector<double> sums = (gelu_on ? backward_sums<scalar_t, true> : backward_sums<scalar_t, false>)(
        xp, gp, gxp, centre.data(), inv.data(), scale.data(), shift.data(), M, C);
    // k = weight * invstd (= scale), p = -k * invstd * gweight / M, q = -k * gbias / M
    std::vector<scalar_t> p(Cp, 0), q(Cp, 0);
    scalar_t *gwp = gweight.mutable_data_ptr<scalar_t>(), *gbp = gbias.mutable_data_ptr<scalar_t>();
    for (int64_t c = 0; c < C; ++c) {
      const double gb = sums[c], gw = sums[Cp + c], kc = static_cast<double>(wp[c]) * ip[c];
      gbp[c] = static_cast<scalar_t>(gb);
      gwp[c] = static_cast<scalar_t>(gw);
      p[c] = static_cast<scalar_t>(-kc * ip[c] * gw / M);
      q[c] = static_cast<scalar_t>(-kc * gb / M);
    }
    const scalar_t *cen = centre.data(), *kp = scale.data(), *pp = p.data(), *qp = q.data();
    for_row_chunks(M, C, [=](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        for (int64_t c = 0; c < C; c += n) {
          const int64_t cnt = std::min(n, C - c);
          const V d = V::loadu(xp + r * C + c, cnt) - V::loadu(cen + c), gz = V::loadu(gzp + r * C + c, cnt);
          at::vec::fmadd(gz, V::loadu(kp + c), at::vec::fmadd(d, V::loadu(pp + c), V::loadu(qp + c)))
              .store(gxp + r * C + c, cnt);
        }
      }
    });
  });
  return {gx, gweight, gbias};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(hybridvision, m) {
  m.def("batch_norm_act_forward(Tensor x, Tensor weight, Tensor bias, float eps, bool gelu) -> (Tensor, Tensor, Tensor)");
  m.def("batch_norm_act_backward(Tensor gy, Tensor x, Tensor weight, Tensor bias, Tensor mean, Tensor invstd, "
        "bool gelu) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(hybridvision, CPU, m) {
  m.impl("batch_norm_act_forward", &batch_norm_act_forward);
  m.impl("batch_norm_act_backward", &batch_norm_act_backward);
}
