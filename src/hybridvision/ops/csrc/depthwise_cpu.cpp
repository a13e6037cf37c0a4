// Depthwise 3x3 convolution, zero padding 1, stride 1 or 2, on channels-last memory (built with the other kernels
// by hybridvision/ops/native.py; hybridvision/ops/fused.py times it against oneDNN and uses the faster).
//
// x (B, C, H, W) in channels-last memory is B*H*W pixels of C contiguous channels; weight (C, 1, 3, 3); s the stride,
// Ho = (H - 1) / s + 1, Wo = (W - 1) / s + 1; taps that fall outside the image read zeros (skipped):
//   forward       y[b, c, o, p]  = bias[c] + sum_{i, j < 3} w[c, i, j] * x[b, c, s*o - 1 + i, s*p - 1 + j]  (then GELU)
//   input grad    gx[b, c, h, v] = sum of gy[b, c, o, p] * w[c, i, j] over s*o - 1 + i = h, s*p - 1 + j = v
//   weight grad   gw[c, i, j]    = sum_{b, o, p} gy[b, c, o, p] * x[b, c, s*o - 1 + i, s*p - 1 + j]
// Vectorised over the contiguous channels, all channels of a pixel in turn, one image row per parallel work item:
// the three input rows of an output row stay in the core's cache, so each value crosses memory about once (blocking
// the channels, 128 at a time, made each block re-read the rows: up to 1.5x slower forward and 2x slower input
// gradient at CoAtNet-0's shapes in separate scratch runs). Windows that lie
// inside the image take 9 fixed taps; border pixels a list of the valid ones. The weight gradient sums each row in
// the input type and adds the row sums into per-thread double accumulators.
#include "vec_gelu.h"  // first: it selects the vector ISA for ATen/cpu/vec

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <vector>

namespace {

using at::vec::Vectorized;
using hybridvision_native::normal_cdf_pdf;

// The valid taps of one output (or, for the input gradient, one input) pixel: pixel offsets (in units of C) into
// the other tensor and the tap index i * 3 + j.
struct Taps {
  int n = 0;
  int64_t offset[9];
  int tap[9];
};

int64_t out_size(int64_t n, int64_t s) { return (n - 1) / s + 1; }

void check(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.dim() == 4, name, " must be a 4-D CPU tensor, got ", t.sizes(), " on ",
              t.device());
  TORCH_CHECK(t.is_contiguous(at::MemoryFormat::ChannelsLast), name, " must be channels-last contiguous (call "
              ".contiguous(memory_format=torch.channels_last)), got strides ", t.strides());
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, name,
              " must be float32 or float64, got ", t.scalar_type());
}

// weight (C, 1, 3, 3) -> 9 rows of Cp values (tap-major, zero-padded to whole vectors)
template <typename T> std::vector<T> taps_by_channel(const at::Tensor& weight, int64_t C, int64_t Cp) {
  TORCH_CHECK(weight.sizes() == at::IntArrayRef({C, 1, 3, 3}) && weight.scalar_type() == at::CppTypeToScalarType<T>(),
              "weight must be (C, 1, 3, 3) of the input's dtype with C = ", C, ", got ", weight.sizes(), " ",
              weight.scalar_type());
  const at::Tensor w = weight.contiguous();
  const T* wp = w.const_data_ptr<T>();
  std::vector<T> out(9 * Cp, T(0));
  for (int64_t c = 0; c < C; ++c)
    for (int t = 0; t < 9; ++t) out[t * Cp + c] = wp[c * 9 + t];
  return out;
}

// acc + sum of the 9 taps at src (the top-left input pixel of a 3x3 window, rows ``row`` values apart, pixels C
// apart) times the tap-major weights w9 (rows Cp apart), for channels [c, c + n); every tap inside the image.
template <typename T>
inline Vectorized<T> window9(const T* src, int64_t row, int64_t C, const T* w9, int64_t Cp, Vectorized<T> acc) {
  using V = Vectorized<T>;
  for (int i = 0; i < 3; ++i)
    for (int j = 0; j < 3; ++j)
      acc = at::vec::fmadd(V::loadu(src + i * row + j * C), V::loadu(w9 + (i * 3 + j) * Cp), acc);
  return acc;
}

// The taps of output pixel (o, p) of image b that fall inside the H x W input: offsets of the input pixels.
Taps input_taps(int64_t b, int64_t o, int64_t p, int64_t s, int64_t H, int64_t W, int64_t C) {
  Taps taps;
  for (int i = 0; i < 3; ++i) {
    const int64_t h = s * o - 1 + i;
    if (h < 0 || h >= H) continue;
    for (int j = 0; j < 3; ++j) {
      const int64_t v = s * p - 1 + j;
      if (v < 0 || v >= W) continue;
      taps.offset[taps.n] = ((b * H + h) * W + v) * C;
      taps.tap[taps.n++] = i * 3 + j;
    }
  }
  return taps;
}

template <typename T, bool GELU>
void forward_rows(const T* x, const T* w9, const T* bias, T* y, int64_t B, int64_t C, int64_t Cp, int64_t H,
                  int64_t W, int64_t s) {
  using V = Vectorized<T>;
  const int64_t n = V::size(), Ho = out_size(H, s), Wo = out_size(W, s);
  at::parallel_for(0, B * Ho, 1, [=](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t b = row / Ho, o = row % Ho;
      const bool rows_inside = s * o - 1 >= 0 && s * o + 1 < H;
      for (int64_t p = 0; p < Wo; ++p) {
        T* out = y + (row * Wo + p) * C;
        int64_t c = 0;
        if (rows_inside && s * p - 1 >= 0 && s * p + 1 < W) {  // the whole window inside: 9 fixed taps
          const T* src = x + ((b * H + s * o - 1) * W + s * p - 1) * C;
          for (; c + n <= C; c += n) {
            V acc = window9(src + c, W * C, C, w9 + c, Cp, V::loadu(bias + c));
            if constexpr (GELU) acc = acc * normal_cdf_pdf(acc).first;
            acc.store(out + c);
          }
          if (c == C) continue;
        }
        const Taps taps = input_taps(b, o, p, s, H, W, C);  // border pixels, and the channel tail
        for (; c < C; c += n) {
          const int64_t cnt = std::min(n, C - c);
          V acc = V::loadu(bias + c);
          for (int t = 0; t < taps.n; ++t)
            acc = at::vec::fmadd(V::loadu(x + taps.offset[t] + c, cnt), V::loadu(w9 + taps.tap[t] * Cp + c), acc);
          if constexpr (GELU) acc = acc * normal_cdf_pdf(acc).first;
          acc.store(out + c, cnt);
        }
      }
    }
  });
}

// -> y (B, C, Ho, Wo) channels-last
at::Tensor dw3x3_forward(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                         int64_t stride, bool gelu) {
  check(x, "x");
  TORCH_CHECK(stride == 1 || stride == 2, "stride must be 1 or 2, got ", stride);
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  at::Tensor y = at::empty({B, C, out_size(H, stride), out_size(W, stride)},
                           x.options().memory_format(at::MemoryFormat::ChannelsLast));
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "dw3x3_forward", [&] {
    const int64_t n = Vectorized<scalar_t>::size(), Cp = (C + n - 1) / n * n;
    const std::vector<scalar_t> w9 = taps_by_channel<scalar_t>(weight, C, Cp);
    std::vector<scalar_t> b(Cp, scalar_t(0));
    if (bias.has_value() && bias->defined()) {
      TORCH_CHECK(bias->dim() == 1 && bias->size(0) == C && bias->scalar_type() == x.scalar_type(),
                  "bias must be (C,) of the input's dtype with C = ", C, ", got ", bias->sizes());
      const at::Tensor bc = bias->contiguous();
      std::copy(bc.const_data_ptr<scalar_t>(), bc.const_data_ptr<scalar_t>() + C, b.begin());
    }
    (gelu ? forward_rows<scalar_t, true> : forward_rows<scalar_t, false>)(
        x.const_data_ptr<scalar_t>(), w9.data(), b.data(), y.mutable_data_ptr<scalar_t>(), B, C, Cp, H, W, stride);
  });
  return y;
}

// -> gx (B, C, H, W) channels-last, for gy (B, C, Ho, Wo) of an input of height H and width W
at::Tensor dw3x3_backward_input(const at::Tensor& gy, const at::Tensor& weight, int64_t H, int64_t W,
                                int64_t stride) {
  check(gy, "gy");
  TORCH_CHECK(stride == 1 || stride == 2, "stride must be 1 or 2, got ", stride);
  const int64_t B = gy.size(0), C = gy.size(1), Ho = gy.size(2), Wo = gy.size(3);
  TORCH_CHECK(Ho == out_size(H, stride) && Wo == out_size(W, stride), "gy ", gy.sizes(), " does not match an input of ",
              H, "x", W, " at stride ", stride);
  at::Tensor gx = at::empty({B, C, H, W}, gy.options().memory_format(at::MemoryFormat::ChannelsLast));
  AT_DISPATCH_FLOATING_TYPES(gy.scalar_type(), "dw3x3_backward_input", [&] {
    using V = Vectorized<scalar_t>;
    const int64_t n = V::size(), Cp = (C + n - 1) / n * n, s = stride;
    const std::vector<scalar_t> w9v = taps_by_channel<scalar_t>(weight, C, Cp);
    std::vector<scalar_t> flipped(9 * Cp);  // stride 1: gx is gy correlated with the kernel turned by 180 degrees
    for (int t = 0; t < 9; ++t)
      std::copy(w9v.begin() + (8 - t) * Cp, w9v.begin() + (9 - t) * Cp, flipped.begin() + t * Cp);
    const scalar_t *g = gy.const_data_ptr<scalar_t>(), *w9 = w9v.data(), *w9f = flipped.data();
    scalar_t* out0 = gx.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, B * H, 1, [=](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) {
        const int64_t b = row / H, h = row % H;
        const bool rows_inside = s == 1 && h >= 1 && h + 1 < Ho;
        for (int64_t v = 0; v < W; ++v) {
          scalar_t* out = out0 + (row * W + v) * C;
          int64_t c = 0;
          if (rows_inside && v >= 1 && v + 1 < Wo) {  // stride 1, all 9 taps inside: fixed offsets
            const scalar_t* src = g + ((b * Ho + h - 1) * Wo + v - 1) * C;
            for (; c + n <= C; c += n) window9(src + c, Wo * C, C, w9f + c, Cp, V(scalar_t(0))).store(out + c);
            if (c == C) continue;
          }
          Taps taps;  // output pixels (o, p) whose tap (i, j) reads (h, v): s*o - 1 + i = h, s*p - 1 + j = v
          for (int i = 0; i < 3; ++i) {
            const int64_t on = h + 1 - i;
            if (on < 0 || on % s != 0 || on / s >= Ho) continue;
            for (int j = 0; j < 3; ++j) {
              const int64_t pn = v + 1 - j;
              if (pn < 0 || pn % s != 0 || pn / s >= Wo) continue;
              taps.offset[taps.n] = ((b * Ho + on / s) * Wo + pn / s) * C;
              taps.tap[taps.n++] = i * 3 + j;
            }
          }
          for (; c < C; c += n) {
            const int64_t cnt = std::min(n, C - c);
            V acc(scalar_t(0));
            for (int t = 0; t < taps.n; ++t)
              acc = at::vec::fmadd(V::loadu(g + taps.offset[t] + c, cnt), V::loadu(w9 + taps.tap[t] * Cp + c), acc);
            acc.store(out + c, cnt);
          }
        }
      }
    });
  });
  return gx;
}

// -> gw (C, 1, 3, 3) for gy (B, C, Ho, Wo) and the forward's input x (B, C, H, W)
at::Tensor dw3x3_backward_weight(const at::Tensor& gy, const at::Tensor& x, int64_t stride) {
  check(gy, "gy");
  check(x, "x");
  TORCH_CHECK(stride == 1 || stride == 2, "stride must be 1 or 2, got ", stride);
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const int64_t Ho = out_size(H, stride), Wo = out_size(W, stride);
  TORCH_CHECK(gy.sizes() == at::IntArrayRef({B, C, Ho, Wo}) && gy.scalar_type() == x.scalar_type(), "gy must be ",
              at::IntArrayRef({B, C, Ho, Wo}), " of x's dtype for x ", x.sizes(), " at stride ", stride, ", got ",
              gy.sizes(), " ", gy.scalar_type());
  at::Tensor gw = at::empty({C, 1, 3, 3}, x.options().memory_format(at::MemoryFormat::Contiguous));
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "dw3x3_backward_weight", [&] {
    using V = Vectorized<scalar_t>;
    const int64_t n = V::size(), Cp = (C + n - 1) / n * n, s = stride;
    const int nthreads = at::get_num_threads();
    std::vector<double> acc(static_cast<size_t>(nthreads) * 9 * Cp, 0.0);
    double* const accp = acc.data();
    const scalar_t *g = gy.const_data_ptr<scalar_t>(), *xp = x.const_data_ptr<scalar_t>();
    at::parallel_for(0, B * Ho, 1, [=](int64_t begin, int64_t end) {
      double* mine = accp + static_cast<size_t>(at::get_thread_num()) * 9 * Cp;
      std::vector<scalar_t> part(9 * Cp);
      for (int64_t row = begin; row < end; ++row) {
        const int64_t b = row / Ho, o = row % Ho;
        std::fill(part.begin(), part.end(), scalar_t(0));
        for (int64_t p = 0; p < Wo; ++p) {
          const Taps taps = input_taps(b, o, p, s, H, W, C);
          const scalar_t* grow = g + (row * Wo + p) * C;
          for (int64_t c = 0; c < C; c += n) {
            const int64_t cnt = std::min(n, C - c);
            const V gv = V::loadu(grow + c, cnt);
            for (int t = 0; t < taps.n; ++t) {
              scalar_t* pa = part.data() + taps.tap[t] * Cp + c;
              at::vec::fmadd(gv, V::loadu(xp + taps.offset[t] + c, cnt), V::loadu(pa)).store(pa);
            }
          }
        }
        for (int64_t k = 0; k < 9 * Cp; ++k) mine[k] += static_cast<double>(part[k]);
      }
    });
    scalar_t* out = gw.mutable_data_ptr<scalar_t>();
    for (int64_t c = 0; c < C; ++c)
      for (int t = 0; t < 9; ++t) {
        double sum = 0.0;
        for (int th = 0; th < nthreads; ++th) sum += acc[(static_cast<size_t>(th) * 9 + t) * Cp + c];
        out[c * 9 + t] = static_cast<scalar_t>(sum);
      }
  });
  return gw;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(hybridvision, m) {
  m.def("dw3x3_forward(Tensor x, Tensor weight, Tensor? bias, int stride, bool gelu) -> Tensor");
  m.def("dw3x3_backward_input(Tensor gy, Tensor weight, int H, int W, int stride) -> Tensor");
  m.def("dw3x3_backward_weight(Tensor gy, Tensor x, int stride) -> Tensor");
}

TORCH_LIBRARY_IMPL(hybridvision, CPU, m) {
  m.impl("dw3x3_forward", &dw3x3_forward);
  m.impl("dw3x3_backward_input", &dw3x3_backward_input);
  m.impl("dw3x3_backward_weight", &dw3x3_backward_weight);
}
