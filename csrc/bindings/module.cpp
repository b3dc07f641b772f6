// The only pybind11 code: integers and pointers in, GIL released, C++ errors -> Python.
// std::invalid_argument becomes ValueError, std::runtime_error becomes RuntimeError.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <vector>

#include "rapidquant/kernels.h"

namespace py = pybind11;
using rq::DType;
using rq::Layout;
using Shape = std::vector<int64_t>;

namespace {

template <class T> T* P(uintptr_t p) { return reinterpret_cast<T*>(p); }

Layout layout_of(const Shape& shape, const Shape& block) {
  RQ_CHECK(shape.size() == block.size(), "shape and block must have the same length");
  return rq::make_layout((int)shape.size(), shape.data(), block.data());
}

py::list cuda_archs() {
  py::list out;
#ifdef RAPIDQUANT_CUDA_ARCHS
  std::string s = RAPIDQUANT_CUDA_ARCHS, cur;
  for (char c : s + ",") {
    if (c == ',') { if (!cur.empty()) out.append(cur); cur.clear(); } else cur += c;
  }
#endif
  return out;
}

#define RQ_NOGIL py::call_guard<py::gil_scoped_release>()

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "rapidquant compiled kernels (torch-free; called through rapidquant.ops)";
#ifdef RAPIDQUANT_WITH_CUDA
  m.attr("with_cuda") = true;
  m.attr("cuda_version") = RAPIDQUANT_CUDA_VERSION;
#else
  m.attr("with_cuda") = false;
  m.attr("cuda_version") = py::none();
#endif
#ifdef RAPIDQUANT_WITH_OPENMP
  m.attr("with_openmp") = true;
#else
  m.attr("with_openmp") = false;
#endif
  m.attr("cuda_archs") = cuda_archs();
  m.attr("version") = RAPIDQUANT_VERSION;

  m.def("cpu_isa", []() { return std::string(rq::cpu_isa()); },
        "Instruction set the CPU kernels use: avx512, avx2 or base.");
  m.def("set_cpu_isa", [](const std::string& name) { rq::set_cpu_isa(name.c_str()); },
        "Force the CPU kernels' instruction set (base, avx2, avx512).");

  m.def("layout", [](const Shape& shape, const Shape& block) {
    Layout L = layout_of(shape, block);
    Shape sz(L.size, L.size + L.ndim), bl(L.block, L.block + L.ndim);
    return py::make_tuple(sz, bl, L.nparam);
  }, "Collapsed (sizes, blocks, nparam) of a shape against a per-dim block spec (0 = broadcast).");

  // ---------------- CPU ----------------
  m.def("qdq_cpu", [](uintptr_t x, uintptr_t y, int dt, const Shape& shape, const Shape& block,
                      uintptr_t s, uintptr_t z, int qmin, int qmax, int nt) {
    rq::qdq_cpu(P<const void>(x), P<void>(y), (DType)dt, layout_of(shape, block),
                P<const float>(s), P<const float>(z), qmin, qmax, nt);
  }, RQ_NOGIL);
  m.def("quantize_cpu", [](uintptr_t x, int dt, uintptr_t q, int qt, const Shape& shape,
                           const Shape& block, uintptr_t s, uintptr_t z, int qmin, int qmax, int nt) {
    rq::quantize_cpu(P<const void>(x), (DType)dt, P<void>(q), (rq::IType)qt,
                     layout_of(shape, block), P<const float>(s), P<const float>(z), qmin, qmax, nt);
  }, RQ_NOGIL);
  m.def("dequantize_cpu", [](uintptr_t q, int qt, uintptr_t y, int dt, const Shape& shape,
                             const Shape& block, uintptr_t s, uintptr_t z, int nt) {
    rq::dequantize_cpu(P<const void>(q), (rq::IType)qt, P<void>(y), (DType)dt,
                       layout_of(shape, block), P<const float>(s), P<const float>(z), nt);
  }, RQ_NOGIL);
  m.def("qdq_backward_cpu", [](uintptr_t x, uintptr_t dy, uintptr_t dx, int dt, const Shape& shape,
                               const Shape& block, uintptr_t s, uintptr_t z, int qmin, int qmax,
                               uintptr_t ds, uintptr_t dz, int nt) {
    rq::qdq_backward_cpu(P<const void>(x), P<const void>(dy), P<void>(dx), (DType)dt,
                         layout_of(shape, block), P<const float>(s), P<const float>(z), qmin,
                         qmax, P<float>(ds), P<float>(dz), nt);
  }, RQ_NOGIL);
  m.def("qdq_drop_cpu", [](uintptr_t x, uintptr_t y, int dt, const Shape& shape, const Shape& block,
                           uintptr_t s, uintptr_t z, int qmin, int qmax, uint64_t seed, uint32_t thr, int nt) {
    rq::qdq_drop_cpu(P<const void>(x), P<void>(y), (DType)dt, layout_of(shape, block),
                     P<const float>(s), P<const float>(z), qmin, qmax, seed, thr, nt);
  }, RQ_NOGIL);
  m.def("qdq_drop_backward_cpu", [](uintptr_t x, uintptr_t dy, uintptr_t dx, int dt, const Shape& shape,
                                    const Shape& block, uintptr_t s, uintptr_t z, int qmin, int qmax,
                                    uint64_t seed, uint32_t thr, uintptr_t ds, uintptr_t dz, int nt) {
    rq::qdq_drop_backward_cpu(P<const void>(x), P<const void>(dy), P<void>(dx), (DType)dt,
                              layout_of(shape, block), P<const float>(s), P<const float>(z), qmin,
                              qmax, seed, thr, P<float>(ds), P<float>(dz), nt);
  }, RQ_NOGIL);
  m.def("drop_select_cpu", [](uintptr_t a, uintptr_t b, uintptr_t out, int dt, const Shape& shape,
                              uint64_t seed, uint32_t thr, int nt) {
    rq::drop_select_cpu(P<const void>(a), P<const void>(b), P<void>(out), (DType)dt,
                        layout_of(shape, Shape(shape.size(), 0)), seed, thr, nt);
  }, RQ_NOGIL);
  m.def("float_qdq_cpu", [](uintptr_t x, uintptr_t y, int dt, const Shape& shape,
                            const Shape& block, uintptr_t s, int fmt, int nt) {
    rq::float_qdq_cpu(P<const void>(x), P<void>(y), (DType)dt, layout_of(shape, block),
                      P<const float>(s), (rq::FloatFormat)fmt, nt);
  }, RQ_NOGIL);
  m.def("minmax_cpu", [](uintptr_t x, int dt, const Shape& shape, const Shape& block,
                         uintptr_t mn, uintptr_t mx, int nt) {
    rq::minmax_cpu(P<const void>(x), (DType)dt, layout_of(shape, block), P<float>(mn),
                   P<float>(mx), nt);
  }, RQ_NOGIL);
  m.def("histogram_cpu", [](uintptr_t x, int dt, const Shape& shape, const Shape& block,
                            uintptr_t lo, uintptr_t hi, int bins, bool clamp, uintptr_t counts,
                            int nt) {
    rq::histogram_cpu(P<const void>(x), (DType)dt, layout_of(shape, block), P<const float>(lo),
                      P<const float>(hi), bins, clamp, P<int64_t>(counts), nt);
  }, RQ_NOGIL);
  m.def("range_search_cpu", [](uintptr_t hist, uintptr_t lo, uintptr_t hi, int64_t C, int64_t B,
                               uintptr_t s, int64_t K1, uintptr_t z, int64_t K2, bool product,
                               int qmin, int qmax, float gamma, uintptr_t mse, uintptr_t cost,
                               int nt) {
    rq::range_search_cpu(P<const float>(hist), P<const float>(lo), P<const float>(hi), C, B,
                         P<const float>(s), K1, P<const float>(z), K2, product, qmin, qmax,
                         gamma, P<float>(mse), P<float>(cost), nt);
  }, RQ_NOGIL);
  m.def("adaround_forward_cpu", [](uintptr_t w, uintptr_t v, uintptr_t out, const Shape& shape,
                                   const Shape& block, uintptr_t s, uintptr_t z, int qmin,
                                   int qmax, float beta, bool hard, int nt) {
    return rq::adaround_forward_cpu(P<const float>(w), P<const float>(v), P<float>(out),
                                    layout_of(shape, block), P<const float>(s),
                                    P<const float>(z), qmin, qmax, beta, hard, nt);
  }, RQ_NOGIL);
  m.def("adaround_backward_cpu", [](uintptr_t w, uintptr_t v, uintptr_t dout, uintptr_t dv,
                                    const Shape& shape, const Shape& block, uintptr_t s,
                                    uintptr_t z, int qmin, int qmax, float beta, uintptr_t lam, int nt) {
    rq::adaround_backward_cpu(P<const float>(w), P<const float>(v), P<const float>(dout),
                              P<float>(dv), layout_of(shape, block), P<const float>(s),
                              P<const float>(z), qmin, qmax, beta, P<const float>(lam), nt);
  }, RQ_NOGIL);

#ifdef RAPIDQUANT_WITH_CUDA
  // ---------------- CUDA (stream passed as an integer) ----------------
  m.def("qdq_cuda", [](uintptr_t x, uintptr_t y, int dt, const Shape& shape, const Shape& block,
                       uintptr_t s, uintptr_t z, int qmin, int qmax, uintptr_t st) {
    rq::qdq_cuda(P<const void>(x), P<void>(y), (DType)dt, layout_of(shape, block),
                 P<const float>(s), P<const float>(z), qmin, qmax, st);
  }, RQ_NOGIL);
  m.def("quantize_cuda", [](uintptr_t x, int dt, uintptr_t q, int qt, const Shape& shape,
                            const Shape& block, uintptr_t s, uintptr_t z, int qmin, int qmax,
                            uintptr_t st) {
    rq::quantize_cuda(P<const void>(x), (DType)dt, P<void>(q), (rq::IType)qt,
                      layout_of(shape, block), P<const float>(s), P<const float>(z), qmin, qmax, st);
  }, RQ_NOGIL);
  m.def("dequantize_cuda", [](uintptr_t q, int qt, uintptr_t y, int dt, const Shape& shape,
                              const Shape& block, uintptr_t s, uintptr_t z, uintptr_t st) {
    rq::dequantize_cuda(P<const void>(q), (rq::IType)qt, P<void>(y), (DType)dt,
                        layout_of(shape, block), P<const float>(s), P<const float>(z), st);
  }, RQ_NOGIL);
  m.def("qdq_backward_cuda", [](uintptr_t x, uintptr_t dy, uintptr_t dx, int dt,
                                const Shape& shape, const Shape& block, uintptr_t s, uintptr_t z,
                                int qmin, int qmax, uintptr_t ds, uintptr_t dz, uintptr_t st) {
    rq::qdq_backward_cuda(P<const void>(x), P<const void>(dy), P<void>(dx), (DType)dt,
                          layout_of(shape, block), P<const float>(s), P<const float>(z), qmin,
                          qmax, P<float>(ds), P<float>(dz), st);
  }, RQ_NOGIL);
  m.def("qdq_drop_cuda", [](uintptr_t x, uintptr_t y, int dt, const Shape& shape, const Shape& block,
                            uintptr_t s, uintptr_t z, int qmin, int qmax, uint64_t seed, uint32_t thr,
                            uintptr_t stream) {
    rq::qdq_drop_cuda(P<const void>(x), P<void>(y), (DType)dt, layout_of(shape, block),
                      P<const float>(s), P<const float>(z), qmin, qmax, seed, thr, stream);
  }, RQ_NOGIL);
  m.def("qdq_drop_backward_cuda", [](uintptr_t x, uintptr_t dy, uintptr_t dx, int dt,
                                     const Shape& shape, const Shape& block, uintptr_t s, uintptr_t z,
                                     int qmin, int qmax, uint64_t seed, uint32_t thr, uintptr_t ds,
                                     uintptr_t dz, uintptr_t stream) {
    rq::qdq_drop_backward_cuda(P<const void>(x), P<const void>(dy), P<void>(dx), (DType)dt,
                               layout_of(shape, block), P<const float>(s), P<const float>(z), qmin,
                               qmax, seed, thr, P<float>(ds), P<float>(dz), stream);
  }, RQ_NOGIL);
  m.def("drop_select_cuda", [](uintptr_t a, uintptr_t b, uintptr_t out, int dt, const Shape& shape,
                               uint64_t seed, uint32_t thr, uintptr_t stream) {
    rq::drop_select_cuda(P<const void>(a), P<const void>(b), P<void>(out), (DType)dt,
                         layout_of(shape, Shape(shape.size(), 0)), seed, thr, stream);
  }, RQ_NOGIL);
  m.def("float_qdq_cuda", [](uintptr_t x, uintptr_t y, int dt, const Shape& shape,
                             const Shape& block, uintptr_t s, int fmt, uintptr_t st) {
    rq::float_qdq_cuda(P<const void>(x), P<void>(y), (DType)dt, layout_of(shape, block),
                       P<const float>(s), (rq::FloatFormat)fmt, st);
  }, RQ_NOGIL);
  m.def("minmax_cuda", [](uintptr_t x, int dt, const Shape& shape, const Shape& block,
                          uintptr_t mn, uintptr_t mx, uintptr_t nanflag, uintptr_t st) {
    rq::minmax_cuda(P<const void>(x), (DType)dt, layout_of(shape, block), P<float>(mn),
                    P<float>(mx), P<int32_t>(nanflag), st);
  }, RQ_NOGIL);
  m.def("histogram_cuda", [](uintptr_t x, int dt, const Shape& shape, const Shape& block,
                             uintptr_t lo, uintptr_t hi, int bins, bool clamp, uintptr_t counts,
                             uintptr_t st) {
    rq::histogram_cuda(P<const void>(x), (DType)dt, layout_of(shape, block), P<const float>(lo),
                       P<const float>(hi), bins, clamp, P<int64_t>(counts), st);
  }, RQ_NOGIL);
  m.def("range_search_cuda", [](uintptr_t hist, uintptr_t lo, uintptr_t hi, int64_t C, int64_t B,
                                uintptr_t s, int64_t K1, uintptr_t z, int64_t K2, bool product,
                                int qmin, int qmax, float gamma, uintptr_t mse, uintptr_t cost,
                                uintptr_t st) {
    rq::range_search_cuda(P<const float>(hist), P<const float>(lo), P<const float>(hi), C, B,
                          P<const float>(s), K1, P<const float>(z), K2, product, qmin, qmax,
                          gamma, P<float>(mse), P<float>(cost), st);
  }, RQ_NOGIL);
  m.def("adaround_forward_cuda", [](uintptr_t w, uintptr_t v, uintptr_t out, const Shape& shape,
                                    const Shape& block, uintptr_t s, uintptr_t z, int qmin,
                                    int qmax, float beta, bool hard, uintptr_t reg, uintptr_t st) {
    rq::adaround_forward_cuda(P<const float>(w), P<const float>(v), P<float>(out),
                              layout_of(shape, block), P<const float>(s), P<const float>(z),
                              qmin, qmax, beta, hard, P<float>(reg), st);
  }, RQ_NOGIL);
  m.def("adaround_backward_cuda", [](uintptr_t w, uintptr_t v, uintptr_t dout, uintptr_t dv,
                                     const Shape& shape, const Shape& block, uintptr_t s,
                                     uintptr_t z, int qmin, int qmax, float beta, uintptr_t lam,
                                     uintptr_t st) {
    rq::adaround_backward_cuda(P<const float>(w), P<const float>(v), P<const float>(dout),
                               P<float>(dv), layout_of(shape, block), P<const float>(s),
                               P<const float>(z), qmin, qmax, beta, P<const float>(lam), st);
  }, RQ_NOGIL);
#endif
}
