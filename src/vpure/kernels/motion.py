"""Motion compensation: the predicted frame built from ``block_match`` vectors."""

from __future__ import annotations

import torch

from .errors import KernelError


def motion_compensate(ref: torch.Tensor, mv: torch.Tensor, block: int = 8) -> torch.Tensor:
    """Predicted frame: block (by, bx) = ref[..., by*b + dy : +b, bx*b + dx : +b].

    ref (C, H, W) or (N, C, H, W) (any dtype), mv int (H/b, W/b, 2) or (N, H/b, W/b, 2)
    holding (dy, dx) as returned by ``block_match``; every block must stay inside ``ref``.
    Returns a tensor like ``ref``.
    """
    batched = ref.ndim == 4
    r = ref if batched else ref[None]
    m = torch.as_tensor(mv, device=r.device)
    m = m if m.ndim == 4 else m[None]
    n, c, h, w = r.shape
    nby, nbx = h // block, w // block
    if h % block or w % block or tuple(m.shape) != (n, nby, nbx, 2):
        raise KernelError(f"motion_compensate: ref {tuple(r.shape)} and mv {tuple(m.shape)} do not fit block={block}")
    m = m.long()
    ys = torch.arange(h, device=r.device).view(1, h, 1) + m[..., 0].repeat_interleave(block, 1).repeat_interleave(block, 2)
    xs = torch.arange(w, device=r.device).view(1, 1, w) + m[..., 1].repeat_interleave(block, 1).repeat_interleave(block, 2)
    if bool((ys < 0).any() | (ys >= h).any() | (xs < 0).any() | (xs >= w).any()):
        raise KernelError("motion_compensate: a motion vector points outside the reference frame")
    idx = (ys * w + xs).view(n, 1, h * w).expand(n, c, h * w)
    out = r.reshape(n, c, h * w).gather(2, idx).view(n, c, h, w)
    return out if batched else out[0]
