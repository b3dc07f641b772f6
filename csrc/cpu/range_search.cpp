// Fused MSE / SQNR range search: score K candidate encodings per group against the
// group's histogram in one call. Bin midpoints stand in for the data.
//
// For one scale s, the rounding error of every in-range bin does not depend on the zero
// point, and clipping a bin only replaces its error by (bound - mid). So per (group,
// scale) one pass over the non-empty bins builds prefix sums of the in-range error, and
// each zero point then costs two binary searches: O(K1 * B + K1 * K2 * log B) per group
// instead of O(K1 * K2 * B).
#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "elementwise.h"
#include "rapidquant/kernels.h"

namespace rq {
namespace RQ_ISA {  // compiled once per instruction set; see dispatch.cpp
namespace {

struct Group {  // the non-empty bins of one histogram, with moments for clipped sums
  std::vector<float> mid;
  std::vector<double> n, N, S1, S2;  // counts; prefix sums of n, n*mid, n*mid^2
  double total = 0.0;

  void build(const float* hist, float lo, float hi, int64_t B) {
    mid.clear();
    n.clear();
    const float w = (hi - lo) / (float)B;
    for (int64_t j = 0; j < B; ++j)
      if (hist[j] != 0.f) {
        mid.push_back(lo + ((float)j + 0.5f) * w);
        n.push_back(hist[j]);
      }
    const size_t M = mid.size();
    N.assign(M + 1, 0.0);
    S1.assign(M + 1, 0.0);
    S2.assign(M + 1, 0.0);
    for (size_t j = 0; j < M; ++j) {
      const double m = mid[j];
      N[j + 1] = N[j] + n[j];
      S1[j + 1] = S1[j] + n[j] * m;
      S2[j + 1] = S2[j] + n[j] * m * m;
    }
    total = N[M];
  }
  // sum over bins [a, b) of n * (c - mid)^2
  double clipped(size_t a, size_t b, double c) const {
    if (a >= b) return 0.0;
    const double r = c * c * (N[b] - N[a]) - 2.0 * c * (S1[b] - S1[a]) + (S2[b] - S2[a]);
    return r > 0.0 ? r : 0.0;
  }
};

struct ScaleScan {  // rounded grid index and in-range error prefix for one scale
  std::vector<float> r, e2;
  std::vector<double> E;
  void build(const Group& g, float s) {
    const size_t M = g.mid.size();
    r.resize(M);
    e2.resize(M);
    for (size_t j = 0; j < M; ++j) {  // vectorizable
      const float v = g.mid[j] / s;
      const float vc = v < -4194304.f ? -4194304.f : (v > 4194304.f ? 4194304.f : v);
      const float q = rint_small(vc);
      const float err = q * s - g.mid[j];
      r[j] = q;
      e2[j] = err * err;
    }
    E.assign(M + 1, 0.0);
    for (size_t j = 0; j < M; ++j) E[j + 1] = E[j] + g.n[j] * (double)e2[j];
  }
};

}  // namespace

void range_search_cpu(const float* hist, const float* lo, const float* hi, int64_t C, int64_t B,
                      const float* scale, int64_t K1, const float* zp, int64_t K2, bool product,
                      int qmin, int qmax, float gamma, float* mse, float* cost, int nthreads) {
  RQ_CHECK(B >= 1, "histograms need at least one bin");
  RQ_CHECK(qmin < qmax, "qmin (" << qmin << ") must be smaller than qmax (" << qmax << ")");
  RQ_CHECK(product || K1 == K2, "paired candidates need as many scales as zero points");
  // work items: (group, scale); a paired candidate is a scale with one zero point
  const int64_t items = C * K1;
  const int nt = pick_threads(C * B * K1 / 4, nthreads);
  parallel_slices(items, nt, [&](int, int64_t b, int64_t e) {
    Group g;
    ScaleScan sc;
    int64_t cur = -1;
    for (int64_t it = b; it < e; ++it) {
      const int64_t c = it / K1, k1 = it % K1;
      if (c != cur) {
        g.build(hist + c * B, lo[c], hi[c], B);
        cur = c;
      }
      const float s = scale[c * K1 + k1];
      const int64_t zbeg = product ? 0 : k1, zend = product ? K2 : k1 + 1;
      const bool bad = !(s > 0.f) || !std::isfinite(s);
      if (!bad) sc.build(g, s);
      const size_t M = g.mid.size();
      for (int64_t k2 = zbeg; k2 < zend; ++k2) {
        const int64_t out = product ? (c * K1 + k1) * K2 + k2 : c * K1 + k1;
        if (bad) {
          mse[out] = cost[out] = std::numeric_limits<float>::infinity();
          continue;
        }
        const float z = zp[c * K2 + k2];
        const float lq = (float)qmin - z, hq = (float)qmax - z;
        // r is non-decreasing in the bin index: in-range bins are one interval
        const size_t a = std::lower_bound(sc.r.begin(), sc.r.end(), lq) - sc.r.begin();
        const size_t bb = std::upper_bound(sc.r.begin(), sc.r.end(), hq) - sc.r.begin();
        const double inside = bb > a ? sc.E[bb] - sc.E[a] : 0.0;
        const double clip = g.clipped(0, std::min(a, M), (double)(lq * s)) +
                            g.clipped(std::max(bb, a), M, (double)(hq * s));
        const double tot = g.total > 0.0 ? g.total : 1.0;
        mse[out] = (float)((inside + clip) / tot);
        cost[out] = (float)((inside + (double)gamma * clip) / tot);
      }
    }
  });
}

}  // namespace RQ_ISA
}  // namespace rq
