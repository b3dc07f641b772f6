// Float-format quantize-dequantize: fp16, bf16, fp8 e4m3fn and e5m2, RNE, saturating.
#include <cmath>
#include "elementwise.h"
#include "rapidquant/float_format.h"
#include "rapidquant/kernels.h"

namespace rq {
namespace RQ_ISA {  // compiled once per instruction set; see dispatch.cpp
namespace {

template <class T>
struct FloatQdqOp : NoAccum {
  const T* x;
  T* y;
  const float* s;  // may be null: no scaling
  FormatSpec f;
  template <bool PE>
  void run(int64_t i0, int64_t n, int64_t p) {
    if (!s) {
      for (int64_t k = 0; k < n; ++k)
        IO<T>::store(y, i0 + k, round_to_format(IO<T>::load(x, i0 + k), f));
      return;
    }
    for (int64_t k = 0; k < n; ++k) {
      const float sc = s[PE ? p + k : p];
      IO<T>::store(y, i0 + k, round_to_format(IO<T>::load(x, i0 + k) / sc, f) * sc);
    }
  }
};

}  // namespace

void float_qdq_cpu(const void* x, void* y, DType dt, const Layout& L, const float* scale,
                   FloatFormat fmt, int nthreads) {
  if (scale)
    for (int64_t i = 0; i < L.nparam; ++i)
      RQ_CHECK(std::isfinite(scale[i]) && scale[i] > 0.f,
               "scale[" << i << "] = " << scale[i] << " must be finite and > 0");
  RQ_DISPATCH_DTYPE(dt, T, {
    FloatQdqOp<T> op;
    op.x = (const T*)x; op.y = (T*)y; op.s = scale; op.f = format_spec(fmt);
    walk(L, nthreads, op);
  });
}

}  // namespace RQ_ISA
}  // namespace rq
