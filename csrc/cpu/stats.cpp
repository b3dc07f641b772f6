// Encoding statistics: min/max and histograms per parameter group, in one pass.
#include <cmath>
#include <limits>
#include "elementwise.h"
#include "rapidquant/kernels.h"

namespace rq {
namespace {

template <class T>
struct MinMaxOp : NoAccum {
  const T* x;
  Privates<float> pmn, pmx;
  Privates<uint8_t> pnan;
  void bind(int tid) { pmn.bind(tid); pmx.bind(tid); pnan.bind(tid); }
  template <bool PE>
  void run(int64_t i0, int64_t n, int64_t p) {
    if constexpr (PE) {
      for (int64_t k = 0; k < n; ++k) {
        const float v = IO<T>::load(x, i0 + k);
        float& a = pmn.mine[p + k];
        float& b = pmx.mine[p + k];
        a = v < a ? v : a;
        b = v > b ? v : b;
        pnan.mine[p + k] |= (uint8_t)(v != v);
      }
    } else {
      float a = std::numeric_limits<float>::infinity(), b = -a;
      int nan = 0;
      for (int64_t k = 0; k < n; ++k) {
        const float v = IO<T>::load(x, i0 + k);
        a = v < a ? v : a;
        b = v > b ? v : b;
        nan |= (v != v);
      }
      float& A = pmn.mine[p];
      float& B = pmx.mine[p];
      A = a < A ? a : A;
      B = b > B ? b : B;
      pnan.mine[p] |= (uint8_t)nan;
    }
  }
};

template <class T>
struct HistOp : NoAccum {
  const T* x;
  const float *lo, *hi;
  int bins;
  bool clamp_outside;
  Privates<int64_t> pc;
  void bind(int tid) { pc.bind(tid); }
  inline void add(float v, int64_t p) {
    const float l = lo[p], h = hi[p];
    const float inv = (float)bins / (h - l);
    int64_t b;
    if (v >= l && v <= h) {
      b = (int64_t)((v - l) * inv);
      b = b < bins ? b : bins - 1;
    } else if (clamp_outside && v < l) {
      b = 0;
    } else if (clamp_outside && v > h) {
      b = bins - 1;
    } else {
      return;  // outside, or NaN
    }
    pc.mine[p * bins + b] += 1;
  }
  template <bool PE>
  void run(int64_t i0, int64_t n, int64_t p) {
    for (int64_t k = 0; k < n; ++k) add(IO<T>::load(x, i0 + k), PE ? p + k : p);
  }
};

}  // namespace

void minmax_cpu(const void* x, DType dt, const Layout& L, float* mn, float* mx, int nthreads) {
  const float inf = std::numeric_limits<float>::infinity();
  const int nt = pick_threads(L.numel, nthreads);
  std::vector<float> smn, smx;
  std::vector<uint8_t> snan;
  RQ_DISPATCH_DTYPE(dt, T, {
    MinMaxOp<T> op;
    op.x = (const T*)x;
    op.pmn.init(smn, nt, L.nparam, inf);
    op.pmx.init(smx, nt, L.nparam, -inf);
    op.pnan.init(snan, nt, L.nparam, 0);
    walk(L, nt, op);
  });
  for (int64_t i = 0; i < L.nparam; ++i) {
    float a = inf, b = -inf;
    bool nan = false;
    for (int t = 0; t < nt; ++t) {
      a = std::min(a, smn[(size_t)t * L.nparam + i]);
      b = std::max(b, smx[(size_t)t * L.nparam + i]);
      nan |= snan[(size_t)t * L.nparam + i] != 0;
    }
    const float qnan = std::numeric_limits<float>::quiet_NaN();
    mn[i] = nan ? qnan : a;
    mx[i] = nan ? qnan : b;
  }
}

void histogram_cpu(const void* x, DType dt, const Layout& L, const float* lo, const float* hi,
                   int bins, bool clamp_outside, int64_t* counts, int nthreads) {
  RQ_CHECK(bins >= 1, "bins must be >= 1 (got " << bins << ")");
  for (int64_t i = 0; i < L.nparam; ++i)
    RQ_CHECK(std::isfinite(lo[i]) && std::isfinite(hi[i]) && hi[i] > lo[i],
             "histogram range [" << lo[i] << ", " << hi[i] << "] of group " << i
                                 << " must be finite with hi > lo; widen a zero range first");
  const int nt = pick_threads(L.numel, nthreads);
  std::vector<int64_t> store;
  RQ_DISPATCH_DTYPE(dt, T, {
    HistOp<T> op;
    op.x = (const T*)x; op.lo = lo; op.hi = hi; op.bins = bins; op.clamp_outside = clamp_outside;
    op.pc.init(store, nt, L.nparam * bins, 0);
    walk(L, nt, op);
  });
  const int64_t n = L.nparam * bins;
  for (int t = 0; t < nt; ++t) {
    const int64_t* src = store.data() + (size_t)t * n;
    for (int64_t i = 0; i < n; ++i) counts[i] += src[i];
  }
}

}  // namespace rq
