// Small-head attention for CPU inference: out = softmax(q k^T * scale) v for every (batch,
// head), heads of 8, 16 or 32 channels, fp32 arithmetic on fp32 or bf16 tensors.
//
// q (B, Lq, H, D), k and v (B, Lk, H, D) as laid out by an attention layer's projections
// ((B, L, H*D) viewed per head: no transposes), any batch and position strides, the head
// dimension contiguous; out (B, Lq, H, D) likewise. One task per (batch, head): its keys
// are converted once to fp32, keys transposed (D, Lk) so scores vectorise over keys, values
// as rows (Lk, D). PyTorch's CPU flash kernel blocks for wide heads and spends most of its
// time on bookkeeping at D = 8 (the `small` UNet's heads): this kernel is its narrow-head
// counterpart. The AVX-512 copy is chosen at run time; the portable copy computes the same
// arithmetic in scalar loops (CPUs without AVX-512 keep PyTorch's kernel, see attention.py).
#include <nanobind/nanobind.h>
#include <nanobind/stl/vector.h>

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <vector>

#include "common.h"

namespace nb = nanobind;

namespace {

inline float bf16_to_f32(uint16_t h) {
  const uint32_t u = uint32_t(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline uint16_t f32_to_bf16(float f) {  // round to nearest even, NaN kept NaN
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return uint16_t((u >> 16) | 0x40);
  u += 0x7fffu + ((u >> 16) & 1u);
  return uint16_t(u >> 16);
}

template <typename T> inline float load(const T* p) {
  if constexpr (sizeof(T) == 2) return bf16_to_f32(*p); else return *p;
}
template <typename T> inline void store(T* p, float f) {
  if constexpr (sizeof(T) == 2) *p = f32_to_bf16(f); else *p = f;
}

struct Problem {
  const void *q, *k, *v;
  void* o;
  int64_t B, H, Lq, Lk;
  int64_t qs[3], ks[3], vs[3], os[3];  // batch, position, head strides in elements
  float scale;
};

// Per-thread scratch: keys transposed (D, Lkp), value rows (Lk, D), one row of scores.
struct Scratch {
  float *kt = nullptr, *vr = nullptr, *s = nullptr;
  void* mem = nullptr;
  Scratch(int64_t D, int64_t lkp) {
    const size_t n = size_t(D) * lkp * 2 + lkp;
    mem = std::aligned_alloc(64, ((n * sizeof(float)) + 63) / 64 * 64);
    if (!mem) throw std::bad_alloc();
    kt = static_cast<float*>(mem);
    vr = kt + size_t(D) * lkp;
    s = vr + size_t(D) * lkp;
  }
  ~Scratch() { std::free(mem); }
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;
};

template <typename T, int D>
void gather_kv(const Problem& p, int64_t b, int64_t h, int64_t lkp, Scratch& w) {
  const T* kb = static_cast<const T*>(p.k) + b * p.ks[0] + h * p.ks[2];
  const T* vb = static_cast<const T*>(p.v) + b * p.vs[0] + h * p.vs[2];
  for (int64_t j = 0; j < p.Lk; ++j)
    for (int d = 0; d < D; ++d) {
      w.kt[d * lkp + j] = load(kb + j * p.ks[1] + d);
      w.vr[j * D + d] = load(vb + j * p.vs[1] + d);
    }
  for (int64_t j = p.Lk; j < lkp; ++j)
    for (int d = 0; d < D; ++d) w.kt[d * lkp + j] = 0.0f;
}

// One task per (batch, head): its keys and values gathered once, then each query row
// computed by `row(w, qv, out)` (qv the scaled query, out the D outputs) and stored.
template <typename T, int D, typename Row>
void for_each_row(const Problem& p, int64_t lkp, const Row& row) {
  const int64_t pairs = p.B * p.H;
#pragma omp parallel
  {
    Scratch w(D, lkp);
#pragma omp for schedule(static)
    for (int64_t bh = 0; bh < pairs; ++bh) {
      const int64_t b = bh / p.H, h = bh % p.H;
      gather_kv<T, D>(p, b, h, lkp, w);
      for (int64_t i = 0; i < p.Lq; ++i) {
        const T* qi = static_cast<const T*>(p.q) + b * p.qs[0] + i * p.qs[1] + h * p.qs[2];
        alignas(32) float qv[D], out[D];
        for (int d = 0; d < D; ++d) qv[d] = load(qi + d) * p.scale;
        row(w, qv, out);
        T* oi = static_cast<T*>(p.o) + b * p.os[0] + i * p.os[1] + h * p.os[2];
        for (int d = 0; d < D; ++d) store(oi + d, out[d]);
      }
    }
  }
}

// -- portable copy --------------------------------------------------------------------
template <typename T, int D>
void attention_portable(const Problem& p) {
  const int64_t lk = p.Lk;
  for_each_row<T, D>(p, lk, [lk](const Scratch& w, const float* qv, float* out) {
    float m = -INFINITY;
    for (int64_t j = 0; j < lk; ++j) {
      float s = 0.0f;
      for (int d = 0; d < D; ++d) s += qv[d] * w.kt[d * lk + j];
      w.s[j] = s;
      m = s > m ? s : m;
    }
    float sum = 0.0f, acc[D] = {};
    for (int64_t j = 0; j < lk; ++j) {
      const float e = std::exp(w.s[j] - m);
      sum += e;
      for (int d = 0; d < D; ++d) acc[d] += e * w.vr[j * D + d];
    }
    for (int d = 0; d < D; ++d) out[d] = acc[d] / sum;
  });
}

// -- AVX-512 copy ---------------------------------------------------------------------
#ifdef VPURE_X86
#pragma GCC push_options
#pragma GCC target("avx512f,avx512dq,avx512bw,avx512vl,avx2,fma")
// GCC 12 warns inside its own avx512fintrin.h (_mm512_undefined_* feeding reductions).
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"

// exp(x) for x <= 0 (scores minus their row maximum): x = n ln2 + r with |r| <= ln2/2,
// exp(r) by Cephes' degree-6 expf polynomial, 2^n built in the exponent bits.
inline __m512 exp_nonpositive(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 y = _mm512_set1_ps(1.9875691500e-4f);
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.3981999507e-3f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(8.3334519073e-3f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(4.1665795894e-2f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.6666665459e-1f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(5.0000001201e-1f));
  y = _mm512_fmadd_ps(_mm512_mul_ps(y, r), r, _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  const __m512i e = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
  return _mm512_mul_ps(y, _mm512_castsi512_ps(e));
}

template <typename T, int D>
void attention_avx512(const Problem& p) {
  const int64_t lk = p.Lk, nb = (lk + 15) / 16, lkp = nb * 16;
  const __mmask16 tail = lk % 16 ? __mmask16((1u << (lk % 16)) - 1) : __mmask16(0xffff);
  for_each_row<T, D>(p, lkp, [=](const Scratch& w, const float* qv, float* out) {
    // scores for 16 keys at a time, and their running maximum
    __m512 mx = _mm512_set1_ps(-INFINITY);
    for (int64_t jb = 0; jb < nb; ++jb) {
      __m512 s = _mm512_mul_ps(_mm512_set1_ps(qv[0]), _mm512_load_ps(w.kt + jb * 16));
      for (int d = 1; d < D; ++d)
        s = _mm512_fmadd_ps(_mm512_set1_ps(qv[d]), _mm512_load_ps(w.kt + d * lkp + jb * 16), s);
      if (jb == nb - 1) s = _mm512_mask_blend_ps(tail, _mm512_set1_ps(-INFINITY), s);
      _mm512_store_ps(w.s + jb * 16, s);
      mx = _mm512_max_ps(mx, s);
    }
    const __m512 m = _mm512_set1_ps(_mm512_reduce_max_ps(mx));
    __m512 sum = _mm512_setzero_ps();
    for (int64_t jb = 0; jb < nb; ++jb) {
      __m512 e = exp_nonpositive(_mm512_sub_ps(_mm512_load_ps(w.s + jb * 16), m));
      if (jb == nb - 1) e = _mm512_maskz_mov_ps(tail, e);
      _mm512_store_ps(w.s + jb * 16, e);
      sum = _mm512_add_ps(sum, e);
    }
    const __m256 inv = _mm256_set1_ps(1.0f / _mm512_reduce_add_ps(sum));
    // weighted sum of value rows, eight independent accumulators (FMA latency)
    constexpr int C = D / 8;  // 256-bit chunks per row
    __m256 acc[8][C];
    for (int u = 0; u < 8; ++u)
      for (int c = 0; c < C; ++c) acc[u][c] = _mm256_setzero_ps();
    int64_t j = 0;
    for (; j + 8 <= lk; j += 8)
      for (int u = 0; u < 8; ++u) {
        const __m256 e = _mm256_set1_ps(w.s[j + u]);
        for (int c = 0; c < C; ++c)
          acc[u][c] = _mm256_fmadd_ps(e, _mm256_loadu_ps(w.vr + (j + u) * D + c * 8), acc[u][c]);
      }
    for (; j < lk; ++j) {
      const __m256 e = _mm256_set1_ps(w.s[j]);
      for (int c = 0; c < C; ++c) acc[0][c] = _mm256_fmadd_ps(e, _mm256_loadu_ps(w.vr + j * D + c * 8), acc[0][c]);
    }
    for (int c = 0; c < C; ++c) {
      const __m256 t = _mm256_add_ps(
          _mm256_add_ps(_mm256_add_ps(acc[0][c], acc[1][c]), _mm256_add_ps(acc[2][c], acc[3][c])),
          _mm256_add_ps(_mm256_add_ps(acc[4][c], acc[5][c]), _mm256_add_ps(acc[6][c], acc[7][c])));
      _mm256_store_ps(out + c * 8, _mm256_mul_ps(t, inv));
    }
  });
}

#pragma GCC diagnostic pop
#pragma GCC pop_options
#endif

bool cpu_has_avx512() { return vpure::cpu_has_avx512(); }

template <typename T, int D>
void run(const Problem& p, bool portable) {
#ifdef VPURE_X86
  if (!portable && cpu_has_avx512()) return attention_avx512<T, D>(p);
#endif
  attention_portable<T, D>(p);
}

template <typename T>
void run_d(const Problem& p, int64_t D, bool portable) {
  switch (D) {
    case 8: return run<T, 8>(p, portable);
    case 16: return run<T, 16>(p, portable);
    case 32: return run<T, 32>(p, portable);
    default: throw std::invalid_argument("small_head_attention: head size must be 8, 16 or 32");
  }
}

// Pointers come from the Python wrapper (vpure.kernels.attention), which checks devices,
// dtypes, shapes and strides and allocates the output; this entry point trusts them.
void attention_entry(bool bf16, uintptr_t q, uintptr_t k, uintptr_t v, uintptr_t o, int64_t B, int64_t H,
                     int64_t Lq, int64_t Lk, int64_t D, std::vector<int64_t> qs, std::vector<int64_t> ks,
                     std::vector<int64_t> vs, std::vector<int64_t> os, double scale, bool portable) {
  if (qs.size() != 3 || ks.size() != 3 || vs.size() != 3 || os.size() != 3)
    throw std::invalid_argument("small_head_attention: strides are (batch, position, head)");
  if (B < 0 || H <= 0 || Lq < 0 || Lk <= 0)
    throw std::invalid_argument("small_head_attention: empty key sequence or bad sizes");
  Problem p{reinterpret_cast<const void*>(q), reinterpret_cast<const void*>(k), reinterpret_cast<const void*>(v),
            reinterpret_cast<void*>(o), B, H, Lq, Lk, {qs[0], qs[1], qs[2]}, {ks[0], ks[1], ks[2]},
            {vs[0], vs[1], vs[2]}, {os[0], os[1], os[2]}, float(scale)};
  if (bf16) run_d<uint16_t>(p, D, portable); else run_d<float>(p, D, portable);
}

}  // namespace

void register_attention(nb::module_ &m) {
  m.def("small_head_attention", &attention_entry, nb::arg("bf16"), nb::arg("q"), nb::arg("k"), nb::arg("v"),
        nb::arg("out"), nb::arg("B"), nb::arg("H"), nb::arg("Lq"), nb::arg("Lk"), nb::arg("D"), nb::arg("q_strides"),
        nb::arg("k_strides"), nb::arg("v_strides"), nb::arg("out_strides"), nb::arg("scale"),
        nb::arg("portable") = false, nb::call_guard<nb::gil_scoped_release>(),
        "Raw-pointer entry for vpure.kernels.attention.small_head_attention (use that).");
  m.def("cpu_has_avx512", &cpu_has_avx512, "Whether the AVX-512 copy of the attention kernel runs here.");
}
