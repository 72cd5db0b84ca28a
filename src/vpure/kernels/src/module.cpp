// vpure.kernels._native: CPU kernels for block matching, warp-L1, small-head attention,
// channels-last max pooling and separable (antialiased) resizing.
#include <nanobind/nanobind.h>
#include <nanobind/stl/string.h>

#include "common.h"

namespace nb = nanobind;

void register_block_match(nb::module_ &m);
void register_warp_l1(nb::module_ &m);
void register_attention(nb::module_ &m);
void register_pool(nb::module_ &m);
void register_resize(nb::module_ &m);
void register_group_norm(nb::module_ &m);

NB_MODULE(_native, m) {
  m.doc() = "vpure native CPU kernels";
  m.def("build_info", []() {
    nb::dict d;
#ifdef VPURE_HAVE_OPENMP
    d["openmp"] = true;
#else
    d["openmp"] = false;
#endif
    d["max_threads"] = vpure::max_threads();
    d["avx2"] = vpure::cpu_has_avx2();
#if defined(__VERSION__)
    d["compiler"] = std::string(__VERSION__);
#endif
    return d;
  }, "Compile-time and run-time facts: OpenMP, thread count, AVX2 dispatch, compiler.");
  m.def("set_num_threads", [](int n) { vpure::set_threads(n); }, nb::arg("n"),
        "Threads used by the native kernels (OpenMP).");
  register_block_match(m);
  register_warp_l1(m);
  register_attention(m);
  register_pool(m);
  register_resize(m);
  register_group_norm(m);
}
