// CUDA statistics: grouped min/max, histograms, fused range search.
#include <cmath>

#include "common.cuh"
#include "rapidquant/kernels.h"

namespace rq {
namespace cu {
namespace {

struct MinMaxAcc {
  int64_t key;
  float mn, mx;
  int nan;
  __device__ static MinMaxAcc identity() { return MinMaxAcc{-1, INFINITY, -INFINITY, 0}; }
  __device__ static MinMaxAcc combine(MinMaxAcc a, MinMaxAcc b) {
    return MinMaxAcc{a.key >= 0 ? a.key : b.key, fminf(a.mn, b.mn), fmaxf(a.mx, b.mx), a.nan | b.nan};
  }
};

template <class T>
struct MinMaxOp {
  static constexpr bool kReduces = true;
  using Acc = MinMaxAcc;
  const T* x;
  float *mn, *mx;
  int32_t* nanflag;
  __device__ void flush(const Acc& a) const {
    if (a.key < 0) return;
    if (a.mn <= a.mx) {
      atomic_min_float(mn + a.key, a.mn);
      atomic_max_float(mx + a.key, a.mx);
    }
    if (a.nan) nanflag[a.key] = 1;
  }
  __device__ void elem(int64_t i, int64_t p, Acc& acc) const {
    const float v = DIO<T>::load(x, i);
    if (acc.key != p) {
      flush(acc);
      acc = Acc{p, INFINITY, -INFINITY, 0};
    }
    if (v != v) {
      acc.nan = 1;
    } else {
      acc.mn = fminf(acc.mn, v);
      acc.mx = fmaxf(acc.mx, v);
    }
  }
};

__device__ __forceinline__ int bin_of(float v, float l, float h, int bins, bool clamp_outside) {
  if (v >= l && v <= h) {
    const float inv = (float)bins / (h - l);
    const int b = (int)((v - l) * inv);
    return b < bins ? b : bins - 1;
  }
  if (clamp_outside && v < l) return 0;
  if (clamp_outside && v > h) return bins - 1;
  return -1;  // outside, or NaN
}

// Histogram with global atomics (any layout).
template <class T>
__global__ void hist_global_kernel(DevLayout L, const T* x, const float* lo, const float* hi,
                                   int bins, bool clamp_outside, unsigned long long* counts) {
  const int64_t stride = (int64_t)gridDim.x * blockDim.x;
  for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < L.numel; i += stride) {
    const int64_t p = param_of(L, i);
    const int b = bin_of(DIO<T>::load(x, i), lo[p], hi[p], bins, clamp_outside);
    if (b >= 0) atomicAdd(counts + p * bins + b, 1ULL);
  }
}

// Histogram of rows that share one group, privatized in shared memory.
template <class T>
__global__ void hist_shared_kernel(DevLayout L, int64_t tiles_per_row, const T* x, const float* lo,
                                   const float* hi, int bins, bool clamp_outside,
                                   unsigned long long* counts) {
  extern __shared__ unsigned int sh[];
  for (int b = threadIdx.x; b < bins; b += blockDim.x) sh[b] = 0;
  __syncthreads();
  const int64_t t = blockIdx.x;
  const int64_t row = t / tiles_per_row, tile = t - row * tiles_per_row;
  const int64_t p = row_base(L, row), off = row * L.inner;
  const int64_t j0 = tile * kTile * 4;
  const int64_t j1 = j0 + kTile * 4 < L.inner ? j0 + kTile * 4 : L.inner;
  const float l = lo[p], h = hi[p];
  for (int64_t j = j0 + threadIdx.x; j < j1; j += blockDim.x) {
    const int b = bin_of(DIO<T>::load(x, off + j), l, h, bins, clamp_outside);
    if (b >= 0) atomicAdd(sh + b, 1u);
  }
  __syncthreads();
  for (int b = threadIdx.x; b < bins; b += blockDim.x)
    if (sh[b]) atomicAdd(counts + p * bins + b, (unsigned long long)sh[b]);
}

// One thread per (group, candidate); bins of the group are read by the whole warp.
__global__ void range_search_kernel(const float* hist, const float* lo, const float* hi, int64_t C,
                                    int64_t B, const float* scale, int64_t K1, const float* zp,
                                    int64_t K2, bool product, float qmin, float qmax, float gamma,
                                    float* mse, float* cost) {
  const int64_t K = product ? K1 * K2 : K1;
  const int64_t ck = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (ck >= C * K) return;
  const int64_t c = ck / K, k = ck - c * K;
  const int64_t k1 = product ? k / K2 : k, k2 = product ? k % K2 : k;
  const float s = scale[c * K1 + k1], z = zp[c * K2 + k2];
  const float lq = qmin - z, hq = qmax - z;
  const float l = lo[c], w = (hi[c] - lo[c]) / (float)B;
  double se = 0.0, sc = 0.0, total = 0.0;
  if (!(s > 0.f) || isinf(s)) {
    mse[ck] = INFINITY;
    cost[ck] = INFINITY;
    return;
  }
  for (int64_t j = 0; j < B; ++j) {
    const float n = hist[c * B + j];
    if (n == 0.f) continue;
    const float mid = l + ((float)j + 0.5f) * w;
    const float r = rintf(mid / s);
    const bool clipped = r < lq || r > hq;
    const float rc = r < lq ? lq : (r > hq ? hq : r);
    const float err = rc * s - mid;
    const double e2 = (double)n * (double)err * (double)err;
    se += e2;
    sc += clipped ? (double)gamma * e2 : e2;
    total += n;
  }
  if (total > 0.0) {
    se /= total;
    sc /= total;
  }
  mse[ck] = (float)se;
  cost[ck] = (float)sc;
}

}  // namespace
}  // namespace cu

void minmax_cuda(const void* x, DType dt, const Layout& L, float* mn, float* mx,
                 int32_t* nanflag, uintptr_t stream) {
  RQ_CUDA_DISPATCH_DTYPE(dt, T, {
    cu::MinMaxOp<T> op{(const T*)x, mn, mx, nanflag};
    cu::launch(L, op, cu::as_stream(stream));
  });
}

void histogram_cuda(const void* x, DType dt, const Layout& L, const float* lo, const float* hi,
                    int bins, bool clamp_outside, int64_t* counts, uintptr_t stream) {
  RQ_CHECK(bins >= 1, "bins must be >= 1 (got " << bins << ")");
  if (L.numel == 0) return;
  cu::DevLayout d = cu::to_device(L);
  auto* out = reinterpret_cast<unsigned long long*>(counts);
  cudaStream_t st = cu::as_stream(stream);
  const bool shared = d.inner_block == 0 && bins <= 8192 && d.inner >= cu::kTiledMinInner;
  RQ_CUDA_DISPATCH_DTYPE(dt, T, {
    if (shared) {
      const int64_t per_block = cu::kTile * 4;
      const int64_t tiles_per_row = (d.inner + per_block - 1) / per_block;
      const int64_t blocks = tiles_per_row * (d.numel / d.inner);
      cu::hist_shared_kernel<T><<<(unsigned)blocks, cu::kThreads, bins * sizeof(unsigned int), st>>>(
          d, tiles_per_row, (const T*)x, lo, hi, bins, clamp_outside, out);
    } else {
      int64_t blocks = (d.numel + cu::kThreads * 4 - 1) / (cu::kThreads * 4);
      blocks = blocks < 65535 * 8 ? blocks : 65535 * 8;
      cu::hist_global_kernel<T><<<(unsigned)blocks, cu::kThreads, 0, st>>>(
          d, (const T*)x, lo, hi, bins, clamp_outside, out);
    }
  });
  cu::check_launch();
}

void range_search_cuda(const float* hist, const float* lo, const float* hi, int64_t C, int64_t B,
                       const float* scale, int64_t K1, const float* zp, int64_t K2, bool product,
                       int qmin, int qmax, float gamma, float* mse, float* cost,
                       uintptr_t stream) {
  RQ_CHECK(B >= 1, "histograms need at least one bin");
  RQ_CHECK(product || K1 == K2, "paired candidates need as many scales as zero points");
  const int64_t K = product ? K1 * K2 : K1;
  const int64_t n = C * K;
  if (n == 0) return;
  const unsigned blocks = (unsigned)((n + cu::kThreads - 1) / cu::kThreads);
  cu::range_search_kernel<<<blocks, cu::kThreads, 0, cu::as_stream(stream)>>>(
      hist, lo, hi, C, B, scale, K1, zp, K2, product, (float)qmin, (float)qmax, gamma, mse, cost);
  cu::check_launch();
}

}  // namespace rq
