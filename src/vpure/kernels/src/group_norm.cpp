// Group normalisation (optionally followed by SiLU) of (N, C, H, W) maps for CPU inference,
// in either memory layout: NCHW (each channel's plane contiguous) or channels-last (NHWC,
// each pixel's channels contiguous).
//
//   y[n, c, p] = act((x[n, c, p] - mean[n, g]) * rstd[n, g] * gamma[c] + beta[c]),  g = c / (C / G)
//
// with mean and (biased) variance over the group's C/G channels and H*W pixels, rstd =
// 1 / sqrt(var + eps), act the identity or SiLU (y * sigmoid(y)). fp32 or bf16 tensors;
// arithmetic in fp32, statistics accumulated in double about a per-channel shift (the
// channel's first value), so a large mean does not cancel the variance; bf16 outputs
// rounded to nearest even, once (after the activation).
//
// Why: Inductor's generated kernel for GroupNorm + SiLU on a channels-last map with two
// channels per group (the `small` VAE decoder's 64 channels in 32 groups at 112 px) took
// 10 ms per 8 frames against ~2.7 ms eager; the decoder's norms were two thirds of a
// compiled decode on the 2-vCPU Xeon. Here each sample is read twice (statistics, then
// normalisation, on one thread while it is still in cache) and written once, vectorised
// over channels (NHWC) or pixels (NCHW).
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

struct GN {
  int64_t N, C, HW, G;
  const float* gamma;  // C values or null (1)
  const float* beta;   // C values or null (0)
  bool silu;
};

// Subnormal floats flushed to zero (inputs and results) for the kernel's duration, per
// thread: the vectorised SiLU also evaluates its clamped-out branch (x / (1 + e^87)) in
// every lane, whose subnormal results cost a microcode assist each (a 3x slower SiLU on
// the Xeon); a subnormal activation is zero to a normalisation anyway.
struct FlushSubnormals {
#ifdef VPURE_X86
  unsigned saved = _mm_getcsr();
  FlushSubnormals() { _mm_setcsr(saved | 0x8040u); }  // FTZ | DAZ
  ~FlushSubnormals() { _mm_setcsr(saved); }
#endif
};

#define VPURE_ISA_IMPL "group_norm_impl.inc"
#include "isa_copies.h"

// A third copy in 16-float vectors: the SiLU's exponential is arithmetic-bound, twice the
// AVX2 copy's rate where AVX-512 runs.
#ifdef VPURE_X86
#pragma GCC push_options
#pragma GCC target("avx512f,avx512dq,avx512bw,avx512vl,avx2,prefer-vector-width=512")
#define VPURE_NS avx512
#define VPURE_AVX2 1
#include "group_norm_impl.inc"
#undef VPURE_AVX2
#undef VPURE_NS
#pragma GCC pop_options
#endif

// a[c] = rstd * gamma[c], b[c] = beta[c] - mean * a[c] for one sample, from its channels'
// sums of x - shift[c] and of the squares over all HW pixels.
void coefficients(const GN& q, const float* shift, const double* sum, const double* sq, float* a, float* b,
                  double eps) {
  const int64_t cg = q.C / q.G;
  const double hw = double(q.HW), count = double(cg) * hw;
  for (int64_t g = 0; g < q.G; ++g) {
    double total = 0.0;
    for (int64_t c = g * cg; c < (g + 1) * cg; ++c) total += sum[c] + double(shift[c]) * hw;
    const double mean = total / count;
    double m2 = 0.0;  // the group's sum of (x - mean)^2, from each channel's shifted sums
    for (int64_t c = g * cg; c < (g + 1) * cg; ++c) {
      const double d = double(shift[c]) - mean;
      m2 += sq[c] + 2.0 * d * sum[c] + hw * d * d;
    }
    const double rstd = 1.0 / std::sqrt(std::max(m2 / count, 0.0) + eps);
    for (int64_t c = g * cg; c < (g + 1) * cg; ++c) {
      const double sc = rstd * (q.gamma ? double(q.gamma[c]) : 1.0);
      a[c] = float(sc);
      b[c] = float((q.beta ? double(q.beta[c]) : 0.0) - mean * sc);
    }
  }
}

template <typename T>
void run(const GN& q, bool channels_last, const T* x, T* y, double eps, bool portable) {
#ifdef VPURE_X86
  const bool avx512 = !portable && vpure::cpu_has_avx512(), avx2 = !portable && vpure::cpu_has_avx2();
#else
  (void)portable;
#endif
  const int64_t N = q.N, C = q.C, HW = q.HW;
  auto stats = [&](const float* shift, double* sum, double* sq, int64_t n, int64_t p0, int64_t p1) {
#ifdef VPURE_X86
    if (avx512) return avx512::stats(q, channels_last, x, shift, sum, sq, n, p0, p1);
    if (avx2) return avx2::stats(q, channels_last, x, shift, sum, sq, n, p0, p1);
#endif
    base::stats(q, channels_last, x, shift, sum, sq, n, p0, p1);
  };
  auto normalise = [&](const float* a, const float* b, int64_t n, int64_t p0, int64_t p1) {
#ifdef VPURE_X86
    if (avx512) return avx512::normalise(q, channels_last, x, y, a, b, n, p0, p1);
    if (avx2) return avx2::normalise(q, channels_last, x, y, a, b, n, p0, p1);
#endif
    base::normalise(q, channels_last, x, y, a, b, n, p0, p1);
  };
  auto first_values = [&](int64_t n, float* shift) {  // each channel's first value: the shift
    for (int64_t c = 0; c < C; ++c) shift[c] = base::widen(channels_last ? x[n * HW * C + c] : x[(n * C + c) * HW]);
  };
  const int64_t threads = vpure::max_threads();
  if (N >= threads) {
    // One sample per task, its statistics then its normalisation while it is still in cache
    // (a 64-channel 112 px bf16 frame is 1.6 MB).
#pragma omp parallel
    {
      FlushSubnormals ftz;
      std::vector<float> shift((size_t)C), a((size_t)C), b((size_t)C);
      std::vector<double> sum((size_t)C), sq((size_t)C);
#pragma omp for schedule(static)
      for (int64_t n = 0; n < N; ++n) {
        first_values(n, shift.data());
        std::fill(sum.begin(), sum.end(), 0.0);
        std::fill(sq.begin(), sq.end(), 0.0);
        stats(shift.data(), sum.data(), sq.data(), n, 0, HW);
        coefficients(q, shift.data(), sum.data(), sq.data(), a.data(), b.data(), eps);
        normalise(a.data(), b.data(), n, 0, HW);
      }
    }
    return;
  }
  // Fewer samples than threads: each sample's pixels in pieces, all statistics first.
  const int64_t pieces = (threads + N - 1) / N, rows = (HW + pieces - 1) / pieces, tasks = N * pieces;
  std::vector<float> shift((size_t)(N * C)), a((size_t)(N * C)), b((size_t)(N * C));
  std::vector<double> sum((size_t)(tasks * C), 0.0), sq((size_t)(tasks * C), 0.0);
  for (int64_t n = 0; n < N; ++n) first_values(n, shift.data() + n * C);
#pragma omp parallel
  {
    FlushSubnormals ftz;
#pragma omp for schedule(static)
    for (int64_t k = 0; k < tasks; ++k) {
      const int64_t n = k / pieces, p0 = k % pieces * rows;
      stats(shift.data() + n * C, sum.data() + k * C, sq.data() + k * C, n, std::min(p0, HW), std::min(p0 + rows, HW));
    }
  }
  for (int64_t n = 0; n < N; ++n) {
    for (int64_t p = 1; p < pieces; ++p)
      for (int64_t c = 0; c < C; ++c) {
        sum[n * pieces * C + c] += sum[(n * pieces + p) * C + c];
        sq[n * pieces * C + c] += sq[(n * pieces + p) * C + c];
      }
    coefficients(q, shift.data() + n * C, sum.data() + n * pieces * C, sq.data() + n * pieces * C, a.data() + n * C,
                 b.data() + n * C, eps);
  }
#pragma omp parallel
  {
    FlushSubnormals ftz;
#pragma omp for schedule(static)
    for (int64_t k = 0; k < tasks; ++k) {
      const int64_t n = k / pieces, p0 = k % pieces * rows;
      normalise(a.data() + n * C, b.data() + n * C, n, std::min(p0, HW), std::min(p0 + rows, HW));
    }
  }
}

// Pointers come from the Python wrapper (vpure.kernels.group_norm), which checks device,
// dtype, layout and sizes, converts gamma and beta to fp32 and allocates the output.
void group_norm_entry(bool bf16, bool channels_last, uintptr_t x, uintptr_t y, uintptr_t gamma, uintptr_t beta,
                      int64_t N, int64_t C, int64_t HW, int64_t G, double eps, bool silu, bool portable) {
  if (N < 0 || C <= 0 || HW <= 0 || G <= 0 || C % G || !(eps >= 0.0))
    throw std::invalid_argument("group_norm: bad sizes");
  const GN q{N, C, HW, G, reinterpret_cast<const float*>(gamma), reinterpret_cast<const float*>(beta), silu};
  if (N == 0) return;
  if (bf16)
    run(q, channels_last, reinterpret_cast<const uint16_t*>(x), reinterpret_cast<uint16_t*>(y), eps, portable);
  else
    run(q, channels_last, reinterpret_cast<const float*>(x), reinterpret_cast<float*>(y), eps, portable);
}

}  // namespace

void register_group_norm(nb::module_& m) {
  m.def("group_norm", &group_norm_entry, nb::arg("bf16"), nb::arg("channels_last"), nb::arg("x"), nb::arg("y"),
        nb::arg("gamma"), nb::arg("beta"), nb::arg("N"), nb::arg("C"), nb::arg("HW"), nb::arg("G"), nb::arg("eps"),
        nb::arg("silu"), nb::arg("portable") = false, nb::call_guard<nb::gil_scoped_release>(),
        "Raw-pointer entry for vpure.kernels.group_norm.group_norm (use that).");
}
