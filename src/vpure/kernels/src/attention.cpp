// Small-head attention for CPU inference: out = softmax(q k^T * scale) v for every (batch,
// head), heads of 8, 16 or 32 channels, fp32 arithmetic on fp32 or bf16 tensors.
//
// q (B, Lq, H, D), k and v (B, Lk, H, D) as laid out by an attention layer's projections
// ((B, L, H*D) viewed per head: no transposes), any batch and position strides, the head
// dimension contiguous; out (B, Lq, H, D) likewise. One task per (batch, head): its keys and
// values are converted once to fp32. The AVX-512 copy vectorises over sixteen query rows at
// a time (attention_avx512); the portable copy computes the same arithmetic row by row in
// scalar loops, keys transposed (D, Lk). PyTorch's CPU flash kernel blocks for wide heads and
// spends most of its time on bookkeeping at D = 8 (the `small` UNet's heads): this kernel is
// its narrow-head counterpart. The AVX-512 copy is chosen at run time (CPUs without AVX-512
// keep PyTorch's kernel, see attention.py).
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

// Per-thread fp32 scratch for a parallel region. A failed allocation is recorded in
// `failed`, the region's work skipped, and bad_alloc thrown after it (no exception may leave
// an OpenMP region).
struct ThreadBuffer {
  float* data;
  ThreadBuffer(size_t n, bool& failed)
      : data(static_cast<float*>(std::aligned_alloc(64, (n * sizeof(float) + 63) / 64 * 64))) {
    if (!data) {
#pragma omp atomic write
      failed = true;
    }
  }
  ~ThreadBuffer() { std::free(data); }
  ThreadBuffer(const ThreadBuffer&) = delete;
  ThreadBuffer& operator=(const ThreadBuffer&) = delete;
};

// Element offset of position i of head h in batch b, for (batch, position, head) strides.
inline int64_t offset(const int64_t* strides, int64_t b, int64_t i, int64_t h) {
  return b * strides[0] + i * strides[1] + h * strides[2];
}

// Keys and values of one (batch, head) as fp32 rows (Lk, D). Always inlined, so that in the
// AVX-512 copy it is compiled for that target too (its conversions vectorise: 1.5x on the
// temporal attention's 16-key problems).
template <typename T, int D>
__attribute__((always_inline)) inline void gather_kv(const Problem& p, int64_t b, int64_t h, float* kr, float* vr) {
  const T* kb = static_cast<const T*>(p.k) + offset(p.ks, b, 0, h);
  const T* vb = static_cast<const T*>(p.v) + offset(p.vs, b, 0, h);
  const int64_t lk = p.Lk, kstep = p.ks[1], vstep = p.vs[1];  // locals: the stores below may not alias them
  for (int64_t j = 0; j < lk; ++j)
    for (int d = 0; d < D; ++d) {
      kr[j * D + d] = load(kb + j * kstep + d);
      vr[j * D + d] = load(vb + j * vstep + d);
    }
}

// -- portable copy: one query row at a time, scalar loops ------------------------------
template <typename T, int D>
void attention_portable(const Problem& p) {
  const int64_t lk = p.Lk, pairs = p.B * p.H;
  bool out_of_memory = false;
#pragma omp parallel
  {
    ThreadBuffer buf(size_t(lk) * (2 * D + 1), out_of_memory);
    float *kr = buf.data, *vr = kr + lk * D, *sc = vr + lk * D;
#pragma omp for schedule(static)
    for (int64_t bh = 0; bh < pairs; ++bh) {
      if (!buf.data) continue;
      const int64_t b = bh / p.H, h = bh % p.H;
      gather_kv<T, D>(p, b, h, kr, vr);
      for (int64_t i = 0; i < p.Lq; ++i) {
        const T* qi = static_cast<const T*>(p.q) + offset(p.qs, b, i, h);
        float q[D], acc[D] = {}, m = -INFINITY, sum = 0.0f;
        for (int d = 0; d < D; ++d) q[d] = load(qi + d) * p.scale;
        for (int64_t j = 0; j < lk; ++j) {
          float s = 0.0f;
          for (int d = 0; d < D; ++d) s += q[d] * kr[j * D + d];
          sc[j] = s;
          m = s > m ? s : m;
        }
        for (int64_t j = 0; j < lk; ++j) {
          const float e = std::exp(sc[j] - m);
          sum += e;
          for (int d = 0; d < D; ++d) acc[d] += e * vr[j * D + d];
        }
        T* oi = static_cast<T*>(p.o) + offset(p.os, b, i, h);
        for (int d = 0; d < D; ++d) store(oi + d, acc[d] / sum);
      }
    }
  }
  if (out_of_memory) throw std::bad_alloc();
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

// Sixteen query rows at a time, one per lane: each key's scores for the sixteen rows are
// one vector (D FMAs against the key's broadcast channels), so the row maximum, the
// exponentials, their sum and the weighted sum of value rows are all vertical operations:
// no horizontal reduction per row, which dominated at the UNet's short key sequences (16
// frames of temporal attention). Keys and values are gathered once per (batch, head) as
// fp32 rows; queries are transposed into lanes (scaled), outputs transposed back.
template <typename T, int D>
void attention_avx512(const Problem& p) {
  constexpr int DC = D < 16 ? D : 16;  // value channels accumulated per pass (registers)
  const int64_t lk = p.Lk, pairs = p.B * p.H;
  bool out_of_memory = false;
#pragma omp parallel
  {
    ThreadBuffer buf(size_t(lk) * (2 * D + 16) + size_t(D) * 32, out_of_memory);
    float *qt = buf.data, *ot = qt + D * 16, *sc = ot + D * 16, *kr = sc + lk * 16, *vr = kr + lk * D;
#pragma omp for schedule(static)
    for (int64_t bh = 0; bh < pairs; ++bh) {
      if (!buf.data) continue;
      const int64_t b = bh / p.H, h = bh % p.H;
      gather_kv<T, D>(p, b, h, kr, vr);
      for (int64_t i0 = 0; i0 < p.Lq; i0 += 16) {
        const int rows = int(p.Lq - i0 < 16 ? p.Lq - i0 : 16);
        for (int r = 0; r < 16; ++r) {
          const T* qi = static_cast<const T*>(p.q) + offset(p.qs, b, i0 + r, h);
          if (r < rows)
            for (int d = 0; d < D; ++d) qt[d * 16 + r] = load(qi + d) * p.scale;
          else
            for (int d = 0; d < D; ++d) qt[d * 16 + r] = 0.0f;
        }
        __m512 q[D];
        for (int d = 0; d < D; ++d) q[d] = _mm512_load_ps(qt + d * 16);
        __m512 mx = _mm512_set1_ps(-INFINITY);
        for (int64_t j = 0; j < lk; ++j) {
          const float* kj = kr + j * D;
          __m512 s = _mm512_mul_ps(q[0], _mm512_set1_ps(kj[0]));
          for (int d = 1; d < D; ++d) s = _mm512_fmadd_ps(q[d], _mm512_set1_ps(kj[d]), s);
          _mm512_store_ps(sc + j * 16, s);
          mx = _mm512_max_ps(mx, s);
        }
        __m512 sum = _mm512_setzero_ps();
        for (int64_t j = 0; j < lk; ++j) {
          const __m512 e = exp_nonpositive(_mm512_sub_ps(_mm512_load_ps(sc + j * 16), mx));
          _mm512_store_ps(sc + j * 16, e);
          sum = _mm512_add_ps(sum, e);
        }
        const __m512 inv = _mm512_div_ps(_mm512_set1_ps(1.0f), sum);
        for (int d0 = 0; d0 < D; d0 += DC) {
          __m512 acc[DC];
          for (int c = 0; c < DC; ++c) acc[c] = _mm512_setzero_ps();
          for (int64_t j = 0; j < lk; ++j) {
            const __m512 e = _mm512_load_ps(sc + j * 16);
            const float* vj = vr + j * D + d0;
            for (int c = 0; c < DC; ++c) acc[c] = _mm512_fmadd_ps(e, _mm512_set1_ps(vj[c]), acc[c]);
          }
          for (int c = 0; c < DC; ++c) _mm512_store_ps(ot + (d0 + c) * 16, _mm512_mul_ps(acc[c], inv));
        }
        for (int r = 0; r < rows; ++r) {
          T* oi = static_cast<T*>(p.o) + offset(p.os, b, i0 + r, h);
          for (int d = 0; d < D; ++d) store(oi + d, ot[d * 16 + r]);
        }
      }
    }
  }
  if (out_of_memory) throw std::bad_alloc();
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
