// Shared by the native kernels: std::vector with 64-byte aligned storage, for per-thread scratch that the kernels
// read and write in whole SIMD vectors. (std::vector's default storage is 16-byte aligned: three of every four
// 64-byte vectors in it straddle two cache lines, and each such access costs two. Aligning the FFT's strip
// buffer alone took its passes from 8.2 to 6.0 ns per complex point at K=56, one thread, Zen 5; scratch.)
#pragma once

#include <cstddef>
#include <new>
#include <vector>

namespace hybridvision_native {

template <typename T> struct LineAllocator {
  using value_type = T;
  static constexpr std::align_val_t align{64};
  LineAllocator() = default;
  template <typename U> LineAllocator(const LineAllocator<U>&) {}
  T* allocate(std::size_t n) { return static_cast<T*>(::operator new(n * sizeof(T), align)); }
  void deallocate(T* p, std::size_t) { ::operator delete(p, align); }
  template <typename U> bool operator==(const LineAllocator<U>&) const { return true; }
  template <typename U> bool operator!=(const LineAllocator<U>&) const { return false; }
};

// A vector whose data() is 64-byte aligned (a cache line; one AVX-512 register).
template <typename T> using LineVector = std::vector<T, LineAllocator<T>>;

}  // namespace hybridvision_native
