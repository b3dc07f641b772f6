// rapidquant kernel contract: plain C++ on raw pointers. No torch, no pybind11.
#pragma once
#include <cstdint>
#include <cstring>
#include <sstream>
#include <stdexcept>
#include <string>

namespace rq {

// Element types the kernels load and store. Math is always fp32.
enum class DType : int { F32 = 0, F16 = 1, BF16 = 2 };
// Integer storage for quantize-only output / dequantize-only input.
enum class IType : int { I8 = 0, U8 = 1, I16 = 2, I32 = 3 };
// Float formats for float quantize-dequantize.
enum class FloatFormat : int { F16 = 0, BF16 = 1, E4M3FN = 2, E5M2 = 3 };

#define RQ_STR_(x) #x
#define RQ_CHECK(cond, ...)                                                              \
  do {                                                                                   \
    if (!(cond)) {                                                                       \
      std::ostringstream rq_os_;                                                         \
      rq_os_ << __VA_ARGS__ << " [" << __func__ << " at " << __FILE__ << ":" << __LINE__ \
             << "]";                                                                     \
      throw std::invalid_argument(rq_os_.str());                                         \
    }                                                                                    \
  } while (false)

// Integer storage types (plain C++ ints on both CPU and CUDA).
#define RQ_DISPATCH_ITYPE(qt, Q, ...)                                           \
  switch (qt) {                                                                 \
    case ::rq::IType::I8: { using Q = int8_t; __VA_ARGS__; break; }             \
    case ::rq::IType::U8: { using Q = uint8_t; __VA_ARGS__; break; }            \
    case ::rq::IType::I16: { using Q = int16_t; __VA_ARGS__; break; }           \
    case ::rq::IType::I32: { using Q = int32_t; __VA_ARGS__; break; }           \
    default: RQ_CHECK(false, "unsupported integer dtype code " << (int)(qt));   \
  }

// A tensor x (contiguous) seen against a parameter tensor p (scale, zero point, or a
// statistic) that is broadcast or blocked along each dimension:
//   p.shape[d] == 1                      (block[d] == 0: broadcast)
//   p.shape[d] == x.shape[d] / block[d]  (block[d] >= 1; 1 = one parameter per index)
// make_layout() collapses adjacent dimensions of the same kind, so per-tensor becomes one
// row, per-channel on axis 0 becomes rows with one parameter each, and so on. The last
// collapsed dimension is the "inner" run walked by the vectorized loops.
constexpr int kMaxDims = 8;
struct Layout {
  int ndim = 0;
  int64_t size[kMaxDims] = {};
  int64_t block[kMaxDims] = {};    // 0 = broadcast
  int64_t pstride[kMaxDims] = {};  // stride in p per (index / block); 0 when broadcast
  int64_t numel = 0;
  int64_t nparam = 1;

  int64_t inner() const { return ndim ? size[ndim - 1] : 1; }
  int64_t rows() const { return inner() ? numel / inner() : 0; }
  int64_t inner_block() const { return ndim ? block[ndim - 1] : 0; }
  int64_t inner_pstride() const { return ndim ? pstride[ndim - 1] : 0; }
  // parameter offset of the first element of row r
  int64_t row_base(int64_t r) const {
    int64_t off = 0;
    for (int d = ndim - 2; d >= 0; --d) {
      int64_t i = r % size[d];
      r /= size[d];
      if (block[d]) off += (i / block[d]) * pstride[d];
    }
    return off;
  }
};

Layout make_layout(int ndim, const int64_t* shape, const int64_t* block);

// ---------------- scalar conversions (host) ----------------
inline float bits_to_float(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }
inline uint32_t float_to_bits(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }

inline float half_to_float(uint16_t h) {
  uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1f, man = h & 0x3ffu;
  if (exp == 0x1f) return bits_to_float(sign | 0x7f800000u | (man << 13));
  if (exp == 0) {
    // subnormal: man * 2^-24, exact in fp32
    float v = (float)man * 5.9604644775390625e-08f;
    return sign ? -v : v;
  }
  return bits_to_float(sign | ((exp + 112) << 23) | (man << 13));
}

inline uint16_t float_to_half(float f) {  // round to nearest even, inf on overflow
  uint32_t x = float_to_bits(f);
  uint32_t sign = (x >> 16) & 0x8000u;
  uint32_t ax = x & 0x7fffffffu;
  if (ax >= 0x7f800000u) return (uint16_t)(sign | 0x7c00u | (ax > 0x7f800000u ? 0x200u : 0));
  if (ax >= 0x477ff000u) return (uint16_t)(sign | 0x7c00u);  // >= 65520 rounds to inf
  if (ax < 0x38800000u) {                                    // below 2^-14: subnormal
    // scale by 2^24 and round with the fp32 adder (RNE)
    float v = bits_to_float(ax) * 16777216.0f;
    float r = (v + 12582912.0f) - 12582912.0f;
    return (uint16_t)(sign | (uint32_t)r);
  }
  uint32_t mant_odd = (ax >> 13) & 1u;
  ax += 0xc8000fffu + mant_odd;  // rebias exponent (-112 << 23) and round
  return (uint16_t)(sign | (ax >> 13));
}

inline float bf16_to_float(uint16_t h) { return bits_to_float((uint32_t)h << 16); }
inline uint16_t float_to_bf16(float f) {
  uint32_t x = float_to_bits(f);
  if ((x & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((x >> 16) | 0x40u);  // quiet NaN
  x += 0x7fffu + ((x >> 16) & 1u);
  return (uint16_t)(x >> 16);
}

// Round-half-even for |v| <= 2^22 using the fp32 adder; exact without fast-math.
inline float rint_small(float v) { return (v + 12582912.0f) - 12582912.0f; }

}  // namespace rq
