// Max pooling over channels-last (NDHWC; NHWC is D = 1) maps for CPU inference:
// y[n, ot, oy, ox, c] = max over the kt x k x k window at (ot*st, oy*s - p, ox*s - p) of
// x[n, ., ., ., c], windows clipped to the map (implicit -inf spatial padding; none in
// time), NaN propagating as in PyTorch's max_pool2d/3d. fp32 or bf16 (the maximum is one of
// its inputs, so bf16 is compared in fp32 and stored back exactly), or uint8: the codes of
// an int8 plan's per-tensor quantised activations, whose maximum is the code of the
// maximum (quantisation is monotonic), so pooling never leaves the integer domain.
//
// Why: oneDNN's convolutions leave their output channels-last, and PyTorch's CPU max pools
// on such a map also write the argmax indices nobody reads; on the ResNet-18 gate's stem
// (32 x 64 x 56 x 56, bf16) it takes 1.6 ms alone. Here each output pixel is the running
// maximum over C contiguous channels of at most kt*k*k input pixels, vectorised over C.
#include <nanobind/nanobind.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <vector>

#include "common.h"

namespace nb = nanobind;

namespace {

struct Pool {
  int64_t N, T, H, W, C, OT, OH, OW, kt, st, k, s, p;
};

#define VPURE_ISA_IMPL "pool_impl.inc"
#include "isa_copies.h"

template <typename T>
void run(const Pool& q, const T* x, T* y, bool portable) {
#ifdef VPURE_X86
  const bool avx2 = !portable && vpure::cpu_has_avx2();
#else
  (void)portable;
#endif
  const int64_t rows = q.N * q.OT * q.OH;
#pragma omp parallel
  {
    std::vector<float> acc((size_t)q.C);
#pragma omp for schedule(static)
    for (int64_t r = 0; r < rows; ++r) {
#ifdef VPURE_X86
      if (avx2) avx2::pool_row(q, x, y, r, acc.data());
      else
#endif
        base::pool_row(q, x, y, r, acc.data());
    }
  }
}

// Pointers come from the Python wrapper (vpure.kernels.pool), which checks device, dtype,
// layout and sizes and allocates the output; this entry point trusts them.
// dtype: 0 fp32, 1 bf16, 2 uint8.
void max_pool_entry(int dtype, uintptr_t x, uintptr_t y, int64_t N, int64_t T, int64_t H, int64_t W, int64_t C,
                    int64_t kt, int64_t st, int64_t k, int64_t s, int64_t p, bool portable) {
  if (N < 0 || T <= 0 || H <= 0 || W <= 0 || C <= 0 || kt <= 0 || st <= 0 || k <= 0 || s <= 0 || p < 0 ||
      2 * p > k)
    throw std::invalid_argument("max_pool_ndhwc: bad sizes");
  const Pool q{N, T, H, W, C, (T - kt) / st + 1, (H + 2 * p - k) / s + 1, (W + 2 * p - k) / s + 1, kt, st, k, s, p};
  if (T < kt || q.OH <= 0 || q.OW <= 0) throw std::invalid_argument("max_pool_ndhwc: window larger than the map");
  if (dtype == 1)
    run(q, reinterpret_cast<const uint16_t*>(x), reinterpret_cast<uint16_t*>(y), portable);
  else if (dtype == 2)
    run(q, reinterpret_cast<const uint8_t*>(x), reinterpret_cast<uint8_t*>(y), portable);
  else if (dtype == 0)
    run(q, reinterpret_cast<const float*>(x), reinterpret_cast<float*>(y), portable);
  else
    throw std::invalid_argument("max_pool_ndhwc: dtype must be 0 (fp32), 1 (bf16) or 2 (uint8)");
}

}  // namespace

void register_pool(nb::module_& m) {
  m.def("max_pool_ndhwc", &max_pool_entry, nb::arg("dtype"), nb::arg("x"), nb::arg("y"), nb::arg("N"), nb::arg("T"),
        nb::arg("H"), nb::arg("W"), nb::arg("C"), nb::arg("kt"), nb::arg("st"), nb::arg("k"), nb::arg("s"),
        nb::arg("p"), nb::arg("portable") = false, nb::call_guard<nb::gil_scoped_release>(),
        "Raw-pointer entry for vpure.kernels.pool.max_pool2d / max_pool3d (use those).");
}
