// Shared CUDA helpers: error checks, device-side layout, element IO, launch drivers.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

#include "rapidquant/common.h"

namespace rq {
namespace cu {

#define RQ_CUDA_CHECK(expr)                                                                  \
  do {                                                                                       \
    cudaError_t rq_err_ = (expr);                                                            \
    if (rq_err_ != cudaSuccess)                                                              \
      throw std::runtime_error(std::string("CUDA error: ") + cudaGetErrorString(rq_err_) +   \
                               " (" #expr ") at " __FILE__ ":" + std::to_string(__LINE__));  \
  } while (false)

inline void check_launch() { RQ_CUDA_CHECK(cudaGetLastError()); }
inline cudaStream_t as_stream(uintptr_t s) { return reinterpret_cast<cudaStream_t>(s); }

constexpr int kThreads = 256;
constexpr int64_t kTile = 4096;          // elements of one row handled by one block
constexpr int64_t kTiledMinInner = 2048;  // rows shorter than this use the flat kernel

// The host Layout, passed by value to kernels.
struct DevLayout {
  int ndim;
  int64_t size[kMaxDims], block[kMaxDims], pstride[kMaxDims];
  int64_t numel, inner, inner_block, nparam;
};

inline DevLayout to_device(const Layout& L) {
  DevLayout d{};
  d.ndim = L.ndim;
  for (int i = 0; i < L.ndim; ++i) {
    d.size[i] = L.size[i];
    d.block[i] = L.block[i];
    d.pstride[i] = L.pstride[i];
  }
  d.numel = L.numel;
  d.inner = L.inner();
  d.inner_block = L.inner_block();
  d.nparam = L.nparam;
  return d;
}

__device__ __forceinline__ int64_t row_base(const DevLayout& L, int64_t r) {
  int64_t off = 0;
  for (int d = L.ndim - 2; d >= 0; --d) {
    const int64_t i = r % L.size[d];
    r /= L.size[d];
    if (L.block[d]) off += (i / L.block[d]) * L.pstride[d];
  }
  return off;
}

__device__ __forceinline__ int64_t param_of(const DevLayout& L, int64_t i) {
  if (L.nparam == 1) return 0;
  const int64_t row = i / L.inner, j = i - row * L.inner;
  int64_t p = row_base(L, row);
  if (L.inner_block) p += j / L.inner_block;
  return p;
}

// Element IO: load as float, store from float (round to nearest even).
template <class T> struct DIO;
template <> struct DIO<float> {
  static __device__ __forceinline__ float load(const float* p, int64_t i) { return p[i]; }
  static __device__ __forceinline__ void store(float* p, int64_t i, float v) { p[i] = v; }
};
template <> struct DIO<__half> {
  static __device__ __forceinline__ float load(const __half* p, int64_t i) { return __half2float(p[i]); }
  static __device__ __forceinline__ void store(__half* p, int64_t i, float v) { p[i] = __float2half_rn(v); }
};
template <> struct DIO<__nv_bfloat16> {
  static __device__ __forceinline__ float load(const __nv_bfloat16* p, int64_t i) { return __bfloat162float(p[i]); }
  static __device__ __forceinline__ void store(__nv_bfloat16* p, int64_t i, float v) { p[i] = __float2bfloat16_rn(v); }
};

#define RQ_CUDA_DISPATCH_DTYPE(dt, T, ...)                                         \
  switch (dt) {                                                                    \
    case DType::F32: { using T = float; __VA_ARGS__; break; }                      \
    case DType::F16: { using T = __half; __VA_ARGS__; break; }                     \
    case DType::BF16: { using T = __nv_bfloat16; __VA_ARGS__; break; }             \
    default: RQ_CHECK(false, "unsupported dtype code " << (int)(dt)                \
                      << "; expected float32, float16 or bfloat16");               \
  }

// An accumulator for ops without reductions.
struct NoAcc {
  __device__ void reset() {}
  __device__ static NoAcc identity() { return NoAcc{}; }
};

// Block-wide reduction of an accumulator with A::combine; returns the total in thread 0.
template <class A>
__device__ A block_reduce(A a) {
  __shared__ A buf[kThreads];
  buf[threadIdx.x] = a;
  __syncthreads();
  for (int s = blockDim.x / 2; s > 0; s >>= 1) {
    if ((int)threadIdx.x < s) buf[threadIdx.x] = A::combine(buf[threadIdx.x], buf[threadIdx.x + s]);
    __syncthreads();
  }
  return buf[0];
}

// Drivers. Op provides:
//   using Acc;  __device__ void elem(int64_t i, int64_t p, Acc& acc);
//   __device__ void flush(const Acc& acc);   (Acc carries its parameter key)
// Uniform blocks (every element of the block uses one parameter) reduce in shared memory
// and flush once; otherwise each thread flushes whenever its parameter changes.
template <class Op>
__global__ void tiled_kernel(DevLayout L, int64_t tiles_per_row, Op op) {
  using Acc = typename Op::Acc;
  Acc acc = Acc::identity();
  const int64_t t = blockIdx.x;
  const int64_t row = t / tiles_per_row, tile = t - row * tiles_per_row;
  const int64_t base = row_base(L, row), off = row * L.inner;
  const int64_t j0 = tile * kTile;
  const int64_t j1 = j0 + kTile < L.inner ? j0 + kTile : L.inner;
  for (int64_t j = j0 + threadIdx.x; j < j1; j += blockDim.x)
    op.elem(off + j, L.inner_block == 0 ? base : base + j / L.inner_block, acc);
  if constexpr (Op::kReduces) {
    if (L.inner_block == 0) {
      Acc total = block_reduce(acc);
      if (threadIdx.x == 0) op.flush(total);
    } else {
      op.flush(acc);
    }
  }
}

template <class Op>
__global__ void flat_kernel(DevLayout L, Op op) {
  using Acc = typename Op::Acc;
  Acc acc = Acc::identity();
  const int64_t stride = (int64_t)gridDim.x * blockDim.x;
  for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < L.numel; i += stride)
    op.elem(i, param_of(L, i), acc);
  if constexpr (Op::kReduces) {
    if (L.nparam == 1) {
      Acc total = block_reduce(acc);
      if (threadIdx.x == 0) op.flush(total);
    } else {
      op.flush(acc);
    }
  }
}

template <class Op>
void launch(const Layout& L, Op op, cudaStream_t stream) {
  if (L.numel == 0) return;
  DevLayout d = to_device(L);
  if (d.inner >= kTiledMinInner) {
    const int64_t tiles_per_row = (d.inner + kTile - 1) / kTile;
    const int64_t blocks = tiles_per_row * (d.numel / d.inner);
    RQ_CHECK(blocks < (int64_t)INT32_MAX, "tensor too large for one launch");
    tiled_kernel<Op><<<(unsigned)blocks, kThreads, 0, stream>>>(d, tiles_per_row, op);
  } else {
    int64_t blocks = (d.numel + kThreads * 4 - 1) / (kThreads * 4);
    blocks = blocks < 65535 * 8 ? blocks : 65535 * 8;
    flat_kernel<Op><<<(unsigned)blocks, kThreads, 0, stream>>>(d, op);
  }
  check_launch();
}

// float atomics for min/max: order-preserving on the IEEE bit patterns.
// (v + 0.f turns -0 into +0, whose bit pattern orders correctly.)
__device__ __forceinline__ void atomic_min_float(float* addr, float v) {
  v = v + 0.f;
  if (v >= 0.f) atomicMin(reinterpret_cast<int*>(addr), __float_as_int(v));
  else atomicMax(reinterpret_cast<unsigned int*>(addr), __float_as_uint(v));
}
__device__ __forceinline__ void atomic_max_float(float* addr, float v) {
  v = v + 0.f;
  if (v >= 0.f) atomicMax(reinterpret_cast<int*>(addr), __float_as_int(v));
  else atomicMin(reinterpret_cast<unsigned int*>(addr), __float_as_uint(v));
}

}  // namespace cu
}  // namespace rq
