// Multi-head self-attention with an additive bias (CoAtNet's relative attention, Eq. 3) on the CPU, forward and
// backward, read straight from the q/k/v projection's output (built with the other kernels by
// hybridvision/ops/native.py; hybridvision/ops/attention.py times the forward against
// F.scaled_dot_product_attention at inference and trains through both).
//
// qkv (B, N, 3, H, d) contiguous: token i of image b holds q, k, v of every head (the layout of a Linear(C, 3 H d)
// output reshaped); bias (H, N, N); s the scale (1 / sqrt(d) in CoAtNet):
//   P[b, h] = softmax_rows(s * Q[b, h] K[b, h]^T + bias[h])       (N, N)
//   y[b, i, h, :] = (P[b, h] V[b, h])[i, :]                      y (B, N, H, d): the output projection's input rows
// and, when asked (training), P itself as (B, H, N, N).
//
// One (head, image) pair per parallel work item, head-major so that consecutive items share the head's bias table
// in cache. Per item, q (scaled), k and v are first copied out of qkv into small buffers (whole-vector loads, rows
// prefetched ahead), k transposed into a (d, Np) panel (Np: N rounded up to whole vectors); then kRows query rows at
// a time: their logits in a row buffer (blocks of kRows x 2 vectors of accumulators over the d products; the bias
// added, the padding columns set to -inf and each row's running maximum taken as they are stored), the softmax
// numerators in place (vec_gelu.h's fast_exp), and those rows times V (kRows x 2 vectors of head
// channels per pass over the N keys), divided by the softmax sums at the end. With CoAtNet-0's shapes (N = 196,
// d = 32) on a 2-core Zen 5 this ran 2.1x F.scaled_dot_product_attention (5.5 vs 11.6 ms at batch 16, 12 heads,
// scratch timing).
#include "vec_gelu.h"  // first: it selects the vector ISA for ATen/cpu/vec

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <tuple>
#include <type_traits>
#include <vector>

namespace {

using at::vec::Vectorized;
using hybridvision_native::fast_exp;

// Blocks of accumulators: kRows query rows x kVecs vectors (of keys for the logits, of head channels for P V), each
// step loading kVecs vectors and broadcasting kRows scalars. 8 x 2 with AVX-512's 32 registers, 4 x 2 with AVX2's
// 16. On a Zen 5 core (scratch micro-benchmark, 32 keys deep) 8 x 2 ran 6.8 G vector FMAs/s and 4 x 4 2.8 (GCC 12
// fed the 4 x 4 FMAs straight from memory, 16 loads per step); the register-only peak read 7.3.
#ifdef CPU_CAPABILITY_AVX512
constexpr int kRows = 8;
#else
constexpr int kRows = 4;
#endif
constexpr int kVecs = 2;
constexpr int64_t kAhead = 8;  // tokens prefetched ahead when copying q, k, v out of qkv

// n rounded up to whole vectors of T.
template <typename T> constexpr int64_t round_up(int64_t n) {
  return (n + Vectorized<T>::size() - 1) / Vectorized<T>::size() * Vectorized<T>::size();
}

// f(i0, std::integral_constant<int, R>()) over rows [0, N) in blocks of R = kRows, then 4, then 1.
template <typename F> void row_blocks(int64_t N, F&& f) {
  int64_t i = 0;
  for (; i + kRows <= N; i += kRows) f(i, std::integral_constant<int, kRows>());
  if constexpr (kRows > 4) {
    for (; i + 4 <= N; i += 4) f(i, std::integral_constant<int, 4>());
  }
  for (; i < N; ++i) f(i, std::integral_constant<int, 1>());
}

// The block kernels stay functions of their own: inlined into the work loop, GCC 12 kept their accumulator arrays in
// memory and stored all of them on every pass of the inner loop. logits_block and values_block share their inner
// loop; one micro-kernel returning its accumulators to two epilogues ran 8-15% slower (attention forward, forward +
// backward; scratch, three runs each way), so each keeps its own.
#define NOINLINE __attribute__((noinline))

// Shapes and pointers of one forward call.
template <typename T> struct Problem {
  const T* qkv;
  const T* bias;
  T* y;
  T* probs;  // nullptr: not kept
  int64_t B, N, H, d, Np;
  T scale;
  int64_t row() const { return 3 * H * d; }  // elements between the q (or k, v) rows of consecutive tokens
};

// s[r * Np + j] = sum_k q[r, k] * kt[k * Np + j] for R rows and the CV vectors of columns starting at column c0. As
// logits (kLogits): plus bias_rows[r * N + j] (bias_rows (R, N)), columns N..Np-1 set to -inf, and rmax[r] =
// max(rmax[r], those logits) lane by lane.
template <typename T, int R, int CV, bool kLogits>
NOINLINE void logits_block(const T* q, int64_t d, const T* kt, int64_t Np, int64_t N, const T* bias_rows, int64_t c0,
                           T* s, Vectorized<T>* rmax) {
  using V = Vectorized<T>;
  constexpr int L = V::size();
  V acc[R][CV];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < CV; ++v) acc[r][v] = V(T(0));
  for (int64_t k = 0; k < d; ++k) {
    V kv[CV];
    for (int v = 0; v < CV; ++v) kv[v] = V::loadu(kt + k * Np + c0 + v * L);
    for (int r = 0; r < R; ++r) {
      const V qb(q[r * d + k]);
      for (int v = 0; v < CV; ++v) acc[r][v] = at::vec::fmadd(qb, kv[v], acc[r][v]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < CV; ++v) {
      const int64_t j = c0 + v * L;
      if constexpr (!kLogits) {
        acc[r][v].store(s + r * Np + j);
        continue;
      }
      const int64_t n = std::min<int64_t>(L, N - j);  // >= 1: vectors start below N (Np - L < N)
      V z = acc[r][v] + V::loadu(bias_rows + r * N + j, n);
      if (n < L) z = V::set(V(-std::numeric_limits<T>::infinity()), z, n);
      z.store(s + r * Np + j);
      rmax[r] = at::vec::clamp_min(z, rmax[r]);  // one max instruction, no NaN handling: a NaN's exp is NaN
    }
}

// y[r * yrow + c0 + ...] = f[r] * sum_{j < N} e[r * er + j * ej] * v[j * dp + c0 + ...] for R rows and the DV
// vectors of head channels starting at c0; v's rows are zero-padded to dp (whole vectors), y gets the d real
// channels. (er, ej) = (row stride, 1) reads e's rows, (1, row stride) its columns (a transposed product).
template <typename T, int R, int DV>
NOINLINE void values_block(const T* e, int64_t er, int64_t ej, int64_t N, const T* v, int64_t dp, int64_t d,
                           int64_t c0, const T* f, T* y, int64_t yrow) {
  using V = Vectorized<T>;
  constexpr int L = V::size();
  int cnt[DV];
  for (int u = 0; u < DV; ++u) cnt[u] = static_cast<int>(std::min<int64_t>(L, d - c0 - u * L));
  V acc[R][DV];
  for (int r = 0; r < R; ++r)
    for (int u = 0; u < DV; ++u) acc[r][u] = V(T(0));
  for (int64_t j = 0; j < N; ++j) {
    V vv[DV];
    for (int u = 0; u < DV; ++u) vv[u] = V::loadu(v + j * dp + c0 + u * L);
    for (int r = 0; r < R; ++r) {
      const V p(e[r * er + j * ej]);
      for (int u = 0; u < DV; ++u) acc[r][u] = at::vec::fmadd(p, vv[u], acc[r][u]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int u = 0; u < DV; ++u) (acc[r][u] * V(f[r])).store(y + r * yrow + c0 + u * L, cnt[u]);
}

// logits_block over all Np columns of R rows; as logits (kLogits), their maxima in m.
template <typename T, int R, bool kLogits>
void products(const T* q, int64_t d, const T* kt, int64_t Np, int64_t N, const T* bias_rows, T* s, T* m) {
  using V = Vectorized<T>;
  constexpr int L = V::size();
  V rmax[R];
  for (int r = 0; r < R; ++r) rmax[r] = V(-std::numeric_limits<T>::infinity());
  for (int64_t c0 = 0; c0 < Np; c0 += kVecs * L) {
    if (Np - c0 >= kVecs * L) {
      logits_block<T, R, kVecs, kLogits>(q, d, kt, Np, N, bias_rows, c0, s, rmax);
    } else {
      logits_block<T, R, 1, kLogits>(q, d, kt, Np, N, bias_rows, c0, s, rmax);
    }
  }
  if constexpr (kLogits) {
    for (int r = 0; r < R; ++r)
      m[r] = at::vec::vec_reduce_all<T>([](V& a, V& b) { return at::vec::clamp_min(a, b); }, rmax[r]);
  }
}

// values_block over all d channels.
template <typename T, int R>
void values(const T* e, int64_t er, int64_t ej, int64_t N, const T* v, int64_t dp, int64_t d, const T* f, T* y,
            int64_t yrow) {
  constexpr int L = Vectorized<T>::size();
  for (int64_t c0 = 0; c0 < d; c0 += kVecs * L) {
    if (d - c0 > (kVecs - 1) * L) {
      values_block<T, R, kVecs>(e, er, ej, N, v, dp, d, c0, f, y, yrow);
    } else {
      values_block<T, R, 1>(e, er, ej, N, v, dp, d, c0, f, y, yrow);
    }
  }
}

// Softmax numerators of R logit rows with maxima m in place (padding columns -inf -> 0); inv[r] = 1 / the row's sum.
template <typename T, int R> void softmax_rows(T* s, int64_t Np, const T* m, T* inv) {
  using V = Vectorized<T>;
  constexpr int L = V::size();
  for (int r = 0; r < R; ++r) {
    T* row = s + r * Np;
    const V mr(m[r]);
    V sum(T(0));
    for (int64_t j = 0; j < Np; j += L) {
      const V ex = fast_exp(V::loadu(row + j) - mr);
      ex.store(row + j);
      sum = sum + ex;
    }
    inv[r] = T(1) / at::vec::vec_reduce_all<T>([](V& a, V& b) { return a + b; }, sum);
  }
}

// dst[j * ld + c] = scale * src[j * stride + c] for rows j < N and c < d, and zeros for d <= c < ld when ld is d
// rounded up to whole vectors: one head's q, k or v (or output gradient) out of rows stride apart. Whole-vector loads,
// the rows kAhead tokens on prefetched (their addresses are too far apart for the hardware prefetcher): reading them
// in place, the scalar transpose and the row loops stalled on cache misses, 20% and 14% of the forward's samples in
// perf.
template <typename T> void copy_rows(const T* src, int64_t stride, int64_t N, int64_t d, T scale, T* dst, int64_t ld) {
  using V = Vectorized<T>;
  constexpr int L = V::size();
  const V sc(scale);
  for (int64_t j = 0; j < N; ++j, src += stride, dst += ld) {
    if (j + kAhead < N) {
      for (int64_t c = 0; c < d; c += 64 / sizeof(T)) __builtin_prefetch(src + kAhead * stride + c);
    }
    for (int64_t c = 0; c < d; c += L)
      (V::loadu(src + c, std::min<int64_t>(L, d - c)) * sc).store(dst + c, std::min<int64_t>(L, ld - c));
  }
}

// dst[c * Np + j] = src[j * d + c]: N rows of d values transposed into a (d, Np) panel (columns N..Np-1 untouched).
template <typename T> void transpose_rows(const T* src, int64_t N, int64_t d, T* dst, int64_t Np) {
  for (int64_t j = 0; j < N; ++j)
    for (int64_t c = 0; c < d; ++c) dst[c * Np + j] = src[j * d + c];
}

// One head of one image, packed: q (N, d) already scaled, kt (d, Np) the transposed keys (padding columns zero),
// v (N, dp), its rows zero-padded to whole vectors.
template <typename T> struct Packed {
  int64_t dp;
  std::vector<T> q, kt, v, k;  // k: the keys as read, before the transpose
  Packed(int64_t N, int64_t Np, int64_t d) : dp(round_up<T>(d)), q(N * d), kt(d * Np, T(0)), v(N * dp), k(N * d) {}

  void load(const Problem<T>& p, int64_t b, int64_t h) {
    const int64_t d = p.d, row = p.row();
    const T* src = p.qkv + b * p.N * row + h * d;
    copy_rows(src, row, p.N, d, p.scale, q.data(), d);
    copy_rows(src + p.H * d, row, p.N, d, T(1), k.data(), d);
    copy_rows(src + 2 * p.H * d, row, p.N, d, T(1), v.data(), dp);
    transpose_rows(k.data(), p.N, d, kt.data(), p.Np);
  }
};

// Query rows [i0, i0 + R) of head h, image b (packed in ``in``); s an (R, Np) buffer.
template <typename T, int R>
void rows(const Problem<T>& p, int64_t b, int64_t h, int64_t i0, const Packed<T>& in, T* s) {
  const int64_t d = p.d;
  T m[R];
  products<T, R, true>(in.q.data() + i0 * d, d, in.kt.data(), p.Np, p.N, p.bias + (h * p.N + i0) * p.N, s, m);
  T inv[R];
  softmax_rows<T, R>(s, p.Np, m, inv);
  if (p.probs != nullptr) {
    for (int r = 0; r < R; ++r) {
      T* out = p.probs + ((b * p.H + h) * p.N + i0 + r) * p.N;
      for (int64_t j = 0; j < p.N; ++j) out[j] = s[r * p.Np + j] * inv[r];
    }
  }
  values<T, R>(s, p.Np, 1, p.N, in.v.data(), in.dp, d, inv, p.y + ((b * p.N + i0) * p.H + h) * d, p.H * d);
}

template <typename T> void forward_kernel(const Problem<T>& p) {
  at::parallel_for(0, p.B * p.H, 1, [&](int64_t begin, int64_t end) {
    Packed<T> in(p.N, p.Np, p.d);
    std::vector<T> s(kRows * p.Np);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t h = t / p.B, b = t % p.B;
      in.load(p, b, h);
      row_blocks(p.N, [&](int64_t i, auto r) { rows<T, decltype(r)::value>(p, b, h, i, in, s.data()); });
    }
  });
}

// Shapes and pointers of one backward call.
template <typename T> struct Grads {
  const T* gy;
  const T* qkv;
  const T* probs;
  T* gqkv;
  T* gbias;  // zeroed by the caller
  int64_t B, N, H, d, Np;
  T scale;
  int64_t row() const { return 3 * H * d; }
};

// One row of the softmax's backward: ds (in: dP = dY V^T, out: dS = P * (dP - sum_j P dP)) and gb += dS.
template <typename T> void softmax_grad_row(const T* P, T* ds, T* gb, int64_t N) {
  using V = Vectorized<T>;
  constexpr int L = V::size();
  V acc(T(0));
  for (int64_t j = 0; j < N; j += L) {
    const int64_t n = std::min<int64_t>(L, N - j);
    acc = at::vec::fmadd(V::loadu(P + j, n), V::loadu(ds + j, n), acc);
  }
  const V dot(at::vec::vec_reduce_all<T>([](V& a, V& b) { return a + b; }, acc));
  for (int64_t j = 0; j < N; j += L) {
    const int64_t n = std::min<int64_t>(L, N - j);
    const V g = V::loadu(P + j, n) * (V::loadu(ds + j, n) - dot);
    g.store(ds + j, n);
    (V::loadu(gb + j, n) + g).store(gb + j, n);
  }
}

// The gradients, one head per work item (every image of it in turn, so that its bias gradient has one writer): with
// dY the head's output gradient, qs = s Q, dP = dY V^T, dS = P * (dP - rowsum(P * dP)):
//   dQ = s dS K,  dK = dS^T qs,  dV = P^T dY,  dbias[h] = sum over images of dS
// every product by the forward's block kernels (the transposed ones reading dS and P by columns).
template <typename T> void backward_kernel(const Grads<T>& g) {
  const int64_t N = g.N, d = g.d, Np = g.Np, H = g.H, row = g.row(), dp = round_up<T>(d);
  at::parallel_for(0, H, 1, [&](int64_t begin, int64_t end) {
    // dY as rows of d (broadcast) and of dp (zero-padded vectors); V as read and transposed (d, Np); K, s Q padded;
    // dP / dS of every query row (N, Np)
    std::vector<T> go(N * d), gop(N * dp), vr(N * d), vt(d * Np, T(0)), kp(N * dp), qs(N * dp), ds(N * Np);
    const std::vector<T> one(kRows, T(1)), sc(kRows, g.scale);
    for (int64_t h = begin; h < end; ++h) {
      T* gb = g.gbias + h * N * N;
      for (int64_t b = 0; b < g.B; ++b) {
        const T* src = g.qkv + b * N * row + h * d;
        const T* gsrc = g.gy + b * N * H * d + h * d;
        copy_rows(gsrc, H * d, N, d, T(1), go.data(), d);
        copy_rows(gsrc, H * d, N, d, T(1), gop.data(), dp);
        copy_rows(src, row, N, d, g.scale, qs.data(), dp);
        copy_rows(src + H * d, row, N, d, T(1), kp.data(), dp);
        copy_rows(src + 2 * H * d, row, N, d, T(1), vr.data(), d);
        transpose_rows(vr.data(), N, d, vt.data(), Np);
        const T* P = g.probs + (b * H + h) * N * N;
        T* gq = g.gqkv + b * N * row + h * d;  // (N, 3, H, d) rows: dQ at +0, dK at +H d, dV at +2 H d
        row_blocks(N, [&](int64_t i0, auto rr) {
          constexpr int R = decltype(rr)::value;
          T* dsr = ds.data() + i0 * Np;
          products<T, R, false>(go.data() + i0 * d, d, vt.data(), Np, Np, nullptr, dsr, nullptr);
          for (int r = 0; r < R; ++r) softmax_grad_row(P + (i0 + r) * N, dsr + r * Np, gb + (i0 + r) * N, N);
          values<T, R>(dsr, Np, 1, N, kp.data(), dp, d, sc.data(), gq + i0 * row, row);
        });
        row_blocks(N, [&](int64_t j0, auto rr) {
          constexpr int R = decltype(rr)::value;
          values<T, R>(ds.data() + j0, 1, Np, N, qs.data(), dp, d, one.data(), gq + j0 * row + H * d, row);
          values<T, R>(P + j0, 1, N, N, gop.data(), dp, d, one.data(), gq + j0 * row + 2 * H * d, row);
        });
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> attention_backward(const at::Tensor& gy, const at::Tensor& qkv,
                                                      const at::Tensor& probs, double scale) {
  TORCH_CHECK(qkv.device().is_cpu() && qkv.dim() == 5 && qkv.size(2) == 3 && qkv.is_contiguous() &&
                  (qkv.scalar_type() == at::kFloat || qkv.scalar_type() == at::kDouble),
              "qkv must be a contiguous (B, N, 3, heads, d) float32 / float64 CPU tensor, got ", qkv.sizes(), " ",
              qkv.scalar_type());
  const int64_t B = qkv.size(0), N = qkv.size(1), H = qkv.size(3), d = qkv.size(4);
  TORCH_CHECK(gy.sizes() == at::IntArrayRef({B, N, H, d}) && gy.is_contiguous() && gy.scalar_type() == qkv.scalar_type()
                  && gy.device().is_cpu(),
              "gy must be a contiguous (B, N, heads, d) = (", B, ", ", N, ", ", H, ", ", d, ") CPU tensor of qkv's "
              "dtype, got ", gy.sizes(), " ", gy.scalar_type());
  TORCH_CHECK(probs.sizes() == at::IntArrayRef({B, H, N, N}) && probs.is_contiguous() &&
                  probs.scalar_type() == qkv.scalar_type() && probs.device().is_cpu(),
              "probs must be the forward's contiguous (B, heads, N, N) = (", B, ", ", H, ", ", N, ", ", N,
              ") softmax, got ", probs.sizes(), " ", probs.scalar_type());
  at::Tensor gqkv = at::empty_like(qkv);
  at::Tensor gbias = at::zeros({H, N, N}, qkv.options());
  AT_DISPATCH_FLOATING_TYPES(qkv.scalar_type(), "attention_backward", [&] {
    Grads<scalar_t> g{gy.const_data_ptr<scalar_t>(), qkv.const_data_ptr<scalar_t>(), probs.const_data_ptr<scalar_t>(),
                      gqkv.data_ptr<scalar_t>(), gbias.data_ptr<scalar_t>(), B, N, H, d, round_up<scalar_t>(N),
                      static_cast<scalar_t>(scale)};
    backward_kernel(g);
  });
  return {gqkv, gbias};
}

std::tuple<at::Tensor, at::Tensor> attention_forward(const at::Tensor& qkv, const at::Tensor& bias, int64_t heads,
                                                     double scale, bool keep_probs) {
  TORCH_CHECK(qkv.device().is_cpu() && qkv.dim() == 5 && qkv.size(2) == 3 && qkv.size(3) == heads,
              "qkv must be a (B, N, 3, heads=", heads, ", d) CPU tensor, got ", qkv.sizes(), " on ", qkv.device());
  TORCH_CHECK(qkv.is_contiguous(), "qkv must be contiguous, got strides ", qkv.strides());
  TORCH_CHECK(qkv.scalar_type() == at::kFloat || qkv.scalar_type() == at::kDouble,
              "qkv must be float32 or float64, got ", qkv.scalar_type());
  const int64_t B = qkv.size(0), N = qkv.size(1), d = qkv.size(4);
  TORCH_CHECK(N > 0 && d > 0, "qkv needs at least one token and one channel per head, got ", qkv.sizes());
  TORCH_CHECK(bias.sizes() == at::IntArrayRef({heads, N, N}) && bias.scalar_type() == qkv.scalar_type() &&
                  bias.is_contiguous() && bias.device().is_cpu(),
              "bias must be a contiguous (heads, N, N) = (", heads, ", ", N, ", ", N, ") CPU tensor of qkv's dtype, "
              "got ", bias.sizes(), " ", bias.scalar_type());
  at::Tensor y = at::empty({B, N, heads, d}, qkv.options());
  at::Tensor probs = keep_probs ? at::empty({B, heads, N, N}, qkv.options()) : at::empty({0}, qkv.options());
  AT_DISPATCH_FLOATING_TYPES(qkv.scalar_type(), "attention_forward", [&] {
    Problem<scalar_t> p{qkv.const_data_ptr<scalar_t>(), bias.const_data_ptr<scalar_t>(), y.data_ptr<scalar_t>(),
                        keep_probs ? probs.data_ptr<scalar_t>() : nullptr, B, N, heads, d, round_up<scalar_t>(N),
                        static_cast<scalar_t>(scale)};
    forward_kernel(p);
  });
  return {y, probs};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(hybridvision, m) {
  m.def("attention_forward(Tensor qkv, Tensor bias, int heads, float scale, bool keep_probs) -> (Tensor, Tensor)");
  m.def("attention_backward(Tensor gy, Tensor qkv, Tensor probs, float scale) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(hybridvision, CPU, m) {
  m.impl("attention_forward", &attention_forward);
  m.impl("attention_backward", &attention_backward);
}
