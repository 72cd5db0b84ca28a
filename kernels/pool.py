"""Max pooling of channels-last maps for CPU inference (the ResNet stem's 3x3 / 2 max-pool).

``y[n, c, oy, ox] = max_{i, j < k} x[n, c, oy*s - p + i, ox*s - p + j]`` over positions
inside the map (PyTorch's ``max_pool2d`` with ``ceil_mode=False``, dilation 1: implicit
-inf padding, NaN propagating). oneDNN's convolutions leave their outputs channels-last;
PyTorch's CPU kernel on such a map also writes argmax indices that inference never reads.
The native kernel (``kernels/src/pool.cpp``) keeps a running maximum over the contiguous
channels of each window's rows. fp32 or bf16; no autograd (inference only: ``"auto"``
gives a tensor that needs gradients to PyTorch).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._dispatch import native, resolve
from .errors import KernelError, KernelUnavailable

_DTYPES = (torch.float32, torch.bfloat16)


def max_pool2d_ref(x: torch.Tensor, kernel: int, stride: int, padding: int) -> torch.Tensor:
    """float64 oracle: PyTorch's max_pool2d on a float64 copy, returned in ``x``'s dtype."""
    return F.max_pool2d(x.double(), kernel, stride, padding).to(x.dtype)


def _check(x: torch.Tensor, kernel: int, stride: int, padding: int) -> None:
    if not isinstance(x, torch.Tensor) or x.ndim != 4:
        raise KernelError(f"max_pool2d: x must be a (N, C, H, W) tensor, got "
                          f"{tuple(getattr(x, 'shape', ())) or type(x).__name__}")
    if kernel < 1 or stride < 1 or padding < 0 or 2 * padding > kernel:
        raise KernelError(f"max_pool2d: need kernel >= 1, stride >= 1 and 0 <= padding <= kernel / 2, "
                          f"got {kernel}, {stride}, {padding}")
    if min(x.shape[-2:]) + 2 * padding < kernel:
        raise KernelError(f"max_pool2d: a {kernel}x{kernel} window does not fit a {tuple(x.shape[-2:])} map "
                          f"padded by {padding}")


def native_applies(x: torch.Tensor) -> bool:
    """Whether ``"auto"`` runs the native kernel on ``x``: a CPU fp32/bf16 (N, C, H, W) map in
    channels-last memory that needs no gradient, with the extension built."""
    return (x.device.type == "cpu" and x.dtype in _DTYPES and x.ndim == 4 and x.numel() > 0
            and not (x.requires_grad and torch.is_grad_enabled())
            and x.is_contiguous(memory_format=torch.channels_last) and native() is not None)


def max_pool2d_native(x: torch.Tensor, kernel: int, stride: int, padding: int, *,
                      portable: bool = False) -> torch.Tensor:
    """The native kernel: ``x`` channels-last on CPU, fp32 or bf16; output channels-last.
    ``portable`` forces the baseline (non-AVX2) copy (tests)."""
    mod = native()
    if mod is None:
        raise KernelUnavailable("max_pool2d: the native extension is not built")
    _check(x, kernel, stride, padding)
    if x.device.type != "cpu" or x.dtype not in _DTYPES:
        raise KernelError(f"max_pool2d: the native kernel takes CPU float32/bfloat16, got {x.dtype} on {x.device}")
    x = x.contiguous(memory_format=torch.channels_last)
    n, c, h, w = x.shape
    oh, ow = (h + 2 * padding - kernel) // stride + 1, (w + 2 * padding - kernel) // stride + 1
    y = torch.empty((n, c, oh, ow), dtype=x.dtype, memory_format=torch.channels_last)
    mod.max_pool2d_nhwc(x.dtype == torch.bfloat16, x.data_ptr(), y.data_ptr(), n, h, w, c, kernel, stride, padding,
                        portable)
    return y


def max_pool2d(x: torch.Tensor, kernel: int, stride: int, padding: int = 0, impl: str = "auto") -> torch.Tensor:
    """``max_pool2d(x, kernel, stride, padding)`` as PyTorch computes it, (N, C, H, W) ->
    (N, C, (H + 2p - k) // s + 1, (W + 2p - k) // s + 1).

    ``impl``: "auto" (native where :func:`native_applies`, else PyTorch), "native",
    "torch", "ref" (:func:`max_pool2d_ref`).
    """
    _check(x, kernel, stride, padding)
    if impl == "auto":
        impl = "native" if native_applies(x) else "torch"
    impl = resolve(impl, x.device, ("native", "torch", "ref"))
    if impl == "native":
        return max_pool2d_native(x, kernel, stride, padding)
    if impl == "torch":
        return F.max_pool2d(x, kernel, stride, padding)
    return max_pool2d_ref(x, kernel, stride, padding)
