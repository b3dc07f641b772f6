// Encoding statistics: min/max and histograms per parameter group, in one pass.
#include <cmath>
#include <limits>
#include "elementwise.h"
#include "rapidquant/kernels.h"

namespace rq {
namespace RQ_ISA {  // compiled once per instruction set; see dispatch.cpp
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
      // 16 independent lanes (vectorizable), folded at the end of the run
      const float inf = std::numeric_limits<float>::infinity();
      float amin[16], amax[16], anan[16];
      for (int l = 0; l < 16; ++l) { amin[l] = inf; amax[l] = -inf; anan[l] = 0.f; }
      int64_t k = 0;
      for (; k + 16 <= n; k += 16)
        for (int l = 0; l < 16; ++l) {
          const float v = IO<T>::load(x, i0 + k + l);
          amin[l] = v < amin[l] ? v : amin[l];
          amax[l] = v > amax[l] ? v : amax[l];
          anan[l] = v != v ? 1.f : anan[l];
        }
      for (; k < n; ++k) {
        const float v = IO<T>::load(x, i0 + k);
        amin[0] = v < amin[0] ? v : amin[0];
        amax[0] = v > amax[0] ? v : amax[0];
        anan[0] = v != v ? 1.f : anan[0];
      }
      float& A = pmn.mine[p];
      float& B = pmx.mine[p];
      for (int l = 0; l < 16; ++l) {
        A = amin[l] < A ? amin[l] : A;
        B = amax[l] > B ? amax[l] : B;
        pnan.mine[p] |= (uint8_t)(anan[l] != 0.f);
      }
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
    if constexpr (PE) {
      for (int64_t k = 0; k < n; ++k) add(IO<T>::load(x, i0 + k), p + k);
      return;
    }
    // bin indices for a chunk in a vectorizable loop (-1 = dropped), then the increments
    const float l = lo[p], h = hi[p], inv = (float)bins / (h - l), bmax = (float)(bins - 1);
    const float lo_out = clamp_outside ? 0.f : -1.f, hi_out = clamp_outside ? bmax : -1.f;
    int32_t idx[kChunk];
    int64_t* cnt = pc.mine + p * bins;
    for (int64_t c0 = 0; c0 < n; c0 += kChunk) {
      const int64_t m = std::min(kChunk, n - c0);
      for (int64_t k = 0; k < m; ++k) {
        const float v = IO<T>::load(x, i0 + c0 + k);
        float t = (v - l) * inv;
        t = t > bmax ? bmax : t;
        t = v < l ? lo_out : t;
        t = v > h ? hi_out : t;
        t = v != v ? -1.f : t;
        idx[k] = (int32_t)t;
      }
      for (int64_t k = 0; k < m; ++k)
        if (idx[k] >= 0) ++cnt[idx[k]];
    }
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

}  // namespace RQ_ISA
}  // namespace rq
