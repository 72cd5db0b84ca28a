// Fused warp-L1 loss and gradient (api.md `warp_l1_grad`, spec/videopure.md L_temp).
//
// x (B, C, T, h, w), flow (B, T-1, 2, h, w) with flow[:, i, 0] = dx, flow[:, i, 1] = dy.
// L[b] = sum_i mean_{c,y,x} |Warp(x[b, :, i+1], flow[b, i]) - x[b, :, i]|, Warp sampling
// frame i+1 bilinearly at (x + dx, y + dy) with zero padding (align_corners=True pixel
// coordinates). Gradient: -sign(d)/n into frame i; with detach_warp=false also
// sign(d)/n times the bilinear weights into frame i+1's four source pixels. That scatter
// runs sequentially inside one (b, i) task into a buffer no other task writes, and the
// buffers are added afterwards, so the result is deterministic for any thread count.
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>

#include <cmath>
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <vector>

#include "common.h"


namespace nb = nanobind;

namespace {

using In5 = nb::ndarray<const float, nb::ndim<5>, nb::c_contig, nb::device::cpu>;

#define VPURE_ISA_IMPL "warp_l1_impl.inc"
#include "isa_copies.h"

nb::tuple warp_l1_grad_impl(In5 x, In5 flow, bool detach_warp, bool need_grad) {
  const int64_t B = x.shape(0), C = x.shape(1), T = x.shape(2), h = x.shape(3), w = x.shape(4);
  if (T < 2) throw std::invalid_argument("warp_l1: need at least 2 frames");
  if ((int64_t)flow.shape(0) != B || (int64_t)flow.shape(1) != T - 1 || flow.shape(2) != 2 ||
      (int64_t)flow.shape(3) != h || (int64_t)flow.shape(4) != w)
    throw std::invalid_argument("warp_l1: flow must be (B, T-1, 2, h, w) matching x");
  const int64_t hw = h * w, pairs = B * (T - 1);
  const double inv_n = 1.0 / (double)(C * hw);
  const size_t numel = (size_t)(B * C * T * hw);

  float *grad = need_grad ? new float[numel]() : nullptr;
  std::vector<float> scatter(need_grad && !detach_warp ? numel : 0, 0.0f);
  std::vector<double> partial((size_t)pairs, 0.0);
  const float *X = x.data(), *F = flow.data();
  {
    nb::gil_scoped_release nogil;
    const float s_pos = (float)inv_n;
#ifdef VPURE_X86
    const bool avx2 = vpure::cpu_has_avx2();
#endif
#pragma omp parallel
    {
      std::vector<int32_t> idx((size_t)(4 * hw));
      std::vector<float> wt((size_t)(4 * hw)), absd((size_t)hw);
#pragma omp for schedule(static)
      for (int64_t task = 0; task < pairs; ++task) {
        const int64_t b = task / (T - 1), i = task % (T - 1);
        const float *fx = F + ((b * (T - 1) + i) * 2) * hw, *fy = fx + hw;
#ifdef VPURE_X86
        if (avx2) avx2::pair_corners(fx, fy, h, w, idx.data(), wt.data());
        else
#endif
          base::pair_corners(fx, fy, h, w, idx.data(), wt.data());
        std::fill(absd.begin(), absd.end(), 0.0f);
        for (int64_t c = 0; c < C; ++c) {
          const int64_t base_i = ((b * C + c) * T + i) * hw, base_n = base_i + hw;
          float *gi = need_grad ? grad + base_i : nullptr;
#ifdef VPURE_X86
          if (avx2) avx2::pair_channel(X + base_i, X + base_n, idx.data(), wt.data(), hw, absd.data(), gi, s_pos);
          else
#endif
            base::pair_channel(X + base_i, X + base_n, idx.data(), wt.data(), hw, absd.data(), gi, s_pos);
          if (gi && !detach_warp) {  // sequential within the task: deterministic
            float *sn = scatter.data() + base_n;
            for (int k = 0; k < 4; ++k) {
              const int32_t *ik = idx.data() + k * hw;
              const float *wk = wt.data() + k * hw;
              for (int64_t p = 0; p < hw; ++p) sn[ik[p]] -= gi[p] * wk[p];  // -gi = sign(d)/n
            }
          }
        }
        double acc = 0.0;
        for (int64_t p = 0; p < hw; ++p) acc += (double)absd[(size_t)p];
        partial[(size_t)task] = acc;
      }
    }
    if (need_grad && !detach_warp) {
#pragma omp parallel for schedule(static)
      for (int64_t e = 0; e < (int64_t)numel; ++e) grad[e] += scatter[(size_t)e];
    }
  }
  float *loss = new float[(size_t)B];
  for (int64_t b = 0; b < B; ++b) {
    double s = 0.0;
    for (int64_t i = 0; i < T - 1; ++i) s += partial[(size_t)(b * (T - 1) + i)];
    loss[b] = (float)(s * inv_n);
  }
  nb::capsule own_loss(loss, [](void *p) noexcept { delete[] (float *)p; });
  size_t lshape[1] = {(size_t)B};
  auto loss_arr = nb::ndarray<nb::numpy, float, nb::ndim<1>>(loss, 1, lshape, own_loss);
  if (!need_grad) return nb::make_tuple(loss_arr, nb::none());
  nb::capsule own_grad(grad, [](void *p) noexcept { delete[] (float *)p; });
  size_t gshape[5] = {(size_t)B, (size_t)C, (size_t)T, (size_t)h, (size_t)w};
  return nb::make_tuple(loss_arr, nb::ndarray<nb::numpy, float, nb::ndim<5>>(grad, 5, gshape, own_grad));
}

}  // namespace

void register_warp_l1(nb::module_ &m) {
  m.def("warp_l1_grad", &warp_l1_grad_impl, nb::arg("x"), nb::arg("flow"), nb::arg("detach_warp") = true,
        nb::arg("need_grad") = true,
        "warp_l1_grad(x (B,C,T,h,w) f32, flow (B,T-1,2,h,w) f32, detach_warp, need_grad) -> "
        "(loss (B,) f32, grad like x or None)");
}
