// Separable resampling of image planes with precomputed taps, for CPU inference:
// out[p, oy, ox] = sum_i sum_j wy[oy, i] * wx[ox, j] * in[p, ys[oy] + i, xs[ox] + j]
// over i < ny[oy], j < nx[ox] (the taps of an antialiased bilinear resize as PyTorch
// computes them, built in vpure.kernels.resize). fp32.
//
// Why: the gate sees each frame at 112 px; PyTorch's antialiased interpolate takes 4 ms
// for 32 frames from 224 px on two cores, several times what the arithmetic needs. Here
// each output row is first reduced vertically over whole input rows (contiguous,
// vectorised), then horizontally from that one row; one task per plane.
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>

#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "common.h"

namespace nb = nanobind;

namespace {

using Planes = nb::ndarray<const float, nb::ndim<3>, nb::c_contig, nb::device::cpu>;
using OutPlanes = nb::ndarray<float, nb::ndim<3>, nb::c_contig, nb::device::cpu>;
using Starts = nb::ndarray<const int64_t, nb::ndim<1>, nb::c_contig, nb::device::cpu>;
using Weights = nb::ndarray<const float, nb::ndim<2>, nb::c_contig, nb::device::cpu>;

struct Axis {
  const int64_t *start, *count;
  const float* w;
  int64_t out, taps;  // output size, row length of w
};

#define VPURE_ISA_IMPL "resize_impl.inc"
#include "isa_copies.h"

Axis axis(const Starts& start, const Starts& count, const Weights& w, int64_t in, const char* name) {
  const int64_t n = (int64_t)start.shape(0);
  if ((int64_t)count.shape(0) != n || (int64_t)w.shape(0) != n)
    throw std::invalid_argument(std::string("resample_planes: ") + name + " taps disagree in length");
  const Axis a{start.data(), count.data(), w.data(), n, (int64_t)w.shape(1)};
  for (int64_t o = 0; o < n; ++o)
    if (a.start[o] < 0 || a.count[o] < 1 || a.count[o] > a.taps || a.start[o] + a.count[o] > in)
      throw std::invalid_argument(std::string("resample_planes: ") + name + " tap outside the input");
  return a;
}

void resample_planes(Planes x, OutPlanes y, Starts ys, Starts ny, Weights wy, Starts xs, Starts nx, Weights wx,
                     bool portable) {
  const int64_t P = x.shape(0), H = x.shape(1), W = x.shape(2);
  const Axis ay = axis(ys, ny, wy, H, "row"), ax = axis(xs, nx, wx, W, "column");
  if ((int64_t)y.shape(0) != P || (int64_t)y.shape(1) != ay.out || (int64_t)y.shape(2) != ax.out)
    throw std::invalid_argument("resample_planes: output shape does not match the taps");
  const float* X = x.data();
  float* Y = y.data();
  nb::gil_scoped_release nogil;
#ifdef VPURE_X86
  const bool avx2 = !portable && vpure::cpu_has_avx2();
#else
  (void)portable;
#endif
#pragma omp parallel
  {
    std::vector<float> row((size_t)W);
#pragma omp for schedule(static)
    for (int64_t p = 0; p < P; ++p) {
#ifdef VPURE_X86
      if (avx2) avx2::plane(X + p * H * W, Y + p * ay.out * ax.out, W, ay, ax, row.data());
      else
#endif
        base::plane(X + p * H * W, Y + p * ay.out * ax.out, W, ay, ax, row.data());
    }
  }
}

}  // namespace

void register_resize(nb::module_& m) {
  m.def("resample_planes", &resample_planes, nb::arg("x"), nb::arg("y"), nb::arg("row_start"), nb::arg("row_count"),
        nb::arg("row_weights"), nb::arg("col_start"), nb::arg("col_count"), nb::arg("col_weights"),
        nb::arg("portable") = false,
        "resample_planes(x (P,H,W) f32, y (P,h,w) f32 out, row taps (h,), (h,), (h,K), column taps (w,), (w,), "
        "(w,K)): separable resampling with the given taps (vpure.kernels.resize)");
}
