// QDrop's random choice, shared by the CPU and CUDA kernels: element i of a tensor keeps its
// float value (is not quantized) when a hash of (seed, i) falls below `threshold` (out of
// 2^32). A counter-based hash, not a stream: the choice depends only on seed and the flat
// index, so it is the same for any thread count, device or launch shape, and the backward
// recomputes it instead of storing a mask.
#pragma once
#include <cstdint>

#if defined(__CUDACC__)
#define RQ_DROP_HD __host__ __device__ __forceinline__
#else
#define RQ_DROP_HD inline
#endif

namespace rq {

struct DropSpec {
  uint64_t seed = 0;
  uint32_t threshold = 0;  // keep-float probability * 2^32 (0: quantize everything)
};

// splitmix64's finalizer over seed + i * golden ratio: well-mixed 64 bits per index.
RQ_DROP_HD bool keeps_float(const DropSpec& d, int64_t i) {
  uint64_t z = d.seed + (uint64_t)i * 0x9E3779B97F4A7C15ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  z ^= z >> 31;
  return (uint32_t)(z >> 32) < d.threshold;
}

}  // namespace rq
