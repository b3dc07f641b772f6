// Fused MSE / SQNR range search: score K candidate encodings per group against the
// group's histogram in one call. Bin midpoints stand in for the data.
#include <cmath>
#include <vector>
#include "parallel.h"
#include "rapidquant/kernels.h"

namespace rq {

void range_search_cpu(const float* hist, const float* lo, const float* hi, int64_t C, int64_t B,
                      const float* scale, int64_t K1, const float* zp, int64_t K2, bool product,
                      int qmin, int qmax, float gamma, float* mse, float* cost, int nthreads) {
  RQ_CHECK(B >= 1, "histograms need at least one bin");
  RQ_CHECK(qmin < qmax, "qmin (" << qmin << ") must be smaller than qmax (" << qmax << ")");
  RQ_CHECK(product || K1 == K2, "paired candidates need as many scales as zero points");
  const int64_t K = product ? K1 * K2 : K1;
  const int nt = pick_threads(C * K * B / 8, nthreads);
  parallel_slices(C * K, nt, [&](int, int64_t b, int64_t e) {
    std::vector<float> mids, counts;
    int64_t cur_c = -1;
    double total = 0.0;
    for (int64_t ck = b; ck < e; ++ck) {
      const int64_t c = ck / K, k = ck % K;
      if (c != cur_c) {  // gather the non-empty bins of this group once
        cur_c = c;
        mids.clear();
        counts.clear();
        total = 0.0;
        const float w = (hi[c] - lo[c]) / (float)B;
        for (int64_t j = 0; j < B; ++j) {
          const float n = hist[c * B + j];
          if (n != 0.f) {
            mids.push_back(lo[c] + ((float)j + 0.5f) * w);
            counts.push_back(n);
            total += n;
          }
        }
      }
      const int64_t k1 = product ? k / K2 : k, k2 = product ? k % K2 : k;
      const float s = scale[c * K1 + k1], z = zp[c * K2 + k2];
      const float lq = (float)qmin - z, hq = (float)qmax - z;
      double se = 0.0, sc = 0.0;
      if (!(s > 0.f) || !std::isfinite(s)) {
        se = sc = std::numeric_limits<double>::infinity();
      } else {
        for (size_t j = 0; j < mids.size(); ++j) {
          const float v = mids[j] / s;
          const float vc = v < -4194304.f ? -4194304.f : (v > 4194304.f ? 4194304.f : v);
          const float r = rint_small(vc);
          const bool clipped = r < lq || r > hq;
          const float rc = r < lq ? lq : (r > hq ? hq : r);
          const float err = rc * s - mids[j];
          const double e2 = (double)counts[j] * (double)err * (double)err;
          se += e2;
          sc += clipped ? (double)gamma * e2 : e2;
        }
        if (total > 0.0) {
          se /= total;
          sc /= total;
        }
      }
      mse[ck] = (float)se;
      cost[ck] = (float)sc;
    }
  });
}

}  // namespace rq
