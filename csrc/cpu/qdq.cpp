// Affine quantize-dequantize, quantize-only, dequantize-only and the QDQ backward.
#include <cmath>
#include "elementwise.h"
#include "rapidquant/drop.h"
#include "rapidquant/kernels.h"

namespace rq {
namespace RQ_ISA {  // compiled once per instruction set; see dispatch.cpp
namespace {

// Cheap checks of the encoding on the CPU path (the CUDA path leaves them to the caller).
void check_encoding(const float* s, const float* z, int64_t n, int qmin, int qmax) {
  RQ_CHECK(qmin < qmax, "qmin (" << qmin << ") must be smaller than qmax (" << qmax << ")");
  for (int64_t i = 0; i < n; ++i) {
    RQ_CHECK(std::isfinite(s[i]) && s[i] > 0.f,
             "scale[" << i << "] = " << s[i] << " must be finite and > 0; a zero-range tensor "
                      << "needs a minimum scale (calibrate it or widen the range)");
    RQ_CHECK(z[i] == std::nearbyint(z[i]) && z[i] >= (float)qmin && z[i] <= (float)qmax,
             "zero_point[" << i << "] = " << z[i] << " must be an integer in [qmin, qmax] = ["
                           << qmin << ", " << qmax << "]");
  }
}

// y = rint(clamp(x / s, qmin - zp, qmax - zp)) * s, identical to
// (clamp(rint(x / s) + zp, qmin, qmax) - zp) * s because the bounds are integers.
// Drop (QDrop): elements whose hash keeps them float pass through unchanged.
template <class T, bool Drop = false>
struct QdqOp : NoAccum {
  const T* x;
  T* y;
  const float *s, *z;
  float qmin, qmax;
  DropSpec drop;
  // a select, not a branch: the choice is random, a branch would be mispredicted half the time
  inline bool keep(int64_t i) const {
    if constexpr (Drop) return keeps_float(drop, i);
    return false;
  }
  template <bool PE>
  void run(int64_t i0, int64_t n, int64_t p) {
    if constexpr (!PE) {
      const float sc = s[p], lo = qmin - z[p], hi = qmax - z[p];
      for (int64_t k = 0; k < n; ++k) {
        const float xv = IO<T>::load(x, i0 + k);
        float v = xv / sc;
        v = lo > v ? lo : v;
        v = hi < v ? hi : v;
        IO<T>::store(y, i0 + k, keep(i0 + k) ? xv : rint_small(v) * sc);
      }
    } else {
      for (int64_t k = 0; k < n; ++k) {
        const float sc = s[p + k], lo = qmin - z[p + k], hi = qmax - z[p + k];
        const float xv = IO<T>::load(x, i0 + k);
        float v = xv / sc;
        v = lo > v ? lo : v;
        v = hi < v ? hi : v;
        IO<T>::store(y, i0 + k, keep(i0 + k) ? xv : rint_small(v) * sc);
      }
    }
  }
};

// QDrop on a block's input: out = keeps_float(i) ? b : a (a: quantized path, b: float path).
template <class T>
struct DropSelectOp : NoAccum {
  const T *a, *b;
  T* out;
  DropSpec drop;
  template <bool PE>
  void run(int64_t i0, int64_t n, int64_t) {
    for (int64_t k = 0; k < n; ++k) {
      const int64_t i = i0 + k;
      out[i] = keeps_float(drop, i) ? b[i] : a[i];
    }
  }
};

template <class T, class Q>
struct QuantizeOp : NoAccum {
  const T* x;
  Q* q;
  const float *s, *z;
  float qmin, qmax;
  template <bool PE>
  void run(int64_t i0, int64_t n, int64_t p) {
    for (int64_t k = 0; k < n; ++k) {
      const int64_t pi = PE ? p + k : p;
      float v = IO<T>::load(x, i0 + k) / s[pi];
      v = rint_small(v != v ? 0.f : (qmin - z[pi] > v ? qmin - z[pi] : (qmax - z[pi] < v ? qmax - z[pi] : v)));
      q[i0 + k] = (Q)(v + z[pi]);
    }
  }
};

template <class T, class Q>
struct DequantizeOp : NoAccum {
  const Q* q;
  T* y;
  const float *s, *z;
  template <bool PE>
  void run(int64_t i0, int64_t n, int64_t p) {
    for (int64_t k = 0; k < n; ++k) {
      const int64_t pi = PE ? p + k : p;
      IO<T>::store(y, i0 + k, ((float)q[i0 + k] - z[pi]) * s[pi]);
    }
  }
};

// dx = dy inside the range, 0 outside (mask recomputed, never stored).
// dscale += dy * (inside ? rint(v) - v : (below ? qmin - zp : qmax - zp))
// dzp    += dy * (inside ? 0 : -s)
// Drop: an element kept float has dx = dy and adds nothing to dscale / dzp.
template <class T, bool Drop = false>
struct QdqBackwardOp {
  const T *x, *dy;
  T* dx;
  const float *s, *z;
  float qmin, qmax;
  DropSpec drop;
  bool want_s, want_z;
  std::vector<double>* acc_s_store = nullptr;
  std::vector<double>* acc_z_store = nullptr;
  Privates<double> ps, pz;
  int64_t nparam = 0;

  void prepare(int nt) {
    if (want_s) ps.init(*acc_s_store, nt, nparam, 0.0);
    if (want_z) pz.init(*acc_z_store, nt, nparam, 0.0);
  }
  void bind(int tid) {
    if (want_s) ps.bind(tid);
    if (want_z) pz.bind(tid);
  }
  void finish(int) {}

  // per-element terms: dx, and the scale / zero-point gradient contributions
  inline void terms(int64_t i, float sc, float zz, float& ds, float& dz) const {
    const float lo = qmin - zz, hi = qmax - zz;
    const float v = IO<T>::load(x, i) / sc;
    const float r = rint_small(v > 4194304.f ? 4194304.f : (v < -4194304.f ? -4194304.f : v));
    const float rr = v != v ? v : r;  // keep NaN visible in dscale
    const bool inside = rr >= lo && rr <= hi;
    const float g = IO<T>::load(dy, i);
    bool keep = false;  // selects, not an early return: a random branch would be mispredicted half the time
    if constexpr (Drop) keep = keeps_float(drop, i);
    IO<T>::store(dx, i, inside || keep ? g : 0.f);
    ds = keep ? 0.f : g * (inside ? rr - v : (rr < lo ? lo : (rr > hi ? hi : rr)));
    dz = inside || keep ? 0.f : -g * sc;
  }

  template <bool PE>
  void run(int64_t i0, int64_t n, int64_t p) {
    if constexpr (PE) {
      for (int64_t k = 0; k < n; ++k) {
        float ds, dz;
        terms(i0 + k, s[p + k], z[p + k], ds, dz);
        if (want_s) ps.mine[p + k] += ds;
        if (want_z) pz.mine[p + k] += dz;
      }
    } else {
      float cs[kChunk], cz[kChunk];
      const float sc = s[p], zz = z[p];
      for (int64_t c0 = 0; c0 < n; c0 += kChunk) {
        const int64_t m = std::min(kChunk, n - c0);
        for (int64_t k = 0; k < m; ++k) terms(i0 + c0 + k, sc, zz, cs[k], cz[k]);
        if (want_s) ps.mine[p] += lane_sum(cs, m);
        if (want_z) pz.mine[p] += lane_sum(cz, m);
      }
    }
  }
};

void reduce_privates(const std::vector<double>& acc, int nt, int64_t n, float* out) {
  for (int64_t i = 0; i < n; ++i) {
    double t = 0.0;
    for (int k = 0; k < nt; ++k) t += acc[(size_t)k * n + i];
    out[i] = (float)t;
  }
}

}  // namespace

void qdq_cpu(const void* x, void* y, DType dt, const Layout& L, const float* scale,
             const float* zp, int qmin, int qmax, int nthreads) {
  check_encoding(scale, zp, L.nparam, qmin, qmax);
  RQ_DISPATCH_DTYPE(dt, T, {
    QdqOp<T> op;
    op.x = (const T*)x; op.y = (T*)y; op.s = scale; op.z = zp;
    op.qmin = (float)qmin; op.qmax = (float)qmax;
    walk(L, nthreads, op);
  });
}

void qdq_drop_cpu(const void* x, void* y, DType dt, const Layout& L, const float* scale,
                  const float* zp, int qmin, int qmax, uint64_t seed, uint32_t threshold, int nthreads) {
  check_encoding(scale, zp, L.nparam, qmin, qmax);
  RQ_DISPATCH_DTYPE(dt, T, {
    QdqOp<T, true> op;
    op.x = (const T*)x; op.y = (T*)y; op.s = scale; op.z = zp;
    op.qmin = (float)qmin; op.qmax = (float)qmax; op.drop = DropSpec{seed, threshold};
    walk(L, nthreads, op);
  });
}

void drop_select_cpu(const void* a, const void* b, void* out, DType dt, const Layout& L, uint64_t seed,
                     uint32_t threshold, int nthreads) {
  RQ_DISPATCH_DTYPE(dt, T, {
    DropSelectOp<T> op;
    op.a = (const T*)a; op.b = (const T*)b; op.out = (T*)out; op.drop = DropSpec{seed, threshold};
    walk(L, nthreads, op);
  });
}

void quantize_cpu(const void* x, DType dt, void* q, IType qt, const Layout& L,
                  const float* scale, const float* zp, int qmin, int qmax, int nthreads) {
  check_encoding(scale, zp, L.nparam, qmin, qmax);
  RQ_DISPATCH_DTYPE(dt, T, {
    RQ_DISPATCH_ITYPE(qt, Q, {
      QuantizeOp<T, Q> op;
      op.x = (const T*)x; op.q = (Q*)q; op.s = scale; op.z = zp;
      op.qmin = (float)qmin; op.qmax = (float)qmax;
      walk(L, nthreads, op);
    });
  });
}

void dequantize_cpu(const void* q, IType qt, void* y, DType dt, const Layout& L,
                    const float* scale, const float* zp, int nthreads) {
  for (int64_t i = 0; i < L.nparam; ++i)
    RQ_CHECK(std::isfinite(scale[i]) && scale[i] > 0.f, "scale[" << i << "] = " << scale[i] << " must be finite and > 0");
  RQ_DISPATCH_DTYPE(dt, T, {
    RQ_DISPATCH_ITYPE(qt, Q, {
      DequantizeOp<T, Q> op;
      op.q = (const Q*)q; op.y = (T*)y; op.s = scale; op.z = zp;
      walk(L, nthreads, op);
    });
  });
}

template <bool Drop>
void qdq_backward_impl(const void* x, const void* dy, void* dx, DType dt, const Layout& L,
                       const float* scale, const float* zp, int qmin, int qmax, DropSpec drop,
                       float* dscale, float* dzp, int nthreads) {
  check_encoding(scale, zp, L.nparam, qmin, qmax);
  RQ_CHECK(dx != nullptr, "qdq_backward_cpu needs an output for dx");
  std::vector<double> acc_s, acc_z;
  const int nt = pick_threads(L.numel, nthreads);
  RQ_DISPATCH_DTYPE(dt, T, {
    QdqBackwardOp<T, Drop> op;
    op.x = (const T*)x; op.dy = (const T*)dy; op.dx = (T*)dx; op.s = scale; op.z = zp;
    op.qmin = (float)qmin; op.qmax = (float)qmax; op.drop = drop;
    op.want_s = dscale != nullptr; op.want_z = dzp != nullptr;
    op.acc_s_store = &acc_s; op.acc_z_store = &acc_z; op.nparam = L.nparam;
    walk(L, nt, op);
  });
  if (dscale) reduce_privates(acc_s, nt, L.nparam, dscale);
  if (dzp) reduce_privates(acc_z, nt, L.nparam, dzp);
}

void qdq_backward_cpu(const void* x, const void* dy, void* dx, DType dt, const Layout& L,
                      const float* scale, const float* zp, int qmin, int qmax, float* dscale,
                      float* dzp, int nthreads) {
  qdq_backward_impl<false>(x, dy, dx, dt, L, scale, zp, qmin, qmax, DropSpec{}, dscale, dzp, nthreads);
}

void qdq_drop_backward_cpu(const void* x, const void* dy, void* dx, DType dt, const Layout& L,
                           const float* scale, const float* zp, int qmin, int qmax, uint64_t seed,
                           uint32_t threshold, float* dscale, float* dzp, int nthreads) {
  qdq_backward_impl<true>(x, dy, dx, dt, L, scale, zp, qmin, qmax, DropSpec{seed, threshold}, dscale, dzp,
                          nthreads);
}

}  // namespace RQ_ISA
}  // namespace rq
