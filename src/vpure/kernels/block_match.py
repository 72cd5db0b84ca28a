"""Exhaustive block matching (api.md ``block_match``, spec/detection.md).

For every ``block`` x ``block`` block of ``cur`` at (by, bx) and every displacement
(dy, dx) in [-radius, radius]^2 whose block lies inside ``ref``:

    SAD(dy, dx) = sum_{c, m, n} | cur[c, by*b + m, bx*b + n] - ref[c, by*b + m + dy, bx*b + n + dx] |

(the spec's MAD times the constant M N C, so the argmin is the same). The motion vector
minimises (SAD, |dy| + |dx|, dy, dx) lexicographically, so every implementation returns
identical vectors. uint8 input accumulates exactly in int32; float input is taken at
float32 and accumulated in float64 (exact for 8-bit-grid values; otherwise agreement is
to float64 rounding of the sum).

Order: ``block_match_ref`` (oracle), Triton launcher (kernel in
``_triton_block_match.py``), native and torch implementations, public API.
"""

from __future__ import annotations

import numpy as np
import torch

from . import _dispatch
from .errors import KernelError

_IMPLS = ("triton", "native", "torch", "ref")


def _key_better(s, dy, dx, best):
    bs, bdy, bdx = best
    return (s, abs(dy) + abs(dx), dy, dx) < (bs, abs(bdy) + abs(bdx), bdy, bdx)


# -- reference ----------------------------------------------------------------------------
def block_match_ref(cur: np.ndarray, ref: np.ndarray, block: int = 8, radius: int = 7):
    """Plain loops over blocks and candidates. cur, ref (N, C, H, W) -> (mv (N, nby, nbx, 2) int32, sad float32)."""
    cur = cur.astype(np.int64) if cur.dtype == np.uint8 else cur.astype(np.float32).astype(np.float64)
    ref = ref.astype(np.int64) if ref.dtype == np.uint8 else ref.astype(np.float32).astype(np.float64)
    n, _, h, w = cur.shape
    nby, nbx = h // block, w // block
    mv = np.zeros((n, nby, nbx, 2), np.int32)
    sad = np.zeros((n, nby, nbx), np.float32)
    for i in range(n):
        for by in range(nby):
            for bx in range(nbx):
                y0, x0 = by * block, bx * block
                blk = cur[i, :, y0:y0 + block, x0:x0 + block]
                best = None
                for dy in range(-radius, radius + 1):
                    for dx in range(-radius, radius + 1):
                        y, x = y0 + dy, x0 + dx
                        if y < 0 or x < 0 or y + block > h or x + block > w:
                            continue
                        s = np.abs(blk - ref[i, :, y:y + block, x:x + block]).sum()
                        if best is None or _key_better(s, dy, dx, best):
                            best = (s, dy, dx)
                mv[i, by, bx] = best[1:]
                sad[i, by, bx] = np.float32(best[0])
    return mv, sad


# -- Triton -------------------------------------------------------------------------------
def block_match_triton(cur: torch.Tensor, ref: torch.Tensor, block: int = 8, radius: int = 7):
    import triton

    from ._triton_block_match import _block_match_kernel

    n, c, h, w = cur.shape
    nby, nbx = h // block, w // block
    is_u8 = cur.dtype == torch.uint8
    if not is_u8:
        cur, ref = cur.float(), ref.float()
    cur, ref = cur.contiguous(), ref.contiguous()
    mv = torch.empty(n, nby, nbx, 2, dtype=torch.int32, device=cur.device)
    sad = torch.empty(n, nby, nbx, dtype=torch.float32, device=cur.device)
    ncand = triton.next_power_of_2((2 * radius + 1) ** 2)
    _block_match_kernel[(n * nby * nbx,)](cur, ref, mv, sad, c, h, w, nby, nbx, radius, BLOCK=block,
                                          BW=triton.next_power_of_2(block), NCAND=ncand, IS_U8=is_u8)
    return mv, sad


# -- native C++ (SSE2/AVX2 psadbw, OpenMP over blocks) --------------------------------------
def block_match_native(cur: torch.Tensor, ref: torch.Tensor, block: int = 8, radius: int = 7):
    nat = _dispatch.native()
    if cur.dtype == torch.uint8:
        mv, sad = nat.block_match_u8(cur.contiguous().numpy(), ref.contiguous().numpy(), block, radius)
    else:
        mv, sad = nat.block_match_f32(cur.float().contiguous().numpy(), ref.float().contiguous().numpy(), block, radius)
    return torch.from_numpy(mv), torch.from_numpy(sad)


# -- torch (one candidate at a time over the whole frame: memory O(frame)) ---------------------
def block_match_torch(cur: torch.Tensor, ref: torch.Tensor, block: int = 8, radius: int = 7):
    n, c, h, w = cur.shape
    nby, nbx = h // block, w // block
    acc_dtype = torch.int32 if cur.dtype == torch.uint8 else torch.float64
    cur_a = cur.to(acc_dtype) if cur.dtype == torch.uint8 else cur.float().to(acc_dtype)
    ref_a = ref.to(acc_dtype) if ref.dtype == torch.uint8 else ref.float().to(acc_dtype)
    dev = cur.device
    y0 = torch.arange(nby, device=dev).view(nby, 1) * block
    x0 = torch.arange(nbx, device=dev).view(1, nbx) * block
    best_sad = torch.full((n, nby, nbx), float("inf"), dtype=torch.float64, device=dev)
    best_key = torch.full((n, nby, nbx), 1 << 30, dtype=torch.int64, device=dev)
    best_dy = torch.zeros((n, nby, nbx), dtype=torch.int32, device=dev)
    best_dx = torch.zeros_like(best_dy)
    side = 2 * radius + 1
    for dy in range(-radius, radius + 1):
        for dx in range(-radius, radius + 1):
            valid = (y0 + dy >= 0) & (y0 + dy + block <= h) & (x0 + dx >= 0) & (x0 + dx + block <= w)
            if not bool(valid.any()):
                continue
            # shifted[y, x] = ref[y + dy, x + dx] where inside; blocks reading outside are invalid anyway.
            shifted = torch.zeros_like(ref_a)
            ys, yd = slice(max(0, dy), h + min(0, dy)), slice(max(0, -dy), h - max(0, dy))
            xs, xd = slice(max(0, dx), w + min(0, dx)), slice(max(0, -dx), w - max(0, dx))
            shifted[:, :, yd, xd] = ref_a[:, :, ys, xs]
            d = (cur_a - shifted).abs().view(n, c, nby, block, nbx, block).sum(dim=(1, 3, 5))
            s = d.to(torch.float64)  # exact: int32 sums and float64 sums both fit
            key = (abs(dy) + abs(dx)) * side * side + (dy + radius) * side + (dx + radius)
            better = valid & ((s < best_sad) | ((s == best_sad) & (key < best_key)))
            best_sad = torch.where(better, s, best_sad)
            best_key = torch.where(better, torch.full_like(best_key, key), best_key)
            best_dy = torch.where(better, torch.full_like(best_dy, dy), best_dy)
            best_dx = torch.where(better, torch.full_like(best_dx, dx), best_dx)
    return torch.stack([best_dy, best_dx], dim=-1), best_sad.float()


# -- public API -----------------------------------------------------------------------------
def _as_nchw(a, name: str) -> tuple[torch.Tensor, bool]:
    was_numpy = isinstance(a, np.ndarray)
    t = torch.from_numpy(np.ascontiguousarray(a)) if was_numpy else a
    if not isinstance(t, torch.Tensor):
        raise KernelError(f"block_match: {name} must be a numpy array or torch tensor, got {type(a).__name__}")
    if t.ndim == 2:
        t = t[None, None]
    elif t.ndim == 3:
        t = t[None]
    elif t.ndim != 4:
        raise KernelError(f"block_match: {name} must be (H, W), (C, H, W) or (N, C, H, W), got shape {tuple(t.shape)}")
    if t.dtype != torch.uint8 and not t.is_floating_point():
        raise KernelError(f"block_match: {name} must be uint8 or floating point, got {t.dtype}")
    return t, was_numpy


def block_match(cur, ref, *, block: int = 8, radius: int = 7, impl: str = "auto"):
    """Motion vectors and SADs of ``cur``'s blocks in ``ref``.

    cur, ref: (C, H, W) or (H, W) uint8 or float arrays (torch or numpy); H, W multiples of
    ``block``. Also accepts a batch (N, C, H, W) of frame pairs. Returns ``mv`` int32
    (H/block, W/block, 2) holding (dy, dx) and ``sad`` float32 (H/block, W/block) (with a
    leading N for batches), as numpy if ``cur`` was numpy, else torch on cur's device.
    """
    ndim = np.ndim(cur) if isinstance(cur, np.ndarray) else getattr(cur, "ndim", 0)
    c4, as_numpy = _as_nchw(cur, "cur")
    r4, _ = _as_nchw(ref, "ref")
    if c4.shape != r4.shape:
        raise KernelError(f"block_match: cur {tuple(c4.shape)} and ref {tuple(r4.shape)} differ in shape")
    if c4.dtype != r4.dtype:
        raise KernelError(f"block_match: cur is {c4.dtype} but ref is {r4.dtype}")
    if c4.device != r4.device:
        raise KernelError(f"block_match: cur on {c4.device} but ref on {r4.device}")
    if not isinstance(block, int) or block < 1 or not isinstance(radius, int) or radius < 0:
        raise KernelError(f"block_match: block must be an int >= 1 and radius an int >= 0, got {block}, {radius}")
    h, w = c4.shape[-2:]
    if h % block or w % block:
        hint = ""
        if ndim == 3 and w in (1, 3, 4) and c4.shape[1] > 4:  # an (H, W, C) image read as (C, H, W)
            hint = f"; the input looks channels-last (H, W, C) = {tuple(np.shape(cur))}: pass (C, H, W)"
        raise KernelError(f"block_match: H={h} and W={w} must be multiples of block={block}{hint}")
    if c4.is_floating_point() and not (bool(torch.isfinite(c4).all()) and bool(torch.isfinite(r4).all())):
        raise KernelError("block_match: cur or ref contains NaN or Inf")
    # A vector longer than the frame puts the block outside ref, where no candidate is taken:
    # clamping changes no result, and spares every implementation a (2r+1)^2 search of nothing.
    radius = min(radius, max(h, w) - block)
    which = _dispatch.resolve(impl, c4.device, _IMPLS)
    if which == "ref":
        mv, sad = block_match_ref(c4.cpu().numpy(), r4.cpu().numpy(), block, radius)
        mv, sad = torch.from_numpy(mv).to(c4.device), torch.from_numpy(sad).to(c4.device)
    else:
        fn = {"triton": block_match_triton, "native": block_match_native, "torch": block_match_torch}[which]
        mv, sad = fn(c4, r4, block, radius)
    if ndim < 4:
        mv, sad = mv[0], sad[0]
    if as_numpy:
        return mv.cpu().numpy(), sad.cpu().numpy()
    return mv, sad
