// Depthwise circular cross-correlation on the CPU by direct summation or FFT, hand-vectorised (hybridvision's
// method="native"; built on first use by hybridvision/ops/native.py).
//
//   forward  y[b, c, i] = add[c, i] + sum_k w[c, k] * x[b, c, (i + k) mod K]     along dim 2 (H) or 3 (W)
//   wgrad    dw[c, k]   = sum_{b, other, i} gy[b, c, i] * x[b, c, (i + k) mod K]
// (the input gradient is the forward with the flipped kernel w'[k] = w[(K - k) mod K], done in Python).
//
// The core (rows_block) holds R output lines of one SIMD vector each in registers and streams the K input lines
// past them: one vector load feeds R FMAs whose other operand is a vector of weights from a per-channel table. The
// lanes run over
//   * 16 planes, for small planes: the same channel of 16 samples (one kernel, broadcast to every lane) or, for
//     batches too small to fill half the lanes, 16 channels of one sample (a kernel per lane); the 16 planes are
//     transposed (in registers, 16 x 16 blocks) into one tile whose rows are the positions;
//   * else along dim 2 over W (the contiguous axis; no copies), and along dim 3 over 16 rows transposed into a tile.
// Nothing but x, y and a few KB to a few hundred KB of per-thread scratch is touched. Types: float and double.
// From K=28 on (the forward along W from K=32, the weight gradient from K=20; K without prime factors above 7) both
// ops run an FFT instead (the FFT path below; the ops' algo argument overrides the choice); the forward along W where
// K is 7 or 14 vectors or half vectors (56 / 112 / 224 floats with AVX-512) runs it in registers with its lanes along
// the axis (lane_fft_rows), and so does the weight gradient where K is 7 of them (56 / 112; lane_fft_wgrad); the
// forward along H where K = 32, 40, 56, 224 takes three or five sweeps of a strip instead of the passes
// (sweep_correlate).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <c10/core/CPUAllocator.h>
#include <torch/library.h>

#if defined(__AVX__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <tuple>
#include <type_traits>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <utility>
#include <vector>

namespace {

// Zeroed per-thread scratch of n scalars from torch's CPU allocator, whose blocks are 64-byte aligned: a vector load
// or store in it never straddles two cache lines. (In std::vector's 16-byte aligned storage three of every four did;
// aligning the FFT's strip buffer took its passes from 8.2 to 6.0 ns per complex point at K=56, one thread, Zen 5;
// scratch.)
template <typename T> class Scratch {
 public:
  explicit Scratch(int64_t n) : mem_(c10::GetCPUAllocator()->allocate(n * sizeof(T))) {
    std::memset(mem_.get(), 0, n * sizeof(T));
  }
  T* data() const { return static_cast<T*>(mem_.get()); }

 private:
  c10::DataPtr mem_;
};

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

// Whole vectors to and from any address, as one vector move. (std::memcpy of a vector does that only while the
// vector sits in a register: where it lives in an array on the stack, GCC 12 with -march=znver3 copied it in 16-byte
// pieces, some through general registers, and the next load of the piece waited on the store. Through this type
// instead, the AVX2 build on a Zen 3 EPYC, both builds side by side, 2 threads, per-round medians: forward along H
// 1.20-1.44x at 56 x 56 / 112 x 112 / 224 x 224, along W 1.03-1.15x, the weight gradient 1.01-1.38x; scratch, the
// kernel log's session 25.)
template <typename V> struct __attribute__((packed, may_alias)) Unaligned { V v; };
template <typename V, typename T> inline V load(const T* p) { return reinterpret_cast<const Unaligned<V>*>(p)->v; }
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
// The first n lanes of v to p by one masked move; false (nothing written) where the ISA has none for V.
template <typename V, typename T> inline bool store_masked(T* p, const V& v, int64_t n) {
#if defined(__AVX512F__)
  if constexpr (sizeof(V) == 64 && std::is_same<T, float>::value) {
    _mm512_mask_storeu_ps(p, static_cast<__mmask16>((1u << n) - 1), (__m512)v);
    return true;
  } else if constexpr (sizeof(V) == 64 && std::is_same<T, double>::value) {
    _mm512_mask_storeu_pd(p, static_cast<__mmask8>((1u << n) - 1), (__m512d)v);
    return true;
  }
#endif
  return false;
}
template <typename V, typename T> inline void store(T* p, const V& v, int64_t n = lanes<V, T>()) {
  if (n == lanes<V, T>()) {
    reinterpret_cast<Unaligned<V>*>(p)->v = v;
    return;
  }
  if (!store_masked(p, v, n)) std::memcpy(p, &v, n * sizeof(T));
}
// The first n lanes of a vector, n <= lanes (n = 0: nothing read, zeros / nothing written): where MASKED_MOVES, one
// masked move whatever n is (no branch in the loops), else a full move when n is all the lanes.
#if defined(__AVX512F__)
constexpr bool MASKED_MOVES = true;
#else
constexpr bool MASKED_MOVES = false;
#endif
template <typename V, typename T> inline V load_n(const T* p, int64_t n) {
  if constexpr (MASKED_MOVES && sizeof(V) == 64) return load_part<V>(p, n);
  return n == lanes<V, T>() ? load<V>(p) : load_part<V>(p, n);
}
template <typename V, typename T> inline void store_n(T* p, const V& v, int64_t n) {
  if (!store_masked(p, v, n)) store(p, v, n);
}
// s in every lane. (s - 0 folds to a plain broadcast; V{} + s does not, since -0 + 0 is +0: GCC adds in a scalar
// register first.)
template <typename V, typename T> inline V bcast(T s) { return s - V{}; }
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
#endif
#if defined(__AVX__)  // (also AVX-512's half vectors: lane_fft_rows)
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
// Where the lanes run in the direct sum (both ops): small planes (at most BATCH_LANES_MAX_P elements) through lanes
// over planes, over the channels (L channels of a sample) where at least half the lanes have one and they fill more
// lanes than the batch would, else over the batch (a channel of L samples) where the samples fill half the lanes;
// otherwise (AXIS) along the contiguous axis (dim 2) or over 16-row transposed tiles (dim 3). Forward, C=2688/K, 2
// threads, per-round medians (`cd benchmarks && python bench_native_ab.py --base REV --threads 2 --cases 7x7 14x14
// --budget 1 --batch B`): channel lanes against lanes over the axis at B=1 (REV 3d4a247) 7x7 4.85x / 5.27x (dim 2 /
// 3), 14x14 2.86x / 2.22x; against half-empty batch lanes (REV 0ebcde4) B=8 1.57-1.72x, B=12 1.20-1.25x, B=17
// 1.54-1.73x.
enum class LaneMode { AXIS, BATCH, CHANNELS };
inline LaneMode lane_mode(int64_t B, int64_t C, int64_t plane, int64_t dim, int64_t L) {
  if (plane > BATCH_LANES_MAX_P[dim - 2]) return LaneMode::AXIS;
  const int64_t fill_b = B * ((C + L - 1) / L), fill_c = C * ((B + L - 1) / L);  // lanes used, scaled alike
  if (2 * C >= L && fill_c > fill_b) return LaneMode::CHANNELS;
  return 2 * B >= L ? LaneMode::BATCH : LaneMode::AXIS;
}
// The weight gradient's: lanes over planes (lane_mode) only where both of its (P x L) tiles stay small and the lanes
// along the axis would be poorly filled: along dim 2 (no transposes there) at most 5/8 of them and planes of at most
// 256, along dim 3 (transposed either way) any unfilled and planes of at most 400. `cd benchmarks && python
// bench_native_ab.py --base 0ebcde4 --threads 2 --cases 7x7 7x10 7x12 10x10 12x12 14x10 14x14 14x20 16x16 16x40
// --batch B` (B = 16, 1, 8; per-round medians): planes wherever lane_mode allows them, dim 2 W=7-10 1.09-1.90x, W=12
// 0.98-1.49x, W=14 0.78-1.10x, W=16 0.67-0.85x, dim 3 H=7-14 and 20 1.15-2.54x, 16x16 0.98x, 16x40 (plane 640)
// 0.85-0.97x; with this rule dim 2 W=7 1.27-2.30x, W=10 1.04-1.90x, dim 3 1.12-2.78x where it takes the planes, the
// others 0.99-1.03x.
inline LaneMode wgrad_lane_mode(int64_t B, int64_t C, int64_t H, int64_t W, int64_t dim, int64_t L) {
  const int64_t across = dim == 2 ? W : H, vectors = (across + L - 1) / L * L;  // the axis lanes: used, in all
  const bool planes = dim == 2 ? H * W <= 256 && 8 * across <= 5 * vectors : H * W <= 400 && across < vectors;
  return planes ? lane_mode(B, C, H * W, dim, L) : LaneMode::AXIS;
}

// dim 2: K rows of V's lanes (input row stride sx, output row stride sy). wb: the weights as full vectors
// (lane_tables), row t (Vec<T>::n lanes) = w[t mod K] of each lane's channel for t in [-R, 2K) (pointer at t = 0);
// ab: null, or the addends, row i = add[i] of each lane's channel for i < K + R (zero from K). Broadcasting once per
// channel keeps the inner loop at one load per FMA operand: compilers otherwise rotate the sliding weight window
// through registers and re-broadcast each tap with a shuffle, which competes with the FMAs for the same port.
template <typename V, typename T>
void rows_block(const T* xs, int64_t sx, T* ys, int64_t sy, const T* wb, const T* ab, int64_t K) {
  constexpr int64_t LF = Vec<T>::n;
  for (int64_t i0 = 0; i0 < K; i0 += R) {
    V acc[R];
    for (int r = 0; r < R; ++r) acc[r] = ab ? load<V>(ab + (i0 + r) * LF) : V{};
    for (int64_t j = 0; j < K; ++j) {
      const V xv = load<V>(xs + j * sx);
      const T* wp = wb + (j - i0 + K) * LF;  // weight of output row i0 + r: w[(j - i0 - r) mod K], row -r from here
      for (int r = 0; r < R; ++r) acc[r] += load<V>(wp - r * LF) * xv;
    }
    const int64_t rn = std::min<int64_t>(R, K - i0);
    for (int64_t r = 0; r < rn; ++r) store(ys + (i0 + r) * sy, acc[r]);
  }
}

// dim 2, one (K x W) plane: full vectors, then one half vector, then the rest through zero-padded scratch. wb, ab:
// rows_block's tables.
template <typename T>
void fwd_rows(const T* x, T* y, const T* wb, const T* ab, int64_t K, int64_t W, T* scratch) {
  using V = typename Vec<T>::type;
  using Vh = typename Vec<T>::half;
  constexpr int64_t L = lanes<V, T>(), Lh = lanes<Vh, T>();
  int64_t w0 = 0;
  for (; w0 + L <= W; w0 += L) rows_block<V>(x + w0, W, y + w0, W, wb, ab, K);
  if (w0 + Lh <= W) {
    rows_block<Vh>(x + w0, W, y + w0, W, wb, ab, K);
    w0 += Lh;
  }
  if (w0 < W) {
    const int64_t n = W - w0;
    T* xb = scratch;
    T* yb = scratch + K * Lh;
    for (int64_t j = 0; j < K; ++j)
      for (int64_t l = 0; l < Lh; ++l) xb[j * Lh + l] = l < n ? x[j * W + w0 + l] : T(0);
    rows_block<Vh>(xb, Lh, yb, Lh, wb, ab, K);
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
// (stream: with non-temporal stores where m = L, every row is 64-byte aligned and a vector is a whole line). With
// MASKED_MOVES row(i) is called for every i < L (rows i >= n move no lanes), so that the block stays in registers: a
// branch per row kept it on the stack, and GCC turned the tile's stores into a memcpy call unless the loops are
// unrolled (together: a strip's transposes in and out in L1 1.67x / 1.51x / 1.14x as fast at K=56 / 112 / 224, one
// thread; scratch). Rows i >= n move at row(0): a masked move of no lanes still costs its address's translation, and
// rows past the tensor's end (batch lanes with fewer than L samples: C planes apart) made the forward at B=8, C=384,
// 7x7, 2 threads, take 100 us against 43 with them at row(0) (and 50 at B=16; scratch mask.py).
template <typename T, typename Row> void to_tile(Row row, int64_t n, int64_t m, T* tile) {
  using V = typename Vec<T>::type;
  constexpr int64_t L = Vec<T>::n;
  V v[L];
#pragma GCC unroll 16
  for (int64_t i = 0; i < L; ++i) {
    if constexpr (MASKED_MOVES)
      v[i] = load_n<V>(row(i < n ? i : 0), i < n ? m : 0);
    else
      v[i] = i < n ? load_n<V>(row(i), m) : V{};
  }
  transpose_block<T>(v);
#pragma GCC unroll 16
  for (int64_t i = 0; i < L; ++i) store(tile + i * L, v[i]);
}
// The L x L block at tile transposed into v: v[i][j] = tile[j * L + i].
template <typename T> inline void block_from_tile(const T* tile, typename Vec<T>::type* v) {
  using V = typename Vec<T>::type;
  constexpr int64_t L = Vec<T>::n;
#pragma GCC unroll 16
  for (int64_t i = 0; i < L; ++i) v[i] = load<V>(tile + i * L);
  transpose_block<T>(v);
}
template <typename T, typename Row> void from_tile(const T* tile, Row row, int64_t n, int64_t m, bool stream = false) {
  using V = typename Vec<T>::type;
  constexpr int64_t L = Vec<T>::n;
  V v[L];
  block_from_tile<T>(tile, v);
  // non-temporal stores only where a row's vector is a whole cache line (AVX-512; AVX2: tile_to_rows)
  stream = stream && sizeof(V) == 64;
  for (int64_t i = 0; i < n && stream; ++i) stream = reinterpret_cast<uintptr_t>(row(i)) % 64 == 0;
  if (m == L && stream) {
    for (int64_t i = 0; i < n; ++i) store_stream(row(i), v[i]);
    return;
  }
#pragma GCC unroll 16
  for (int64_t i = 0; i < L; ++i) {
    if constexpr (MASKED_MOVES)
      store_n(row(i < n ? i : 0), v[i], i < n ? m : 0);
    else if (i < n)
      store(row(i), v[i], m);
  }
}
// Row accessors of a row-major matrix at src with row stride ld.
template <typename T> inline auto matrix_rows(T* src, int64_t ld) {
  return [=](int64_t i) { return src + i * ld; };
}

// The lane tile of rows h0 .. h0 + L - 1 of a (rows x K) matrix (dim 3: lanes = rows): tile[k * L + l] =
// src[(h0 + l) * K + k] for k < K, zero in lanes past the last row. Tile rows K .. KP - 1 (KP = K rounded up to
// L) are scratch: a last column chunk narrower than L is read as a full L x L block (the rest of each row is the
// next row's head) whenever that stays inside the matrix, so the tile needs KP rows. prefetch: when non-zero, also
// prefetch the L rows that many scalars on (the caller's next strip). out: when not null, the same rows of the
// (rows x K) matrix at out (where the caller writes this strip's result) are prefetched for writing. The L rows are
// L K contiguous scalars: both sweep their cache lines in address order, a share with each column chunk, so that
// the misses overlap the transposes and the FFT. (Prefetching a strip's 112 lines of y in one burst before it, at
// 56x56, kept the core waiting on full miss buffers: perf annotate put a third of the work loop's own samples on
// that loop; chunk by chunk the forward along W ran 1.10x / 1.14x as fast at 56x56 / 84x84. The sweep in address
// order instead of a line of each row per chunk: 1.05x / 1.12x / 1.15x at 56x56 / 84x84 / 160x160 with the
// caches swept before each call, 1.02x / 0.99x / 1.07x without; per-round medians, scratch.)
template <typename T>
void rows_to_tile(const T* src, int64_t rows, int64_t K, int64_t h0, T* tile, int64_t prefetch = 0,
                  const T* out = nullptr) {
  constexpr int64_t L = Vec<T>::n, E = 64 / sizeof(T);  // E: scalars per cache line
  const int64_t n = std::min(L, rows - h0);
  // the rows' lines (one more: they need not start on a line) and how many each column chunk prefetches
  const int64_t chunks = (K + L - 1) / L, lines = (L * K + E - 1) / E + 1, share = (lines + chunks - 1) / chunks;
  const T* first = src + h0 * K;
  for (int64_t k0 = 0; k0 < K; k0 += L) {
    const int64_t m = std::min(L, K - k0), j0 = k0 / L * share, j1 = std::min(lines, j0 + share);
    for (int64_t j = j0; j < j1 && prefetch; ++j)  // (prefetches never fault, even past the end)
      __builtin_prefetch(first + prefetch + j * E);
    for (int64_t j = j0; j < j1 && out; ++j) __builtin_prefetch(out + h0 * K + j * E, 1, 2);
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
  using V = typename Vec<T>::type;
  constexpr int64_t L = Vec<T>::n, J = 64 / sizeof(V);  // J: vectors per cache line
  const int64_t n = std::min(L, rows - h0);
  T* d = dst + h0 * K;
  if constexpr (J > 1) {
    // Where a vector is part of a line (AVX2), the J blocks of each line's columns go together, so that every
    // non-temporal store sequence writes whole lines: from_tile stored one block at a time, streaming the blocks at
    // line starts and storing the others normally, and the two halves of each line met in the caches and in the
    // write-combining buffers (forward along W at 224 x 224 with streaming off altogether ran 1.55x as fast; scratch).
    if (stream && n == L && K % (J * L) == 0 && reinterpret_cast<uintptr_t>(d) % 64 == 0) {
      for (int64_t i0 = K - J * L; i0 >= 0; i0 -= J * L) {
        V v[J][L];
        for (int64_t j = 0; j < J; ++j) block_from_tile<T>(tile + (i0 + j * L) * L, v[j]);
        for (int64_t i = 0; i < L; ++i)
          for (int64_t j = 0; j < J; ++j) store_stream(d + i * K + i0 + j * L, v[j][i]);
      }
      return;
    }
  }
  for (int64_t i0 = (K - 1) / L * L; i0 >= 0; i0 -= L) {
    const bool wide = n == L && (h0 + L - 1) * K + i0 + L <= rows * K;
    from_tile(tile + i0 * L, matrix_rows(dst + h0 * K + i0, K), n, wide ? L : std::min(L, K - i0), stream);
  }
}

// The pair strip of rows h0 .. h0 + 2 L - 1 of a (rows x K) matrix as one complex tile: the first L rows into t
// (real parts), the next L into t + io (imaginary parts), prefetching the strip `prefetch` scalars on (0: none) and,
// for writing, the same rows of out (not null).
template <typename T>
void rows_to_pair_tile(const T* src, int64_t rows, int64_t K, int64_t h0, T* t, int64_t io, int64_t prefetch,
                       const T* out = nullptr) {
  constexpr int64_t L = Vec<T>::n;
  rows_to_tile(src, rows, K, h0, t, prefetch, out);
  rows_to_tile(src, rows, K, h0 + L, t + io, prefetch, out);
}
// The offset of the strip after rows o0 .. o0 + 2 L - 1 of a plane whose strips end at row `end`: the plane's next
// strip, else the first strip of the plane at offset `next` (a plane the caller transforms next; 0: none).
inline int64_t next_strip(int64_t o0, int64_t end, int64_t K, int64_t L, int64_t next) {
  return o0 + 2 * L < end ? 2 * L * K : next ? next - o0 * K : 0;
}

// dim 3, one (H x K) plane: L rows at a time are transposed into a (K x L) tile, run through rows_block (the dim 2
// kernel, lanes = rows; wb, ab its tables) and transposed back.
template <typename T>
void fwd_cols(const T* x, T* y, const T* wb, const T* ab, int64_t H, int64_t K, T* scratch) {
  using V = typename Vec<T>::type;
  constexpr int64_t L = Vec<T>::n;
  const int64_t KP = (K + L - 1) / L * L;
  T* xt = scratch;
  T* yt = scratch + KP * L;
  for (int64_t h0 = 0; h0 < H; h0 += L) {
    rows_to_tile(x, H, K, h0, xt);
    rows_block<V>(xt, L, yt, L, wb, ab, K);
    tile_to_rows(yt, y, H, K, h0, false);
  }
}

// Small planes, lanes over planes: nb <= L planes (P = H * W elements each, plane stride ps; the same channel of
// consecutive samples, or consecutive channels of one sample, with wb / ab per lane) are transposed into a (P x L)
// tile, every line along ``dim`` of it goes through rows_block and the result is transposed back. No lane is
// wasted on a short axis. scratch: 2 * PP * L (PP = P rounded up to L).
template <typename T>
void fwd_planes(const T* x, T* y, int64_t ps, int64_t nb, const T* wb, const T* ab, int64_t H, int64_t W,
                int64_t dim, T* scratch) {
  using V = typename Vec<T>::type;
  constexpr int64_t L = Vec<T>::n;
  const int64_t P = H * W, PP = (P + L - 1) / L * L;
  T* xt = scratch;
  T* yt = scratch + PP * L;
  for (int64_t p0 = 0; p0 < P; p0 += L) to_tile(matrix_rows(x + p0, ps), nb, std::min(L, P - p0), xt + p0 * L);
  if (dim == 3) {
    for (int64_t h = 0; h < H; ++h) rows_block<V>(xt + h * W * L, L, yt + h * W * L, L, wb, ab, W);
  } else {
    for (int64_t w = 0; w < W; ++w) rows_block<V>(xt + w * L, W * L, yt + w * L, W * L, wb, ab, H);
  }
  for (int64_t p0 = 0; p0 < P; p0 += L) from_tile(yt + p0 * L, matrix_rows(y + p0, ps), nb, std::min(L, P - p0));
}

// A table of L-lane rows (pointer at row 0) made periodic: rows t in [lo, hi) outside [0, K) set to row t mod K.
template <typename T> void periodic_rows(T* rows, int64_t K, int64_t lo, int64_t hi) {
  using V = typename Vec<T>::type;
  constexpr int64_t L = Vec<T>::n;
  for (int64_t t = K; t < hi; ++t) store(rows + t * L, load<V>(rows + (t - K) * L));
  for (int64_t t = lo; t < 0; ++t) store(rows + t * L, load<V>(rows + (t % K + K) % K * L));
}

// rows_block's tables for channels c0 .. c0 + nc - 1 in lanes 0 .. nc - 1, zero in the other lanes (nc = 1: channel c0
// in every lane), from the (C, K) weights w and addends add (null: ab untouched). wb: max(2K, KP) + R rows (KP: K
// rounded up to L), row t + R = w[c, t mod K] for t in [-R, 2K); ab: max(K + R, KP) rows, row i = add[c, i] for
// i < K, zero after. The channels' rows are transposed into lanes L x L at a time: built lane by lane, the tables
// cost the batch lanes 0.85-0.94x at 7x7 and 14x14, B=16 (benchmarks/native_kernel_log.md, session 22).
template <typename T>
void lane_tables(const T* w, const T* add, int64_t K, int64_t c0, int64_t nc, T* wb, T* ab) {
  using V = typename Vec<T>::type;
  constexpr int64_t L = Vec<T>::n;
  const auto rows = [&](const T* src, T* dst) {  // dst row k = src[c, k] for k < K (rows up to KP: zero)
    if (nc == 1) {
      for (int64_t k = 0; k < K; ++k) store(dst + k * L, bcast<V>(src[c0 * K + k]));
      return;
    }
    for (int64_t k0 = 0; k0 < K; k0 += L)
      to_tile(matrix_rows(src + c0 * K + k0, K), nc, std::min(L, K - k0), dst + k0 * L);
  };
  T* w0 = wb + R * L;  // row t = 0
  rows(w, w0);
  periodic_rows(w0, K, -R, 2 * K);
  if (!add) return;
  rows(add, ab);
  std::fill(ab + K * L, ab + (K + R) * L, T(0));
}

// ---- The FFT path (large K) --------------------------------------------------------------------------------------
// The same forward through the DFT, O(K log K) per line instead of O(K^2). Two sets of L real lines ride as the real
// and imaginary parts of one complex signal z = x1 + i x2 (the kernel is real, so the correlation acts on each part
// alone): y1 + i y2 = F^-1(F(z) S) with S = conj(F(w)) / K (F the DFT; the correlation's spectrum is F(x) conj(F(w))).
// Each strip of K complex vectors (lanes = independent lines) goes through
//   * the forward levels: K = P_0 P_1 ... P_{n-1} (radices 4, 2, 3, 5, 7; fft_radices), level k splits blocks
//     of len_k = P_k M elements: for m < M the P elements m + M t go through the DFT and are multiplied by the
//     twiddles w^(m t), w = exp(-2 pi i / len_k), in place (decimation in frequency, no reordering: the spectrum
//     comes out in a digit-reversed order, and S is computed by the same passes, so the order cancels);
//   * the middle level, blocks of P_{n-1} contiguous elements: DFT, times S, DFT again on the real and imaginary
//     parts swapped (swap(z) = i conj(z): the inverse DFT is swap(DFT(swap(.))) and swap(conj(w) z) = w swap(z), so
//     the inverse levels are forward DFTs with the same twiddles on swapped data);
//   * the inverse levels n-2 .. 0 (twiddles, then the DFT; decimation in time), the last one writing y (+ the addend)
//     with the parts swapped back.
// That is 2 n - 1 passes over a strip, each a load and a store of every element. Along H the first reads x's rows
// where they lie (partial strips by masked loads) and the last writes y's (large outputs with non-temporal stores,
// STREAM_MIN_BYTES), both prefetching the next strip; along W the strip is a transposed tile (rows_to_tile) that the
// passes transform in place (the forward where K is 7 or 14 vectors or half vectors: lane_fft_rows instead). K with a
// prime factor above 7 keeps the direct sum.

// Smallest K for which algo=0 takes the FFT path (when K has no prime factor above 7): [forward, wgrad][dim 2, dim 3].
// From `python benchmarks/bench_native_crossover.py --threads 2`: the first K of its sweep from which the FFT is
// faster at every larger K. Three runs at 71bcb4c (2026-12-02, after the prefetch changes): forward along dim 2 56, 28,
// 28 (K=48 0.93x, 1.08x, 1.20x: a tie; K=24 0.68-0.80x, where the direct sum's batch lanes are at their best), along
// dim 3 32, 28, 32 (K=28 0.92x, 1.06x, 0.95x); weight gradient along dim 2 20, 20, 20 (K=20 1.16-1.24x, K=16
// 0.82-0.85x), along dim 3 20, 20, 20. So 28 / 32 and 20 / 20. (Three runs after the pass rewrite before them read 28
// / 28 and 28 / 20; the Stockham kernel before crossed at 48 / 48 and 32 / 40.) Those runs were on AVX-512 (Zen 5).
// On AVX2 (a Zen 3 EPYC, 2026-12-03 at 8093309, two runs; the first is benchmarks/results/native_crossover_avx2.md)
// the forward along dim 3 crosses earlier: from 24 and 28 (K=28 1.61x / 1.68x, K=24 1.04x / 0.90x); along dim 2 from
// 32 twice (K=28 0.99x / 0.98x: a tie), the weight gradient from 32 / 16 and 21 / 28 (K=20 1.45x / 1.26x and 0.94x /
// 0.92x). So there 28 / 28 and 20 / 20 (`cd benchmarks && python bench_native_ab.py --base 8093309 --threads 2
// --cases 28x28 28x56 28x7 --budget 1`: forward along dim 3 1.45x, 1.48x, 1.22x, per-round medians). On a Zen 4
// EPYC (AVX-512, 2026-12-03, one run at e3b3b6a: forward 28 / 28, weight gradient 16 / 21; K=28 along dim 3 1.13x)
// the forward along dim 3 from 28 too: `--base e3b3b6a --algo 0 --cases 28x28 28x56 28x7 28x112 --budget 1.5` 1.13x,
// 1.13x, 0.99x, 0.93x, again 1.10x at 28 x 28, 1.12x at 28 x 20, 0.95x at 28 x 112 (per-round medians); on Zen 5 K=28
// had been a tie (0.92-1.06x above). So one table for every ISA: 28 / 28 and 20 / 20.
// benchmarks/results/native_crossover.md holds the last Zen 5 run.
constexpr int64_t FFT_MIN_K[2][2] = {{28, 28}, {20, 20}};

// The radices of an FFT of length n, outer levels first: 4s, a 2, then the odd ones, the largest last (the middle
// level has no twiddles); none when n has a prime factor above 7 or n < 2. (A radix-8 codelet, 8 x 7 for K=56 and
// 8 x 2 x 7 for 112, measured slower than 4 x 2 x 7 and 4 x 4 x 7 in interleaved runs, as it did in the Stockham
// kernel before: its 16 data and 14 twiddle vectors crowd the 32 registers.)
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

// The plans (FftPlan, SweepPlan, LaneFft) depend on K and the type alone, and their cos / sin tables cost microseconds
// per call: each is built once per K and kept for the process. Against building them per call (`cd benchmarks &&
// python bench_native_ab.py --base 1607502 --threads 2 --algo 2 --batch 1 --budget 0.5 --cases 224x7 56x7 32x7 112x7
// 224x224`, per-round medians, forward along H / W): 1.11x / 1.37x, 1.04x / 1.17x, 1.03x / 1.03x, 1.09x / 1.24x,
// 1.02x / 1.00x; the weight gradient alike.
template <typename Plan> const Plan& plan_for(int64_t K) {
  static std::mutex mutex;
  static std::map<int64_t, std::unique_ptr<const Plan>> plans;
  const std::lock_guard<std::mutex> lock(mutex);
  std::unique_ptr<const Plan>& p = plans[K];
  if (!p) p = std::make_unique<const Plan>(K);
  return *p;
}

template <typename T> struct FftPlan {
  int64_t n;
  std::vector<int> radix;  // level k's radix; the last level is the middle one
  std::vector<int64_t> M, offset;  // level k: M = len_k / P_k, its twiddles from tw[offset[k]]
  std::vector<T> tw;  // per level, m < M, t = 1 .. P - 1: cos(phi), -sin(phi), phi = 2 pi m t / len
  explicit FftPlan(int64_t n_) : n(n_), radix(fft_radices(n_)) {
    int64_t len = n;
    for (int p : radix) {
      const int64_t m = len / p;
      M.push_back(m);
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

// cos and sin of 2 pi k / P for the odd radices, k = 0 .. P - 1; compile-time, so that they stay constants.
template <int P> struct Unit;
template <> struct Unit<3> {
  static constexpr double c[3] = {1, -0.5, -0.5};
  static constexpr double s[3] = {0, 0.866025403784438646763723170752936183, -0.866025403784438646763723170752936183};
};
template <> struct Unit<5> {
  static constexpr double c1 = 0.309016994374947424102293417182819059, c2 = -0.809016994374947424102293417182819059;
  static constexpr double s1 = 0.951056516295153572116439333379382143, s2 = 0.587785252292473129168705954639072769;
  static constexpr double c[5] = {1, c1, c2, c2, c1};
  static constexpr double s[5] = {0, s1, s2, -s2, -s1};
};
template <> struct Unit<7> {
  static constexpr double c1 = 0.623489801858733530525004884004239810, c2 = -0.222520933956314404288902564496794759,
                          c3 = -0.900968867902419126236102319507445051;
  static constexpr double s1 = 0.781831482468029808708444526674057750, s2 = 0.974927912181823607018131682993931217,
                          s3 = 0.433883739117558120475768332848358754;
  static constexpr double c[7] = {1, c1, c2, c3, c3, c2, c1};
  static constexpr double s[7] = {0, s1, s2, s3, -s3, -s2, -s1};
};

// In-place DFT of P complex vectors, b_t = sum_r a_r exp(-2 pi i r t / P).
template <int P, typename V>
__attribute__((always_inline)) inline void dft(V* xr, V* xi) {
  using T = std::remove_reference_t<decltype(xr[0][0])>;
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
    V sr[H + 1], si[H + 1], dr[H + 1], di[H + 1];
    V b0r = xr[0], b0i = xi[0];
    for (int r = 1; r <= H; ++r) {
      sr[r] = xr[r] + xr[P - r];
      si[r] = xi[r] + xi[P - r];
      dr[r] = xr[r] - xr[P - r];
      di[r] = xi[r] - xi[P - r];
      b0r += sr[r];
      b0i += si[r];
    }
#pragma GCC unroll 4
    for (int t = 1; t <= H; ++t) {
      V ar = xr[0], ai = xi[0], br = V{}, bi = V{};
#pragma GCC unroll 4
      for (int r = 1; r <= H; ++r) {
        const T c = static_cast<T>(Unit<P>::c[r * t % P]), s = static_cast<T>(Unit<P>::s[r * t % P]);
        ar += sr[r] * c;
        ai += si[r] * c;
        br += dr[r] * s;
        bi += di[r] * s;
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

// Where a pass reads or writes: element e (a vector of L lanes) has its real part at re + e * stride and its
// imaginary part at im + e * stride. Lines of the caller's tensors (the first pass's input, the last one's output)
// may be partial: only the first nre / nim lanes are read (the rest as zero) or written.
template <typename T> struct Lines {
  T* re;
  T* im;
  int64_t stride;
  int64_t nre = Vec<std::remove_const_t<T>>::n, nim = Vec<std::remove_const_t<T>>::n;
  int64_t prefetch = 0;  // when non-zero, also prefetch each element at this offset (the next strip), to read / write
  bool stream = false;  // writing: non-temporal stores (full lanes, 64-byte aligned rows only)
  Lines<T> swapped() const { return Lines<T>{im, re, stride, nim, nre, prefetch, stream}; }
};
template <typename T> Lines<const T> as_const(const Lines<T>& l) {
  return Lines<const T>{l.re, l.im, l.stride, l.nre, l.nim, l.prefetch, l.stream};
}

// The kinds of pass: a forward level (DFT, then twiddles), an inverse one (twiddles, then DFT), the middle level
// alone (DFT) and the middle level of the correlation (DFT, times S, swap, DFT).
enum Pass { DIF, DIT, MID, MID_S };
// Where a pass reads / writes: a strip buffer (full lanes; TILE: the last pass, with the addend), or the caller's
// lines (partial lanes, prefetch of the next strip; on the way out the addend, and EXT_STREAM with non-temporal
// stores).
enum Io { BUF, TILE, EXT, EXT_STREAM };

// One pass of radix P over a strip of K elements: for each block of P M elements and m < M, the P elements m + M t.
// tw: the level's twiddles; S: the spectrum (MID_S: K complex, interleaved); add: K addends (Out != BUF).
template <int P, Pass Kind, Io In, Io Out, typename T>
void fft_pass(Lines<const T> in, Lines<T> out, int64_t K, int64_t M, const T* tw, const T* S, const T* add) {
  using V = typename Vec<T>::type;
  // one base pointer per side and pass-constant offsets: the P elements M strides apart, the imaginary parts a
  // fixed distance from the real ones
  const int64_t len = P * M, is = in.stride, os = out.stride, ie = M * is, oe = M * os;
  const int64_t iim = in.im - in.re, oim = out.im - out.re, ipf = in.prefetch, opf = out.prefetch;
  for (int64_t m = 0; m < M; ++m) {
    V wr[P], wi[P];
    if constexpr (Kind == DIF || Kind == DIT)
      for (int t = 1; t < P; ++t) {
        wr[t] = bcast<V>(tw[(m * (P - 1) + t - 1) * 2]);
        wi[t] = bcast<V>(tw[(m * (P - 1) + t - 1) * 2 + 1]);
      }
    const auto twiddle = [&](V* xr, V* xi) {
      if (m > 0)
        for (int t = 1; t < P; ++t) {
          const V r = xr[t] * wr[t] - xi[t] * wi[t];
          xi[t] = xr[t] * wi[t] + xi[t] * wr[t];
          xr[t] = r;
        }
    };
    for (int64_t b = m; b < K; b += len) {
      V xr[P], xi[P];
      const T* ib = in.re + b * is;
      for (int t = 0; t < P; ++t) {
        const T* p = ib + t * ie;
        if constexpr (In == BUF) {
          xr[t] = load<V>(p);
          xi[t] = load<V>(p + iim);
        } else {  // the next strip's element into L2
          __builtin_prefetch(p + ipf, 0, 2);
          __builtin_prefetch(p + iim + ipf, 0, 2);
          xr[t] = load_n<V>(p, in.nre);
          xi[t] = load_n<V>(p + iim, in.nim);
        }
      }
      if constexpr (Kind == DIT) twiddle(xr, xi);
      dft<P>(xr, xi);
      if constexpr (Kind == DIF) twiddle(xr, xi);
      if constexpr (Kind == MID_S) {  // times S, then the parts swapped: DFT again
        for (int t = 0; t < P; ++t) {
          const V a = bcast<V>(S[2 * (b + t)]), c = bcast<V>(S[2 * (b + t) + 1]);
          const V r = xr[t] * a - xi[t] * c;
          xr[t] = xr[t] * c + xi[t] * a;  // the imaginary part, now real
          xi[t] = r;
        }
        dft<P>(xr, xi);
      }
      T* ob = out.re + b * os;
      for (int t = 0; t < P; ++t) {
        T* o = ob + t * oe;
        if constexpr (Out == BUF) {
          store(o, xr[t]);
          store(o + oim, xi[t]);
        } else {
          const V ad = bcast<V>(add[b + t * M]);
          if constexpr (Out == TILE) {
            store(o, xr[t] + ad);
            store(o + oim, xi[t] + ad);
          } else if constexpr (Out == EXT_STREAM) {
            store_stream(o, xr[t] + ad);
            store_stream(o + oim, xi[t] + ad);
          } else {  // the next strip's lines, for writing
            __builtin_prefetch(o + opf, 1, 2);
            __builtin_prefetch(o + oim + opf, 1, 2);
            store_n(o, xr[t] + ad, out.nre);
            store_n(o + oim, xi[t] + ad, out.nim);
          }
        }
      }
    }
  }
}

template <Pass Kind, Io In, Io Out, typename T>
void fft_pass_p(int p, Lines<const T> in, Lines<T> out, int64_t K, int64_t M, const T* tw, const T* S,
                const T* add) {
  switch (p) {
    case 2: fft_pass<2, Kind, In, Out>(in, out, K, M, tw, S, add); break;
    case 3: fft_pass<3, Kind, In, Out>(in, out, K, M, tw, S, add); break;
    case 4: fft_pass<4, Kind, In, Out>(in, out, K, M, tw, S, add); break;
    case 5: fft_pass<5, Kind, In, Out>(in, out, K, M, tw, S, add); break;
    default: fft_pass<7, Kind, In, Out>(in, out, K, M, tw, S, add); break;
  }
}

// The forward levels of the lines at in (the caller's lines, or b itself), into b (L lanes, imaginary parts io after
// the real ones): F(in) in the passes' order when the middle level is included (mid), else up to it.
template <typename T> void fft_forward_levels(const FftPlan<T>& pl, Lines<const T> in, T* b, int64_t io, bool mid) {
  constexpr int64_t L = Vec<T>::n;
  const int n = static_cast<int>(pl.radix.size());
  const Lines<T> bl{b, b + io, L};
  const bool ext = in.re != b;
  const T* none = nullptr;
  for (int k = 0; k < n - 1 + mid; ++k) {
    const T* tw = pl.tw.data() + pl.offset[k];
    const Pass kind = k == n - 1 ? MID : DIF;
    const int64_t M = pl.M[k];
    if (k == 0 && ext && kind == MID)
      fft_pass_p<MID, EXT, BUF>(pl.radix[k], in, bl, pl.n, M, tw, none, none);
    else if (k == 0 && ext)
      fft_pass_p<DIF, EXT, BUF>(pl.radix[k], in, bl, pl.n, M, tw, none, none);
    else if (kind == MID)
      fft_pass_p<MID, BUF, BUF>(pl.radix[k], as_const(bl), bl, pl.n, M, tw, none, none);
    else
      fft_pass_p<DIF, BUF, BUF>(pl.radix[k], as_const(bl), bl, pl.n, M, tw, none, none);
  }
}

// The inverse levels n - 2 .. 0 on b (swapped representation, in place), the last one writing out (+ add, unless
// last is BUF).
template <typename T>
void fft_inverse_levels(const FftPlan<T>& pl, T* b, int64_t io, Lines<T> out, const T* add, Io last) {
  constexpr int64_t L = Vec<T>::n;
  const int n = static_cast<int>(pl.radix.size());
  const Lines<T> bl{b, b + io, L};
  const T* none = nullptr;
  for (int k = n - 2; k >= 0; --k) {
    const T* tw = pl.tw.data() + pl.offset[k];
    const int p = pl.radix[k];
    const int64_t M = pl.M[k];
    if (k > 0 || last == BUF)
      fft_pass_p<DIT, BUF, BUF>(p, as_const(bl), k > 0 ? bl : out, pl.n, M, tw, none, none);
    else if (last == TILE)
      fft_pass_p<DIT, BUF, TILE>(p, as_const(bl), out, pl.n, M, tw, none, add);
    else if (last == EXT)
      fft_pass_p<DIT, BUF, EXT>(p, as_const(bl), out, pl.n, M, tw, none, add);
    else
      fft_pass_p<DIT, BUF, EXT_STREAM>(p, as_const(bl), out, pl.n, M, tw, none, add);
  }
}

// The correlation of the complex lines at in with the kernel whose spectrum is S (K complex numbers in the passes'
// order, real and imaginary interleaved, conj(F(w)) / K), plus add (K values): y1 lands at out.re, y2 at out.im.
// in and out: the caller's lines (out.stream: non-temporal stores), or both the buffer b itself (a tile); b: 2 io
// scalars.
template <typename T>
void fft_correlate(const FftPlan<T>& pl, const T* S, const T* add, Lines<const T> in, Lines<T> out, T* b, int64_t io) {
  constexpr int64_t L = Vec<T>::n;
  const int n = static_cast<int>(pl.radix.size());
  const int p = pl.radix[n - 1];
  const bool tile = in.re == b;
  const T* none = nullptr;
  if (n == 1) {  // K = 2 .. 8, one pass from in to out
    if (tile)
      fft_pass_p<MID_S, BUF, TILE>(p, in, out.swapped(), pl.n, 1, none, S, add);
    else
      fft_pass_p<MID_S, EXT, EXT>(p, in, out.swapped(), pl.n, 1, none, S, add);
    return;
  }
  fft_forward_levels(pl, in, b, io, false);
  const Lines<T> bl{b, b + io, L};
  fft_pass_p<MID_S, BUF, BUF>(p, as_const(bl), bl, pl.n, 1, none, S, none);
  fft_inverse_levels(pl, b, io, out.swapped(), add, tile ? TILE : out.stream ? EXT_STREAM : EXT);
}

// ---- Along dim 2 where K = A B, B = 8 (A = 4, 5, 7) or 32 (A = 7): sweeps over a strip instead of the passes -----
// The strip's rows n = n1 + B n2 as in the four-step FFT (lane_fft_rows), both factors down the vectors: sweep 1, for
// each n1, the DFT of A over rows n1 + B n2 of x (in registers) times exp(-2 pi i k2 n1 / K), into the buffer;
// sweep 2, for each k2, the DFT of 8 over n1 (radix 2, then dft<4> of each half: position t holds k1 = 2 t for t < 4,
// 2 (t - 4) + 1 after), times S, and its inverse (B = 32 = 8 x 4: first the DFTs of 4 and their twiddles,
// sweep_outer4, then those of 8, then back); sweep 3, for each n1, the conjugate twiddles and the inverse DFT of
// A, to y's rows n1 + B n2 (+ the addend). The buffer is read and written 4 times per strip (8 at B = 32), the
// passes' 8 to 12 (K = 32 = 4 x 4 x 2, 40 = 4 x 2 x 5, 56 = 4 x 2 x 7, 224 = 4 x 4 x 2 x 7). Forward along H against
// the passes, 2 threads, per-round medians (`cd benchmarks && python bench_native_ab.py --base 93cbc9e --algo 2
// --threads 2 --cases 56x56 56x112 56x20 56x7 32x32 40x40 32x56 112x112 --budget 1`): 1.11-1.26x (56 x 56 1.16x;
// 112 x 112, untouched, 1.02x); at B=1 (`--cases 56x56 32x32 40x40 56x7 --budget 0.7 --batch 1`) 1.08-1.23x.
// K=224 (`--base 60b1412 --cases 224x224 224x56 224x20 224x7`): 1.07x, 1.11x, 1.06x, 1.05x (another run at 224 x 224
// 1.15x); B=1 224 x 224 1.08x, 224 x 56 0.99x; that change cost the B = 8 sizes 2-4% (56 x 56, 32 x 32, 40 x 40,
// 32 x 7: 0.96-0.98x in two runs, 0.98-1.01x for the base against itself; cause not found). At B = 32 half the next
// strip's prefetches go with sweep 3 instead of all with sweep 1, whose loads of x they had crowded (a profile put 47%
// of the time in sweep 1, on the instructions after those loads): `--base 51cb6a6 --cases 224x224 224x56 224x20 56x56
// --budget 1.5` 1.08x, 1.03x, 1.03x, 1.01x, again 1.07x / 1.02x at 224 x 224 / 56 and with `--cold` 1.09x / 0.92x.
// At B = 8 sweep 3 is too close to the next strip (56 x 56 0.83-1.02x), but sweep 2 is not: `--base 5bc7143 --cases
// 56x56 40x40 32x32 56x112 224x224 --budget 1.5` 1.09x, 1.13x, 1.03x, 1.12x, 0.99x (224 untouched); `--cold --cases
// 56x56 56x20 56x7 40x40 56x112` 0.96x, 1.11x, 1.10x, 1.00x, 1.12x; `--batch 1` 56 x 56 1.08x. With the split at A = 4
// too, 32 x 32 ran 0.91-0.97x.
// Whether the sweeps at K = A B take the prime-factor split (sweep_correlate), which needs no twiddles.
constexpr bool prime_factor_split(int A, int B) { return A == 7 && B == 8; }

// The rows (A n1 + B n2) mod A B of the prime-factor split, from a table: GCC 12 tuned for Zen computed the modulo
// by idiv (112 per strip at K = 56).
template <int A, int B> struct PfaRows {
  int16_t r[B][A];
  constexpr PfaRows() : r{} {
    for (int n1 = 0; n1 < B; ++n1)
      for (int n2 = 0; n2 < A; ++n2) r[n1][n2] = static_cast<int16_t>((A * n1 + B * n2) % (A * B));
  }
  static const PfaRows of;
};
template <int A, int B> constexpr PfaRows<A, B> PfaRows<A, B>::of{};

template <typename T> struct SweepPlan {
  int A = 0, B = 8;  // K = A B; A = 0: none
  T tw[32][7][2];  // exp(-2 pi i k2 n1 / K)
  T w32[8][4][2];  // exp(-2 pi i a k / 32)
  explicit SweepPlan(int64_t K) {
    if (K == 32 || K == 40 || K == 56) A = static_cast<int>(K / 8);
    if (K == 224) A = 7, B = 32;
    if (!A) return;
    for (int n1 = 0; n1 < (prime_factor_split(A, B) ? 0 : B); ++n1)
      for (int k2 = 0; k2 < A; ++k2) {
        tw[n1][k2][0] = static_cast<T>(std::cos(-2 * M_PI * n1 * k2 / static_cast<double>(K)));
        tw[n1][k2][1] = static_cast<T>(std::sin(-2 * M_PI * n1 * k2 / static_cast<double>(K)));
      }
    for (int a = 0; a < (B == 32 ? 8 : 0); ++a)
      for (int k = 0; k < 4; ++k) {
        w32[a][k][0] = static_cast<T>(std::cos(-2 * M_PI * a * k / 32));
        w32[a][k][1] = static_cast<T>(std::sin(-2 * M_PI * a * k / 32));
      }
  }
};

template <typename V, typename T> inline void cmul_s(V& r, V& i, T c, T d) {  // (r, i) times c + i d
  const V t = r * d + i * c;
  r = r * c - i * d;
  i = t;
}

// The DFT of P complex vectors: P = 8 in the order above (radix 2, then dft<4> of each half), else (4, 5, 7) natural;
// INV: its inverse (that order in, natural out; times P). The DFT of 8's twiddles exp(-2 pi i j / 8), j = 1, 2, 3, are
// (1 - i) h, -i and -(1 + i) h (h = 1 / sqrt 2): a swap for j = 2 and, for j = 1 and 3, a sum and a difference times
// h, 2 multiplies instead of a complex product's 4 (2 of them FMAs); on Zen 4 the FMA pipes, which also take the
// stores, are the busier side of the sweeps. Forward along H, per-round medians (`cd benchmarks && python
// bench_native_ab.py --base 13f598d --threads 2 --algo 2 --budget 3 --cases 56x56 56x112 224x224 40x40 32x32`):
// 1.00x, 1.02x, 1.01x, 1.03x, 1.01x; `--cases 56x56 56x112 224x224 56x20 224x56` 1.02x, 1.02x, 1.02x, 1.04x, 1.03x
// (along W, untouched, 0.96-1.00x).
template <int P, bool INV, typename V> __attribute__((always_inline)) inline void dft_sweep(V* xr, V* xi) {
  if constexpr (P == 8) {
    using T = std::remove_reference_t<decltype(xr[0][0])>;
    constexpr T h = static_cast<T>(0.707106781186547524400844362104849039);
    if constexpr (!INV) {
      V dr[4], di[4];
      for (int j = 0; j < 4; ++j) {
        dr[j] = j == 2 ? xr[j + 4] - xr[j] : xr[j] - xr[j + 4];  // (j = 2: negated, for the -i below)
        di[j] = xi[j] - xi[j + 4];
        xr[j] += xr[j + 4];
        xi[j] += xi[j + 4];
      }
      xr[4] = dr[0];
      xi[4] = di[0];
      xr[5] = (dr[1] + di[1]) * h;  // times (1 - i) h
      xi[5] = (di[1] - dr[1]) * h;
      xr[6] = di[2];  // times -i
      xi[6] = dr[2];
      xr[7] = (di[3] - dr[3]) * h;  // times -(1 + i) h
      xi[7] = (dr[3] + di[3]) * -h;
      dft<4>(xr, xi);
      dft<4>(xr + 4, xi + 4);
    } else {
      dft<4>(xi, xr);  // the parts swapped: the inverse DFT
      dft<4>(xi + 4, xr + 4);
      // b_j = x_{j+4} times the conjugate twiddle: 1, (1 + i) h, i, (i - 1) h
      const V br[4] = {xr[4], (xr[5] - xi[5]) * h, xi[6], (xr[7] + xi[7]) * -h};  // (j = 2: negated)
      const V bi[4] = {xi[4], (xr[5] + xi[5]) * h, xr[6], (xr[7] - xi[7]) * h};
      for (int j = 0; j < 4; ++j) {
        xr[j + 4] = j == 2 ? xr[j] + br[j] : xr[j] - br[j];
        xi[j + 4] = xi[j] - bi[j];
        xr[j] = j == 2 ? xr[j] - br[j] : xr[j] + br[j];
        xi[j] += bi[j];
      }
    }
  } else {
    if constexpr (!INV) dft<P>(xr, xi); else dft<P>(xi, xr);
  }
}

// Sweep 2's outer level for B = 32 = 8 x 4 (n1 = a + 8 bb) on the 32 vectors at c: per a the DFT of 4 over bb (to
// k), times exp(-2 pi i a k / 32) (all ones at a = 0, skipped), to position a + 8 k (then per k the DFT of 8 over a, as
// for B = 8); inv: back.
template <typename T> void sweep_outer4(const SweepPlan<T>& p, T* c, int64_t io, bool inv) {
  using V = typename Vec<T>::type;
  constexpr int64_t L = Vec<T>::n;
  for (int a = 0; a < 8; ++a) {
    V xr[4], xi[4];
    for (int t = 0; t < 4; ++t) xr[t] = load<V>(c + (a + 8 * t) * L), xi[t] = load<V>(c + io + (a + 8 * t) * L);
    if (inv) {
      if (a) for (int t = 1; t < 4; ++t) cmul_s(xr[t], xi[t], p.w32[a][t][0], -p.w32[a][t][1]);
      dft<4>(xi, xr);
    } else {
      dft<4>(xr, xi);
      if (a) for (int t = 1; t < 4; ++t) cmul_s(xr[t], xi[t], p.w32[a][t][0], p.w32[a][t][1]);
    }
    for (int t = 0; t < 4; ++t) store(c + (a + 8 * t) * L, xr[t]), store(c + io + (a + 8 * t) * L, xi[t]);
  }
}

// The sweeps over the pair strip `in` (row n of the lines at n * stride) with the buffer b (re at b, im at
// b + io; vector p * B + n1), writing `out` (as fft_correlate's); with S null only sweep 1 and the forward DFTs of
// B, leaving the spectrum in b (sweep_spectra).
template <int A, int B, typename T>
void sweep_correlate(const SweepPlan<T>& p, const T* S, const T* add, Lines<const T> in, Lines<T> out, T* b,
                      int64_t io) {
  using V = typename Vec<T>::type;
  constexpr int64_t L = Vec<T>::n;
  // the next strip's rows n1 + B n2 are prefetched with this strip's: those with n2 < PF1 in sweep 1, the rest with
  // sweep 2's step q = n2 (B = 8) or in sweep 3 (B = 32); at A = 4 all in sweep 1 (see the comment above)
  constexpr int PF1 = A == 4 ? A : A / 2;
  // At K = 56 the split is prime-factor style (prime_factor_split): row (A n1 + B n2) mod K instead of n1 + B n2, and
  // no twiddles between the DFTs of A and B (their product is the DFT of K in another order, which cancels as S comes
  // through the same sweeps). AVX2's 16 registers spill in the twiddle multiplies: `cd benchmarks && python
  // bench_native_ab.py --base 99a16e3 --threads 2 --algo 2 --cases 56x56 56x112 56x20 --budget 2` forward 1.12x, 1.11x,
  // 1.04x (per-round medians, Zen 3); Zen 4's AVX-512 (two 256-bit halves per instruction) gains too: `--base 2ae7fad
  // --cases 56x56 56x112 56x7 --budget 2` 1.08x, 1.09x, 1.12x (session 26); Zen 5 read 0.97x, 1.02x, 1.06x (session
  // 24). At 224 (7 x 32) it lost: 0.71-1.06x on Zen 5; on Zen 4, with the next strip's prefetches still covering
  // every row (sweep 3's at n1 + B n2, not at the split's rows), `--base HEAD --cases 224x224 224x56 224x20 --budget
  // 2` 0.99x, 0.93x, 0.96x (session 28; kernel log); at 40 (5 x 8) 0.96-1.03x on Zen 3.
  constexpr bool PFA = prime_factor_split(A, B);
  const auto row_of = [](int n1, int n2) -> int64_t {
    if constexpr (PFA) return PfaRows<A, B>::of.r[n1][n2]; else return n1 + B * n2;
  };
  const auto prefetch_next = [&](int64_t n) {  // row n of the next strip, into L2
    if (!in.prefetch) return;
    __builtin_prefetch(in.re + n * in.stride + in.prefetch, 0, 2);
    __builtin_prefetch(in.im + n * in.stride + in.prefetch, 0, 2);
  };
  for (int n1 = 0; n1 < B; ++n1) {
    V xr[A], xi[A];
    for (int n2 = 0; n2 < A; ++n2) {
      const T* r = in.re + row_of(n1, n2) * in.stride;
      const T* i = in.im + row_of(n1, n2) * in.stride;
      if (n2 < PF1) prefetch_next(n1 + B * n2);
      xr[n2] = load_n<V>(r, in.nre);
      xi[n2] = load_n<V>(i, in.nim);
    }
    dft_sweep<A, false>(xr, xi);
    for (int q = 0; q < A; ++q) {
      if (!PFA && n1 && q) cmul_s(xr[q], xi[q], p.tw[n1][q][0], p.tw[n1][q][1]);
      store(b + (q * B + n1) * L, xr[q]);
      store(b + io + (q * B + n1) * L, xi[q]);
    }
  }
  for (int q = 0; q < A; ++q) {
    if constexpr (B == 8)
      if (q >= PF1)
        for (int n = q * B; n < (q + 1) * B; ++n) prefetch_next(n);
    if constexpr (B == 32) sweep_outer4(p, b + q * B * L, io, false);
    for (int g = 0; g < B; g += 8) {
      V xr[8], xi[8];
      for (int t = 0; t < 8; ++t)
        xr[t] = load<V>(b + (q * B + g + t) * L), xi[t] = load<V>(b + io + (q * B + g + t) * L);
      dft_sweep<8, false>(xr, xi);
      if (S) {
        for (int t = 0; t < 8; ++t)
          cmul_s(xr[t], xi[t], S[2 * (q * B + g + t)], S[2 * (q * B + g + t) + 1]);
        dft_sweep<8, true>(xr, xi);
      }
      for (int t = 0; t < 8; ++t)
        store(b + (q * B + g + t) * L, xr[t]), store(b + io + (q * B + g + t) * L, xi[t]);
    }
    if constexpr (B == 32)
      if (S) sweep_outer4(p, b + q * B * L, io, true);
  }
  if (!S) return;
  for (int n1 = 0; n1 < B; ++n1) {
    V xr[A], xi[A];
    for (int q = 0; q < A; ++q) {
      xr[q] = load<V>(b + (q * B + n1) * L);
      xi[q] = load<V>(b + io + (q * B + n1) * L);
      if (!PFA && n1 && q) cmul_s(xr[q], xi[q], p.tw[n1][q][0], -p.tw[n1][q][1]);
    }
    dft_sweep<A, true>(xr, xi);
    for (int n2 = 0; n2 < A; ++n2) {
      const int64_t n = row_of(n1, n2);
      if (B == 32 && n2 >= PF1) prefetch_next(n1 + B * n2);  // the rows sweep 1 did not prefetch, whatever the split
      T* r = out.re + n * out.stride;
      T* i = out.im + n * out.stride;
      const V ad = bcast<V>(add[n]);
      if (out.stream) {
        store_stream(r, xr[n2] + ad);
        store_stream(i, xi[n2] + ad);
      } else {
        if (out.prefetch) {
          __builtin_prefetch(r + out.prefetch, 1, 2);
          __builtin_prefetch(i + out.prefetch, 1, 2);
        }
        store_n(r, xr[n2] + ad, out.nre);
        store_n(i, xi[n2] + ad, out.nim);
      }
    }
  }
}
template <typename T>
void sweep_correlate(const SweepPlan<T>& p, const T* S, const T* add, Lines<const T> in, Lines<T> out, T* b,
                      int64_t io) {
  if (p.A == 7 && p.B == 8) sweep_correlate<7, 8>(p, S, add, in, out, b, io);
  if (p.A == 5) sweep_correlate<5, 8>(p, S, add, in, out, b, io);
  if (p.A == 4) sweep_correlate<4, 8>(p, S, add, in, out, b, io);
  if (p.A == 7 && p.B == 32) sweep_correlate<7, 32>(p, S, add, in, out, b, io);
}

// conj(F(w[c])) / K for every channel of the (C, K) weights in sweep 2's order (vector k2 * 8 + t): (C, K, 2), L
// channels per strip (the lanes).
template <typename T> std::vector<T> sweep_spectra(const SweepPlan<T>& p, const T* w, int64_t C) {
  constexpr int64_t L = Vec<T>::n;
  const int64_t K = p.A * p.B, io = K * L;
  std::vector<T> S(C * K * 2);
  const Scratch<T> scratch(3 * io);
  T* a = scratch.data();
  T* b = a + io;
  for (int64_t c0 = 0; c0 < C; c0 += L) {
    rows_to_tile(w, C, K, c0, a);
    sweep_correlate<T>(p, nullptr, nullptr, Lines<const T>{a, a, L, L, 0}, Lines<T>{b, b, L}, b, io);
    for (int64_t l = 0; l < std::min(L, C - c0); ++l)
      for (int64_t f = 0; f < K; ++f) {
        S[((c0 + l) * K + f) * 2] = b[f * L + l] / static_cast<T>(K);
        S[((c0 + l) * K + f) * 2 + 1] = -b[io + f * L + l] / static_cast<T>(K);
      }
  }
  return S;
}

// conj(F(w[c])) / K for every channel of the (C, K) weights in the passes' order, L channels per transform: (C, K, 2).
template <typename T> std::vector<T> weight_spectra(const FftPlan<T>& pl, const T* w, int64_t C) {
  constexpr int64_t L = Vec<T>::n;
  const int64_t K = pl.n, KP = (K + L - 1) / L * L, io = KP * L;
  std::vector<T> S(C * K * 2);
  const Scratch<T> scratch(2 * io);
  T* a = scratch.data();
  for (int64_t c0 = 0; c0 < C; c0 += L) {
    rows_to_tile(w, C, K, c0, a);
    std::fill(a + io, a + io + K * L, T(0));
    fft_forward_levels(pl, Lines<const T>{a, a + io, L}, a, io, true);
    for (int64_t l = 0; l < std::min(L, C - c0); ++l)
      for (int64_t f = 0; f < K; ++f) {
        S[((c0 + l) * K + f) * 2] = a[f * L + l] / static_cast<T>(K);
        S[((c0 + l) * K + f) * 2 + 1] = -a[io + f * L + l] / static_cast<T>(K);
      }
  }
  return S;
}

// ---- Along dim 3 where K = N M, N = L or L / 2, M = 7 or 14: the FFT with its lanes along the axis, in registers --
// A pair of rows (z = row a + i row b, as above) is M complex vectors v[n2], lane n1 holding z[n1 + N n2] (with
// N = L / 2 a vector holds two such signals, two pairs of rows, one in each half). With f = M k1 + k2 the DFT splits
// into (the four-step FFT)
//   F(z)[M k1 + k2] = sum_n1 exp(-2 pi i k1 n1 / N) exp(-2 pi i k2 n1 / K) sum_n2 z[n1 + N n2] exp(-2 pi i k2 n2 / M):
// an M-point DFT down the vectors (lane by lane; 14 = 2 x 7 by the prime-factor split, without twiddles: vector
// (7 j + 2 n) mod 14 goes to slot 7 j + n, and vector p ends holding k2 = 8 p mod 14 for p < 7, 7 + 8 (p - 7) mod 14
// after; against the radix-2 split with its twiddles `bench_native_ab.py --base 12fef35 --algo 2 --cases 224x224
// 224x56 224x7 --budget 1.5`, forward / weight gradient per-round medians: 1.04-1.07x / 1.04-1.05x, 1.03-1.04x /
// 1.04-1.05x, 1.06x / 1.04x; B=1 1.01-1.06x), the twiddles exp(-2 pi i k2 n1 / K) per lane, then an N-point DFT
// across the lanes of each signal (log2 N radix-2 steps, decimation in frequency, each on pairs of vectors: two-source
// shuffles put a butterfly's two inputs at the same lane of two vectors (LanePairs), so a step is an add, a subtract
// and one twiddle multiply per lane, and k1 ends in an order of vector and lane that the steps define). S is computed
// by the same steps, so the order cancels; the inverse runs the steps backwards (decimation in time, conjugate
// twiddles). Odd M takes a zero vector for the pairs. No strip buffer and no 16 x 16 transposes: the rows are
// loaded, transformed in registers and stored. (Session 20 ran the same transform through the passes' strip buffer,
// 32 rows at a time, and measured it slower than the tiles: benchmarks/native_kernel_log.md.) Against the transposed
// tiles, forward, 2 threads, per-round medians: `cd benchmarks && python bench_native_ab.py --base fed7cc3 --algo 2
// --threads 2 --cases 224x224 224x56 112x112 112x20 224x7 112x7 --budget 1` 1.03-1.32x at B=16 (224 x 224 1.10x,
// 112 x 112 1.17x), 1.00-2.13x at B=1; the half vectors (K=56), `--base 52c0596 --cases 56x56 56x112 56x20 56x7`
// 1.58-2.35x at B=16 (56 x 56 1.58x), 1.54x / 2.41x at B=1 (56 x 56, 56 x 7).
template <typename V> struct Cx { V r, i; };
template <typename V> inline Cx<V> operator+(Cx<V> a, Cx<V> b) { return {a.r + b.r, a.i + b.i}; }
template <typename V> inline Cx<V> operator-(Cx<V> a, Cx<V> b) { return {a.r - b.r, a.i - b.i}; }
// a w, a conj(w) for w a (re lanes, im lanes) pair at p, or scalars
template <typename V, typename T> inline Cx<V> cmul(Cx<V> a, const T* p) {
  constexpr int64_t L = lanes<V, T>();
  const V r = load<V>(p), i = load<V>(p + L);
  return {a.r * r - a.i * i, a.r * i + a.i * r};
}
template <typename V, typename T> inline Cx<V> cmul_conj(Cx<V> a, const T* p) {
  constexpr int64_t L = lanes<V, T>();
  const V r = load<V>(p), i = load<V>(p + L);
  return {a.r * r + a.i * i, a.i * r - a.r * i};
}
// One radix-2 step across the lanes takes two vectors a, b whose lanes hold sequences of 2 D lanes each (blocks) to
// lo, the first halves of a's and b's blocks, and hi, their second halves at the same places, so that lo + hi and
// (lo - hi) w are the next step's sequences of D lanes. Where D >= Q (the lanes of 16 bytes) the halves move as
// pieces, a's then b's (one vshuff32x4 / vperm2f128); below Q within each 16 bytes (one vshufps / vunpcklpd); the
// inverse where a vector holds several blocks interleaves pieces (GCC: one vpermt2ps). idx: lo's then hi's lanes as
// indices into (a, b); inv: a's then b's lanes as indices into (lo, hi).
template <int D, int L, int Q> struct LanePairs {
  static constexpr std::array<int, 2 * L> make() {
    std::array<int, 2 * L> f{};
    const int S = D >= Q ? L : Q;  // the lanes within which a's pieces come first, then b's
    for (int h = 0; h < 2; ++h)
      for (int i = 0; i < L; ++i) {
        const int base = i / S * S, k = i % S / D, per = S / (2 * D);
        f[h * L + i] = k / per * L + base + k % per * 2 * D + h * D + i % D;
      }
    return f;
  }
  static constexpr std::array<int, 2 * L> idx = make();
  static constexpr std::array<int, 2 * L> invert() {
    std::array<int, 2 * L> g{};
    for (int t = 0; t < 2 * L; ++t) g[idx[t]] = t;
    return g;
  }
  static constexpr std::array<int, 2 * L> inv = invert();
};
template <int D, bool INV, typename V, size_t... I> inline void pair_lanes(V a, V b, V& lo, V& hi,
                                                                           std::index_sequence<I...>) {
  constexpr int L = sizeof...(I);
  typedef LanePairs<D, L, static_cast<int>(16 / sizeof(a[0]))> P;
  constexpr const std::array<int, 2 * L>& f = INV ? P::inv : P::idx;
  lo = __builtin_shufflevector(a, b, f[I]...);
  hi = __builtin_shufflevector(a, b, f[L + I]...);
}
// (a, b) -> (lo, hi); INV: (lo, hi) -> (a, b)
template <int D, bool INV, typename V> inline void pair_lanes(V a, V b, V& lo, V& hi) {
  pair_lanes<D, INV>(a, b, lo, hi, std::make_index_sequence<sizeof(V) / sizeof(a[0])>{});
}

template <typename T> struct LaneFft {
  static constexpr int64_t L = Vec<T>::n;
  int M = 0, G = 1;  // K = (L / G) M with M = 7 or 14: G signals of L / G lanes per vector; M = 0: neither
  // in one 64-byte aligned block (vector loads that straddle two cache lines cost the passes 1.4x, see Scratch): tw,
  // per step across the lanes with D >= 4 (D = L / 2G, ..., 4; see LanePairs): (re, im lanes) exp(-2 pi i (l mod D)
  // / 2D); t4, per vector p: (re, im lanes) exp(-2 pi i k2(p) n / K) for lane l, n = l mod (L / G) its place in its
  // signal
  Scratch<T> tables;
  const T *tw, *t4;
  T c7[3][3], s7[3][3];  // cos / sin(2 pi (n + 1) (k + 1) / 7)
  // (M, G) for K, or (0, 1) where the path does not apply (checked before any table is built: callers ask for every K);
  // G = 1 is tried first, so M = 14 comes with G = 1 only
  static std::pair<int, int> fit(int64_t K) {
    for (int g : {1, 2})
      if (L / g >= 4 && K % (L / g) == 0 && (K / (L / g) == 7 || K / (L / g) == 14))
        return {static_cast<int>(K / (L / g)), g};
    return {0, 1};
  }
  explicit LaneFft(int64_t K) : tables(4 * L + 14 * 2 * L) {
    T* twd = tables.data();
    T* t4d = twd + 4 * L;
    tw = twd, t4 = t4d;
    std::tie(M, G) = fit(K);
    if (!M) return;
    const int64_t N = L / G;
    const double pi = M_PI;
    for (int64_t D = N / 2; D >= 4; D /= 2, twd += 2 * L)
      for (int64_t l = 0; l < L; ++l) {
        const double a = -2 * pi * static_cast<double>(l % D) / static_cast<double>(2 * D);
        twd[l] = static_cast<T>(std::cos(a));
        twd[L + l] = static_cast<T>(std::sin(a));
      }
    for (int p = 0; p < M; ++p)
      for (int64_t l = 0; l < L; ++l) {
        const int k2 = M == 14 ? (p < 7 ? 8 * p % 14 : (7 + 8 * (p - 7)) % 14) : p;
        const double a = -2 * pi * static_cast<double>(k2 * (l % N)) / static_cast<double>(K);
        t4d[p * 2 * L + l] = static_cast<T>(std::cos(a));
        t4d[p * 2 * L + L + l] = static_cast<T>(std::sin(a));
      }
    for (int n = 0; n < 3; ++n)
      for (int k = 0; k < 3; ++k) {
        c7[n][k] = static_cast<T>(std::cos(2 * pi * (n + 1) * (k + 1) / 7));
        s7[n][k] = static_cast<T>(std::sin(2 * pi * (n + 1) * (k + 1) / 7));
      }
  }
};

// The vectors the steps across the lanes run on: M, or M + 1 (a zero vector) for odd M, as they take pairs.
constexpr int padded(int M) { return M + M % 2; }

// The odd lanes (those the twiddle -i or +i multiplies in the step with D = 2), as a vector condition.
template <typename V> inline auto lanes_odd() {
  decltype(V{} < V{}) m{};
  for (size_t l = 0; l < sizeof(V) / sizeof(m[0]); ++l) m[l] = l & 1 ? -1 : 0;
  return m;
}

// The 7-point DFT of v[0 .. 6] in place, exp(-2 pi i n k / 7) (INV: exp(+...)), by the pairs v[n] +- v[7 - n].
// (The passes' dft<P> on separate real and imaginary arrays instead, its constants compiled in: 0.68-0.91x at K=224,
// kernel log, session 23.)
template <bool INV, typename V, typename T> __attribute__((always_inline)) inline void dft7(Cx<V>* v,
                                                                                            const LaneFft<T>& p) {
  Cx<V> s[3], d[3];
  for (int n = 0; n < 3; ++n) {
    s[n] = v[n + 1] + v[6 - n];
    d[n] = v[n + 1] - v[6 - n];
  }
  const Cx<V> v0 = v[0];
  v[0] = v0 + (s[0] + (s[1] + s[2]));
  for (int k = 0; k < 3; ++k) {
    Cx<V> a = v0, b;
    for (int n = 0; n < 3; ++n) {
      a.r += s[n].r * p.c7[n][k];
      a.i += s[n].i * p.c7[n][k];
    }
    b.r = d[0].r * p.s7[0][k] + d[1].r * p.s7[1][k] + d[2].r * p.s7[2][k];
    b.i = d[0].i * p.s7[0][k] + d[1].i * p.s7[1][k] + d[2].i * p.s7[2][k];
    const Cx<V> minus{a.r + b.i, a.i - b.r}, plus{a.r - b.i, a.i + b.r};  // a - i b, a + i b
    v[k + 1] = INV ? plus : minus;
    v[6 - k] = INV ? minus : plus;
  }
}

// The forward steps on v[0 .. M - 1] (see above): down the vectors, twiddles, across the lanes (v[M] zeroed first
// for odd M: v holds padded(M) vectors).
template <int M, int G, typename V, typename T> __attribute__((always_inline)) inline void lane_fft_forward(
    Cx<V>* v, const LaneFft<T>& p) {
  constexpr int64_t L = lanes<V, T>(), N = L / G;
  constexpr int P = padded(M);
  if constexpr (P > M) v[M] = Cx<V>{};
  if constexpr (M == 14) {  // 14 = 2 x 7 prime-factor: vector (7 j + 2 n) mod 14 to slot 7 j + n, no twiddles
    Cx<V> u[14];
    for (int j = 0; j < 2; ++j)
      for (int n = 0; n < 7; ++n) u[7 * j + n] = v[(7 * j + 2 * n) % 14];
    for (int n = 0; n < 7; ++n) {
      v[n] = u[n] + u[n + 7];
      v[n + 7] = u[n] - u[n + 7];
    }
    dft7<false>(v + 7, p);
  }
  dft7<false>(v, p);
#pragma GCC unroll 16
  for (int q = 1; q < M; ++q) v[q] = cmul(v[q], p.t4 + q * 2 * L);
  // step D on the pairs (v[q], v[q + 1]): lo + hi, (lo - hi) times the twiddle (at D = 2: 1, -i on odd lanes)
  const auto step = [&](auto dc, int s) {
    constexpr int D = decltype(dc)::value;
#pragma GCC unroll 8
    for (int q = 0; q < P; q += 2) {
      Cx<V> lo, hi;
      pair_lanes<D, false>(v[q].r, v[q + 1].r, lo.r, hi.r);
      pair_lanes<D, false>(v[q].i, v[q + 1].i, lo.i, hi.i);
      v[q] = lo + hi;
      const Cx<V> d = lo - hi;
      if constexpr (D >= 4) {
        v[q + 1] = cmul(d, p.tw + s * 2 * L);
      } else if constexpr (D == 2) {
        const auto m = lanes_odd<V>();
        v[q + 1] = {m ? d.i : d.r, m ? hi.r - lo.r : d.i};
      } else {
        v[q + 1] = d;
      }
    }
  };
  int s = 0;
  if constexpr (N >= 16) step(std::integral_constant<int, 8>{}, s++);
  if constexpr (N >= 8) step(std::integral_constant<int, 4>{}, s++);
  step(std::integral_constant<int, 2>{}, s++);
  step(std::integral_constant<int, 1>{}, s++);
}

// The inverse: across the lanes (decimation in time, conjugate twiddles), twiddles, down the vectors; times K.
template <int M, int G, typename V, typename T> __attribute__((always_inline)) inline void lane_fft_inverse(
    Cx<V>* v, const LaneFft<T>& p) {
  constexpr int64_t L = lanes<V, T>(), N = L / G;
  constexpr int P = padded(M), steps = N == 16 ? 4 : N == 8 ? 3 : 2;
  // step D undone (index s as in the forward; times 2): d = v[q + 1] times the conjugate twiddle, (lo, hi) =
  // (v[q] + d, v[q] - d) back to the pair
  const auto step = [&](auto dc, int s) {
    constexpr int D = decltype(dc)::value;
#pragma GCC unroll 8
    for (int q = 0; q < P; q += 2) {
      Cx<V> d = v[q + 1];
      if constexpr (D >= 4) {
        d = cmul_conj(d, p.tw + s * 2 * L);
      } else if constexpr (D == 2) {  // odd lanes times +i
        const auto m = lanes_odd<V>();
        d = {m ? -d.i : d.r, m ? d.r : d.i};
      }
      const Cx<V> lo = v[q] + d, hi = v[q] - d;
      pair_lanes<D, true>(lo.r, hi.r, v[q].r, v[q + 1].r);
      pair_lanes<D, true>(lo.i, hi.i, v[q].i, v[q + 1].i);
    }
  };
  step(std::integral_constant<int, 1>{}, steps - 1);
  step(std::integral_constant<int, 2>{}, steps - 2);
  if constexpr (N >= 8) step(std::integral_constant<int, 4>{}, steps - 3);
  if constexpr (N >= 16) step(std::integral_constant<int, 8>{}, steps - 4);
#pragma GCC unroll 16
  for (int q = 1; q < M; ++q) v[q] = cmul_conj(v[q], p.t4 + q * 2 * L);
  dft7<true>(v, p);
  if constexpr (M == 14) {
    dft7<true>(v + 7, p);
    Cx<V> u[14];
    for (int n = 0; n < 7; ++n) {
      u[n] = v[n] + v[n + 7];
      u[n + 7] = v[n] - v[n + 7];
    }
    for (int j = 0; j < 2; ++j)
      for (int n = 0; n < 7; ++n) v[(7 * j + 2 * n) % 14] = u[7 * j + n];
  }
}

// A vector of G signals (N = L / G lanes each) from rows r[0 .. G - 1] at offset off (lanes j N .. (j + 1) N - 1 from
// r[j]; a null row reads as zeros), and its inverse, which writes the rows that are not null (non-temporal stores).
template <int G, typename V, typename T, size_t... I> inline V load_rows(const T* const* r, int64_t off,
                                                                         std::index_sequence<I...>) {
  if constexpr (G == 1) {
    return r[0] ? load<V>(r[0] + off) : V{};
  } else {
    typedef T Hf __attribute__((vector_size(sizeof(V) / 2)));
    const Hf lo = r[0] ? load<Hf>(r[0] + off) : Hf{}, hi = r[1] ? load<Hf>(r[1] + off) : Hf{};
    return __builtin_shufflevector(lo, hi, I...);
  }
}
template <int G, typename V, typename T> inline V load_rows(const T* const* r, int64_t off) {
  return load_rows<G, V>(r, off, std::make_index_sequence<sizeof(V) / sizeof(T)>{});
}
template <int G, typename V, typename T, size_t... I> inline void store_rows(T* const* r, int64_t off, V v,
                                                                            std::index_sequence<I...>) {
  if constexpr (G == 1) {
    if (r[0]) store_stream(r[0] + off, v);
  } else {
    constexpr size_t N = sizeof...(I);
    if (r[0]) store_stream(r[0] + off, __builtin_shufflevector(v, v, I...));
    if (r[1]) store_stream(r[1] + off, __builtin_shufflevector(v, v, (I + N)...));
  }
}
template <int G, typename V, typename T> inline void store_rows(T* const* r, int64_t off, V v) {
  store_rows<G>(r, off, v, std::make_index_sequence<sizeof(V) / sizeof(T) / G>{});
}

// conj(F(w[c])) / K for every channel of the (C, K) weights in the steps' order (each signal's lanes alike):
// (C, padded(M), 2, L).
template <int M, int G, typename T> Scratch<T> lane_spectra(const LaneFft<T>& p, const T* w, int64_t C) {
  using V = typename Vec<T>::type;
  constexpr int64_t L = Vec<T>::n, N = L / G, K = M * N, P = padded(M);
  Scratch<T> S(C * P * 2 * L);
  for (int64_t c = 0; c < C; ++c) {
    const T* wc[2] = {w + c * K, w + c * K};
    Cx<V> v[P];
    for (int n = 0; n < M; ++n) v[n] = {load_rows<G, V>(wc, n * N), V{}};
    lane_fft_forward<M, G>(v, p);
    for (int q = 0; q < P; ++q) {
      store(S.data() + (c * P + q) * 2 * L, v[q].r);
      store(S.data() + (c * P + q) * 2 * L + L, V(-v[q].i));
    }
  }
  for (int64_t i = 0; i < C * P * 2 * L; ++i) S.data()[i] /= static_cast<T>(K);
  return S;
}

// The forward along dim 3 over the rows of `planes` (B C) planes of H rows, 2 G rows at a time (signal j: rows
// 2 j, 2 j + 1 as real and imaginary parts; rows past H read as zeros and are not written); x's rows prefetched two
// groups ahead, y's written by non-temporal stores at any size (unlike the passes, STREAM_MIN_BYTES): with ordinary
// stores (y's lines prefetched for writing) the forward at K=224 x 56 (9 MiB) ran 0.87x the passes' and 1.25x the
// streamed one's time, and followed by a read of y (a sum, a GELU) streaming still won at K=224 (1.07-1.15x) and tied
// at K=112 (0.93-1.00x; scratch cons.py, 2 threads, B=16, C=2688/K).
template <int M, int G, typename T>
void lane_fft_rows(const LaneFft<T>& p, const T* x, T* y, const T* w, const T* add, int64_t planes, int64_t C,
                   int64_t H) {
  using V = typename Vec<T>::type;
  constexpr int64_t L = Vec<T>::n, N = L / G, K = M * N, R = 2 * G, P = padded(M);
  const Scratch<T> S = lane_spectra<M, G>(p, w, C);
  const int64_t groups = (H + R - 1) / R;
  at::parallel_for(0, planes * groups, 16, [&](int64_t begin, int64_t end) {
    for (int64_t q = begin; q < end; ++q) {
      const int64_t pl = q / groups, h = q % groups * R, c = pl % C;
      const T* x0 = x + (pl * H + h) * K;
      T* y0 = y + (pl * H + h) * K;
      for (int64_t j = 0; j < R * K; j += 64 / static_cast<int64_t>(sizeof(T))) __builtin_prefetch(x0 + 2 * R * K + j);
      const T *xr[G], *xi[G];
      T *yr[G], *yi[G];
      for (int j = 0; j < G; ++j) {
        const bool re = h + 2 * j < H, im = h + 2 * j + 1 < H;
        xr[j] = re ? x0 + 2 * j * K : nullptr;
        xi[j] = im ? x0 + (2 * j + 1) * K : nullptr;
        yr[j] = re ? y0 + 2 * j * K : nullptr;
        yi[j] = im ? y0 + (2 * j + 1) * K : nullptr;
      }
      const T* s = S.data() + c * P * 2 * L;
      const T* a[2] = {add ? add + c * K : nullptr, add ? add + c * K : nullptr};
      Cx<V> v[P];
      for (int n = 0; n < M; ++n) v[n] = {load_rows<G, V>(xr, n * N), load_rows<G, V>(xi, n * N)};
      lane_fft_forward<M, G>(v, p);
#pragma GCC unroll 16
      for (int n = 0; n < P; ++n) v[n] = cmul(v[n], s + n * 2 * L);
      lane_fft_inverse<M, G>(v, p);
      for (int n = 0; n < M; ++n) {
        const V an = load_rows<G, V>(a, n * N);
        store_rows<G>(yr, n * N, v[n].r + an);
        store_rows<G>(yi, n * N, v[n].i + an);
      }
    }
    stream_fence();
  });
}

// f(M, G) with the plan's M and G as std::integral_constant (the combinations LaneFft::fit gives).
template <typename T, typename F> void lane_dispatch(const LaneFft<T>& p, F f) {
  using std::integral_constant;
  if (p.M == 14 && p.G == 1) f(integral_constant<int, 14>{}, integral_constant<int, 1>{});
  if (p.M == 7 && p.G == 1) f(integral_constant<int, 7>{}, integral_constant<int, 1>{});
  if (p.M == 7 && p.G == 2) f(integral_constant<int, 7>{}, integral_constant<int, 2>{});
}

// The forward along dim 3 by lane_fft_rows when K = (L / G) M with M = 7 or 14 and G = 1, or M = 7 and G = 2
// (LaneFft::fit; y 64-byte aligned, as torch allocates it); false (nothing done) otherwise.
template <typename T>
bool lane_fft_forward_dim3(const T* x, T* y, const T* w, const T* add, int64_t planes, int64_t C, int64_t H,
                           int64_t K) {
  if (!LaneFft<T>::fit(K).first || reinterpret_cast<uintptr_t>(y) % 64) return false;
  const LaneFft<T>& p = plan_for<LaneFft<T>>(K);
  lane_dispatch(p, [&](auto m, auto g) { lane_fft_rows<m(), g()>(p, x, y, w, add, planes, C, H); });
  return true;
}

// The weight gradient along dim 3 by the same transform: dw[c] = Re F^-1(sum conj(F gy) F x) / K over the row groups
// of channel c's B planes (H rows each; a pair z = x_a + i x_b and its g = gy_a + i gy_b give conj(G) Z, whose inverse
// has the real part corr(gy_a, x_a) + corr(gy_b, x_b)), the sum kept in registers; with G = 2 the halves' sums are
// added at the end.
template <int M, int G, typename T>
void lane_fft_wgrad(const LaneFft<T>& p, const T* gy, const T* x, T* dw, int64_t B, int64_t C, int64_t H) {
  using V = typename Vec<T>::type;
  constexpr int64_t L = Vec<T>::n, N = L / G, K = M * N, R = 2 * G, P = padded(M);
  const int64_t plane = H * K, groups = (H + R - 1) / R;
  at::parallel_for(0, C, 1, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      Cx<V> acc[P] = {};
      for (int64_t b = 0; b < B; ++b)
        for (int64_t h = 0; h < groups * R; h += R) {
          const int64_t off = (b * C + c) * plane + h * K;
          for (int64_t j = 0; j < R * K; j += 64 / static_cast<int64_t>(sizeof(T))) {
            __builtin_prefetch(x + off + 2 * R * K + j);
            __builtin_prefetch(gy + off + 2 * R * K + j);
          }
          const T *xr[G], *xi[G], *gr[G], *gi[G];
          for (int j = 0; j < G; ++j) {
            const bool re = h + 2 * j < H, im = h + 2 * j + 1 < H;
            xr[j] = re ? x + off + 2 * j * K : nullptr;
            xi[j] = im ? x + off + (2 * j + 1) * K : nullptr;
            gr[j] = re ? gy + off + 2 * j * K : nullptr;
            gi[j] = im ? gy + off + (2 * j + 1) * K : nullptr;
          }
          Cx<V> vx[P], vg[P];
          for (int n = 0; n < M; ++n) {
            vx[n] = {load_rows<G, V>(xr, n * N), load_rows<G, V>(xi, n * N)};
            vg[n] = {load_rows<G, V>(gr, n * N), load_rows<G, V>(gi, n * N)};
          }
          lane_fft_forward<M, G>(vx, p);
          lane_fft_forward<M, G>(vg, p);
#pragma GCC unroll 16
          for (int q = 0; q < P; ++q) {  // acc += conj(G) Z
            acc[q].r += vg[q].r * vx[q].r + vg[q].i * vx[q].i;
            acc[q].i += vg[q].r * vx[q].i - vg[q].i * vx[q].r;
          }
        }
      lane_fft_inverse<M, G>(acc, p);
      for (int n = 0; n < M; ++n) {
        const V r = acc[n].r / static_cast<T>(K);
        for (int64_t k = 0; k < N; ++k) {
          T sum = 0;
          for (int j = 0; j < G; ++j) sum += r[j * N + k];
          dw[c * K + n * N + k] = sum;
        }
      }
    }
  });
}

// The weight gradient along dim 3 by lane_fft_wgrad where K is 7 or 14 vectors or 7 half vectors; false (nothing
// done) otherwise. (At M = 14 the two transforms' 56 registers of data spill; with the lane steps of one multiply per
// lane instead of three it beats the tiles there too: `cd benchmarks && python bench_native_ab.py --base 0be9f93
// --algo 2 --threads 2 --cases 224x224 224x56 224x7 --budget 1` 1.47x, 1.18x, 1.21x; before them 1.14x, 0.90x, 0.96x.)
template <typename T>
bool lane_fft_wgrad_dim3(const T* gy, const T* x, T* dw, int64_t B, int64_t C, int64_t H, int64_t K) {
  if (!LaneFft<T>::fit(K).first) return false;
  const LaneFft<T>& p = plan_for<LaneFft<T>>(K);
  lane_dispatch(p, [&](auto m, auto g) { lane_fft_wgrad<m(), g()>(p, gy, x, dw, B, C, H); });
  return true;
}

// A pair strip of lines along dim 2: the offsets of the real and imaginary lines' first elements from the
// channel's first plane, and how many lanes of each are lines.
struct Strip {
  int64_t re, im, nre, nim;
};
// The strips of planes b0 .. b1 - 1 (ps scalars apart) of one channel along dim 2, W lines (columns) each: the full
// strips of 2 L columns, then the last r = W mod 2 L: for r <= L those of two planes as one strip, else one
// (partial) strip per plane. Lanes past the lines are zero, so no lines are copied anywhere.
inline std::vector<Strip> dim2_strips(int64_t b0, int64_t b1, int64_t ps, int64_t W, int64_t L) {
  std::vector<Strip> s;
  const int64_t r = W % (2 * L), o = W - r;
  for (int64_t b = b0; b < b1; ++b)
    for (int64_t o0 = 0; o0 < o; o0 += 2 * L) s.push_back(Strip{b * ps + o0, b * ps + o0 + L, L, L});
  if (r == 0) return s;
  for (int64_t b = b0; b < b1; ++b) {
    if (r > L) {
      s.push_back(Strip{b * ps + o, b * ps + o + L, L, r - L});
    } else if (b + 1 < b1) {
      s.push_back(Strip{b * ps + o, (b + 1) * ps + o, r, r});
      ++b;
    } else {
      s.push_back(Strip{b * ps + o, b * ps + o, r, 0});
    }
  }
  return s;
}
template <typename T> Lines<T> strip_lines(T* base, const Strip& s, int64_t W) {
  return Lines<T>{base + s.re, base + s.im, W, s.nre, s.nim};
}
// How many strips ahead the passes prefetch along dim 2: 1 where rows are whole cache lines, else 3. Interleaved
// forward runs (B=16, C=2688/K, 2 threads, float32; scratch): 3 ahead ran 1.24x / 1.39x / 1.26x as fast at
// K x W = 56x56, 84x84, 112x120 (rows of 224, 336, 480 bytes) and 0.98x / 0.95x at 56x64, 112x112.
inline int64_t strips_ahead(int64_t W, int64_t elem_size) { return W * elem_size % 64 ? 3 : 1; }

// Along dim 3 the lines are rows: the rows left over after a plane's last full pair strip (r = other mod 2 L of them)
// are pooled over the B planes of a channel, so that they fill whole strips instead of one part-empty strip per
// plane: pooled row g (g < n = B r) is row other - r + g mod r of plane g / r (planes ps scalars apart). A pair
// strip of the pool, rows g0 .. g0 + 2 L - 1, is transposed into a tile (lane l of half h = row g0 + h L + l; lanes
// past n zero) and back from it.
struct Pool {
  int64_t ps, other, r, n, K;  // plane stride, rows per plane, pooled per plane, pooled rows (B r), K
  static Pool of(int64_t B, int64_t ps, int64_t other, int64_t K, int64_t L) {
    const int64_t r = other % (2 * L);
    return Pool{ps, other, r, B * r, K};
  }
  // off[i] = the offset of the row of lane i of half h of strip g0 from the first plane, i < L; returns how many
  // lanes have one
  int64_t half_rows(int64_t g0, int64_t h, int64_t L, int64_t* off) const {
    const int64_t nr = std::clamp<int64_t>(n - g0 - h * L, 0, L), g = nr ? g0 + h * L : 0;
    int64_t b = g / r, j = g % r;  // plane and pooled row of lane 0, then counted on (lanes past nr: the last row)
    for (int64_t i = 0; i < L; ++i) {
      off[i] = b * ps + (other - r + j) * K;
      if (i + 1 < nr && ++j == r) {
        j = 0;
        ++b;
      }
    }
    return nr;
  }
};
// The pair strip g0 of the pool of the planes at x into the tile t (imaginary half io on), prefetching chunk by chunk
// the rows of the pool's next strip and, for writing, this strip's rows of out (not null: laid out as x; the
// caller's pool_scatter writes them). The pooled rows lie in up to B planes a channel stride apart, out of reach of
// the hardware's stream prefetch: without the prefetches the tile's loads stalled on them (perf annotate: most of
// pool_gather's samples on the instructions after its loads, with the caches swept before each call; a burst of
// prefetches of a plane's pooled rows before its first strip did not keep them in cache until the pool's turn).
// `cd benchmarks && python bench_native_ab.py --base d0377eb --algo 2 --threads 2 --cases 56x56 84x84 28x28
// --cold` (per-round medians, along W): forward 1.33x / 1.24x / 1.94x, weight gradient 1.57x / 1.28x / 1.90x;
// without --cold 1.18x / 1.15x / 1.24x and 1.37x / 1.15x / 1.00x. (A division per lane for the offsets of the
// next strip made K=28 0.86-0.89x without --cold: half_rows counts rows on.)
template <typename T>
void pool_gather(const Pool& p, const T* x, int64_t g0, T* t, int64_t io, const T* out = nullptr) {
  constexpr int64_t L = Vec<T>::n;
  const bool more = g0 + 2 * L < p.n;
  for (int64_t h = 0; h < 2; ++h) {
    int64_t off[L], next[L];
    const int64_t nr = p.half_rows(g0, h, L, off);
    if (more) p.half_rows(g0 + 2 * L, h, L, next);
    for (int64_t k0 = 0; k0 < p.K; k0 += L) {
      for (int64_t i = 0; i < L && more; ++i) __builtin_prefetch(x + next[i] + k0);
      for (int64_t i = 0; i < L && out; ++i) __builtin_prefetch(out + off[i] + k0, 1, 2);
      to_tile([&](int64_t i) { return x + off[i] + k0; }, nr, std::min(L, p.K - k0), t + h * io + k0 * L);
    }
  }
}
// The inverse of pool_gather: the tile t into the pool's strip g0 of the planes at y (stream: as from_tile's).
template <typename T> void pool_scatter(const Pool& p, const T* t, int64_t g0, T* y, int64_t io, bool stream) {
  constexpr int64_t L = Vec<T>::n;
  for (int64_t h = 0; h < 2; ++h) {
    int64_t off[L];
    const int64_t nr = p.half_rows(g0, h, L, off);
    for (int64_t k0 = 0; k0 < p.K; k0 += L)
      from_tile(t + h * io + k0 * L, [&](int64_t i) { return y + off[i] + k0; }, nr, std::min(L, p.K - k0), stream);
  }
}

// Weight gradient of one channel by the FFT: dw = Re(F^-1(sum over lines of conj(F g) * F x)) (two real lines per
// complex one: the cross terms of the packing are imaginary in the result), the sum kept per lane and the inverse
// transform done once, before the lanes are summed. Planes at gy / x + b * bstride. scratch: 6 KP L.
template <typename T>
void fft_wgrad_channel(const FftPlan<T>& pl, const T* gy, const T* x, int64_t B, int64_t bstride, int64_t dim,
                       int64_t other, T* dw, T* scratch) {
  using V = typename Vec<T>::type;
  constexpr int64_t L = Vec<T>::n;
  const int64_t K = pl.n, io = (K + L - 1) / L * L * L;
  T* zx = scratch;
  T* zg = scratch + 2 * io;
  T* acc = scratch + 4 * io;
  std::fill(acc, acc + 2 * io, T(0));
  const auto add_strip = [&](Lines<const T> lx, Lines<const T> lg) {  // acc += conj(G) X, G = F g, X = F x
    fft_forward_levels(pl, lx, zx, io, true);
    fft_forward_levels(pl, lg, zg, io, true);
    for (int64_t f = 0; f < K; ++f) {
      const V gr = load<V>(zg + f * L), gi = load<V>(zg + io + f * L);
      const V xr = load<V>(zx + f * L), xi = load<V>(zx + io + f * L);
      store(acc + f * L, load<V>(acc + f * L) + gr * xr + gi * xi);
      store(acc + io + f * L, load<V>(acc + io + f * L) + gr * xi - gi * xr);
    }
  };
  const Lines<const T> tx{zx, zx + io, L}, tg{zg, zg + io, L};  // strips transposed into zx / zg (dim 3)
  if (dim == 2) {  // prefetching the strip strips_ahead on, as the forward does
    const std::vector<Strip> strips = dim2_strips(0, B, bstride, other, L);
    const size_t ahead = strips_ahead(other, sizeof(T));
    for (size_t i = 0; i < strips.size(); ++i) {
      Lines<const T> lx = strip_lines(x, strips[i], other), lg = strip_lines(gy, strips[i], other);
      lx.prefetch = lg.prefetch = strips[std::min(i + ahead, strips.size() - 1)].re - strips[i].re;
      add_strip(lx, lg);
    }
  } else {
    const Pool pool = Pool::of(B, bstride, other, K, L);
    for (int64_t b = 0; b < B; ++b)
      for (int64_t o0 = 0; o0 < other - pool.r; o0 += 2 * L) {
        const int64_t pf = next_strip(o0, other - pool.r, K, L, b + 1 < B ? bstride : 0);
        rows_to_pair_tile(x + b * bstride, other, K, o0, zx, io, pf);
        rows_to_pair_tile(gy + b * bstride, other, K, o0, zg, io, pf);
        add_strip(tx, tg);
      }
    for (int64_t g0 = 0; g0 < pool.n; g0 += 2 * L) {
      pool_gather(pool, x, g0, zx, io);
      pool_gather(pool, gy, g0, zg, io);
      add_strip(tx, tg);
    }
  }
  // Re(F^-1(A)) K: the middle level's DFT of swap(A), the inverse levels, and the imaginary part (swapped back)
  const int n = static_cast<int>(pl.radix.size());
  const Lines<T> zl{zx, zx + io, L};
  const T* none = nullptr;
  fft_pass_p<MID, BUF, BUF>(pl.radix[n - 1], as_const(Lines<T>{acc, acc + io, L}.swapped()), zl, K, 1, none, none,
                            none);
  fft_inverse_levels(pl, zx, io, zl, none, BUF);
  for (int64_t k = 0; k < K; ++k) dw[k] = hsum<T>(load<V>(zx + io + k * L)) / static_cast<T>(K);
}

// Weight gradient of one (K x L) tile pair: acc[k] += sum_i G[i] * X2[i + k] (lanes summed later by the caller),
// X2: 2K + R rows with X2[t] = X[t mod K]; G zero in unused lanes. Inlined into its two callers: called out of line,
// the weight gradient along dim 2 at B=1, C=384, 7 x 12 ran 0.85x (bench_native_ab, per-round medians).
template <typename T>
__attribute__((always_inline)) inline void wgrad_tile(const T* G, const T* X2, int64_t K, typename Vec<T>::type* acc) {
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
      periodic_rows(X2, K, 0, 2 * K + R);
      wgrad_tile(G, X2, K, acc);
    }
  }
}

// Weight gradient of small planes, lanes over planes (as fwd_planes): nb <= L planes of gy and of x (plane stride ps)
// are transposed into (P x L) tiles and every line along dim goes through wgrad_tile: acc (K vectors) += lane by lane
// sum_i G[i] X[(i + k) mod K] (lanes past nb: zero). scratch: 2 PP L + (3K + R) L (PP = P rounded up to L).
template <typename T>
void wgrad_planes(const T* gy, const T* x, int64_t ps, int64_t nb, int64_t H, int64_t W, int64_t dim,
                  typename Vec<T>::type* acc, T* scratch) {
  using V = typename Vec<T>::type;
  constexpr int64_t L = Vec<T>::n;
  const int64_t P = H * W, PP = (P + L - 1) / L * L, K = dim == 2 ? H : W;
  T* tg = scratch;
  T* tx = tg + PP * L;
  T* X2 = tx + PP * L;  // 2K + R rows
  T* G = X2 + (2 * K + R) * L;  // K rows: a line's, gathered where they are not contiguous (dim 2)
  for (int64_t p0 = 0; p0 < P; p0 += L) {
    to_tile(matrix_rows(gy + p0, ps), nb, std::min(L, P - p0), tg + p0 * L);
    to_tile(matrix_rows(x + p0, ps), nb, std::min(L, P - p0), tx + p0 * L);
  }
  // element j of line l is tile row l * first + j * step
  const int64_t lines = dim == 2 ? W : H, step = dim == 2 ? W : 1, first = dim == 2 ? 1 : W;
  for (int64_t l = 0; l < lines; ++l) {
    const T* gl = tg + l * first * L;
    const T* xl = tx + l * first * L;
    // (straight from the tile, not periodic_rows on X2: 0.92-0.96x at 7x7 along H, B=16)
    for (int64_t t = 0, j = 0; t < 2 * K + R; ++t, j = j + 1 == K ? 0 : j + 1)
      store(X2 + t * L, load<V>(xl + j * step * L));
    if (step != 1)
      for (int64_t j = 0; j < K; ++j) store(G + j * L, load<V>(gl + j * step * L));
    wgrad_tile(step == 1 ? gl : G, X2, K, acc);
  }
}

// weight: (C, K), or (C, 1, K) as a depthwise conv holds it (the same memory), so that the caller needs no view.
void check(const at::Tensor& x, const at::Tensor& w, int64_t dim) {
  TORCH_CHECK(x.device().is_cpu() && w.device().is_cpu(), "hybridvision native circular conv: CPU tensors only");
  TORCH_CHECK(x.dim() == 4 && x.is_contiguous(), "x must be a contiguous (B, C, H, W) tensor");
  TORCH_CHECK(dim == 2 || dim == 3, "dim must be 2 or 3, got ", dim);
  TORCH_CHECK((w.dim() == 2 || (w.dim() == 3 && w.size(1) == 1)) && w.is_contiguous() && w.size(0) == x.size(1) &&
                  w.size(-1) == x.size(dim),
              "weight must be a contiguous (C, K) or (C, 1, K) tensor with C = x.size(1), K = x.size(dim), got ",
              w.sizes());
  TORCH_CHECK(w.scalar_type() == x.scalar_type(), "x and weight must have the same dtype");
}

at::Tensor circular_dw_forward(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& add,
                               int64_t dim, int64_t algo) {
  check(x, w, dim);
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3), K = x.size(dim);
  if (add)
    TORCH_CHECK(((add->dim() == 2 && add->size(0) == C && add->size(1) == K) || (add->dim() == 1 && add->size(0) == C))
                    && add->is_contiguous() && add->scalar_type() == x.scalar_type(),
                "add must be a contiguous (C, K) tensor, or (C,) (a bias), of x's dtype; got ", add->sizes());
  const bool fft = use_fft(algo, K, dim, 0);
  auto y = at::empty_like(x);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "circular_dw_forward", [&] {
    constexpr int64_t L = Vec<scalar_t>::n;
    const int64_t KP = (K + L - 1) / L * L;
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* wp = w.data_ptr<scalar_t>();
    const scalar_t* ap = add ? add->data_ptr<scalar_t>() : nullptr;
    std::vector<scalar_t> bias_rows;  // add (C,): add[c] at each of the K positions, as the (C, K) rows below read it
    if (add && add->dim() == 1) {
      bias_rows.resize(C * K);
      for (int64_t c = 0; c < C; ++c) std::fill_n(bias_rows.begin() + c * K, K, ap[c]);
      ap = bias_rows.data();
    }
    scalar_t* yp = y.data_ptr<scalar_t>();
    const int64_t plane = H * W;
    if (fft && dim == 3 && lane_fft_forward_dim3(xp, yp, wp, ap, B * C, C, H, K)) return;
    if (fft) {
      // along dim 2 the sweeps where K = 32, 40, 56, 224; the passes' plan empty where they run
      const SweepPlan<scalar_t>& sw = plan_for<SweepPlan<scalar_t>>(dim == 2 ? K : 0);
      const FftPlan<scalar_t>& pl = plan_for<FftPlan<scalar_t>>(sw.A ? 0 : K);
      const std::vector<scalar_t> S = sw.A ? sweep_spectra(sw, wp, C) : weight_spectra(pl, wp, C), zeros(add ? 0 : K);
      const auto addend = [&](int64_t c) { return ap ? ap + c * K : zeros.data(); };  // the passes add K values
      const bool stream = static_cast<int64_t>(y.nbytes()) >= STREAM_MIN_BYTES;
      const int64_t io = KP * L;
      const auto aligned = [](const scalar_t* p) { return reinterpret_cast<uintptr_t>(p) % 64 == 0; };
      if (dim == 2) {  // work items: the strips of two planes of a channel (dim2_strips), read and written in place
        // every item's strips are those of planes 0 and 1 (of plane 0 alone for an odd batch's last), shifted
        const std::vector<Strip> pair = dim2_strips(0, std::min<int64_t>(B, 2), C * plane, W, L),
                                 lone = dim2_strips(0, B % 2, C * plane, W, L);
        const auto strips_of = [&](int64_t q) -> const std::vector<Strip>& { return q / C * 2 + 1 < B ? pair : lone; };
        const auto base_of = [&](int64_t q) { return (q / C * 2 * C + q % C) * plane; };  // its first plane
        const size_t ahead = strips_ahead(W, sizeof(scalar_t));
        at::parallel_for(0, C * ((B + 1) / 2), 1, [&](int64_t begin, int64_t end) {
          const Scratch<scalar_t> buf(2 * io);
          for (int64_t q = begin; q < end; ++q) {
            const int64_t c = q % C, base = base_of(q);
            const std::vector<Strip>& strips = strips_of(q);
            for (size_t i = 0; i < strips.size(); ++i) {
              const Strip& s = strips[i];
              Lines<const scalar_t> in = strip_lines(xp + base, s, W);
              // prefetch the strip `ahead` on while this one is transformed (in the next item where this one has
              // fewer left; the item's last where the range ends)
              int64_t qa = q;
              size_t j = i + ahead;
              if (j >= strips.size() && q + 1 < end) {
                j = std::min(j - strips.size(), strips_of(++qa).size() - 1);
              } else {
                j = std::min(j, strips.size() - 1);
              }
              in.prefetch = base_of(qa) + strips_of(qa)[j].re - base - s.re;
              Lines<scalar_t> out = strip_lines(yp + base, s, W);
              // non-temporal stores only where they write whole lines: rows a whole number of lines apart, and the
              // real and imaginary vectors each a line (AVX-512) or the two halves of one (AVX2), which the passes and
              // sweeps store back to back. (AVX2 had never streamed here: `cd benchmarks && python
              // bench_native_ab.py --base 66be002 --threads 2 --algo 2 --cases 112x112 224x224 224x112`, forward
              // along H 1.29x, 1.17x, 1.12x, per-round medians; again 1.31x, 1.20x, 1.31x.)
              out.stream = stream && s.nre == L && s.nim == L && W * sizeof(scalar_t) % 64 == 0 && aligned(out.re) &&
                           (aligned(out.im) || out.im == out.re + L);
              if (!out.stream) out.prefetch = in.prefetch;  // (streamed lines bypass the caches)
              if (sw.A)
                sweep_correlate(sw, S.data() + c * K * 2, addend(c), in, out, buf.data(), io);
              else
                fft_correlate(pl, S.data() + c * K * 2, addend(c), in, out, buf.data(), io);
            }
          }
          stream_fence();
        });
        return;
      }
      // dim 3, work items: the full strips of one plane (transposed into a tile and back), or one pair strip of a
      // channel's pool. In memory order when nothing is pooled; else channel-major, a channel's pool strips after its
      // planes (each prefetches the next; see pool_gather)
      const Pool pool = Pool::of(B, C * plane, H, K, L);
      const int64_t r = pool.r;
      const int64_t planes = H > r ? B : 0, pooled = (pool.n + 2 * L - 1) / (2 * L), per = planes + pooled;
      const auto item_of = [&](int64_t q) {  // (channel, item of the channel: plane i < planes, else pool strip)
        return pooled ? std::pair<int64_t, int64_t>{q / per, q % per} : std::pair<int64_t, int64_t>{q % C, q / C};
      };
      at::parallel_for(0, C * per, 1, [&](int64_t begin, int64_t end) {
        const Scratch<scalar_t> buf(2 * io);
        scalar_t* t = buf.data();
        const Lines<scalar_t> tl{t, t + io, L};
        for (int64_t q = begin; q < end; ++q) {
          const auto [c, i] = item_of(q);
          const scalar_t* a = addend(c);
          const scalar_t* s = S.data() + c * K * 2;
          if (i < planes) {
            const int64_t p = i * C + c;
            const scalar_t* x = xp + p * plane;
            scalar_t* yy = yp + p * plane;
            // the next item's plane, if it is one (its first strip is prefetched during this plane's last)
            const auto [c1, i1] = item_of(q + 1);
            const int64_t next = q + 1 < end && i1 < planes ? (i1 * C + c1 - p) * plane : 0;
            for (int64_t o0 = 0; o0 < H - r; o0 += 2 * L) {
              // this strip's rows of y prefetched for writing (unless streamed past the caches)
              rows_to_pair_tile(x, H, K, o0, t, io, next_strip(o0, H - r, K, L, next), stream ? nullptr : yy);
              fft_correlate(pl, s, a, as_const(tl), tl, t, io);
              tile_to_rows(t, yy, H - r, K, o0, stream);  // rows past H - r are the pool's
              tile_to_rows(t + io, yy, H - r, K, o0 + L, stream);
            }
            continue;
          }
          const int64_t g0 = (i - planes) * 2 * L;
          pool_gather(pool, xp + c * plane, g0, t, io, stream ? nullptr : yp + c * plane);
          fft_correlate(pl, s, a, as_const(tl), tl, t, io);
          pool_scatter(pool, t, g0, yp + c * plane, io, stream);
        }
        stream_fence();
      });
      return;
    }
    const LaneMode mode = lane_mode(B, C, plane, dim, L);
    const bool by_channel = mode == LaneMode::CHANNELS, by_batch = mode == LaneMode::BATCH;
    // work items: (table, item) pairs, table-major, so that a thread builds each table once: the tables of a channel
    // (its batch groups or planes) or of a group of L channels (by_channel: one item per sample)
    const int64_t tables = by_channel ? (C + L - 1) / L : C, items = by_batch ? (B + L - 1) / L : B;
    const int64_t PP = (plane + L - 1) / L * L;
    const bool planes = mode != LaneMode::AXIS;
    const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, plane * K * (planes ? L : 1) / 16));
    at::parallel_for(0, tables * items, grain, [&](int64_t begin, int64_t end) {
      const Scratch<scalar_t> wb((std::max(2 * K, KP) + R) * L), ab(std::max(K + R, KP) * L),
          scratch(planes ? 2 * PP * L : 2 * KP * L);
      const scalar_t* a = ap ? ab.data() : nullptr;
      int64_t cur = -1;
      for (int64_t q = begin; q < end; ++q) {
        const int64_t c = q / items, g = q % items;
        if (c != cur) {
          cur = c;
          lane_tables(wp, ap, K, by_channel ? c * L : c, by_channel ? std::min(L, C - c * L) : 1, wb.data(),
                      ab.data());
        }
        if (by_batch) {
          const int64_t off = (g * L * C + c) * plane;
          fwd_planes(xp + off, yp + off, C * plane, std::min(L, B - g * L), wb.data() + R * L, a, H, W, dim,
                     scratch.data());
        } else if (by_channel) {
          const int64_t off = (g * C + c * L) * plane;
          fwd_planes(xp + off, yp + off, plane, std::min(L, C - c * L), wb.data() + R * L, a, H, W, dim,
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
    if (fft && dim == 3 && lane_fft_wgrad_dim3(gp, xp, dp, B, C, H, K)) return;
    if (fft) {
      const FftPlan<scalar_t>& pl = plan_for<FftPlan<scalar_t>>(K);
      at::parallel_for(0, C, 1, [&](int64_t begin, int64_t end) {
        const Scratch<scalar_t> scratch(6 * ((K + L - 1) / L * L) * L);
        for (int64_t c = begin; c < end; ++c)
          fft_wgrad_channel(pl, gp + c * plane, xp + c * plane, B, bstride, dim, dim == 2 ? W : H, dp + c * K,
                            scratch.data());
      });
      return;
    }
    const int64_t KP = (K + L - 1) / L * L;
    const LaneMode mode = wgrad_lane_mode(B, C, H, W, dim, L);
    if (mode != LaneMode::AXIS) {  // lanes over planes, a work item per channel or per group of L channels
      const bool by_channel = mode == LaneMode::CHANNELS;
      const int64_t PP = (plane + L - 1) / L * L;
      at::parallel_for(0, by_channel ? (C + L - 1) / L : C, 1, [&](int64_t begin, int64_t end) {
        std::vector<V> acc(KP);
        const Scratch<scalar_t> scratch(2 * PP * L + (3 * K + R) * L);
        for (int64_t c = begin; c < end; ++c) {
          std::fill(acc.begin(), acc.end(), V{});
          if (by_channel) {  // lane l of acc[k]: dw[c L + l, k], transposed into place
            const int64_t nc = std::min(L, C - c * L);
            for (int64_t b = 0; b < B; ++b) {
              const int64_t off = (b * C + c * L) * plane;
              wgrad_planes(gp + off, xp + off, plane, nc, H, W, dim, acc.data(), scratch.data());
            }
            for (int64_t k0 = 0; k0 < K; k0 += L)
              from_tile(reinterpret_cast<const scalar_t*>(acc.data() + k0), matrix_rows(dp + c * L * K + k0, K), nc,
                        std::min(L, K - k0));
          } else {
            for (int64_t b0 = 0; b0 < B; b0 += L) {
              const int64_t off = (b0 * C + c) * plane;
              wgrad_planes(gp + off, xp + off, C * plane, std::min(L, B - b0), H, W, dim, acc.data(), scratch.data());
            }
            for (int64_t k = 0; k < K; ++k) dp[c * K + k] = hsum<scalar_t>(acc[k]);
          }
        }
      });
      return;
    }
    at::parallel_for(0, C, 1, [&](int64_t begin, int64_t end) {
      std::vector<V> acc(K);
      const Scratch<scalar_t> scratch((KP + std::max(2 * K + R, KP)) * L);
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
