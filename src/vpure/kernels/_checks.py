"""Argument checks shared by the kernel ops; messages name the argument."""

from __future__ import annotations

import torch

from .errors import KernelError


def check_warp_args(x: torch.Tensor, flow: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor) or not isinstance(flow, torch.Tensor):
        raise KernelError("warp_l1: x and flow must be torch tensors")
    if x.ndim != 5:
        raise KernelError(f"warp_l1: x must be (B, C, T, h, w), got shape {tuple(x.shape)}")
    b, _, t, h, w = x.shape
    if t < 2:
        raise KernelError(f"warp_l1: x needs at least 2 frames, got T={t}")
    if tuple(flow.shape) != (b, t - 1, 2, h, w):
        raise KernelError(f"warp_l1: flow must be (B, T-1, 2, h, w) = {(b, t - 1, 2, h, w)}, got {tuple(flow.shape)}")
    if not x.is_floating_point() or not flow.is_floating_point():
        raise KernelError(f"warp_l1: x and flow must be floating point, got {x.dtype} and {flow.dtype}")
    if x.device != flow.device:
        raise KernelError(f"warp_l1: x on {x.device} but flow on {flow.device}")
    if x.numel() == 0:
        raise KernelError(f"warp_l1: x is empty: shape {tuple(x.shape)}")
    # One behaviour for every implementation: a NaN or Inf displacement has no pixel to
    # sample (the native path clamped it to a border, the others gave NaN or an index error).
    if not torch.isfinite(flow.sum(dtype=torch.float32)) and not bool(torch.isfinite(flow).all()):
        raise KernelError("warp_l1: flow contains NaN or Inf")
