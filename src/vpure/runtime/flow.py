"""Optical flow for VideoPure (spec/videopure.md, stage 1).

A flow provider maps frames (B, 3, T, H, W) in [0, 1] to forward flows
(B, T-1, 2, H, W) from frame i to frame i+1 (channel 0 = dx, 1 = dy) at full resolution;
:func:`downsample_flow` brings them to latent size. :class:`DISFlow` (OpenCV's DIS) is the
weight-free default provider.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .errors import InputError

DIS_PRESETS = ("ultrafast", "fast", "medium")


def downsample_flow(flow: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, T-1, 2, H, W) -> (B, T-1, 2, h, w): bilinear (align_corners=False), x scaled by w/W, y by h/H."""
    if flow.ndim != 5 or flow.shape[2] != 2:
        raise InputError(f"flow must be (B, T-1, 2, H, W), got {tuple(flow.shape)}")
    b, p, _, big_h, big_w = flow.shape
    h, w = size
    out = F.interpolate(flow.reshape(b * p, 2, big_h, big_w).float(), size=(h, w), mode="bilinear", align_corners=False)
    scale = torch.tensor([w / big_w, h / big_h], dtype=out.dtype, device=out.device).view(1, 2, 1, 1)
    return (out * scale).reshape(b, p, 2, h, w)


class DISFlow:
    """OpenCV DIS optical flow on grey frames; frames (B, 3, T, H, W) [0, 1] -> (B, T-1, 2, H, W)."""

    def __init__(self, preset: str = "medium"):
        import cv2

        if preset not in DIS_PRESETS:
            raise InputError(f"DIS preset {preset!r} is not one of {DIS_PRESETS}")
        self.preset = preset
        self._dis = cv2.DISOpticalFlow_create(getattr(cv2, f"DISOPTICAL_FLOW_PRESET_{preset.upper()}"))

    def __call__(self, frames: torch.Tensor, input_range: str = "unit") -> torch.Tensor:

        if frames.ndim != 5 or frames.shape[1] != 3:
            raise InputError(f"frames must be (B, 3, T, H, W), got {tuple(frames.shape)}")
        scale = 255.0 if input_range == "unit" else 1.0
        gray = (frames.detach().float().cpu() * scale).clamp(0, 255)
        gray = (0.299 * gray[:, 0] + 0.587 * gray[:, 1] + 0.114 * gray[:, 2]).round().to(torch.uint8).numpy()
        b, t, h, w = gray.shape
        out = np.zeros((b, t - 1, 2, h, w), np.float32)
        for i in range(b):
            for j in range(t - 1):
                out[i, j] = self._dis.calc(gray[i, j], gray[i, j + 1], None).transpose(2, 0, 1)
        return torch.from_numpy(out).to(frames.device)
