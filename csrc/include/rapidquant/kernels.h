// Declarations of every kernel. CPU entry points end in _cpu, CUDA ones in _cuda and take
// the raw cudaStream_t as an integer so this header needs no CUDA include.
#pragma once
#include "rapidquant/common.h"

namespace rq {

// ---- affine quantize-dequantize (ONNX QuantizeLinear/DequantizeLinear numerics) ----
// y = (clamp(rint(x / s) + zp, qmin, qmax) - zp) * s, computed in fp32.
void qdq_cpu(const void* x, void* y, DType dt, const Layout& L, const float* scale,
             const float* zp, int qmin, int qmax, int nthreads);
void quantize_cpu(const void* x, DType dt, void* q, IType qt, const Layout& L,
                  const float* scale, const float* zp, int qmin, int qmax, int nthreads);
void dequantize_cpu(const void* q, IType qt, void* y, DType dt, const Layout& L,
                    const float* scale, const float* zp, int nthreads);
// Straight-through dx (zero outside the range) and LSQ-style dscale/dzp reduced per
// parameter. dx/dscale/dzp may be null when not needed.
void qdq_backward_cpu(const void* x, const void* dy, void* dx, DType dt, const Layout& L,
                      const float* scale, const float* zp, int qmin, int qmax, float* dscale,
                      float* dzp, int nthreads);

// ---- float formats: y = round_fmt(clamp(x / s, -max, max)) * s (saturating, RNE) ----
void float_qdq_cpu(const void* x, void* y, DType dt, const Layout& L, const float* scale,
                   FloatFormat fmt, int nthreads);

// ---- statistics ----
// min/max per parameter of L (nparam entries). NaN propagates (like torch.aminmax).
void minmax_cpu(const void* x, DType dt, const Layout& L, float* mn, float* mx, int nthreads);
// counts[p * bins + b] += #{x in group p : bin b of [lo[p], hi[p]]}; outside values dropped
// unless clamp_outside, in which case they land in the edge bins. NaN is dropped.
void histogram_cpu(const void* x, DType dt, const Layout& L, const float* lo, const float* hi,
                   int bins, bool clamp_outside, int64_t* counts, int nthreads);
// Score candidate encodings against histograms. For group c (of C) with histogram
// hist[c, :B] over [lo[c], hi[c]] and candidate (s, z):
//   mse  = sum_b n_b e_b^2 / sum_b n_b,  e_b = qdq(mid_b; s, z) - mid_b
//   cost = sum_b n_b e_b^2 w_b / sum_b n_b, w_b = gamma if mid_b clips else 1
// Candidates: paired (scale[c,K], zp[c,K]) -> out[c,K], or product
// (scale[c,K1] x zp[c,K2]) -> out[c,K1,K2].
void range_search_cpu(const float* hist, const float* lo, const float* hi, int64_t C, int64_t B,
                      const float* scale, int64_t K1, const float* zp, int64_t K2, bool product,
                      int qmin, int qmax, float gamma, float* mse, float* cost, int nthreads);

// ---- AdaRound ----
// w_soft = (clamp(floor(w / s) + h(v) + zp, qmin, qmax) - zp) * s,
// h(v) = clip(sigmoid(v) * (zeta - gamma) + gamma, 0, 1); hard: h = (v >= 0).
// Returns the regularizer sum(1 - |2h - 1|^beta) (0 when hard).
double adaround_forward_cpu(const float* w, const float* v, float* out, const Layout& L,
                            const float* scale, const float* zp, int qmin, int qmax,
                            float beta, bool hard, int nthreads);
// dv = dout * s * h'(v) * inside + lam * d(reg)/dv
void adaround_backward_cpu(const float* w, const float* v, const float* dout, float* dv,
                           const Layout& L, const float* scale, const float* zp, int qmin,
                           int qmax, float beta, const float* lam, int nthreads);

constexpr float kAdaZeta = 1.1f;
constexpr float kAdaGamma = -0.1f;

#ifdef RAPIDQUANT_WITH_CUDA
void qdq_cuda(const void* x, void* y, DType dt, const Layout& L, const float* scale,
              const float* zp, int qmin, int qmax, uintptr_t stream);
void quantize_cuda(const void* x, DType dt, void* q, IType qt, const Layout& L,
                   const float* scale, const float* zp, int qmin, int qmax, uintptr_t stream);
void dequantize_cuda(const void* q, IType qt, void* y, DType dt, const Layout& L,
                     const float* scale, const float* zp, uintptr_t stream);
// dscale/dzp must be zero-filled by the caller (accumulated with atomics).
void qdq_backward_cuda(const void* x, const void* dy, void* dx, DType dt, const Layout& L,
                       const float* scale, const float* zp, int qmin, int qmax, float* dscale,
                       float* dzp, uintptr_t stream);
void float_qdq_cuda(const void* x, void* y, DType dt, const Layout& L, const float* scale,
                    FloatFormat fmt, uintptr_t stream);
// mn/mx must be pre-filled with +inf/-inf and nanflag with 0 by the caller.
void minmax_cuda(const void* x, DType dt, const Layout& L, float* mn, float* mx,
                 int32_t* nanflag, uintptr_t stream);
// counts must be zero-filled by the caller.
void histogram_cuda(const void* x, DType dt, const Layout& L, const float* lo, const float* hi,
                    int bins, bool clamp_outside, int64_t* counts, uintptr_t stream);
void range_search_cuda(const float* hist, const float* lo, const float* hi, int64_t C,
                       int64_t B, const float* scale, int64_t K1, const float* zp, int64_t K2,
                       bool product, int qmin, int qmax, float gamma, float* mse, float* cost,
                       uintptr_t stream);
// reg (one float) must be zero-filled by the caller.
void adaround_forward_cuda(const float* w, const float* v, float* out, const Layout& L,
                           const float* scale, const float* zp, int qmin, int qmax, float beta,
                           bool hard, float* reg, uintptr_t stream);
void adaround_backward_cuda(const float* w, const float* v, const float* dout, float* dv,
                            const Layout& L, const float* scale, const float* zp, int qmin,
                            int qmax, float beta, const float* lam, uintptr_t stream);
#endif

}  // namespace rq
