// Rounding an fp32 value onto a narrower float grid (RNE, saturating), shared by the CPU
// and CUDA kernels. Works on the value's own binade: the grid spacing is 2^(e - mbits)
// with e clamped to the smallest normal exponent, which also gives the subnormals.
#pragma once
#include "rapidquant/common.h"

#if defined(__CUDACC__)
#define RQ_HD __host__ __device__ __forceinline__
#else
#define RQ_HD inline
#endif

namespace rq {

struct FormatSpec {
  int mbits;   // explicit mantissa bits
  int emin;    // exponent of the smallest normal
  float maxv;  // largest finite value
};

RQ_HD FormatSpec format_spec(FloatFormat f) {
  switch (f) {
    case FloatFormat::F16: return {10, -14, 65504.0f};
    case FloatFormat::BF16: return {7, -126, 3.38953139e38f};
    case FloatFormat::E4M3FN: return {3, -6, 448.0f};
    case FloatFormat::E5M2: return {2, -14, 57344.0f};
  }
  return {10, -14, 65504.0f};
}

RQ_HD float rq_as_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  return bits_to_float(u);
#endif
}
RQ_HD uint32_t rq_as_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  return float_to_bits(f);
#endif
}

RQ_HD float round_to_format(float v, FormatSpec f) {
  v = v > f.maxv ? f.maxv : v;  // saturate; NaN passes through
  v = v < -f.maxv ? -f.maxv : v;
  int e = (int)((rq_as_bits(v) >> 23) & 0xffu) - 127;
  e = e < f.emin ? f.emin : e;
  const int qe = e - f.mbits;  // exponent of the grid spacing
  const float q = qe >= -126 ? rq_as_float((uint32_t)(qe + 127) << 23)
                             : rq_as_float(1u << (qe + 149));
  const float t = v / q;                                  // exact: power-of-two scaling
  const float r = ((t + 12582912.0f) - 12582912.0f) * q;  // |t| < 2^(mbits+1)
  // keep the sign of zero
  return rq_as_float((rq_as_bits(r) & 0x7fffffffu) | (rq_as_bits(v) & 0x80000000u));
}

}  // namespace rq
