"""Antialiased bilinear resizing of image planes for CPU inference (the gate's 224 -> 112 px).

``out = A_h x A_w^T`` per plane, with PyTorch's taps for ``interpolate(mode="bilinear",
align_corners=False, antialias=True)``: output pixel ``i`` centred at ``c = s (i + 0.5)``
(``s = in / out``) weighs input pixel ``j`` by the triangle ``max(0, 1 - |j + 0.5 - c| /
max(s, 1))``, over ``|j + 0.5 - c| < max(s, 1)``, normalised to sum 1. The native kernel
(``kernels/src/resize.cpp``) applies the taps separably, rows first; PyTorch's CPU kernel
takes several times longer than that arithmetic needs. fp32; no autograd (``"auto"`` gives
a tensor that needs gradients, e.g. the gate-adaptive attack's, to PyTorch).
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch
import torch.nn.functional as F

from ._dispatch import native, resolve
from .errors import KernelError, KernelUnavailable


@lru_cache(maxsize=32)
def taps(in_size: int, out_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(start (out,) int64, count (out,) int64, weights (out, K) float64, zero past count) of
    the antialiased bilinear resize from ``in_size`` to ``out_size`` pixels, as PyTorch
    computes them (``_compute_indices_min_size_weights_aa``)."""
    if in_size < 1 or out_size < 1:
        raise KernelError(f"resize: sizes must be positive, got {in_size} -> {out_size}")
    scale = in_size / out_size
    support = scale if scale >= 1.0 else 1.0  # the triangle's half-width, widened when shrinking
    inv = 1.0 / scale if scale >= 1.0 else 1.0
    rows = []
    for i in range(out_size):
        center = scale * (i + 0.5)
        lo = max(math.trunc(center - support + 0.5), 0)
        hi = min(math.trunc(center + support + 0.5), in_size)
        w = [max(0.0, 1.0 - abs((j + lo - center + 0.5) * inv)) for j in range(hi - lo)]
        total = sum(w)
        rows.append((lo, [v / total for v in w] if total else w))
    k = max(len(w) for _, w in rows)
    weights = torch.zeros(out_size, k, dtype=torch.float64)
    for i, (_, w) in enumerate(rows):
        weights[i, :len(w)] = torch.tensor(w, dtype=torch.float64)
    start = torch.tensor([lo for lo, _ in rows], dtype=torch.int64)
    count = torch.tensor([len(w) for _, w in rows], dtype=torch.int64)
    return start, count, weights


@lru_cache(maxsize=32)
def _native_taps(in_size: int, out_size: int):
    start, count, weights = taps(in_size, out_size)
    return start.numpy(), count.numpy(), weights.float().numpy()


def _matrix(in_size: int, out_size: int) -> torch.Tensor:
    start, count, weights = taps(in_size, out_size)
    m = torch.zeros(out_size, in_size, dtype=torch.float64)
    for i in range(out_size):
        m[i, start[i]:start[i] + count[i]] = weights[i, :count[i]]
    return m


def resize_antialiased_ref(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """float64 oracle: ``A_h x A_w^T`` with the taps as dense matrices, in ``x``'s dtype."""
    h, w = size
    out = _matrix(x.shape[-2], h) @ x.double() @ _matrix(x.shape[-1], w).T
    return out.to(x.dtype)


MAX_SIDE = 1 << 15  # output side bound: larger sizes are typos that would allocate (or loop) for minutes
MAX_OUTPUT = 1 << 31  # output elements bound (8 GiB of float32)


def _check(x: torch.Tensor, size) -> tuple[int, int]:
    if not isinstance(x, torch.Tensor) or x.ndim < 2 or x.numel() == 0:
        raise KernelError(f"resize: x must be a non-empty (..., H, W) tensor, got "
                          f"{tuple(getattr(x, 'shape', ())) or type(x).__name__}")
    if not x.is_floating_point():
        raise KernelError(f"resize: x must be floating point, got {x.dtype}")
    try:
        h, w = (int(v) for v in size)
    except (TypeError, ValueError):
        raise KernelError(f"resize: size must be (h, w), got {size!r}") from None
    if h < 1 or w < 1:
        raise KernelError(f"resize: size must be positive, got {(h, w)}")
    if max(h, w) > MAX_SIDE or x.numel() // (x.shape[-2] * x.shape[-1]) * h * w > MAX_OUTPUT:
        raise KernelError(f"resize: output {(h, w)} for {tuple(x.shape)} is beyond the bounds (sides <= {MAX_SIDE}, "
                          f"<= {MAX_OUTPUT} output elements)")
    return h, w


def native_applies(x: torch.Tensor) -> bool:
    """Whether ``"auto"`` runs the native kernel on ``x``: CPU float32 that needs no
    gradient, with the extension built."""
    return (x.device.type == "cpu" and x.dtype == torch.float32 and x.ndim >= 2 and x.numel() > 0
            and not (x.requires_grad and torch.is_grad_enabled()) and native() is not None)


def resize_antialiased_native(x: torch.Tensor, size: tuple[int, int], *, portable: bool = False) -> torch.Tensor:
    """The native kernel: CPU float32 ``x`` (..., H, W) -> contiguous (..., h, w).
    ``portable`` forces the baseline (non-AVX2) copy (tests)."""
    mod = native()
    if mod is None:
        raise KernelUnavailable("resize: the native extension is not built")
    h, w = _check(x, size)
    if x.device.type != "cpu" or x.dtype != torch.float32:
        raise KernelError(f"resize: the native kernel takes CPU float32, got {x.dtype} on {x.device}")
    planes = x.reshape(-1, *x.shape[-2:]).contiguous()
    out = torch.empty(planes.shape[0], h, w, dtype=torch.float32)
    mod.resample_planes(planes.detach().numpy(), out.numpy(), *_native_taps(x.shape[-2], h),
                        *_native_taps(x.shape[-1], w), portable)
    return out.reshape(*x.shape[:-2], h, w)


def resize_antialiased(x: torch.Tensor, size: tuple[int, int], impl: str = "auto") -> torch.Tensor:
    """``interpolate(x, size, mode="bilinear", align_corners=False, antialias=True)`` over the
    last two dimensions of ``x`` (..., H, W) -> (..., h, w).

    ``impl``: "auto" (native where :func:`native_applies`, else PyTorch), "native",
    "torch", "ref" (:func:`resize_antialiased_ref`).
    """
    h, w = _check(x, size)
    if impl == "auto":
        impl = "native" if native_applies(x) else "torch"
    impl = resolve(impl, x.device, ("native", "torch", "ref"))
    if impl == "native":
        return resize_antialiased_native(x, (h, w))
    if impl == "torch":
        lead = x.shape[:-2]
        out = F.interpolate(x.reshape(-1, 1, *x.shape[-2:]), size=(h, w), mode="bilinear", align_corners=False,
                            antialias=True)
        return out.reshape(*lead, h, w)
    return resize_antialiased_ref(x, (h, w))
