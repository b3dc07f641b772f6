// Declarations of every kernel. CPU entry points end in _cpu, CUDA ones in _cuda and take
// the raw cudaStream_t as an integer so this header needs no CUDA include.
#pragma once
#include "rapidquant/common.h"

namespace rq {

// CPU kernels. Each is compiled once per instruction set (namespaces isa_base,
// isa_avx2, isa_avx512); the entry points in namespace rq pick one at run time.
//
// qdq_cpu          y = (clamp(rint(x / s) + zp, qmin, qmax) - zp) * s in fp32 (ONNX Q/DQ).
// quantize_cpu     q = clamp(rint(x / s) + zp, qmin, qmax) as an integer type.
// dequantize_cpu   y = (q - zp) * s.
// qdq_backward_cpu straight-through dx (0 outside the range) and LSQ-style dscale/dzp
//                  reduced per parameter; dx/dscale/dzp may be null when not needed.
// qdq_drop_cpu     QDrop: qdq_cpu, except that elements kept float by keeps_float(seed, i)
//                  (rapidquant/drop.h; probability threshold / 2^32) pass through unchanged.
// qdq_drop_backward_cpu  qdq_backward_cpu with the same elements passing dy through and
//                  adding nothing to dscale/dzp.
// drop_select_cpu  out = keeps_float(seed, i) ? b : a (QDrop's mix of quantized and float inputs).
// float_qdq_cpu    y = round_fmt(clamp(x / s, -max, max)) * s (RNE, saturating); s may be null.
// minmax_cpu       min/max per parameter group; NaN propagates (like torch.aminmax).
// histogram_cpu    counts[p * bins + b] += #{x of group p in bin b of [lo[p], hi[p]]};
//                  outside values dropped unless clamp_outside (edge bins); NaN dropped.
// range_search_cpu score candidates (s, z) against histograms hist[c, :B] over [lo, hi]:
//                    mse  = sum_b n_b e_b^2 / sum_b n_b, e_b = qdq(mid_b; s, z) - mid_b
//                    cost = same with e_b^2 weighted by gamma where mid_b clips.
//                  Paired (scale[c,K], zp[c,K]) -> [c,K] or product (scale[c,K1] x
//                  zp[c,K2]) -> [c,K1,K2].
// adaround_forward_cpu  w_soft = (clamp(floor(w/s) + h(v) + zp, qmin, qmax) - zp) * s with
//                  h(v) = clip(sigmoid(v) * (zeta - gamma) + gamma, 0, 1) (hard: v >= 0);
//                  returns sum(1 - |2h - 1|^beta) (0 when hard).
// adaround_backward_cpu dv = dout * s * h'(v) * inside + lam[0] * d(reg)/dv.
#define RQ_CPU_KERNEL_DECLS \
  void qdq_cpu(const void* x, void* y, DType dt, const Layout& L, const float* scale, const float* zp, int qmin, int qmax, int nthreads); \
  void quantize_cpu(const void* x, DType dt, void* q, IType qt, const Layout& L, const float* scale, const float* zp, int qmin, int qmax, int nthreads); \
  void dequantize_cpu(const void* q, IType qt, void* y, DType dt, const Layout& L, const float* scale, const float* zp, int nthreads); \
  void qdq_backward_cpu(const void* x, const void* dy, void* dx, DType dt, const Layout& L, const float* scale, const float* zp, int qmin, int qmax, float* dscale, float* dzp, int nthreads); \
  void qdq_drop_cpu(const void* x, void* y, DType dt, const Layout& L, const float* scale, const float* zp, int qmin, int qmax, uint64_t seed, uint32_t threshold, int nthreads); \
  void qdq_drop_backward_cpu(const void* x, const void* dy, void* dx, DType dt, const Layout& L, const float* scale, const float* zp, int qmin, int qmax, uint64_t seed, uint32_t threshold, float* dscale, float* dzp, int nthreads); \
  void drop_select_cpu(const void* a, const void* b, void* out, DType dt, const Layout& L, uint64_t seed, uint32_t threshold, int nthreads); \
  void float_qdq_cpu(const void* x, void* y, DType dt, const Layout& L, const float* scale, FloatFormat fmt, int nthreads); \
  void minmax_cpu(const void* x, DType dt, const Layout& L, float* mn, float* mx, int nthreads); \
  void histogram_cpu(const void* x, DType dt, const Layout& L, const float* lo, const float* hi, int bins, bool clamp_outside, int64_t* counts, int nthreads); \
  void range_search_cpu(const float* hist, const float* lo, const float* hi, int64_t C, int64_t B, const float* scale, int64_t K1, const float* zp, int64_t K2, bool product, int qmin, int qmax, float gamma, float* mse, float* cost, int nthreads); \
  double adaround_forward_cpu(const float* w, const float* v, float* out, const Layout& L, const float* scale, const float* zp, int qmin, int qmax, float beta, bool hard, int nthreads); \
  void adaround_backward_cpu(const float* w, const float* v, const float* dout, float* dv, const Layout& L, const float* scale, const float* zp, int qmin, int qmax, float beta, const float* lam, int nthreads);

RQ_CPU_KERNEL_DECLS
namespace isa_base { RQ_CPU_KERNEL_DECLS }
namespace isa_avx2 { RQ_CPU_KERNEL_DECLS }
namespace isa_avx512 { RQ_CPU_KERNEL_DECLS }

// The instruction set the CPU entry points use: "avx512", "avx2" or "base".
const char* cpu_isa();
// Force one (tests, benchmarks); throws if the CPU or the build lacks it.
void set_cpu_isa(const char* name);

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
void qdq_drop_cuda(const void* x, void* y, DType dt, const Layout& L, const float* scale,
                   const float* zp, int qmin, int qmax, uint64_t seed, uint32_t threshold,
                   uintptr_t stream);
// dscale/dzp must be zero-filled by the caller (accumulated with atomics).
void qdq_drop_backward_cuda(const void* x, const void* dy, void* dx, DType dt, const Layout& L,
                            const float* scale, const float* zp, int qmin, int qmax, uint64_t seed,
                            uint32_t threshold, float* dscale, float* dzp, uintptr_t stream);
void drop_select_cuda(const void* a, const void* b, void* out, DType dt, const Layout& L, uint64_t seed,
                      uint32_t threshold, uintptr_t stream);
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
