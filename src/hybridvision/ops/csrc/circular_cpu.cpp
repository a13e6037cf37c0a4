// Depthwise circular cross-correlation on the CPU by direct summation or FFT, hand-vectorised (hybridvision's
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
// From K=48 on (the weight gradient from K=32 along H / 40 along W; K without prime factors above 7) both ops
// run an FFT instead (the FFT path below; the ops' algo argument overrides the choice).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#if defined(__AVX__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <cstring>
#include <vector>

namespace {

typedef float vf16 __attribute__((vector_size(64)));
typedef float vf8 __attribute__((vector_size(32)));
typedef double vd8 __attribute__((vector_size(64)));
typedef double vd4 __attribute__((vector_size(32)));
typedef float vf4 __attribute__((vector_size(16)));
typedef double vd2 __attribute__((vector_size(16)));
// The full vector and the half one for narrow tails: one register of the ISA -- 64 bytes with AVX-512, else 32.
// (64-byte vectors on an AVX2-only CPU take two registers each: the R-row blocks below then spill, and the kernel
// ran 2-5x slower than the GEMM method on an AVX2 EPYC.)
template <typename T> struct Vec;
#if defined(__AVX512F__)
template <> struct Vec<float> { typedef vf16 type; typedef vf8 half; static constexpr int64_t n = 16; };
template <> struct Vec<double> { typedef vd8 type; typedef vd4 half; static constexpr int64_t n = 8; };
#else
template <> struct Vec<float> { typedef vf8 type; typedef vf4 half; static constexpr int64_t n = 8; };
template <> struct Vec<double> { typedef vd4 type; typedef vd2 half; static constexpr int64_t n = 4; };
#endif
template <typename V, typename T> constexpr int64_t lanes() { return sizeof(V) / sizeof(T); }

template <typename V, typename T> inline V load(const T* p) {
  V v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
// The first n lanes of a vector: load_part reads p[0 .. n - 1] (the other lanes zero), store writes them. Masked
// moves where the ISA has them (AVX-512), so that n unknown at compile time does not become a memcpy / memset call.
template <typename V, typename T> inline V load_part(const T* p, int64_t n) {
#if defined(__AVX512F__)
  if constexpr (sizeof(V) == 64 && std::is_same<T, float>::value) {
    return (V)_mm512_maskz_loadu_ps(static_cast<__mmask16>((1u << n) - 1), p);
  } else if constexpr (sizeof(V) == 64 && std::is_same<T, double>::value) {
    return (V)_mm512_maskz_loadu_pd(static_cast<__mmask8>((1u << n) - 1), p);
  }
#endif
  V v = {};
  std::memcpy(&v, p, n * sizeof(T));
  return v;
}
template <typename V, typename T> inline void store(T* p, const V& v, int64_t n = lanes<V, T>()) {
  if (n == lanes<V, T>()) {
    std::memcpy(p, &v, sizeof(v));
    return;
  }
#if defined(__AVX512F__)
  if constexpr (sizeof(V) == 64 && std::is_same<T, float>::value) {
    _mm512_mask_storeu_ps(p, static_cast<__mmask16>((1u << n) - 1), (__m512)v);
    return;
  } else if constexpr (sizeof(V) == 64 && std::is_same<T, double>::value) {
    _mm512_mask_storeu_pd(p, static_cast<__mmask8>((1u << n) - 1), (__m512d)v);
    return;
  }
#endif
  std::memcpy(p, &v, n * sizeof(T));
}
// A full vector to 64-byte aligned memory, bypassing the caches (AVX-512 and AVX): saves the
// read-for-ownership of every line of a large output that is written once and not read back soon (see
// STREAM_MIN_BYTES). Callers run stream_fence() before the data is used by other threads.
template <typename V, typename T> inline void store_stream(T* p, const V& v) {
#if defined(__AVX512F__)
  if constexpr (sizeof(V) == 64 && std::is_same<T, float>::value) {
    _mm512_stream_ps(p, (__m512)v);
    return;
  } else if constexpr (sizeof(V) == 64 && std::is_same<T, double>::value) {
    _mm512_stream_pd(p, (__m512d)v);
    return;
  }
#elif defined(__AVX__)
  if constexpr (sizeof(V) == 32 && std::is_same<T, float>::value) {
    _mm256_stream_ps(p, (__m256)v);
    return;
  } else if constexpr (sizeof(V) == 32 && std::is_same<T, double>::value) {
    _mm256_stream_pd(p, (__m256d)v);
    return;
  }
#endif
  store(p, v);
}
inline void stream_fence() {
#if defined(__AVX__)
  _mm_sfence();
#endif
}
// Outputs at least this large are written with non-temporal stores where rows are 64-byte aligned: half the 32 MiB
// L3 of the development machine; a smaller output is likely still in cache when the next layer reads it.
constexpr int64_t STREAM_MIN_BYTES = 16 << 20;

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
// One stage on L rows of L floats (VF) with the index vectors VI: lo[c] = c & S ? L + c - S : c, hi[c] = c & S ?
// L + c : c + S.
template <typename VF, typename VI, int L, int S>
__attribute__((always_inline)) inline void transpose_stage(VF* v, const VI lo, const VI hi) {
#pragma GCC unroll 16
  for (int i = 0; i < L; ++i)
    if (!(i & S)) {
      const VF a = v[i], b = v[i + S];
      v[i] = __builtin_shuffle(a, b, lo);
      v[i + S] = __builtin_shuffle(a, b, hi);
    }
}
#if defined(__AVX512F__)
typedef int vi16 __attribute__((vector_size(64)));
template <> __attribute__((always_inline)) inline void transpose_block<float>(vf16* v) {
  transpose_stage<vf16, vi16, 16, 8>(v, vi16{0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23},
                                     vi16{8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31});
  transpose_stage<vf16, vi16, 16, 4>(v, vi16{0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10, 11, 24, 25, 26, 27},
                                     vi16{4, 5, 6, 7, 20, 21, 22, 23, 12, 13, 14, 15, 28, 29, 30, 31});
  transpose_stage<vf16, vi16, 16, 2>(v, vi16{0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12, 13, 28, 29},
                                     vi16{2, 3, 18, 19, 6, 7, 22, 23, 10, 11, 26, 27, 14, 15, 30, 31});
  transpose_stage<vf16, vi16, 16, 1>(v, vi16{0, 16, 2, 18, 4, 20, 6, 22, 8, 24, 10, 26, 12, 28, 14, 30},
                                     vi16{1, 17, 3, 19, 5, 21, 7, 23, 9, 25, 11, 27, 13, 29, 15, 31});
}
#else
typedef int vi8 __attribute__((vector_size(32)));
template <> __attribute__((always_inline)) inline void transpose_block<float>(vf8* v) {
  transpose_stage<vf8, vi8, 8, 4>(v, vi8{0, 1, 2, 3, 8, 9, 10, 11}, vi8{4, 5, 6, 7, 12, 13, 14, 15});
  transpose_stage<vf8, vi8, 8, 2>(v, vi8{0, 1, 8, 9, 4, 5, 12, 13}, vi8{2, 3, 10, 11, 6, 7, 14, 15});
  transpose_stage<vf8, vi8, 8, 1>(v, vi8{0, 8, 2, 10, 4, 12, 6, 14}, vi8{1, 9, 3, 11, 5, 13, 7, 15});
}
#endif
#endif

// Tiles: an (n x m) block of rows, row i at row(i) (a pointer), n, m <= L, moved to / from lanes.
// to_tile: tile[j * L + i] = row(i)[j] (zero where i >= n or j >= m); from_tile: the inverse, n x m written
// (stream: with non-temporal stores where m = L and every row is 64-byte aligned).
template <typename T, typename Row> void to_tile(Row row, int64_t n, int64_t m, T* tile) {
  using V = typename Vec<T>::type;
  constexpr int64_t L = Vec<T>::n;
  V v[L];
  if (n == L && m == L) {
    for (int64_t i = 0; i < L; ++i) v[i] = load<V>(row(i));
  } else {
    for (int64_t i = 0; i < L; ++i) v[i] = i < n ? load_part<V>(row(i), m) : V{};
  }
  transpose_block<T>(v);
  for (int64_t i = 0; i < L; ++i) store(tile + i * L, v[i]);
}
template <typename T, typename Row> void from_tile(const T* tile, Row row, int64_t n, int64_t m, bool stream = false) {
  using V = typename Vec<T>::type;
  constexpr int64_t L = Vec<T>::n;
  V v[L];
  for (int64_t i = 0; i < L; ++i) v[i] = load<V>(tile + i * L);
  transpose_block<T>(v);
  for (int64_t i = 0; i < n && stream; ++i) stream = reinterpret_cast<uintptr_t>(row(i)) % 64 == 0;
  if (m == L && stream) {
    for (int64_t i = 0; i < n; ++i) store_stream(row(i), v[i]);
  } else {
    for (int64_t i = 0; i < n; ++i) store(row(i), v[i], m);
  }
}
// Row accessors of a row-major matrix at src with row stride ld.
template <typename T> inline auto matrix_rows(T* src, int64_t ld) {
  return [=](int64_t i) { return src + i * ld; };
}

// The lane tile of rows h0 .. h0 + L - 1 of a (rows x K) matrix (dim 3: lanes = rows): tile[k * L + l] =
// src[(h0 + l) * K + k] for k < K, zero in lanes past the last row. Tile rows K .. KP - 1 (KP = K rounded up to
// L) are scratch: a last column chunk narrower than L is read as a full L x L block (the rest of each row is the
// next row's head) whenever that stays inside the matrix, so the tile needs KP rows. prefetch_rows: also prefetch
// the rows that far below (the caller's next strip).
template <typename T>
void rows_to_tile(const T* src, int64_t rows, int64_t K, int64_t h0, T* tile, int64_t prefetch_rows = 0) {
  constexpr int64_t L = Vec<T>::n;
  const int64_t n = std::min(L, rows - h0);
  for (int64_t k0 = 0; k0 < K; k0 += L) {
    const int64_t m = std::min(L, K - k0);
    if (prefetch_rows)  // the same block prefetch_rows further down (prefetches never fault, even past the end)
      for (int64_t i = 0; i < L; ++i) __builtin_prefetch(src + (h0 + prefetch_rows + i) * K + k0);
    const bool wide = m == L || (n == L && (h0 + L - 1) * K + k0 + L <= rows * K);
    to_tile(matrix_rows(src + h0 * K + k0, K), n, wide ? L : m, tile + k0 * L);
  }
}

// The inverse of rows_to_tile: rows h0 .. min(h0 + L, rows) - 1 of the (rows x K) matrix dst from the (K x L) tile.
// Column chunks from the last to the first: a last chunk narrower than L is stored full width when that stays
// inside the matrix; what it spills into the head of the next row is overwritten by that row's first chunk (stored
// after it, or, for the tile's last row, by the next tile, which callers store later). So `rows` must end where
// the caller's own rows end: rows after it may belong to another work item.
template <typename T> void tile_to_rows(const T* tile, T* dst, int64_t rows, int64_t K, int64_t h0, bool stream) {
  constexpr int64_t L = Vec<T>::n;
  const int64_t n = std::min(L, rows - h0);
  for (int64_t i0 = (K - 1) / L * L; i0 >= 0; i0 -= L) {
    const bool wide = n == L && (h0 + L - 1) * K + i0 + L <= rows * K;
    from_tile(tile + i0 * L, matrix_rows(dst + h0 * K + i0, K), n, wide ? L : std::min(L, K - i0), stream);
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
    tile_to_rows(yt, y, H, K, h0, false);
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
  for (int64_t p0 = 0; p0 < P; p0 += L) to_tile(matrix_rows(x + p0, ps), nb, std::min(L, P - p0), xt + p0 * L);
  if (dim == 3) {
    for (int64_t h = 0; h < H; ++h) rows_block<V>(xt + h * W * L, L, yt + h * W * L, L, wb, add, W);
  } else {
    for (int64_t w = 0; w < W; ++w) rows_block<V>(xt + w * L, W * L, yt + w * L, W * L, wb, add, H);
  }
  for (int64_t p0 = 0; p0 < P; p0 += L) from_tile(yt + p0 * L, matrix_rows(y + p0, ps), nb, std::min(L, P - p0));
}

// ---- The FFT path (large K) --------------------------------------------------------------------------------------
// The same forward through the DFT, O(K log K) per line instead of O(K^2). Two sets of L real lines ride as the real
// and imaginary parts of one complex signal z = x1 + i x2 (the kernel is real, so the correlation acts on each part
// alone); with F the DFT and S = F(w) / K,
//   y1 + i y2 = conj(F(conj(F z) * S))
// (the correlation's spectrum is F(x) conj(F(w)), and the inverse DFT is conj(F(conj(.))) / K). F is a Stockham
// (self-sorting) mixed-radix FFT with radices 4, 2, 3, 5, 7 over K complex vectors whose lanes are independent
// lines. The first stage reads the input where it lies (rows of x along H), the last stage of the first FFT applies
// conj(.) * S, and the last stage of the second writes y (+ the addend), so a strip makes one pass per stage over
// scratch that stays in cache; the next strip is prefetched while one is transformed, and large outputs are written
// with non-temporal stores (STREAM_MIN_BYTES). (A radix-8 variant, 8 x 7 for K=56, measured slower than 4 x 2 x 7 in an exploratory
// A/B run, and was dropped.) K with a prime factor above 7 keeps the direct sum.

// Smallest K for which algo=0 takes the FFT path (when K has no prime factor above 7): [forward, wgrad][dim 2, dim 3].
// From `python benchmarks/bench_native_crossover.py`: the first K of its sweep from which the FFT is faster at every
// larger K. Three runs at the current kernel (2026-12-02): forward along dim 2 28, 40, 28 (K=28-40 0.93-1.10x, ties;
// K=48 1.21-1.43x), along dim 3 28, 48, 28 (K=40 0.89-1.06x; K=48 1.20-1.38x, K=56 1.06-1.16x); weight gradient
// along dim 2 28 three times (K=28-32 1.00-1.09x: 32 kept), along dim 3 40, 28, 40 (K=32 0.93-1.02x; K=40
// 1.31-1.44x). So 48 / 48 and 32 / 40. (Before the partial-strip, pool and addressing changes of that day the
// forward crossed at 64 on both axes.) benchmarks/results/native_crossover.md holds the last run. Odd radices
// (3, 5, 7) cost more per point than 4 and 2, so lengths between the sweep's may cross a little later.
constexpr int64_t FFT_MIN_K[2][2] = {{48, 48}, {32, 40}};

// The radices of an FFT of length n (4s, 2, then odd, the largest last: the last stage has no twiddles), or
// none when n has a prime factor above 7 or n < 2.
inline std::vector<int> fft_radices(int64_t n) {
  std::vector<int> r;
  if (n < 2) return r;
  for (int p : {4, 2, 3, 5, 7})
    while (n % p == 0) {
      r.push_back(p);
      n /= p;
    }
  if (n != 1) r.clear();
  return r;
}

// algo: 0 = choose (the FFT from FFT_MIN_K on), 1 = direct sum, 2 = FFT. op: 0 forward, 1 wgrad.
inline bool use_fft(int64_t algo, int64_t K, int64_t dim, int op) {
  TORCH_CHECK(algo >= 0 && algo <= 2, "algo must be 0 (choose), 1 (direct sum) or 2 (FFT), got ", algo);
  const bool ok = !fft_radices(K).empty();
  TORCH_CHECK(algo != 2 || ok, "algo=2 (FFT) needs K >= 2 without prime factors above 7, got K=", K);
  return algo == 2 || (algo == 0 && ok && K >= FFT_MIN_K[op][dim - 2]);
}

template <typename T> struct FftPlan {
  int64_t n;
  std::vector<int> radix;
  std::vector<int64_t> offset;  // stage k's twiddles start at tw[offset[k]]
  std::vector<T> tw;  // per stage, pp < m, t = 1 .. p - 1: cos(phi), -sin(phi), phi = 2 pi pp t / (p m)
  explicit FftPlan(int64_t n_) : n(n_), radix(fft_radices(n_)) {
    int64_t len = n;
    for (int p : radix) {
      const int64_t m = len / p;
      offset.push_back(static_cast<int64_t>(tw.size()));
      for (int64_t pp = 0; pp < m; ++pp)
        for (int t = 1; t < p; ++t) {
          const double phi = 2.0 * M_PI * static_cast<double>(pp * t) / static_cast<double>(len);
          tw.push_back(static_cast<T>(std::cos(phi)));
          tw.push_back(static_cast<T>(-std::sin(phi)));
        }
      len = m;
    }
  }
};

// cos and sin of 2 pi r t / P for r, t = 0 .. P / 2 (odd P).
template <int P, typename T> struct OddRoots {
  T c[P / 2 + 1][P / 2 + 1], s[P / 2 + 1][P / 2 + 1];
  OddRoots() {
    for (int r = 0; r <= P / 2; ++r)
      for (int t = 0; t <= P / 2; ++t) {
        c[r][t] = static_cast<T>(std::cos(2.0 * M_PI * r * t / P));
        s[r][t] = static_cast<T>(std::sin(2.0 * M_PI * r * t / P));
      }
  }
};

// In-place DFT of P complex vectors, b_t = sum_r a_r exp(-2 pi i r t / P). cr, sr: OddRoots broadcast (odd P).
template <int P, typename V>
__attribute__((always_inline)) inline void dft(V* xr, V* xi, const V (*cr)[P / 2 + 1], const V (*sr)[P / 2 + 1]) {
  if constexpr (P == 2) {
    const V tr = xr[0] - xr[1], ti = xi[0] - xi[1];
    xr[0] += xr[1];
    xi[0] += xi[1];
    xr[1] = tr;
    xi[1] = ti;
  } else if constexpr (P == 4) {
    const V t0r = xr[0] + xr[2], t0i = xi[0] + xi[2], t1r = xr[0] - xr[2], t1i = xi[0] - xi[2];
    const V t2r = xr[1] + xr[3], t2i = xi[1] + xi[3], t3r = xr[1] - xr[3], t3i = xi[1] - xi[3];
    xr[0] = t0r + t2r;
    xi[0] = t0i + t2i;
    xr[2] = t0r - t2r;
    xi[2] = t0i - t2i;
    xr[1] = t1r + t3i;  // t1 - i t3
    xi[1] = t1i - t3r;
    xr[3] = t1r - t3i;  // t1 + i t3
    xi[3] = t1i + t3r;
  } else {  // odd P: pairs r, P - r share cos (sums) and sin (differences)
    constexpr int H = P / 2;
    V sr_[H + 1], si_[H + 1], dr[H + 1], di[H + 1];
    V b0r = xr[0], b0i = xi[0];
    for (int r = 1; r <= H; ++r) {
      sr_[r] = xr[r] + xr[P - r];
      si_[r] = xi[r] + xi[P - r];
      dr[r] = xr[r] - xr[P - r];
      di[r] = xi[r] - xi[P - r];
      b0r += sr_[r];
      b0i += si_[r];
    }
    for (int t = 1; t <= H; ++t) {
      V ar = xr[0], ai = xi[0], br = V{}, bi = V{};
      for (int r = 1; r <= H; ++r) {
        ar += sr_[r] * cr[r][t];
        ai += si_[r] * cr[r][t];
        br += dr[r] * sr[r][t];
        bi += di[r] * sr[r][t];
      }
      xr[t] = ar + bi;  // A - i B
      xi[t] = ai - br;
      xr[P - t] = ar - bi;  // A + i B
      xi[P - t] = ai + br;
    }
    xr[0] = b0r;
    xi[0] = b0i;
  }
}

// Where a stage reads or writes: element e (a vector of L lanes) has its real part at re + e * stride and its
// imaginary part at im + e * stride.
template <typename T> struct Lines {
  T* re;
  T* im;
  int64_t stride;
  int64_t prefetch = 0;  // reading: when non-zero, also prefetch each element at this offset (the next strip)
};

// What the last stage does with its outputs: store them (PLAIN), store conj(b_e) * S[e] (SPECTRUM: the end of the
// first FFT), or store re(b_e) + add[e] and add[e] - im(b_e) (OUTPUT: the end of the second FFT; add may be null;
// OUTPUT_STREAM: the same with non-temporal stores, for 64-byte aligned rows of y).
enum Epilogue { PLAIN, SPECTRUM, OUTPUT, OUTPUT_STREAM };


// One Stockham stage of radix P: for pp < m, q < s the P elements q + s (pp + r m) (r < P) go through the DFT, are
// multiplied by the twiddles exp(-2 pi i pp t / (P m)) and land at q + s (P pp + t). E applies to the last stage
// (m = 1) only.
template <int P, Epilogue E, typename T>
void fft_stage(Lines<const T> in, Lines<T> out, int64_t m, int64_t s, const T* tw, const T* S, const T* add) {
  using V = typename Vec<T>::type;
  constexpr int H = P / 2 + 1;
  V cr[H][H] = {}, sr[H][H] = {};
  if constexpr (P % 2 == 1) {
    static const OddRoots<P, T> roots;
    for (int r = 0; r < H; ++r)
      for (int t = 0; t < H; ++t) {
        cr[r][t] = V{} + roots.c[r][t];
        sr[r][t] = V{} + roots.s[r][t];
      }
  }
  for (int64_t pp = 0; pp < m; ++pp) {
    V wr[P], wi[P];
    for (int t = 1; t < P; ++t) {
      wr[t] = V{} + tw[(pp * (P - 1) + t - 1) * 2];
      wi[t] = V{} + tw[(pp * (P - 1) + t - 1) * 2 + 1];
    }
    // one base pointer per side and stage-constant offsets: the P inputs r m s apart, the P outputs s apart, the
    // imaginary parts a fixed distance from the real ones (keeps the odd radices' 4 P streams out of the registers)
    const int64_t irs = s * m * in.stride, iim = in.im - in.re, ors = s * out.stride, oim = out.im - out.re;
    for (int64_t q = 0; q < s; ++q) {
      V xr[P], xi[P];
      const T* ib = in.re + (q + s * pp) * in.stride;
      for (int r = 0; r < P; ++r) {
        if (in.prefetch) {
          __builtin_prefetch(ib + r * irs + in.prefetch);
          __builtin_prefetch(ib + r * irs + iim + in.prefetch);
        }
        xr[r] = load<V>(ib + r * irs);
        xi[r] = load<V>(ib + r * irs + iim);
      }
      dft<P>(xr, xi, cr, sr);
      if (pp > 0)
        for (int t = 1; t < P; ++t) {
          const V r = xr[t] * wr[t] - xi[t] * wi[t];
          xi[t] = xr[t] * wi[t] + xi[t] * wr[t];
          xr[t] = r;
        }
      T* ob = out.re + (q + s * P * pp) * out.stride;
      for (int t = 0; t < P; ++t) {
        const int64_t e = q + s * (P * pp + t);
        T* o = ob + t * ors;
        if constexpr (E == SPECTRUM) {
          const V a = V{} + S[2 * e], b = V{} + S[2 * e + 1];
          store(o, xr[t] * a + xi[t] * b);
          store(o + oim, xr[t] * b - xi[t] * a);
        } else if constexpr (E == OUTPUT) {
          const V ad = V{} + (add ? add[e] : T(0));
          store(o, xr[t] + ad);
          store(o + oim, ad - xi[t]);
        } else if constexpr (E == OUTPUT_STREAM) {
          const V ad = V{} + (add ? add[e] : T(0));
          store_stream(o, xr[t] + ad);
          store_stream(o + oim, ad - xi[t]);
        } else {
          store(o, xr[t]);
          store(o + oim, xi[t]);
        }
      }
    }
  }
}

template <int P, typename T>
void fft_stage_e(Epilogue e, Lines<const T> in, Lines<T> out, int64_t m, int64_t s, const T* tw, const T* S,
                 const T* add) {
  if (e == SPECTRUM)
    fft_stage<P, SPECTRUM>(in, out, m, s, tw, S, add);
  else if (e == OUTPUT)
    fft_stage<P, OUTPUT>(in, out, m, s, tw, S, add);
  else if (e == OUTPUT_STREAM)
    fft_stage<P, OUTPUT_STREAM>(in, out, m, s, tw, S, add);
  else
    fft_stage<P, PLAIN>(in, out, m, s, tw, S, add);
}

// F of the pl.n elements at in, stage k writing buf[(first + k) % 2] (vectors of L lanes, imaginary parts at + io),
// the last stage writing out with epilogue e instead. Returns nothing: the result is at out.
template <typename T>
void fft_run(const FftPlan<T>& pl, Lines<const T> in, T* const buf[2], int first, int64_t io, Lines<T> out, Epilogue e,
             const T* S, const T* add) {
  constexpr int64_t L = Vec<T>::n;
  int64_t len = pl.n, s = 1;
  const int nst = static_cast<int>(pl.radix.size());
  for (int k = 0; k < nst; ++k) {
    const int p = pl.radix[k];
    const int64_t m = len / p;
    const T* tw = pl.tw.data() + pl.offset[k];
    T* b = buf[(first + k) % 2];
    const bool last = k == nst - 1;
    const Lines<T> o = last ? out : Lines<T>{b, b + io, L};
    const Epilogue ek = last ? e : PLAIN;
    switch (p) {
      case 2: fft_stage_e<2>(ek, in, o, m, s, tw, S, add); break;
      case 3: fft_stage_e<3>(ek, in, o, m, s, tw, S, add); break;
      case 4: fft_stage_e<4>(ek, in, o, m, s, tw, S, add); break;
      case 5: fft_stage_e<5>(ek, in, o, m, s, tw, S, add); break;
      default: fft_stage_e<7>(ek, in, o, m, s, tw, S, add); break;
    }
    in = Lines<const T>{b, b + io, L};
    len = m;
    s *= p;
  }
}

// The correlation of the complex lines at in with the kernel whose spectrum is S (K complex numbers, real and
// imaginary interleaved, F(w) / K), plus add: y1 lands at out.re, y2 at out.im (stream: non-temporal stores where
// out is 64-byte aligned). buf: two buffers of 2 io scalars.
template <typename T>
void fft_correlate(const FftPlan<T>& pl, const T* S, const T* add, Lines<const T> in, Lines<T> out, T* const buf[2],
                   int64_t io, bool stream) {
  constexpr int64_t L = Vec<T>::n;
  const int nst = static_cast<int>(pl.radix.size());
  T* mid = buf[(nst - 1) % 2];  // where the first FFT's last stage leaves conj(F z) * S
  fft_run(pl, in, buf, 0, io, Lines<T>{mid, mid + io, L}, SPECTRUM, S, add);
  const bool nt = stream && out.stride % L == 0 && reinterpret_cast<uintptr_t>(out.re) % 64 == 0 &&
                  reinterpret_cast<uintptr_t>(out.im) % 64 == 0;
  fft_run(pl, Lines<const T>{mid, mid + io, L}, buf, nst, io, out, nt ? OUTPUT_STREAM : OUTPUT, S, add);
}

// F(w[c]) / K for every channel of the (C, K) weights, L channels per FFT: (C, K, 2) scalars.
template <typename T> std::vector<T> weight_spectra(const FftPlan<T>& pl, const T* w, int64_t C) {
  constexpr int64_t L = Vec<T>::n;
  const int64_t K = pl.n, KP = (K + L - 1) / L * L, io = KP * L;
  std::vector<T> S(C * K * 2), a(2 * io), b(2 * io), z(2 * io);
  T* const buf[2] = {b.data(), z.data()};
  for (int64_t c0 = 0; c0 < C; c0 += L) {
    rows_to_tile(w, C, K, c0, a.data());
    std::fill(a.begin() + io, a.begin() + io + K * L, T(0));
    fft_run(pl, Lines<const T>{a.data(), a.data() + io, L}, buf, 0, io, Lines<T>{a.data(), a.data() + io, L}, PLAIN,
            static_cast<const T*>(nullptr), static_cast<const T*>(nullptr));
    for (int64_t l = 0; l < std::min(L, C - c0); ++l)
      for (int64_t f = 0; f < K; ++f) {
        S[((c0 + l) * K + f) * 2] = a[f * L + l] / static_cast<T>(K);
        S[((c0 + l) * K + f) * 2 + 1] = a[io + f * L + l] / static_cast<T>(K);
      }
  }
  return S;
}

// The complex input lines of the pair strip at o0 of one plane: dim 2, columns o0 .. o0 + L - 1 (real parts) and
// the next L (imaginary parts) of a (K x W) plane, read in place; dim 3, rows o0 .. o0 + 2 L - 1 of an (H x K)
// plane transposed into t. Full strips only (the lines past a plane's last full strip go through a Pool). t: 2 io
// scalars.
template <typename T>
Lines<const T> strip_lines(const T* x, int64_t dim, int64_t K, int64_t other, int64_t o0, T* t, int64_t io) {
  constexpr int64_t L = Vec<T>::n;
  if (dim == 2) return Lines<const T>{x + o0, x + o0 + L, other};
  rows_to_tile(x, other, K, o0, t, 2 * L);
  rows_to_tile(x, other, K, o0 + L, t + io, 2 * L);
  return Lines<const T>{t, t + io, L};
}

// The lines left over after a plane's last full pair strip (r = other mod 2 L of them: the last columns along dim 2,
// the last rows along dim 3) are pooled over the B planes of a channel, so that they fill whole strips instead of
// one part-empty strip per plane: pooled line g (g < n = B r) is line other - r + g mod r of plane g / r (planes ps
// scalars apart). A pair strip of the pool, lines g0 .. g0 + 2 L - 1, is gathered into t (lane l of half h = line
// g0 + h L + l; lanes past n zero) and scattered back from it: along dim 2 by masked moves of the runs of columns
// that share a plane, along dim 3 by L x L transposes of rows found one by one.
struct Pool {
  int64_t ps, other, r, n, dim, K;  // plane stride, lines per plane, pooled per plane, pooled lines (B r), dim, K
  static Pool of(int64_t dim, int64_t B, int64_t ps, int64_t other, int64_t K, int64_t L) {
    const int64_t r = other % (2 * L);
    return Pool{ps, other, r, B * r, dim, K};
  }
  // offset of pooled line g's first element from the first plane's
  int64_t line(int64_t g) const { return g / r * ps + (other - r + g % r) * (dim == 2 ? 1 : K); }
  // dim 3: rows[i] = the row of lane i of half h of strip g0 (planes at base); returns how many lanes have one
  template <typename Ptr> int64_t half_rows(Ptr base, int64_t g0, int64_t h, int64_t L, Ptr* rows) const {
    const int64_t nr = std::clamp<int64_t>(n - g0 - h * L, 0, L);
    for (int64_t i = 0; i < nr; ++i) rows[i] = base + line(g0 + h * L + i);
    return nr;
  }
  // dim 2: fn(offset of the run's first column, offset in t, lines) per run of strip g0's lines within one plane
  template <typename F> void runs(int64_t g0, int64_t L, int64_t io, F fn) const {
    for (int64_t l = 0; l < 2 * L && g0 + l < n;) {
      const int64_t g = g0 + l, run = std::min({L - l % L, r - g % r, n - g});
      fn(line(g), l / L * io + l % L, run);
      l += run;
    }
  }
};
template <typename T> void pool_gather(const Pool& p, const T* x, int64_t g0, T* t, int64_t io) {
  using V = typename Vec<T>::type;
  constexpr int64_t L = Vec<T>::n;
  if (p.dim == 3) {
    for (int64_t h = 0; h < 2; ++h) {
      const T* rows[L];
      const int64_t nr = p.half_rows(x, g0, h, L, rows);
      for (int64_t k0 = 0; k0 < p.K; k0 += L)
        to_tile([&](int64_t i) { return rows[i] + k0; }, nr, std::min(L, p.K - k0), t + h * io + k0 * L);
    }
    return;
  }
  if (g0 + 2 * L > p.n) std::fill(t, t + 2 * io, T(0));
  p.runs(g0, L, io, [&](int64_t xo, int64_t to, int64_t n) {
    for (int64_t j = 0; j < p.K; ++j) store(t + to + j * L, load_part<V>(x + xo + j * p.other, n), n);
  });
}
template <typename T> void pool_scatter(const Pool& p, const T* t, int64_t g0, T* y, int64_t io) {
  using V = typename Vec<T>::type;
  constexpr int64_t L = Vec<T>::n;
  if (p.dim == 3) {
    for (int64_t h = 0; h < 2; ++h) {
      T* rows[L];
      const int64_t nr = p.half_rows(y, g0, h, L, rows);
      for (int64_t k0 = 0; k0 < p.K; k0 += L)
        from_tile(t + h * io + k0 * L, [&](int64_t i) { return rows[i] + k0; }, nr, std::min(L, p.K - k0));
    }
    return;
  }
  p.runs(g0, L, io, [&](int64_t yo, int64_t to, int64_t n) {
    for (int64_t j = 0; j < p.K; ++j) store(y + yo + j * p.other, load_part<V>(t + to + j * L, n), n);
  });
}

// Forward by the FFT, one plane ((K x W) along dim 2, (H x K) along dim 3), a pair strip of 2 L lines at a time, of
// the first `lines` lines (the full strips; the rest goes through a Pool). Along dim 2 the result goes
// straight to y (stream: non-temporal stores where rows are 64-byte aligned) and the first pass over a strip
// prefetches the next one (after the last strip, the first of the plane at x + next, when next is not 0); along dim 3
// it goes through t. scratch: 6 KP L.
template <typename T>
void fft_plane(const FftPlan<T>& pl, const T* S, const T* x, T* y, const T* add, int64_t dim, int64_t other,
               int64_t lines, bool stream, int64_t next, T* scratch) {
  constexpr int64_t L = Vec<T>::n;
  const int64_t K = pl.n, io = (K + L - 1) / L * L * L;
  T* t = scratch;
  T* const buf[2] = {scratch + 2 * io, scratch + 4 * io};
  for (int64_t o0 = 0; o0 < lines; o0 += 2 * L) {
    Lines<const T> in = strip_lines(x, dim, K, other, o0, t, io);
    if (dim == 2) {
      // the next strip of the plane, or the first of the next plane: its rows are 2 L apart from this strip's
      if (o0 + 2 * L < lines)
        in.prefetch = 2 * L;
      else if (next)
        in.prefetch = next - o0;
      fft_correlate(pl, S, add, in, Lines<T>{y + o0, y + o0 + L, other}, buf, io, stream);
      continue;
    }
    fft_correlate(pl, S, add, in, Lines<T>{t, t + io, L}, buf, io, false);
    tile_to_rows(t, y, lines, K, o0, stream);  // rows past `lines` are the pool's
    tile_to_rows(t + io, y, lines, K, o0 + L, stream);
  }
}

// Weight gradient of one channel by the FFT: dw = Re(F^-1(sum over lines of conj(F g) * F x)) (two real lines per
// complex one: the cross terms of the packing are imaginary in the result), the sum kept per lane and the inverse
// transform done once, before the lanes are summed. Planes at gy / x + b * bstride. scratch: 12 KP L.
template <typename T>
void fft_wgrad_channel(const FftPlan<T>& pl, const T* gy, const T* x, int64_t B, int64_t bstride, int64_t dim,
                       int64_t other, T* dw, T* scratch) {
  using V = typename Vec<T>::type;
  constexpr int64_t L = Vec<T>::n;
  const int64_t K = pl.n, io = (K + L - 1) / L * L * L;
  T* t = scratch;
  T* const buf[2] = {scratch + 2 * io, scratch + 4 * io};
  T* zx = scratch + 6 * io;
  T* zg = scratch + 8 * io;
  T* acc = scratch + 10 * io;
  std::fill(acc, acc + 2 * io, T(0));
  const T* none = nullptr;
  const auto accumulate = [&]() {  // acc += conj(G) X
    for (int64_t f = 0; f < K; ++f) {
      const V gr = load<V>(zg + f * L), gi = load<V>(zg + io + f * L);
      const V xr = load<V>(zx + f * L), xi = load<V>(zx + io + f * L);
      store(acc + f * L, load<V>(acc + f * L) + gr * xr + gi * xi);
      store(acc + io + f * L, load<V>(acc + io + f * L) + gr * xi - gi * xr);
    }
  };
  const Pool pool = Pool::of(dim, B, bstride, other, K, L);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t o0 = 0; o0 < other - pool.r; o0 += 2 * L) {
      fft_run(pl, strip_lines(x + b * bstride, dim, K, other, o0, t, io), buf, 0, io, Lines<T>{zx, zx + io, L},
              PLAIN, none, none);
      fft_run(pl, strip_lines(gy + b * bstride, dim, K, other, o0, t, io), buf, 0, io, Lines<T>{zg, zg + io, L},
              PLAIN, none, none);
      accumulate();
    }
  for (int64_t g0 = 0; g0 < pool.n; g0 += 2 * L) {
    pool_gather(pool, x, g0, t, io);
    fft_run(pl, Lines<const T>{t, t + io, L}, buf, 0, io, Lines<T>{zx, zx + io, L}, PLAIN, none, none);
    pool_gather(pool, gy, g0, t, io);
    fft_run(pl, Lines<const T>{t, t + io, L}, buf, 0, io, Lines<T>{zg, zg + io, L}, PLAIN, none, none);
    accumulate();
  }
  // Re(F^-1(A)) = Re(conj(F(conj(A)))) / K = Re(F(conj(A))) / K
  for (int64_t f = 0; f < K; ++f) store(acc + io + f * L, -load<V>(acc + io + f * L));
  fft_run(pl, Lines<const T>{acc, acc + io, L}, buf, 0, io, Lines<T>{zx, zx + io, L}, PLAIN,
          static_cast<const T*>(nullptr), static_cast<const T*>(nullptr));
  for (int64_t k = 0; k < K; ++k) dw[k] = hsum<T>(load<V>(zx + k * L)) / static_cast<T>(K);
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
        using V = typename Vec<T>::type;
        const int64_t n = std::min(L, W - o0);
        for (int64_t j = 0; j < K; ++j) {
          store(G + j * L, load_part<V>(g + j * W + o0, n));
          store(X2 + j * L, load_part<V>(xx + j * W + o0, n));
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
                               int64_t dim, int64_t algo) {
  check(x, w, dim);
  if (add) TORCH_CHECK(add->sizes() == w.sizes() && add->is_contiguous() && add->scalar_type() == x.scalar_type(),
                       "add must be a contiguous (C, K) tensor like weight");
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3), K = x.size(dim);
  const bool fft = use_fft(algo, K, dim, 0);
  auto y = at::empty_like(x);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "circular_dw_forward", [&] {
    constexpr int64_t L = Vec<scalar_t>::n;
    const int64_t KP = (K + L - 1) / L * L;
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* wp = w.data_ptr<scalar_t>();
    const scalar_t* ap = add ? add->data_ptr<scalar_t>() : nullptr;
    scalar_t* yp = y.data_ptr<scalar_t>();
    const int64_t plane = H * W;
    if (fft) {  // work items: the full strips of one plane, or one pair strip of a channel's pool
      const FftPlan<scalar_t> pl(K);
      const std::vector<scalar_t> S = weight_spectra(pl, wp, C);
      const bool stream = static_cast<int64_t>(y.nbytes()) >= STREAM_MIN_BYTES;
      const int64_t other = dim == 2 ? W : H;
      const Pool pool = Pool::of(dim, B, C * plane, other, K, L);
      const int64_t r = pool.r;
      // In memory order when nothing is pooled; else channel-major, a channel's pool after its planes (the pooled
      // columns are then still in cache)
      const int64_t planes = other > r ? B : 0, pooled = (pool.n + 2 * L - 1) / (2 * L), per = planes + pooled;
      at::parallel_for(0, C * per, 1, [&](int64_t begin, int64_t end) {
        std::vector<scalar_t> scratch(6 * KP * L);
        scalar_t* t = scratch.data();
        const int64_t io = KP * L;
        for (int64_t q = begin; q < end; ++q) {
          const int64_t c = pooled ? q / per : q % C, i = pooled ? q % per : q / C;
          const scalar_t* a = ap ? ap + c * K : nullptr;
          if (i < planes) {
            const int64_t p = i * C + c;
            int64_t next = 0;  // the next item's plane, for the prefetch: C planes on, or the adjacent one
            if (q + 1 < end && (!pooled || i + 1 < planes)) next = (pooled ? C : 1) * plane;
            fft_plane(pl, S.data() + c * K * 2, xp + p * plane, yp + p * plane, a, dim, other, other - r, stream,
                      next, t);
            continue;
          }
          const int64_t g0 = (i - planes) * 2 * L;
          pool_gather(pool, xp + c * plane, g0, t, io);
          scalar_t* const buf[2] = {t + 2 * io, t + 4 * io};
          fft_correlate(pl, S.data() + c * K * 2, a, Lines<const scalar_t>{t, t + io, L},
                        Lines<scalar_t>{t, t + io, L}, buf, io, false);
          pool_scatter(pool, t, g0, yp + c * plane, io);
        }
        stream_fence();
      });
      return;
    }
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

at::Tensor circular_dw_wgrad(const at::Tensor& gy, const at::Tensor& x, int64_t dim, int64_t algo) {
  TORCH_CHECK(gy.sizes() == x.sizes() && gy.is_contiguous() && gy.scalar_type() == x.scalar_type(),
              "gy must be contiguous and shaped like x");
  TORCH_CHECK(x.dim() == 4 && x.is_contiguous() && (dim == 2 || dim == 3), "x: contiguous (B, C, H, W); dim 2 or 3");
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3), K = x.size(dim);
  const bool fft = use_fft(algo, K, dim, 1);
  auto dw = at::empty({C, K}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "circular_dw_wgrad", [&] {
    using V = typename Vec<scalar_t>::type;
    constexpr int64_t L = Vec<scalar_t>::n;
    const scalar_t* gp = gy.data_ptr<scalar_t>();
    const scalar_t* xp = x.data_ptr<scalar_t>();
    scalar_t* dp = dw.data_ptr<scalar_t>();
    const int64_t plane = H * W, bstride = C * plane;
    if (fft) {
      const FftPlan<scalar_t> pl(K);
      at::parallel_for(0, C, 1, [&](int64_t begin, int64_t end) {
        std::vector<scalar_t> scratch(12 * ((K + L - 1) / L * L) * L);
        for (int64_t c = begin; c < end; ++c)
          fft_wgrad_channel(pl, gp + c * plane, xp + c * plane, B, bstride, dim, dim == 2 ? W : H, dp + c * K,
                            scratch.data());
      });
      return;
    }
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
  m.def("circular_dw_forward(Tensor x, Tensor weight, Tensor? add, int dim, int algo=0) -> Tensor");
  m.def("circular_dw_wgrad(Tensor gy, Tensor x, int dim, int algo=0) -> Tensor");
}

TORCH_LIBRARY_IMPL(hybridvision, CPU, m) {
  m.impl("circular_dw_forward", &circular_dw_forward);
  m.impl("circular_dw_wgrad", &circular_dw_wgrad);
}
