#include "rapidquant/common.h"

namespace rq {

Layout make_layout(int ndim, const int64_t* shape, const int64_t* block) {
  RQ_CHECK(ndim >= 0 && ndim <= kMaxDims,
           "tensors with more than " << kMaxDims << " dimensions are not supported (got " << ndim << ")");
  Layout L;
  L.numel = 1;
  for (int d = 0; d < ndim; ++d) {
    RQ_CHECK(shape[d] >= 0, "negative size in dimension " << d);
    RQ_CHECK(block[d] >= 0, "negative block size in dimension " << d);
    RQ_CHECK(block[d] == 0 || shape[d] % block[d] == 0,
             "block size " << block[d] << " does not divide dimension " << d << " of size "
                           << shape[d]);
    L.numel *= shape[d];
  }
  // Drop size-1 dims, treat "block == size" as broadcast, then merge neighbours of the
  // same kind: broadcast+broadcast, or full(block 1)+full.
  int64_t sz[kMaxDims], bl[kMaxDims];
  int n = 0;
  for (int d = 0; d < ndim; ++d) {
    int64_t b = block[d];
    if (shape[d] == 1) continue;
    if (b == shape[d]) b = 0;
    if (n > 0 && ((b == 0 && bl[n - 1] == 0) || (b == 1 && bl[n - 1] == 1))) {
      sz[n - 1] *= shape[d];
      continue;
    }
    sz[n] = shape[d];
    bl[n] = b;
    ++n;
  }
  if (n == 0) {  // scalar-like
    sz[0] = 1;
    bl[0] = 0;
    n = 1;
  }
  L.ndim = n;
  int64_t stride = 1;
  for (int d = n - 1; d >= 0; --d) {
    L.size[d] = sz[d];
    L.block[d] = bl[d];
    if (bl[d]) {
      L.pstride[d] = stride;
      stride *= sz[d] / bl[d];
    } else {
      L.pstride[d] = 0;
    }
  }
  L.nparam = stride;
  if (L.numel == 0) L.nparam = stride;  // still describes the parameter tensor
  return L;
}

}  // namespace rq
