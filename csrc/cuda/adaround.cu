// CUDA AdaRound: soft-rounded weight + regularizer, and the fused gradient w.r.t. V.
#include "common.cuh"
#include "rapidquant/kernels.h"

namespace rq {
namespace cu {
namespace {

struct RegAcc {
  int64_t key;
  float reg;
  __device__ static RegAcc identity() { return RegAcc{-1, 0.f}; }
  __device__ static RegAcc combine(RegAcc a, RegAcc b) { return RegAcc{a.key >= 0 ? a.key : b.key, a.reg + b.reg}; }
};

__device__ __forceinline__ float rect_sigmoid_lin(float v, float* sig) {
  const float sg = 1.0f / (1.0f + expf(-v));
  *sig = sg;
  return sg * (kAdaZeta - kAdaGamma) + kAdaGamma;
}

struct AdaFwdOp {
  static constexpr bool kReduces = true;
  using Acc = RegAcc;
  const float *w, *v;
  float* out;
  const float *s, *z;
  float qmin, qmax, beta;
  bool hard;
  float* reg;
  __device__ void flush(const Acc& a) const {
    if (a.key >= 0 && !hard) atomicAdd(reg, a.reg);
  }
  __device__ void elem(int64_t i, int64_t p, Acc& acc) const {
    float h;
    if (hard) {
      h = v[i] >= 0.f ? 1.f : 0.f;
    } else {
      float sg;
      const float hl = rect_sigmoid_lin(v[i], &sg);
      h = hl < 0.f ? 0.f : (hl > 1.f ? 1.f : hl);
      acc.reg += 1.f - powf(fabsf(2.f * h - 1.f), beta);
    }
    acc.key = 0;  // one scalar regularizer
    float u = floorf(w[i] / s[p]) + h + z[p];
    u = u < qmin ? qmin : (u > qmax ? qmax : u);
    out[i] = (u - z[p]) * s[p];
  }
};

struct AdaBwdOp {
  static constexpr bool kReduces = false;
  using Acc = NoAcc;
  const float *w, *v, *dout;
  float* dv;
  const float *s, *z;
  float qmin, qmax, beta;
  const float* lam;
  __device__ void elem(int64_t i, int64_t p, Acc&) const {
    float sg;
    const float hl = rect_sigmoid_lin(v[i], &sg);
    const bool hin = hl >= 0.f && hl <= 1.f;
    const float h = hl < 0.f ? 0.f : (hl > 1.f ? 1.f : hl);
    const float dh = hin ? sg * (1.f - sg) * (kAdaZeta - kAdaGamma) : 0.f;
    const float u = floorf(w[i] / s[p]) + h + z[p];
    const bool uin = u >= qmin && u <= qmax;
    const float a = 2.f * h - 1.f;
    const float sgn = a > 0.f ? 1.f : (a < 0.f ? -1.f : 0.f);
    const float dreg = -beta * powf(fabsf(a), beta - 1.f) * sgn * 2.f;
    dv[i] = (uin ? dout[i] * s[p] : 0.f) * dh + (*lam) * dreg * dh;
  }
};

}  // namespace
}  // namespace cu

// The regularizer is one scalar (key 0): uniform blocks reduce it in shared memory,
// per-channel layouts flush one atomic per thread.
void adaround_forward_cuda(const float* w, const float* v, float* out, const Layout& L,
                           const float* scale, const float* zp, int qmin, int qmax, float beta,
                           bool hard, float* reg, uintptr_t stream) {
  cu::AdaFwdOp op{w, v, out, scale, zp, (float)qmin, (float)qmax, beta, hard, reg};
  cu::launch(L, op, cu::as_stream(stream));
}

void adaround_backward_cuda(const float* w, const float* v, const float* dout, float* dv,
                            const Layout& L, const float* scale, const float* zp, int qmin,
                            int qmax, float beta, const float* lam, uintptr_t stream) {
  cu::AdaBwdOp op{w, v, dout, dv, scale, zp, (float)qmin, (float)qmax, beta, lam};
  cu::launch(L, op, cu::as_stream(stream));
}

}  // namespace rq
