// AdaRound: fused soft-rounded weight, regularizer, and the gradient w.r.t. V.
#include <cmath>
#include "elementwise.h"
#include "rapidquant/kernels.h"

namespace rq {
namespace {

inline float rect_sigmoid_lin(float v, float* sig) {
  const float sg = 1.0f / (1.0f + std::exp(-v));
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
    double reg = 0.0;
    for (int64_t k = 0; k < n; ++k) {
      const int64_t pi = PE ? p + k : p;
      float h;
      if (hard) {
        h = v[i0 + k] >= 0.f ? 1.f : 0.f;
      } else {
        float sg;
        const float hl = rect_sigmoid_lin(v[i0 + k], &sg);
        h = hl < 0.f ? 0.f : (hl > 1.f ? 1.f : hl);
        reg += 1.0 - std::pow((double)std::fabs(2.f * h - 1.f), (double)beta);
      }
      float u = std::floor(w[i0 + k] / s[pi]) + h + z[pi];
      u = u < qmin ? qmin : (u > qmax ? qmax : u);
      out[i0 + k] = (u - z[pi]) * s[pi];
    }
    preg.mine[0] += reg;
  }
};

struct AdaBwdOp : NoAccum {
  const float *w, *v, *dout;
  float* dv;
  const float *s, *z;
  float qmin, qmax, beta, lam;
  template <bool PE>
  void run(int64_t i0, int64_t n, int64_t p) {
    for (int64_t k = 0; k < n; ++k) {
      const int64_t pi = PE ? p + k : p;
      float sg;
      const float hl = rect_sigmoid_lin(v[i0 + k], &sg);
      const bool hin = hl >= 0.f && hl <= 1.f;
      const float h = hl < 0.f ? 0.f : (hl > 1.f ? 1.f : hl);
      const float dh = hin ? sg * (1.f - sg) * (kAdaZeta - kAdaGamma) : 0.f;
      const float u = std::floor(w[i0 + k] / s[pi]) + h + z[pi];
      const bool uin = u >= qmin && u <= qmax;
      const float a = 2.f * h - 1.f;
      const float sgn = a > 0.f ? 1.f : (a < 0.f ? -1.f : 0.f);
      const float dreg = -beta * std::pow(std::fabs(a), beta - 1.f) * sgn * 2.f;
      dv[i0 + k] = (uin ? dout[i0 + k] * s[pi] : 0.f) * dh + lam * dreg * dh;
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

}  // namespace rq
