// Depthwise circular cross-correlation on the CPU by direct summation, hand-vectorised (hybridvision's
// method="native"; built on first use by hybridvision/ops/native.py).
//
//   forward  y[b, c, i] = add[c, i] + sum_k w[c, k] * x[b, c, (i + k) mod K]     along dim 2 (H) or 3 (W)
//   wgrad    dw[c, k]   = sum_{b, other, i} gy[b, c, i] * x[b, c, (i + k) mod K]
// (the input gradient is the forward with the flipped kernel w'[k] = w[(K - k) mod K], done in Python).
//
// The core (rows_block) holds R output lines of one SIMD vector each in registers and streams the K input lines
// past them: one vector load feeds R FMAs whose other operand is a pre-broadcast weight. The lanes run over
//   * the batch, for small planes: the same channel of 16 samples shares the kernel, so 16 planes are transposed
//     (in registers, 16 x 16 blocks) into one tile whose rows are the positions;
//   * else along dim 2 over W (the contiguous axis; no copies), and along dim 3 over 16 rows transposed into a tile.
// Nothing but x, y and a few KB to a few hundred KB of per-thread scratch is touched. Types: float and double.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <vector>

namespace {

typedef float vf16 __attribute__((vector_size(64)));
typedef float vf8 __attribute__((vector_size(32)));
typedef double vd8 __attribute__((vector_size(64)));
typedef double vd4 __attribute__((vector_size(32)));
template <typename T> struct Vec;  // the full vector (64 bytes) and the half one for narrow tails
template <> struct Vec<float> { typedef vf16 type; typedef vf8 half; static constexpr int64_t n = 16; };
template <> struct Vec<double> { typedef vd8 type; typedef vd4 half; static constexpr int64_t n = 8; };
template <typename V, typename T> constexpr int64_t lanes() { return sizeof(V) / sizeof(T); }

template <typename V, typename T> inline V load(const T* p) {
  V v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
template <typename V, typename T> inline void store(T* p, const V& v, int64_t n = lanes<V, T>()) {
  std::memcpy(p, &v, n * sizeof(T));
}
template <typename T> inline T hsum(const typename Vec<T>::type& v) {
  T s = 0;
  for (int64_t l = 0; l < Vec<T>::n; ++l) s += v[l];
  return s;
}

constexpr int R = 8;  // output rows (dim 2) / rows sharing a weight (dim 3) / kernel taps (wgrad) per register block
// Largest plane (H * W) that goes through the batch lanes, along H / along W. Exploratory forward timings of builds
// with either mode, B=16, fp32, 2 threads (ms, batch lanes vs plane mode; scratch scripts, not committed): along H
// K=7 0.11 vs 0.15, K=14 0.19 vs 0.22, K=28 0.61 vs 0.57, K=112 5.4 vs 4.3; along W K=56 1.6 vs 2.1, K=112 4.9 vs
// 6.2, K=224 21 vs 15.
constexpr int64_t BATCH_LANES_MAX_P[2] = {256, 112 * 112};

// dim 2: K rows of V's lanes (input row stride sx, output row stride sy). wb: the weights broadcast to full
// vectors, row t (Vec<T>::n lanes) = w[t mod K] for t in [-R, 2K) (pointer at t = 0). Broadcasting once per channel
// keeps the inner loop at one load per FMA operand: compilers otherwise rotate the sliding weight window through
// registers and re-broadcast each tap with a shuffle, which competes with the FMAs for the same port.
template <typename V, typename T>
void rows_block(const T* xs, int64_t sx, T* ys, int64_t sy, const T* wb, const T* add, int64_t K) {
  constexpr int64_t LF = Vec<T>::n;
  for (int64_t i0 = 0; i0 < K; i0 += R) {
    V acc[R];
    for (int r = 0; r < R; ++r) acc[r] = V{} + ((add && i0 + r < K) ? add[i0 + r] : T(0));
    for (int64_t j = 0; j < K; ++j) {
      const V xv = load<V>(xs + j * sx);
      const T* wp = wb + (j - i0 + K) * LF;  // weight of output row i0 + r: w[(j - i0 - r) mod K], row -r from here
      for (int r = 0; r < R; ++r) acc[r] += load<V>(wp - r * LF) * xv;
    }
    const int64_t rn = std::min<int64_t>(R, K - i0);
    for (int64_t r = 0; r < rn; ++r) store(ys + (i0 + r) * sy, acc[r]);
  }
}

// dim 2, one (K x W) plane: full vectors, then one half vector, then the rest through zero-padded scratch.
template <typename T>
void fwd_rows(const T* x, T* y, const T* wb, const T* add, int64_t K, int64_t W, T* scratch) {
  using V = typename Vec<T>::type;
  using Vh = typename Vec<T>::half;
  constexpr int64_t L = lanes<V, T>(), Lh = lanes<Vh, T>();
  int64_t w0 = 0;
  for (; w0 + L <= W; w0 += L) rows_block<V>(x + w0, W, y + w0, W, wb, add, K);
  if (w0 + Lh <= W) {
    rows_block<Vh>(x + w0, W, y + w0, W, wb, add, K);
    w0 += Lh;
  }
  if (w0 < W) {
    const int64_t n = W - w0;
    T* xb = scratch;
    T* yb = scratch + K * Lh;
    for (int64_t j = 0; j < K; ++j)
      for (int64_t l = 0; l < Lh; ++l) xb[j * Lh + l] = l < n ? x[j * W + w0 + l] : T(0);
    rows_block<Vh>(xb, Lh, yb, Lh, wb, add, K);
    for (int64_t i = 0; i < K; ++i) std::memcpy(y + i * W + w0, yb + i * Lh, n * sizeof(T));
  }
}

// Transposes of L x L blocks (L = Vec<T>::n): v[i][j] -> v[j][i], in registers. For float with GCC, 4 stages of
// two-source shuffles (at stage s, row i takes the columns c with bit s set from row i + s and gives its own to it);
// otherwise element by element.
template <typename T> inline void transpose_block(typename Vec<T>::type* v) {
  constexpr int64_t L = Vec<T>::n;
  T a[L][L];
  std::memcpy(a, v, sizeof(a));
  for (int64_t i = 0; i < L; ++i)
    for (int64_t j = 0; j < L; ++j) v[i][j] = a[j][i];
}
#if defined(__GNUC__) && !defined(__clang__)
typedef int vi16 __attribute__((vector_size(64)));
template <int S> __attribute__((always_inline)) inline void transpose_stage(vf16* v, const vi16 lo, const vi16 hi) {
#pragma GCC unroll 16
  for (int i = 0; i < 16; ++i)
    if (!(i & S)) {
      const vf16 a = v[i], b = v[i + S];
      v[i] = __builtin_shuffle(a, b, lo);  // lo[c] = c & S ? 16 + c - S : c
      v[i + S] = __builtin_shuffle(a, b, hi);  // hi[c] = c & S ? 16 + c : c + S
    }
}
template <> __attribute__((always_inline)) inline void transpose_block<float>(vf16* v) {
  transpose_stage<8>(v, vi16{0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23},
                     vi16{8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31});
  transpose_stage<4>(v, vi16{0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10, 11, 24, 25, 26, 27},
                     vi16{4, 5, 6, 7, 20, 21, 22, 23, 12, 13, 14, 15, 28, 29, 30, 31});
  transpose_stage<2>(v, vi16{0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12, 13, 28, 29},
                     vi16{2, 3, 18, 19, 6, 7, 22, 23, 10, 11, 26, 27, 14, 15, 30, 31});
  transpose_stage<1>(v, vi16{0, 16, 2, 18, 4, 20, 6, 22, 8, 24, 10, 26, 12, 28, 14, 30},
                     vi16{1, 17, 3, 19, 5, 21, 7, 23, 9, 25, 11, 27, 13, 29, 15, 31});
}
#endif

// Tiles: an (n x m) block of a row-major matrix (row stride ld), n, m <= L, moved to / from lanes.
// to_tile: tile[j * L + i] = src[i * ld + j] (zero where i >= n or j >= m); from_tile: the inverse, n x m written.
template <typename T> void to_tile(const T* src, int64_t ld, int64_t n, int64_t m, T* tile) {
  using V = typename Vec<T>::type;
  constexpr int64_t L = Vec<T>::n;
  V v[L];
  if (n == L && m == L) {
    for (int64_t i = 0; i < L; ++i) v[i] = load<V>(src + i * ld);
  } else {
    T a[L][L] = {};
    for (int64_t i = 0; i < n; ++i) std::memcpy(a[i], src + i * ld, m * sizeof(T));
    std::memcpy(v, a, sizeof(a));
  }
  transpose_block<T>(v);
  for (int64_t i = 0; i < L; ++i) store(tile + i * L, v[i]);
}
template <typename T> void from_tile(const T* tile, T* dst, int64_t ld, int64_t n, int64_t m) {
  using V = typename Vec<T>::type;
  constexpr int64_t L = Vec<T>::n;
  V v[L];
  for (int64_t i = 0; i < L; ++i) v[i] = load<V>(tile + i * L);
  transpose_block<T>(v);
  if (m == L) {
    for (int64_t i = 0; i < n; ++i) store(dst + i * ld, v[i]);
  } else {
    for (int64_t i = 0; i < n; ++i) store(dst + i * ld, v[i], m);
  }
}

// The lane tile of rows h0 .. h0 + L - 1 of a (rows x K) matrix (dim 3: lanes = rows): tile[k * L + l] =
// src[(h0 + l) * K + k] for k < K, zero in lanes past the last row. Tile rows K .. KP - 1 (KP = K rounded up to
// L) are scratch: a last column chunk narrower than L is read as a full L x L block (the rest of each row is the
// next row's head) whenever that stays inside the matrix, so the tile needs KP rows.
template <typename T> void rows_to_tile(const T* src, int64_t rows, int64_t K, int64_t h0, T* tile) {
  constexpr int64_t L = Vec<T>::n;
  const int64_t n = std::min(L, rows - h0);
  for (int64_t k0 = 0; k0 < K; k0 += L) {
    const int64_t m = std::min(L, K - k0);
    if (m == L || (n == L && (h0 + L - 1) * K + k0 + L <= rows * K)) {
      to_tile(src + h0 * K + k0, K, n, L, tile + k0 * L);
    } else {  // the block would leave the matrix: through a zero-padded temporary
      T tmp[L * L];
      to_tile(src + h0 * K + k0, K, n, m, tmp);
      std::memcpy(tile + k0 * L, tmp, m * L * sizeof(T));
    }
  }
}

// dim 3, one (H x K) plane: L rows at a time are transposed into a (K x L) tile, run through rows_block (the dim 2
// kernel, lanes = rows) and transposed back. add: K addends, one per output position (= per tile row), or null.
template <typename T>
void fwd_cols(const T* x, T* y, const T* wb, const T* add, int64_t H, int64_t K, T* scratch) {
  using V = typename Vec<T>::type;
  constexpr int64_t L = Vec<T>::n;
  const int64_t KP = (K + L - 1) / L * L;
  T* xt = scratch;
  T* yt = scratch + KP * L;
  for (int64_t h0 = 0; h0 < H; h0 += L) {
    const int64_t n = std::min(L, H - h0);
    rows_to_tile(x, H, K, h0, xt);
    rows_block<V>(xt, L, yt, L, wb, add, K);
    // Column chunks from the last to the first: a last chunk narrower than L is stored full width when that stays
    // inside the plane; what it spills into the head of the next row is overwritten by that row's first chunk
    // (stored after it, or, for the strip's last row, by the next strip).
    for (int64_t i0 = (K - 1) / L * L; i0 >= 0; i0 -= L) {
      const bool wide = n == L && (h0 + L - 1) * K + i0 + L <= H * K;
      from_tile(yt + i0 * L, y + h0 * K + i0, K, n, wide ? L : std::min(L, K - i0));
    }
  }
}

// Small planes, lanes over the batch: the same channel of nb <= L consecutive samples shares the kernel, so nb planes
// (P = H * W elements each, plane stride ps) are transposed into a (P x L) tile, every line along ``dim`` of it goes
// through rows_block and the result is transposed back. No lane is wasted on a short axis. scratch: 2 * PP * L
// (PP = P rounded up to L).
template <typename T>
void fwd_batch(const T* x, T* y, int64_t ps, int64_t nb, const T* wb, const T* add, int64_t H, int64_t W,
               int64_t dim, T* scratch) {
  using V = typename Vec<T>::type;
  constexpr int64_t L = Vec<T>::n;
  const int64_t P = H * W, PP = (P + L - 1) / L * L;
  T* xt = scratch;
  T* yt = scratch + PP * L;
  for (int64_t p0 = 0; p0 < P; p0 += L) to_tile(x + p0, ps, nb, std::min(L, P - p0), xt + p0 * L);
  if (dim == 3) {
    for (int64_t h = 0; h < H; ++h) rows_block<V>(xt + h * W * L, L, yt + h * W * L, L, wb, add, W);
  } else {
    for (int64_t w = 0; w < W; ++w) rows_block<V>(xt + w * L, W * L, yt + w * L, W * L, wb, add, H);
  }
  for (int64_t p0 = 0; p0 < P; p0 += L) from_tile(yt + p0 * L, y + p0, ps, nb, std::min(L, P - p0));
}

// Weight gradient of one (K x L) tile pair: acc[k] += sum_i G[i] * X2[i + k] (lanes summed later by the caller),
// X2: 2K + R rows with X2[t] = X[t mod K]; G zero in unused lanes.
template <typename T>
void wgrad_tile(const T* G, const T* X2, int64_t K, typename Vec<T>::type* acc) {
  using V = typename Vec<T>::type;
  constexpr int64_t L = Vec<T>::n;
  for (int64_t k0 = 0; k0 < K; k0 += R) {
    V a[R] = {};
    for (int64_t i = 0; i < K; ++i) {
      const V g = load<V>(G + i * L);
      const T* xr = X2 + (i + k0) * L;
      for (int r = 0; r < R; ++r) a[r] += g * load<V>(xr + r * L);
    }
    const int64_t rn = std::min<int64_t>(R, K - k0);
    for (int64_t r = 0; r < rn; ++r) acc[k0 + r] += a[r];
  }
}

// Weight gradient of one channel summed over the batch (planes at + b * bstride, H x W each) into acc (K vectors).
// dim 2: tiles are L-column strips of the plane; dim 3: transposed L-row strips. scratch: (KP + max(2K + R, KP)) * L.
template <typename T>
void wgrad_channel(const T* gy, const T* x, int64_t B, int64_t bstride, int64_t H, int64_t W, int64_t dim,
                   typename Vec<T>::type* acc, T* scratch) {
  constexpr int64_t L = Vec<T>::n;
  const int64_t K = dim == 2 ? H : W, other = dim == 2 ? W : H, KP = (K + L - 1) / L * L;
  T* G = scratch;  // KP rows (rows_to_tile)
  T* X2 = scratch + KP * L;  // max(2K + R, KP) rows
  for (int64_t b = 0; b < B; ++b) {
    const T* g = gy + b * bstride;
    const T* xx = x + b * bstride;
    for (int64_t o0 = 0; o0 < other; o0 += L) {
      if (dim == 2) {
        const int64_t n = std::min(L, W - o0);
        for (int64_t j = 0; j < K; ++j) {
          std::memcpy(G + j * L, g + j * W + o0, n * sizeof(T));
          std::memcpy(X2 + j * L, xx + j * W + o0, n * sizeof(T));
          if (n < L) {
            std::fill(G + j * L + n, G + (j + 1) * L, T(0));
            std::fill(X2 + j * L + n, X2 + (j + 1) * L, T(0));
          }
        }
      } else {
        rows_to_tile(g, H, K, o0, G);
        rows_to_tile(xx, H, K, o0, X2);
      }
      for (int64_t t = K; t < 2 * K + R; ++t) std::memcpy(X2 + t * L, X2 + (t - K) * L, L * sizeof(T));
      wgrad_tile(G, X2, K, acc);
    }
  }
}

void check(const at::Tensor& x, const at::Tensor& w, int64_t dim) {
  TORCH_CHECK(x.device().is_cpu() && w.device().is_cpu(), "hybridvision native circular conv: CPU tensors only");
  TORCH_CHECK(x.dim() == 4 && x.is_contiguous(), "x must be a contiguous (B, C, H, W) tensor");
  TORCH_CHECK(dim == 2 || dim == 3, "dim must be 2 or 3, got ", dim);
  TORCH_CHECK(w.dim() == 2 && w.is_contiguous() && w.size(0) == x.size(1) && w.size(1) == x.size(dim),
              "weight must be a contiguous (C, K) tensor with C = x.size(1), K = x.size(dim)");
  TORCH_CHECK(w.scalar_type() == x.scalar_type(), "x and weight must have the same dtype");
}

at::Tensor circular_dw_forward(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& add,
                               int64_t dim) {
  check(x, w, dim);
  if (add) TORCH_CHECK(add->sizes() == w.sizes() && add->is_contiguous() && add->scalar_type() == x.scalar_type(),
                       "add must be a contiguous (C, K) tensor like weight");
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3), K = x.size(dim);
  auto y = at::empty_like(x);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "circular_dw_forward", [&] {
    constexpr int64_t L = Vec<scalar_t>::n;
    const int64_t KP = (K + L - 1) / L * L;
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* wp = w.data_ptr<scalar_t>();
    const scalar_t* ap = add ? add->data_ptr<scalar_t>() : nullptr;
    scalar_t* yp = y.data_ptr<scalar_t>();
    const int64_t plane = H * W;
    // Lanes over the batch for small planes (at most BATCH_LANES_MAX_P elements) when there are enough samples to
    // fill half the lanes; otherwise over the contiguous axis (dim 2) or over 16-row transposed tiles (dim 3).
    const bool by_batch = plane <= BATCH_LANES_MAX_P[dim - 2] && 2 * B >= L;
    const int64_t groups = by_batch ? (B + L - 1) / L : B;  // work items per channel
    const int64_t PP = (plane + L - 1) / L * L;
    const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, plane * K * (by_batch ? L : 1) / 16));
    at::parallel_for(0, groups * C, grain, [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> wb((2 * K + R) * L), scratch(by_batch ? 2 * PP * L : 2 * KP * L);
      int64_t cur = -1;
      for (int64_t q = begin; q < end; ++q) {  // channel-major: the per-channel tables are built once per channel
        const int64_t c = q / groups, g = q % groups;
        if (c != cur) {
          cur = c;
          for (int64_t t = -R; t < 2 * K; ++t)
            std::fill(wb.begin() + (t + R) * L, wb.begin() + (t + R + 1) * L, wp[c * K + ((t % K) + K) % K]);
        }
        const scalar_t* a = ap ? ap + c * K : nullptr;
        if (by_batch) {
          const int64_t off = (g * L * C + c) * plane;
          fwd_batch(xp + off, yp + off, C * plane, std::min(L, B - g * L), wb.data() + R * L, a, H, W, dim,
                    scratch.data());
        } else {
          const int64_t p = g * C + c;
          if (dim == 2)
            fwd_rows(xp + p * plane, yp + p * plane, wb.data() + R * L, a, K, W, scratch.data());
          else
            fwd_cols(xp + p * plane, yp + p * plane, wb.data() + R * L, a, H, K, scratch.data());
        }
      }
    });
  });
  return y;
}

at::Tensor circular_dw_wgrad(const at::Tensor& gy, const at::Tensor& x, int64_t dim) {
  TORCH_CHECK(gy.sizes() == x.sizes() && gy.is_contiguous() && gy.scalar_type() == x.scalar_type(),
              "gy must be contiguous and shaped like x");
  TORCH_CHECK(x.dim() == 4 && x.is_contiguous() && (dim == 2 || dim == 3), "x: contiguous (B, C, H, W); dim 2 or 3");
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3), K = x.size(dim);
  auto dw = at::empty({C, K}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "circular_dw_wgrad", [&] {
    using V = typename Vec<scalar_t>::type;
    constexpr int64_t L = Vec<scalar_t>::n;
    const scalar_t* gp = gy.data_ptr<scalar_t>();
    const scalar_t* xp = x.data_ptr<scalar_t>();
    scalar_t* dp = dw.data_ptr<scalar_t>();
    const int64_t plane = H * W, bstride = C * plane;
    at::parallel_for(0, C, 1, [&](int64_t begin, int64_t end) {
      std::vector<V> acc(K);
      const int64_t KP = (K + L - 1) / L * L;
      std::vector<scalar_t> scratch((KP + std::max(2 * K + R, KP)) * L);
      for (int64_t c = begin; c < end; ++c) {
        std::fill(acc.begin(), acc.end(), V{});
        wgrad_channel(gp + c * plane, xp + c * plane, B, bstride, H, W, dim, acc.data(), scratch.data());
        for (int64_t k = 0; k < K; ++k) dp[c * K + k] = hsum<scalar_t>(acc[k]);
      }
    });
  });
  return dw;
}

}  // namespace

TORCH_LIBRARY(hybridvision, m) {
  m.def("circular_dw_forward(Tensor x, Tensor weight, Tensor? add, int dim) -> Tensor");
  m.def("circular_dw_wgrad(Tensor gy, Tensor x, int dim) -> Tensor");
}

TORCH_LIBRARY_IMPL(hybridvision, CPU, m) {
  m.impl("circular_dw_forward", &circular_dw_forward);
  m.impl("circular_dw_wgrad", &circular_dw_wgrad);
}
