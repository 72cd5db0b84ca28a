"""Clip layout helpers: models take clips (B, C, T, H, W) and run 2D layers on frames."""

from __future__ import annotations

import torch


def frames_to_batch(x: torch.Tensor) -> torch.Tensor:
    """(B, C, T, H, W) -> (B*T, C, H, W), frames of one clip consecutive."""
    b, c, t, h, w = x.shape
    return x.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w)


def batch_to_frames(x: torch.Tensor, b: int) -> torch.Tensor:
    """(B*T, C, H, W) -> (B, C, T, H, W); inverse of :func:`frames_to_batch`."""
    bt, c, h, w = x.shape
    return x.reshape(b, bt // b, c, h, w).permute(0, 2, 1, 3, 4)
