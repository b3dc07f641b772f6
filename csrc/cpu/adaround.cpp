// AdaRound: fused soft-rounded weight, regularizer, and the gradient w.r.t. V.
#include <cmath>
#include "elementwise.h"
#include "vec_math.h"
#include "rapidquant/kernels.h"

namespace rq {
namespace RQ_ISA {  // compiled once per instruction set; see dispatch.cpp
namespace {

inline float rect_sigmoid_lin(float v, float* sig) {
  const float sg = vm_sigmoid(v);
  *sig = sg;
  return sg * (kAdaZeta - kAdaGamma) + kAdaGamma;
}

struct AdaFwdOp : NoAccum {
  const float *w, *v;
  float* out;
  const float *s, *z;
  float qmin, qmax, beta;
  bool hard;
  Privates<double> preg;
  void bind(int tid) { preg.bind(tid); }
  template <bool PE>
  void run(int64_t i0, int64_t n, int64_t p) {
    // locals, so the compiler knows the stores cannot change them (vectorization)
    const float* __restrict w = this->w;
    const float* __restrict v = this->v;
    float* __restrict out = this->out;
    const float* __restrict s = this->s;
    const float* __restrict z = this->z;
    const float qmin = this->qmin, qmax = this->qmax, beta = this->beta;
    float rbuf[kChunk];
    for (int64_t c0 = 0; c0 < n; c0 += kChunk) {
      const int64_t m = std::min(kChunk, n - c0);
      if (hard) {
        for (int64_t k = 0; k < m; ++k) {
          const int64_t i = i0 + c0 + k, pi = PE ? p + c0 + k : p;
          const float h = v[i] >= 0.f ? 1.f : 0.f;
          float u = std::floor(w[i] / s[pi]) + h + z[pi];
          u = u < qmin ? qmin : (u > qmax ? qmax : u);
          out[i] = (u - z[pi]) * s[pi];
        }
        continue;
      }
      for (int64_t k = 0; k < m; ++k) {
        const int64_t i = i0 + c0 + k, pi = PE ? p + c0 + k : p;
        float sg;
        const float hl = rect_sigmoid_lin(v[i], &sg);
        const float h = hl < 0.f ? 0.f : (hl > 1.f ? 1.f : hl);
        rbuf[k] = 1.0f - vm_pow(std::fabs(2.f * h - 1.f), beta);
        float u = std::floor(w[i] / s[pi]) + h + z[pi];
        u = u < qmin ? qmin : (u > qmax ? qmax : u);
        out[i] = (u - z[pi]) * s[pi];
      }
      preg.mine[0] += lane_sum(rbuf, m);
    }
  }
};

struct AdaBwdOp : NoAccum {
  const float *w, *v, *dout;
  float* dv;
  const float *s, *z;
  float qmin, qmax, beta, lam;
  template <bool PE>
  void run(int64_t i0, int64_t n, int64_t p) {
    const float* __restrict w = this->w;
    const float* __restrict v = this->v;
    const float* __restrict dout = this->dout;
    float* __restrict dv = this->dv;
    const float* __restrict s = this->s;
    const float* __restrict z = this->z;
    const float qmin = this->qmin, qmax = this->qmax, beta = this->beta, lam = this->lam;
    for (int64_t c0 = 0; c0 < n; c0 += kChunk) {
      const int m = (int)std::min(kChunk, n - c0);
      const float* __restrict vc = v + i0 + c0;
      const float* __restrict wc = w + i0 + c0;
      const float* __restrict gc = dout + i0 + c0;
      float* __restrict dc = dv + i0 + c0;
      for (int k = 0; k < m; ++k) {
        const int64_t pi = PE ? p + c0 + k : p;
        const float vi = vc[k], wi = wc[k], gi = gc[k], sc = s[pi], zz = z[pi];
        float sg;
        const float hl = rect_sigmoid_lin(vi, &sg);
        // (selects on floats, not bools, so GCC vectorizes the loop)
        const float h = hl < 0.f ? 0.f : (hl > 1.f ? 1.f : hl);
        const float dh = hl < 0.f ? 0.f : (hl > 1.f ? 0.f : sg * (1.f - sg) * (kAdaZeta - kAdaGamma));
        const float u = std::floor(wi / sc) + h + zz;
        const float gu = u < qmin ? 0.f : (u > qmax ? 0.f : gi * sc);
        const float a = 2.f * h - 1.f;
        const float sgn = a > 0.f ? 1.f : (a < 0.f ? -1.f : 0.f);
        const float dreg = -beta * vm_pow(std::fabs(a), beta - 1.f) * sgn * 2.f;
        dc[k] = gu * dh + lam * dreg * dh;
      }
    }
  }
};

}  // namespace

double adaround_forward_cpu(const float* w, const float* v, float* out, const Layout& L,
                            const float* scale, const float* zp, int qmin, int qmax,
                            float beta, bool hard, int nthreads) {
  const int nt = pick_threads(L.numel, nthreads);
  std::vector<double> store;
  AdaFwdOp op;
  op.w = w; op.v = v; op.out = out; op.s = scale; op.z = zp;
  op.qmin = (float)qmin; op.qmax = (float)qmax; op.beta = beta; op.hard = hard;
  op.preg.init(store, nt, 1, 0.0);
  walk(L, nt, op);
  double reg = 0.0;
  for (double r : store) reg += r;
  return reg;
}

void adaround_backward_cpu(const float* w, const float* v, const float* dout, float* dv,
                           const Layout& L, const float* scale, const float* zp, int qmin,
                           int qmax, float beta, const float* lam, int nthreads) {
  AdaBwdOp op;
  op.w = w; op.v = v; op.dout = dout; op.dv = dv; op.s = scale; op.z = zp;
  op.qmin = (float)qmin; op.qmax = (float)qmax; op.beta = beta; op.lam = *lam;
  walk(L, nthreads, op);
}

}  // namespace RQ_ISA
}  // namespace rq
