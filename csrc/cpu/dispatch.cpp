// Run-time choice of the CPU instruction set: the kernels are compiled for baseline x86-64
// (or the build machine's baseline elsewhere), AVX2 and AVX-512, and the best one the CPU
// supports is used. RAPIDQUANT_CPU_ISA=base|avx2|avx512 forces one.
#include <cstdlib>
#include <cstring>
#include <string>

#include "rapidquant/kernels.h"

namespace rq {
namespace {

enum class Isa { Base, Avx2, Avx512 };

bool cpu_has(Isa isa) {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  switch (isa) {
    case Isa::Base: return true;
    case Isa::Avx2: return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    case Isa::Avx512:
      return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
             __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  }
  return false;
#else
  return isa == Isa::Base;
#endif
}

bool built_with(Isa isa) {
  switch (isa) {
    case Isa::Base: return true;
#ifdef RAPIDQUANT_HAVE_AVX2
    case Isa::Avx2: return true;
#endif
#ifdef RAPIDQUANT_HAVE_AVX512
    case Isa::Avx512: return true;
#endif
    default: return false;
  }
}

Isa parse(const std::string& s) {
  if (s == "base") return Isa::Base;
  if (s == "avx2") return Isa::Avx2;
  if (s == "avx512") return Isa::Avx512;
  RQ_CHECK(false, "unknown CPU instruction set '" << s << "'; use base, avx2 or avx512");
  return Isa::Base;
}

Isa best() {
  if (const char* env = std::getenv("RAPIDQUANT_CPU_ISA")) {
    Isa want = parse(env);
    if (built_with(want) && cpu_has(want)) return want;
  }
  for (Isa i : {Isa::Avx512, Isa::Avx2})
    if (built_with(i) && cpu_has(i)) return i;
  return Isa::Base;
}

Isa g_isa = best();

}  // namespace

const char* cpu_isa() {
  switch (g_isa) {
    case Isa::Avx512: return "avx512";
    case Isa::Avx2: return "avx2";
    default: return "base";
  }
}

void set_cpu_isa(const char* name) {
  Isa want = parse(name);
  RQ_CHECK(built_with(want), "this build of rapidquant has no " << name << " kernels");
  RQ_CHECK(cpu_has(want), "this CPU does not support " << name);
  g_isa = want;
}

#ifdef RAPIDQUANT_HAVE_AVX512
#define RQ_CASE_AVX512(call) case Isa::Avx512: return isa_avx512::call;
#else
#define RQ_CASE_AVX512(call)
#endif
#ifdef RAPIDQUANT_HAVE_AVX2
#define RQ_CASE_AVX2(call) case Isa::Avx2: return isa_avx2::call;
#else
#define RQ_CASE_AVX2(call)
#endif
#define RQ_DISPATCH(call)             \
  switch (g_isa) {                    \
    RQ_CASE_AVX512(call)              \
    RQ_CASE_AVX2(call)                \
    default: return isa_base::call;   \
  }

void qdq_cpu(const void* x, void* y, DType dt, const Layout& L, const float* s, const float* z,
             int qmin, int qmax, int nt) {
  RQ_DISPATCH(qdq_cpu(x, y, dt, L, s, z, qmin, qmax, nt))
}
void quantize_cpu(const void* x, DType dt, void* q, IType qt, const Layout& L, const float* s,
                  const float* z, int qmin, int qmax, int nt) {
  RQ_DISPATCH(quantize_cpu(x, dt, q, qt, L, s, z, qmin, qmax, nt))
}
void dequantize_cpu(const void* q, IType qt, void* y, DType dt, const Layout& L, const float* s,
                    const float* z, int nt) {
  RQ_DISPATCH(dequantize_cpu(q, qt, y, dt, L, s, z, nt))
}
void qdq_backward_cpu(const void* x, const void* dy, void* dx, DType dt, const Layout& L,
                      const float* s, const float* z, int qmin, int qmax, float* ds, float* dz,
                      int nt) {
  RQ_DISPATCH(qdq_backward_cpu(x, dy, dx, dt, L, s, z, qmin, qmax, ds, dz, nt))
}
void qdq_drop_cpu(const void* x, void* y, DType dt, const Layout& L, const float* s, const float* z,
                  int qmin, int qmax, uint64_t seed, uint32_t thr, int nt) {
  RQ_DISPATCH(qdq_drop_cpu(x, y, dt, L, s, z, qmin, qmax, seed, thr, nt))
}
void qdq_drop_backward_cpu(const void* x, const void* dy, void* dx, DType dt, const Layout& L,
                           const float* s, const float* z, int qmin, int qmax, uint64_t seed,
                           uint32_t thr, float* ds, float* dz, int nt) {
  RQ_DISPATCH(qdq_drop_backward_cpu(x, dy, dx, dt, L, s, z, qmin, qmax, seed, thr, ds, dz, nt))
}
void drop_select_cpu(const void* a, const void* b, void* out, DType dt, const Layout& L, uint64_t seed,
                     uint32_t thr, int nt) {
  RQ_DISPATCH(drop_select_cpu(a, b, out, dt, L, seed, thr, nt))
}
void float_qdq_cpu(const void* x, void* y, DType dt, const Layout& L, const float* s,
                   FloatFormat fmt, int nt) {
  RQ_DISPATCH(float_qdq_cpu(x, y, dt, L, s, fmt, nt))
}
void minmax_cpu(const void* x, DType dt, const Layout& L, float* mn, float* mx, int nt) {
  RQ_DISPATCH(minmax_cpu(x, dt, L, mn, mx, nt))
}
void histogram_cpu(const void* x, DType dt, const Layout& L, const float* lo, const float* hi,
                   int bins, bool clamp_outside, int64_t* counts, int nt) {
  RQ_DISPATCH(histogram_cpu(x, dt, L, lo, hi, bins, clamp_outside, counts, nt))
}
void range_search_cpu(const float* hist, const float* lo, const float* hi, int64_t C, int64_t B,
                      const float* s, int64_t K1, const float* z, int64_t K2, bool product,
                      int qmin, int qmax, float gamma, float* mse, float* cost, int nt) {
  RQ_DISPATCH(range_search_cpu(hist, lo, hi, C, B, s, K1, z, K2, product, qmin, qmax, gamma, mse, cost, nt))
}
double adaround_forward_cpu(const float* w, const float* v, float* out, const Layout& L,
                            const float* s, const float* z, int qmin, int qmax, float beta,
                            bool hard, int nt) {
  RQ_DISPATCH(adaround_forward_cpu(w, v, out, L, s, z, qmin, qmax, beta, hard, nt))
}
void adaround_backward_cpu(const float* w, const float* v, const float* dout, float* dv,
                           const Layout& L, const float* s, const float* z, int qmin, int qmax,
                           float beta, const float* lam, int nt) {
  RQ_DISPATCH(adaround_backward_cpu(w, v, dout, dv, L, s, z, qmin, qmax, beta, lam, nt))
}

}  // namespace rq
