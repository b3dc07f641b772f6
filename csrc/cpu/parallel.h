// Thread helpers for the CPU kernels: OpenMP above a size threshold, one thread below.
#pragma once
#include <algorithm>
#include <cstdint>
#ifdef RAPIDQUANT_WITH_OPENMP
#include <omp.h>
#endif
#include "rapidquant/common.h"

namespace rq {

constexpr int64_t kParallelGrain = 1 << 15;  // elements; below this fork/join costs more

inline int pick_threads(int64_t work, int nthreads) {
#ifdef RAPIDQUANT_WITH_OPENMP
  if (nthreads < 1) nthreads = 1;
  int64_t by_work = std::max<int64_t>(1, work / kParallelGrain);
  return (int)std::min<int64_t>(nthreads, by_work);
#else
  (void)work;
  (void)nthreads;
  return 1;
#endif
}

// Calls f(tid, begin, end) on nt contiguous, deterministic slices of [0, n).
template <class F>
void parallel_slices(int64_t n, int nt, F&& f) {
  if (nt <= 1) {
    f(0, (int64_t)0, n);
    return;
  }
#ifdef RAPIDQUANT_WITH_OPENMP
#pragma omp parallel num_threads(nt)
  {
    int t = omp_get_thread_num();
    int T = omp_get_num_threads();
    int64_t b = n * t / T, e = n * (t + 1) / T;
    f(t, b, e);
  }
#else
  f(0, (int64_t)0, n);
#endif
}

// Walks elements [begin, end) of a layout as pieces that stay inside one row:
// g(row, j0, j1, offset_of_row_start, param_base_of_row).
template <class G>
void for_each_piece(const Layout& L, int64_t begin, int64_t end, G&& g) {
  const int64_t inner = L.inner();
  if (inner == 0 || begin >= end) return;
  int64_t row = begin / inner, j = begin % inner;
  while (begin < end) {
    int64_t j1 = std::min<int64_t>(inner, j + (end - begin));
    g(row, j, j1, row * inner, L.row_base(row));
    begin += j1 - j;
    ++row;
    j = 0;
  }
}

// Element type traits: load as float, store from float.
struct Half { uint16_t bits; };
struct BF16 { uint16_t bits; };
template <class T> struct IO;
template <> struct IO<float> {
  static inline float load(const float* p, int64_t i) { return p[i]; }
  static inline void store(float* p, int64_t i, float v) { p[i] = v; }
};
template <> struct IO<Half> {
  static inline float load(const Half* p, int64_t i) { return half_to_float(p[i].bits); }
  static inline void store(Half* p, int64_t i, float v) { p[i].bits = float_to_half(v); }
};
template <> struct IO<BF16> {
  static inline float load(const BF16* p, int64_t i) { return bf16_to_float(p[i].bits); }
  static inline void store(BF16* p, int64_t i, float v) { p[i].bits = float_to_bf16(v); }
};

#define RQ_DISPATCH_DTYPE(dt, T, ...)                                                \
  switch (dt) {                                                                      \
    case DType::F32: { using T = float; __VA_ARGS__; break; }                        \
    case DType::F16: { using T = Half; __VA_ARGS__; break; }                         \
    case DType::BF16: { using T = BF16; __VA_ARGS__; break; }                        \
    default: RQ_CHECK(false, "unsupported dtype code " << (int)(dt)                  \
                      << "; expected float32, float16 or bfloat16");                 \
  }

}  // namespace rq
