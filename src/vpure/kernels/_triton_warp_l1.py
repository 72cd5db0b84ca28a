"""Triton kernel for warp_l1 / warp_l1_grad (imported only when the Triton path runs).

One program per (frame pair, tile of pixels): the flow and bilinear weights of the tile
are computed once and reused for every channel. The direct gradient into frame i is
written (each element by exactly one program); with the full gradient the scatter into
frame i+1 is accumulated as fixed-point int64 atomics, which are associative, so the
result does not depend on the order programs run in.
"""

import triton
import triton.language as tl

FIXED_POINT_BITS = 32


@triton.jit
def _warp_l1_kernel(x_ptr, flow_ptr, grad_ptr, scatter_ptr, partial_ptr,
                    C, T, H, W, inv_n,
                    NEED_GRAD: tl.constexpr, FULL: tl.constexpr, BLOCK_P: tl.constexpr):
    pair = tl.program_id(0)
    tile = tl.program_id(1)
    n_tiles = tl.num_programs(1)
    P = T - 1
    b = pair // P
    i = pair % P
    HW = H * W
    offs = tile * BLOCK_P + tl.arange(0, BLOCK_P)
    live = offs < HW
    py = offs // W
    px = offs % W
    fbase = (b * P + i) * 2 * HW
    fx = tl.load(flow_ptr + fbase + offs, mask=live, other=0.0).to(tl.float32)
    fy = tl.load(flow_ptr + fbase + HW + offs, mask=live, other=0.0).to(tl.float32)
    sx = px.to(tl.float32) + fx
    sy = py.to(tl.float32) + fy
    x0f = tl.floor(sx)
    y0f = tl.floor(sy)
    ax = sx - x0f
    ay = sy - y0f
    x0 = x0f.to(tl.int32)
    y0 = y0f.to(tl.int32)
    x1 = x0 + 1
    y1 = y0 + 1
    okx0 = (x0 >= 0) & (x0 < W)
    okx1 = (x1 >= 0) & (x1 < W)
    oky0 = (y0 >= 0) & (y0 < H)
    oky1 = (y1 >= 0) & (y1 < H)
    m00 = live & oky0 & okx0
    m01 = live & oky0 & okx1
    m10 = live & oky1 & okx0
    m11 = live & oky1 & okx1
    w00 = (1.0 - ay) * (1.0 - ax)
    w01 = (1.0 - ay) * ax
    w10 = ay * (1.0 - ax)
    w11 = ay * ax
    i00 = y0 * W + x0
    i01 = y0 * W + x1
    i10 = y1 * W + x0
    i11 = y1 * W + x1
    acc = tl.zeros((BLOCK_P,), dtype=tl.float32)
    for c in range(C):
        base_i = ((b * C + c) * T + i) * HW
        base_n = base_i + HW
        v = w00 * tl.load(x_ptr + base_n + i00, mask=m00, other=0.0).to(tl.float32)
        v += w01 * tl.load(x_ptr + base_n + i01, mask=m01, other=0.0).to(tl.float32)
        v += w10 * tl.load(x_ptr + base_n + i10, mask=m10, other=0.0).to(tl.float32)
        v += w11 * tl.load(x_ptr + base_n + i11, mask=m11, other=0.0).to(tl.float32)
        d = v - tl.load(x_ptr + base_i + offs, mask=live, other=0.0).to(tl.float32)
        acc += tl.where(live, tl.abs(d), 0.0)
        if NEED_GRAD:
            sgn = tl.where(d > 0, 1.0, tl.where(d < 0, -1.0, 0.0))
            tl.store(grad_ptr + base_i + offs, -sgn * inv_n, mask=live)
            if i == P - 1:  # the last frame has no direct term; this program owns its zeros
                tl.store(grad_ptr + base_n + offs, tl.zeros((BLOCK_P,), dtype=tl.float32), mask=live)
            if FULL:
                scale = sgn * 4294967296.0  # 2**FIXED_POINT_BITS
                tl.atomic_add(scatter_ptr + base_n + i00, tl.floor(scale * w00 + 0.5).to(tl.int64), mask=m00)
                tl.atomic_add(scatter_ptr + base_n + i01, tl.floor(scale * w01 + 0.5).to(tl.int64), mask=m01)
                tl.atomic_add(scatter_ptr + base_n + i10, tl.floor(scale * w10 + 0.5).to(tl.int64), mask=m10)
                tl.atomic_add(scatter_ptr + base_n + i11, tl.floor(scale * w11 + 0.5).to(tl.int64), mask=m11)
    tl.store(partial_ptr + pair * n_tiles + tile, tl.sum(acc, axis=0))
