// Drivers that walk a Layout in parallel and hand constant-parameter runs to an op.
//   op.template run<false>(i0, n, p): n elements from i0 all use parameter p
//   op.template run<true >(i0, n, p): element k uses parameter p + k (per-element params)
// Reductions give each thread a private accumulator of L.nparam entries and merge them in
// thread order, so results are deterministic for a given thread count.
#pragma once
#include <vector>
#include "parallel.h"

namespace rq {

template <class Op>
inline void walk_piece(const Layout& L, Op& op, int64_t j0, int64_t j1, int64_t roff,
                       int64_t base) {
  const int64_t B = L.inner_block();
  if (B == 0) {
    op.template run<false>(roff + j0, j1 - j0, base);
  } else if (B == 1) {
    op.template run<true>(roff + j0, j1 - j0, base + j0);
  } else {
    for (int64_t j = j0; j < j1;) {
      int64_t jb = j / B, je = std::min<int64_t>(j1, (jb + 1) * B);
      op.template run<false>(roff + j, je - j, base + jb);
      j = je;
    }
  }
}

// op is copied per thread; op.bind(tid) lets it pick its private accumulators.
template <class Op>
void walk(const Layout& L, int nthreads, Op op) {
  const int nt = pick_threads(L.numel, nthreads);
  op.prepare(nt);
  parallel_slices(L.numel, nt, [&](int tid, int64_t b, int64_t e) {
    Op local = op;
    local.bind(tid);
    for_each_piece(L, b, e, [&](int64_t, int64_t j0, int64_t j1, int64_t roff, int64_t base) {
      walk_piece(L, local, j0, j1, roff, base);
    });
  });
  op.finish(nt);
}

// Elements per chunk for reductions: per-element terms go to a float buffer, the buffer is
// summed in 16 float lanes (vectorizable), and chunk sums add up in double.
constexpr int64_t kChunk = 1024;

inline double lane_sum(const float* r, int64_t n) {
  float acc[16] = {};
  int64_t k = 0;
  for (; k + 16 <= n; k += 16)
    for (int l = 0; l < 16; ++l) acc[l] += r[k + l];
  double t = 0.0;
  for (int l = 0; l < 16; ++l) t += acc[l];
  for (; k < n; ++k) t += r[k];
  return t;
}

// Base for ops without accumulators.
struct NoAccum {
  void prepare(int) {}
  void bind(int) {}
  void finish(int) {}
};

// Per-thread private accumulators of n entries each, for reductions.
template <class A>
struct Privates {
  std::vector<A>* store = nullptr;  // shared across copies of the op
  A* mine = nullptr;
  int64_t n = 0;
  void init(std::vector<A>& s, int nt, int64_t n_, A fill) {
    store = &s;
    n = n_;
    s.assign((size_t)(nt * n_), fill);
  }
  void bind(int tid) { mine = store->data() + (size_t)tid * n; }
  A* thread(int tid) { return store->data() + (size_t)tid * n; }
};

}  // namespace rq
