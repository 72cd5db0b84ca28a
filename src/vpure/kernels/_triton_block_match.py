"""Triton kernel for block_match (imported only when the Triton path runs).

One program per (frame pair, block). All (2R+1)^2 candidates of the block are one
vector; each iteration adds one block row of one channel for every candidate (a
[candidates, block width] tile), accumulating in int32 for uint8 and float64 for float so
every implementation sees the same sums. The winner is picked in two exact reductions:
min SAD, then min secondary key (|dy|+|dx|, dy, dx) among the minima.
"""

import triton
import triton.language as tl


@triton.jit
def _block_match_kernel(cur_ptr, ref_ptr, mv_ptr, sad_ptr, C, H, W, NBY, NBX, R,
                        BLOCK: tl.constexpr, BW: tl.constexpr, NCAND: tl.constexpr, IS_U8: tl.constexpr):
    pid = tl.program_id(0)
    blocks = NBY * NBX
    n = pid // blocks
    blk = pid % blocks
    by = blk // NBX
    bx = blk % NBX
    y0 = by * BLOCK
    x0 = bx * BLOCK
    side = 2 * R + 1
    j = tl.arange(0, NCAND)
    dy = j // side - R
    dx = j % side - R
    valid = (j < side * side) & (y0 + dy >= 0) & (y0 + dy + BLOCK <= H) & (x0 + dx >= 0) & (x0 + dx + BLOCK <= W)
    k = tl.arange(0, BW)
    kmask = k < BLOCK
    frame = n * C * H * W
    if IS_U8:
        acc = tl.zeros((NCAND,), dtype=tl.int32)
    else:
        acc = tl.zeros((NCAND,), dtype=tl.float64)
    for c in range(C):
        for r in range(BLOCK):
            row = frame + c * H * W + (y0 + r) * W + x0
            a = tl.load(cur_ptr + row + k, mask=kmask, other=0)
            roff = row + dy[:, None] * W + dx[:, None] + k[None, :]
            m2 = valid[:, None] & kmask[None, :]
            bref = tl.load(ref_ptr + roff, mask=m2, other=0)
            if IS_U8:
                diff = tl.abs(a.to(tl.int32)[None, :] - bref.to(tl.int32))
            else:
                diff = tl.abs(a.to(tl.float64)[None, :] - bref.to(tl.float64))
            acc += tl.sum(tl.where(m2, diff, 0), axis=1)
    if IS_U8:
        big = 2147483647
        sad = tl.where(valid, acc, big)
    else:
        sad = tl.where(valid, acc, float("inf"))
    best = tl.min(sad, axis=0)
    key = ((tl.abs(dy) + tl.abs(dx)) * side + (dy + R)) * side + (dx + R)
    key = tl.where(valid & (sad == best), key, 2147483647)
    kbest = tl.min(key, axis=0)
    bdy = (kbest // side) % side - R
    bdx = kbest % side - R
    tl.store(mv_ptr + pid * 2, bdy.to(tl.int32))
    tl.store(mv_ptr + pid * 2 + 1, bdx.to(tl.int32))
    tl.store(sad_ptr + pid, best.to(tl.float32))
