"""H.264 integer core transforms (4x4 and 8x8) with QP quantisation, in integer torch ops.

Forward: the standard's integer approximation of the DCT (4x4: rows of
Cf = [[1,1,1,1],[2,1,-1,-2],[1,-1,-1,1],[1,-2,2,-1]]; 8x8: the High-profile butterfly).
Quantisation: |Z| = (|W| * MF[QP % 6][pos] + f) >> qbits, qbits = 15 + QP//6 (4x4) or
16 + QP//6 (8x8), f = 2^qbits / 3 (intra) or / 6 (inter). Dequantisation multiplies by the
standard's V tables scaled by 2^(QP//6) (8x8: times the flat weight 16, shifted by QP//6 - 6).
Inverse: the standard's butterflies followed by (x + 32) >> 6. All arithmetic is integer
(int32 inputs, int64 internally), so results are exact and device independent.
The step size doubles every 6 QP; QP 0 reconstructs the residual to within rounding.
"""

from __future__ import annotations

import torch

from .errors import KernelError

# Multiplication factors (quantisation) and scaling factors (dequantisation), QP % 6 rows.
MF4 = ((13107, 5243, 8066), (11916, 4660, 7490), (10082, 4194, 6554),
       (9362, 3647, 5825), (8192, 3355, 5243), (7282, 2893, 4559))
V4 = ((10, 16, 13), (11, 18, 14), (13, 20, 16), (14, 23, 18), (16, 25, 20), (18, 29, 23))
MF8 = ((13107, 11428, 20972, 12222, 16777, 15481), (11916, 10826, 19174, 11058, 14980, 14290),
       (10082, 8943, 15978, 9675, 12710, 11985), (9362, 8228, 14913, 8931, 11984, 11259),
       (8192, 7346, 13159, 7740, 10486, 9777), (7282, 6428, 11570, 6830, 9118, 8640))
V8 = ((20, 18, 32, 19, 25, 24), (22, 19, 35, 21, 28, 26), (26, 23, 42, 24, 33, 31),
      (28, 25, 45, 26, 35, 33), (32, 28, 51, 30, 40, 38), (36, 32, 58, 34, 46, 43))
QP_MAX = 51


def _class4(i: int, j: int) -> int:
    if i % 2 == 0 and j % 2 == 0:
        return 0
    if i % 2 == 1 and j % 2 == 1:
        return 1
    return 2


def _class8(i: int, j: int) -> int:
    if i % 4 == 0 and j % 4 == 0:
        return 0
    if i % 2 == 1 and j % 2 == 1:
        return 1
    if i % 4 == 2 and j % 4 == 2:
        return 2
    if (i % 4 == 0 and j % 2 == 1) or (i % 2 == 1 and j % 4 == 0):
        return 3
    if (i % 4 == 0 and j % 4 == 2) or (i % 4 == 2 and j % 4 == 0):
        return 4
    return 5


def _table(size: int, table, qp: int, device) -> torch.Tensor:
    cls = _class4 if size == 4 else _class8
    row = table[qp % 6]
    return torch.tensor([[row[cls(i, j)] for j in range(size)] for i in range(size)], dtype=torch.int64, device=device)


def _check(size: int, qp: int | None = None) -> None:
    if size not in (4, 8):
        raise KernelError(f"intdct: size must be 4 or 8, got {size}")
    if qp is not None and not (0 <= qp <= QP_MAX):
        raise KernelError(f"intdct: QP must be in [0, {QP_MAX}], got {qp}")


# -- 1-D butterflies along the last axis -------------------------------------------------
def _fwd4(x):
    s0, s1, s2, s3 = x.unbind(-1)
    a, b, c, d = s0 + s3, s1 + s2, s1 - s2, s0 - s3
    return torch.stack([a + b, 2 * d + c, a - b, d - 2 * c], -1)


def _inv4(x):
    w0, w1, w2, w3 = x.unbind(-1)
    e0, e1, e2, e3 = w0 + w2, w0 - w2, (w1 >> 1) - w3, w1 + (w3 >> 1)
    return torch.stack([e0 + e3, e1 + e2, e1 - e2, e0 - e3], -1)


def _fwd8(x):
    s = x.unbind(-1)
    s07, s16, s25, s34 = s[0] + s[7], s[1] + s[6], s[2] + s[5], s[3] + s[4]
    a0, a1, a2, a3 = s07 + s34, s16 + s25, s07 - s34, s16 - s25
    d07, d16, d25, d34 = s[0] - s[7], s[1] - s[6], s[2] - s[5], s[3] - s[4]
    a4 = d16 + d25 + (d07 + (d07 >> 1))
    a5 = d07 - d34 - (d25 + (d25 >> 1))
    a6 = d07 + d34 - (d16 + (d16 >> 1))
    a7 = d16 - d25 + (d34 + (d34 >> 1))
    return torch.stack([a0 + a1, a4 + (a7 >> 2), a2 + (a3 >> 1), a5 + (a6 >> 2),
                        a0 - a1, a6 - (a5 >> 2), (a2 >> 1) - a3, (a4 >> 2) - a7], -1)


def _inv8(x):
    s = x.unbind(-1)
    a0, a2 = s[0] + s[4], s[0] - s[4]
    a4, a6 = (s[2] >> 1) - s[6], (s[6] >> 1) + s[2]
    b0, b2, b4, b6 = a0 + a6, a2 + a4, a2 - a4, a0 - a6
    a1 = -s[3] + s[5] - s[7] - (s[7] >> 1)
    a3 = s[1] + s[7] - s[3] - (s[3] >> 1)
    a5 = -s[1] + s[7] + s[5] + (s[5] >> 1)
    a7 = s[3] + s[5] + s[1] + (s[1] >> 1)
    b1, b3, b5, b7 = (a7 >> 2) + a1, a3 + (a5 >> 2), (a3 >> 2) - a5, a7 - (a1 >> 2)
    return torch.stack([b0 + b7, b2 + b5, b4 + b3, b6 + b1, b6 - b1, b4 - b3, b2 - b5, b0 - b7], -1)


def _two_d(fn, x):
    return fn(fn(x).transpose(-1, -2)).transpose(-1, -2)


# -- public ---------------------------------------------------------------------------------
def forward_transform(blocks: torch.Tensor, size: int = 4) -> torch.Tensor:
    """Integer core transform of (..., size, size) integer blocks -> int64 coefficients."""
    _check(size)
    return _two_d(_fwd4 if size == 4 else _fwd8, blocks.to(torch.int64))


def quantize(coeffs: torch.Tensor, qp: int, size: int = 4, intra: bool = True) -> torch.Tensor:
    """Levels = sign(W) * ((|W| * MF + f) >> qbits) (int64)."""
    _check(size, qp)
    qbits = (15 if size == 4 else 16) + qp // 6
    f = (1 << qbits) // (3 if intra else 6)
    mf = _table(size, MF4 if size == 4 else MF8, qp, coeffs.device)
    mag = (coeffs.abs() * mf + f) >> qbits
    return torch.where(coeffs < 0, -mag, mag)


def dequantize(levels: torch.Tensor, qp: int, size: int = 4) -> torch.Tensor:
    """Scaled coefficients for the inverse transform (int64)."""
    _check(size, qp)
    v = _table(size, V4 if size == 4 else V8, qp, levels.device)
    if size == 4:
        return (levels * v) << (qp // 6)
    # LevelScale8x8 = 16 (flat weight) * V8, applied with a shift of QP/6 - 6.
    shift = qp // 6 - 2
    if shift >= 0:
        return (levels * v) << shift
    return (levels * v + (1 << (-shift - 1))) >> (-shift)


def inverse_transform(coeffs: torch.Tensor, size: int = 4) -> torch.Tensor:
    """Inverse core transform with the final (x + 32) >> 6 (int64)."""
    _check(size)
    return (_two_d(_inv4 if size == 4 else _inv8, coeffs.to(torch.int64)) + 32) >> 6


def to_blocks(plane: torch.Tensor, size: int) -> torch.Tensor:
    """(..., H, W) with H, W multiples of size -> (..., H/size, W/size, size, size)."""
    *lead, h, w = plane.shape
    return plane.reshape(*lead, h // size, size, w // size, size).transpose(-3, -2)


def from_blocks(blocks: torch.Tensor) -> torch.Tensor:
    *lead, nby, nbx, s, _ = blocks.shape
    return blocks.transpose(-3, -2).reshape(*lead, nby * s, nbx * s)


def quantize_residual(residual: torch.Tensor, qp: int, size: int = 4, intra: bool = False) -> torch.Tensor:
    """Residual planes (..., H, W) integer -> transform, quantise, dequantise, inverse (int32).

    H and W are padded (edge replication) to multiples of ``size`` and cropped back.
    """
    _check(size, qp)
    if residual.is_floating_point():
        raise KernelError(f"quantize_residual: residual must be an integer tensor, got {residual.dtype}")
    h, w = residual.shape[-2:]
    ph, pw = (-h) % size, (-w) % size
    x = residual.to(torch.int64)
    if ph or pw:
        x = torch.cat([x, x[..., -1:, :].expand(*x.shape[:-2], ph, x.shape[-1])], -2) if ph else x
        x = torch.cat([x, x[..., :, -1:].expand(*x.shape[:-1], pw)], -1) if pw else x
    blocks = to_blocks(x, size)
    rec = inverse_transform(dequantize(quantize(forward_transform(blocks, size), qp, size, intra), qp, size), size)
    return from_blocks(rec)[..., :h, :w].to(torch.int32)
