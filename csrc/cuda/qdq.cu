// CUDA affine QDQ, quantize, dequantize, QDQ backward and float-format QDQ.
#include "common.cuh"
#include "rapidquant/drop.h"
#include "rapidquant/float_format.h"
#include "rapidquant/kernels.h"

namespace rq {
namespace cu {
namespace {

template <class T, bool Drop = false>
struct QdqOp {
  static constexpr bool kReduces = false;
  using Acc = NoAcc;
  const T* x;
  T* y;
  const float *s, *z;
  float qmin, qmax;
  DropSpec drop;
  __device__ void elem(int64_t i, int64_t p, Acc&) const {
    if constexpr (Drop) {
      if (keeps_float(drop, i)) { DIO<T>::store(y, i, DIO<T>::load(x, i)); return; }
    }
    const float sc = s[p], lo = qmin - z[p], hi = qmax - z[p];
    float v = DIO<T>::load(x, i) / sc;
    v = lo > v ? lo : v;  // NaN passes through both selects
    v = hi < v ? hi : v;
    DIO<T>::store(y, i, rintf(v) * sc);
  }
};

template <class T, class Q>
struct QuantizeOp {
  static constexpr bool kReduces = false;
  using Acc = NoAcc;
  const T* x;
  Q* q;
  const float *s, *z;
  float qmin, qmax;
  __device__ void elem(int64_t i, int64_t p, Acc&) const {
    float v = DIO<T>::load(x, i) / s[p];
    const float lo = qmin - z[p], hi = qmax - z[p];
    v = v != v ? 0.f : (lo > v ? lo : (hi < v ? hi : v));
    q[i] = (Q)(rintf(v) + z[p]);
  }
};

template <class T, class Q>
struct DequantizeOp {
  static constexpr bool kReduces = false;
  using Acc = NoAcc;
  const Q* q;
  T* y;
  const float *s, *z;
  __device__ void elem(int64_t i, int64_t p, Acc&) const {
    DIO<T>::store(y, i, ((float)q[i] - z[p]) * s[p]);
  }
};

struct GradAcc {
  int64_t key;
  float ds, dz;
  __device__ static GradAcc identity() { return GradAcc{-1, 0.f, 0.f}; }
  __device__ static GradAcc combine(GradAcc a, GradAcc b) {
    return GradAcc{a.key >= 0 ? a.key : b.key, a.ds + b.ds, a.dz + b.dz};
  }
};

template <class T, bool Drop = false>
struct QdqBackwardOp {
  static constexpr bool kReduces = true;
  using Acc = GradAcc;
  const T *x, *dy;
  T* dx;
  const float *s, *z;
  float qmin, qmax;
  float *dscale, *dzp;
  DropSpec drop;
  __device__ void flush(const Acc& a) const {
    if (a.key < 0) return;
    if (dscale) atomicAdd(dscale + a.key, a.ds);
    if (dzp) atomicAdd(dzp + a.key, a.dz);
  }
  __device__ void elem(int64_t i, int64_t p, Acc& acc) const {
    if constexpr (Drop) {
      if (keeps_float(drop, i)) {  // passed through float: dy flows on, no encoding gradient
        if (dx) DIO<T>::store(dx, i, DIO<T>::load(dy, i));
        return;
      }
    }
    const float sc = s[p], lo = qmin - z[p], hi = qmax - z[p];
    const float v = DIO<T>::load(x, i) / sc;
    const float r = rintf(v);
    const bool inside = r >= lo && r <= hi;
    const float g = DIO<T>::load(dy, i);
    if (dx) DIO<T>::store(dx, i, inside ? g : 0.f);
    if (!dscale && !dzp) return;
    if (acc.key != p) {
      flush(acc);
      acc = GradAcc{p, 0.f, 0.f};
    }
    acc.ds += g * (inside ? r - v : (r < lo ? lo : (r > hi ? hi : r)));
    acc.dz += inside ? 0.f : -g * sc;
  }
};

template <class T>
struct DropSelectOp {
  static constexpr bool kReduces = false;
  using Acc = NoAcc;
  const T *a, *b;
  T* out;
  DropSpec drop;
  __device__ void elem(int64_t i, int64_t, Acc&) const { out[i] = keeps_float(drop, i) ? b[i] : a[i]; }
};

template <class T>
struct FloatQdqOp {
  static constexpr bool kReduces = false;
  using Acc = NoAcc;
  const T* x;
  T* y;
  const float* s;
  FormatSpec f;
  __device__ void elem(int64_t i, int64_t p, Acc&) const {
    if (!s) {
      DIO<T>::store(y, i, round_to_format(DIO<T>::load(x, i), f));
    } else {
      const float sc = s[p];
      DIO<T>::store(y, i, round_to_format(DIO<T>::load(x, i) / sc, f) * sc);
    }
  }
};

}  // namespace
}  // namespace cu

void qdq_cuda(const void* x, void* y, DType dt, const Layout& L, const float* scale,
              const float* zp, int qmin, int qmax, uintptr_t stream) {
  RQ_CUDA_DISPATCH_DTYPE(dt, T, {
    cu::QdqOp<T> op{(const T*)x, (T*)y, scale, zp, (float)qmin, (float)qmax, {}};
    cu::launch(L, op, cu::as_stream(stream));
  });
}

void qdq_drop_cuda(const void* x, void* y, DType dt, const Layout& L, const float* scale,
                   const float* zp, int qmin, int qmax, uint64_t seed, uint32_t threshold,
                   uintptr_t stream) {
  RQ_CUDA_DISPATCH_DTYPE(dt, T, {
    cu::QdqOp<T, true> op{(const T*)x, (T*)y, scale, zp, (float)qmin, (float)qmax, DropSpec{seed, threshold}};
    cu::launch(L, op, cu::as_stream(stream));
  });
}

void quantize_cuda(const void* x, DType dt, void* q, IType qt, const Layout& L,
                   const float* scale, const float* zp, int qmin, int qmax, uintptr_t stream) {
  RQ_CUDA_DISPATCH_DTYPE(dt, T, {
    RQ_DISPATCH_ITYPE(qt, Q, {
      cu::QuantizeOp<T, Q> op{(const T*)x, (Q*)q, scale, zp, (float)qmin, (float)qmax};
      cu::launch(L, op, cu::as_stream(stream));
    });
  });
}

void dequantize_cuda(const void* q, IType qt, void* y, DType dt, const Layout& L,
                     const float* scale, const float* zp, uintptr_t stream) {
  RQ_CUDA_DISPATCH_DTYPE(dt, T, {
    RQ_DISPATCH_ITYPE(qt, Q, {
      cu::DequantizeOp<T, Q> op{(const Q*)q, (T*)y, scale, zp};
      cu::launch(L, op, cu::as_stream(stream));
    });
  });
}

void qdq_backward_cuda(const void* x, const void* dy, void* dx, DType dt, const Layout& L,
                       const float* scale, const float* zp, int qmin, int qmax, float* dscale,
                       float* dzp, uintptr_t stream) {
  RQ_CUDA_DISPATCH_DTYPE(dt, T, {
    cu::QdqBackwardOp<T> op{(const T*)x, (const T*)dy, (T*)dx, scale, zp,
                            (float)qmin, (float)qmax, dscale, dzp, {}};
    cu::launch(L, op, cu::as_stream(stream));
  });
}

void qdq_drop_backward_cuda(const void* x, const void* dy, void* dx, DType dt, const Layout& L,
                            const float* scale, const float* zp, int qmin, int qmax, uint64_t seed,
                            uint32_t threshold, float* dscale, float* dzp, uintptr_t stream) {
  RQ_CUDA_DISPATCH_DTYPE(dt, T, {
    cu::QdqBackwardOp<T, true> op{(const T*)x, (const T*)dy, (T*)dx, scale, zp, (float)qmin, (float)qmax,
                                  dscale, dzp, DropSpec{seed, threshold}};
    cu::launch(L, op, cu::as_stream(stream));
  });
}

void drop_select_cuda(const void* a, const void* b, void* out, DType dt, const Layout& L, uint64_t seed,
                      uint32_t threshold, uintptr_t stream) {
  RQ_CUDA_DISPATCH_DTYPE(dt, T, {
    cu::DropSelectOp<T> op{(const T*)a, (const T*)b, (T*)out, DropSpec{seed, threshold}};
    cu::launch(L, op, cu::as_stream(stream));
  });
}

void float_qdq_cuda(const void* x, void* y, DType dt, const Layout& L, const float* scale,
                    FloatFormat fmt, uintptr_t stream) {
  RQ_CUDA_DISPATCH_DTYPE(dt, T, {
    cu::FloatQdqOp<T> op{(const T*)x, (T*)y, scale, format_spec(fmt)};
    cu::launch(L, op, cu::as_stream(stream));
  });
}

}  // namespace rq
