// Exhaustive block matching (spec/detection.md, api.md `block_match`).
//
// For every block of `cur` and every displacement (dy, dx) in [-R, R]^2 whose block lies
// inside `ref`, SAD = sum over channels and pixels of |cur - ref|. The winner minimises
// (sad, |dy| + |dx|, dy, dx) lexicographically, so every implementation agrees bit for bit.
// uint8 frames accumulate exactly in int32 (psadbw); float frames accumulate in double.
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <algorithm>

#include "common.h"

namespace nb = nanobind;

namespace {

struct Geometry {
  int64_t n, c, h, w, block, radius, nby, nbx;
};

// Strictly better under the (sad, |dy|+|dx|, dy, dx) order.
template <typename S>
inline bool better(S sad, int dy, int dx, S best, int bdy, int bdx) {
  if (sad != best) return sad < best;
  int m = std::abs(dy) + std::abs(dx), bm = std::abs(bdy) + std::abs(bdx);
  if (m != bm) return m < bm;
  if (dy != bdy) return dy < bdy;
  return dx < bdx;
}

#define VPURE_ISA_IMPL "block_match_impl.inc"
#include "isa_copies.h"

template <typename T>
void run(const T *cur, const T *ref, const Geometry &g, int32_t *mv, float *sad) {
  if constexpr (std::is_same_v<T, uint8_t>) {
#ifdef VPURE_X86
    if (vpure::cpu_has_avx2()) return avx2::run_u8(cur, ref, g, mv, sad);
#endif
    base::run_u8(cur, ref, g, mv, sad);
  } else {
    base::run_f32(cur, ref, g, mv, sad);
  }
}

template <typename T>
using Frames = nb::ndarray<const T, nb::ndim<4>, nb::c_contig, nb::device::cpu>;

template <typename T>
nb::tuple block_match_impl(Frames<T> cur, Frames<T> ref, int64_t block, int64_t radius) {
  for (int d = 0; d < 4; ++d)
    if (cur.shape(d) != ref.shape(d)) throw std::invalid_argument("block_match: cur and ref shapes differ");
  Geometry g{(int64_t)cur.shape(0), (int64_t)cur.shape(1), (int64_t)cur.shape(2), (int64_t)cur.shape(3),
             block, radius, 0, 0};
  if (block < 1 || radius < 0) throw std::invalid_argument("block_match: block must be >= 1 and radius >= 0");
  if (g.h % block || g.w % block)
    throw std::invalid_argument("block_match: H and W must be multiples of block");
  g.nby = g.h / block;
  g.nbx = g.w / block;
  const size_t nblk = (size_t)(g.n * g.nby * g.nbx);
  int32_t *mv = new int32_t[nblk * 2];
  float *sad = new float[nblk];
  {
    nb::gil_scoped_release nogil;
    run<T>(cur.data(), ref.data(), g, mv, sad);
  }
  nb::capsule own_mv(mv, [](void *p) noexcept { delete[] (int32_t *)p; });
  nb::capsule own_sad(sad, [](void *p) noexcept { delete[] (float *)p; });
  size_t mv_shape[4] = {(size_t)g.n, (size_t)g.nby, (size_t)g.nbx, 2};
  size_t sad_shape[3] = {(size_t)g.n, (size_t)g.nby, (size_t)g.nbx};
  return nb::make_tuple(nb::ndarray<nb::numpy, int32_t, nb::ndim<4>>(mv, 4, mv_shape, own_mv),
                        nb::ndarray<nb::numpy, float, nb::ndim<3>>(sad, 3, sad_shape, own_sad));
}

}  // namespace

void register_block_match(nb::module_ &m) {
  const char *doc =
      "block_match_u8(cur, ref, block, radius) -> (mv int32 (N, H/b, W/b, 2), sad float32 (N, H/b, W/b)).\n"
      "cur, ref: (N, C, H, W) C-contiguous uint8 (or float32 for block_match_f32).";
  m.def("block_match_u8", &block_match_impl<uint8_t>, nb::arg("cur"), nb::arg("ref"), nb::arg("block"),
        nb::arg("radius"), doc);
  m.def("block_match_f32", &block_match_impl<float>, nb::arg("cur"), nb::arg("ref"), nb::arg("block"),
        nb::arg("radius"), doc);
}
