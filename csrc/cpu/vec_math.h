// Branch-free float exp/log that GCC auto-vectorizes (libm calls would not be).
// Accuracy: a few ulp over the ranges AdaRound uses; the reference tests allow for it.
#pragma once
#include <cstdint>
#include <cstring>

namespace rq {

inline float vm_as_float(int32_t i) { float f; std::memcpy(&f, &i, 4); return f; }
inline int32_t vm_as_int(float f) { int32_t i; std::memcpy(&i, &f, 4); return i; }

// e^x: x = n ln2 + r, |r| <= ln2/2, degree-6 polynomial for e^r, times 2^n.
inline float vm_exp(float x) {
  x = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
  const float n = (x * 1.44269504f + 12582912.0f) - 12582912.0f;  // rint
  const float r = (x - n * 0.693359375f) - n * -2.12194440e-4f;
  float p = 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  return p * vm_as_float(((int32_t)n + 127) << 23);
}

// ln(x) for x > 0 (normal): x = m 2^e with m in [sqrt(1/2), sqrt(2)), ln m = 2 atanh(s).
inline float vm_log(float x) {
  const int32_t bits = vm_as_int(x);
  int32_t e = ((bits >> 23) & 0xff) - 127;
  float m = vm_as_float((bits & 0x007fffff) | 0x3f800000);  // [1, 2)
  const bool big = m > 1.41421356f;
  m = big ? m * 0.5f : m;
  e = big ? e + 1 : e;
  const float s = (m - 1.0f) / (m + 1.0f);
  const float s2 = s * s;
  float p = 1.0f / 9.0f;
  p = p * s2 + 1.0f / 7.0f;
  p = p * s2 + 1.0f / 5.0f;
  p = p * s2 + 1.0f / 3.0f;
  p = p * s2 + 1.0f;
  return 2.0f * s * p + (float)e * 0.693147181f;
}

// a^b for a >= 0, b > 0 (0^b = 0).
inline float vm_pow(float a, float b) {
  const float safe = a > 1.17549435e-38f ? a : 1.0f;
  const float r = vm_exp(b * vm_log(safe));
  return a > 1.17549435e-38f ? r : 0.0f;
}

inline float vm_sigmoid(float v) { return 1.0f / (1.0f + vm_exp(-v)); }

}  // namespace rq
