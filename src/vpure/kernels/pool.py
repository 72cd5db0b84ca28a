"""Max pooling of channels-last maps for CPU inference (the ResNet stem's 3x3 / 2 max-pool,
an I3D's 1x3x3 stem pool and 2x1x1 temporal pool).

``y[n, c, oy, ox] = max_{i, j < k} x[n, c, oy*s - p + i, ox*s - p + j]`` over positions
inside the map (PyTorch's ``max_pool2d`` with ``ceil_mode=False``, dilation 1: implicit
-inf padding, NaN propagating); ``max_pool3d`` adds a window of ``kt`` frames every ``st``
(no temporal padding). oneDNN's convolutions leave their outputs channels-last; PyTorch's
CPU kernels on such a map also write argmax indices that inference never reads. The native
kernel (``kernels/src/pool.cpp``) keeps a running maximum over the contiguous channels of
each window's pixels. fp32, bf16 or uint8 (an int8 plan's activation codes, pooled exactly
since per-tensor quantisation is monotonic); no autograd (inference only: ``"auto"`` gives a tensor
that needs gradients to PyTorch).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._dispatch import native, resolve
from .errors import KernelError, KernelUnavailable

_DTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.uint8: 2}  # the native entry's dtype codes


def max_pool2d_ref(x: torch.Tensor, kernel: int, stride: int, padding: int) -> torch.Tensor:
    """float64 oracle: PyTorch's max_pool2d on a float64 copy, returned in ``x``'s dtype."""
    return F.max_pool2d(x.double(), kernel, stride, padding).to(x.dtype)  # exact for uint8 too


def max_pool3d_ref(x: torch.Tensor, kernel: tuple[int, int, int], stride: tuple[int, int, int],
                   padding: tuple[int, int, int]) -> torch.Tensor:
    """float64 oracle: PyTorch's max_pool3d on a float64 copy, returned in ``x``'s dtype."""
    return F.max_pool3d(x.double(), kernel, stride, padding).to(x.dtype)


def _torch(pool, x: torch.Tensor, *args) -> torch.Tensor:
    """PyTorch's pool; uint8 through fp32 (exact), since PyTorch 2.13's integer CPU max-pool on
    a channels-last map fails its own index-width check (its integer_t is the element type)."""
    if x.dtype == torch.uint8:
        return pool(x.float(), *args).to(torch.uint8)
    return pool(x, *args)


def _check(x: torch.Tensor, kt: int, st: int, k: int, s: int, p: int, ndim: int, name: str) -> None:
    if not isinstance(x, torch.Tensor) or x.ndim != ndim:
        layout = "(N, C, H, W)" if ndim == 4 else "(N, C, T, H, W)"
        raise KernelError(f"{name}: x must be a {layout} tensor, got "
                          f"{tuple(getattr(x, 'shape', ())) or type(x).__name__}")
    if min(kt, st, k, s) < 1 or p < 0 or 2 * p > k:
        raise KernelError(f"{name}: need kernel >= 1, stride >= 1 and 0 <= padding <= kernel / 2, "
                          f"got {(kt, k, k) if ndim == 5 else k}, {(st, s, s) if ndim == 5 else s}, {p}")
    if min(x.shape[-2:]) + 2 * p < k or (ndim == 5 and x.shape[2] < kt):
        raise KernelError(f"{name}: the window does not fit a {tuple(x.shape[2:])} map padded by {p}")


def _square(name: str, kernel, stride, padding) -> tuple[int, int, int, int, int]:
    """(kt, st, k, s, p) of a 3-D pool with square spatial windows and no temporal padding."""
    try:
        (kt, kh, kw), (st, sh, sw), (pt, ph, pw) = (tuple(int(v) for v in a) for a in (kernel, stride, padding))
    except (TypeError, ValueError):
        raise KernelError(f"{name}: kernel, stride and padding must be 3-tuples, got {kernel}, {stride}, "
                          f"{padding}") from None
    if kh != kw or sh != sw or ph != pw or pt != 0:
        raise KernelError(f"{name}: the native kernel takes square spatial windows and no temporal padding, got "
                          f"kernel {kernel}, stride {stride}, padding {padding}")
    return kt, st, kh, sh, ph


def native_applies(x: torch.Tensor) -> bool:
    """Whether ``"auto"`` runs the native kernel on ``x``: a CPU fp32/bf16/uint8 (N, C, H, W) or
    (N, C, T, H, W) map in channels-last memory that needs no gradient, with the extension
    built."""
    layout = {4: torch.channels_last, 5: torch.channels_last_3d}.get(x.ndim)
    return (layout is not None and x.device.type == "cpu" and x.dtype in _DTYPES and x.numel() > 0
            and not (x.requires_grad and torch.is_grad_enabled())
            and x.is_contiguous(memory_format=layout) and native() is not None)


def _native(x: torch.Tensor, kt: int, st: int, k: int, s: int, p: int, portable: bool, name: str) -> torch.Tensor:
    mod = native()
    if mod is None:
        raise KernelUnavailable(f"{name}: the native extension is not built")
    if x.device.type != "cpu" or x.dtype not in _DTYPES:
        raise KernelError(f"{name}: the native kernel takes CPU float32/bfloat16/uint8, got {x.dtype} on {x.device}")
    three_d = x.ndim == 5
    x = x.contiguous(memory_format=torch.channels_last_3d if three_d else torch.channels_last)
    n, c, t, h, w = x.shape if three_d else (x.shape[0], x.shape[1], 1, *x.shape[2:])
    ot, oh, ow = (t - kt) // st + 1, (h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1
    y = torch.empty((n, c, ot, oh, ow) if three_d else (n, c, oh, ow), dtype=x.dtype,
                    memory_format=torch.channels_last_3d if three_d else torch.channels_last)
    mod.max_pool_ndhwc(_DTYPES[x.dtype], x.data_ptr(), y.data_ptr(), n, t, h, w, c, kt, st, k, s, p,
                       portable)
    return y


def max_pool2d_native(x: torch.Tensor, kernel: int, stride: int, padding: int, *,
                      portable: bool = False) -> torch.Tensor:
    """The native kernel on an (N, C, H, W) map (made channels-last if it is not), CPU fp32,
    bf16 or uint8; output channels-last. ``portable`` forces the baseline (non-AVX2) copy (tests)."""
    _check(x, 1, 1, kernel, stride, padding, 4, "max_pool2d")
    return _native(x, 1, 1, kernel, stride, padding, portable, "max_pool2d")


def max_pool3d_native(x: torch.Tensor, kernel, stride, padding, *, portable: bool = False) -> torch.Tensor:
    """The native kernel on an (N, C, T, H, W) map (made channels-last-3d if it is not), CPU
    fp32, bf16 or uint8, square spatial windows, no temporal padding; output channels-last-3d."""
    kt, st, k, s, p = _square("max_pool3d", kernel, stride, padding)
    _check(x, kt, st, k, s, p, 5, "max_pool3d")
    return _native(x, kt, st, k, s, p, portable, "max_pool3d")


def max_pool2d(x: torch.Tensor, kernel: int, stride: int, padding: int = 0, impl: str = "auto") -> torch.Tensor:
    """``max_pool2d(x, kernel, stride, padding)`` as PyTorch computes it, (N, C, H, W) ->
    (N, C, (H + 2p - k) // s + 1, (W + 2p - k) // s + 1).

    ``impl``: "auto" (native where :func:`native_applies`, else PyTorch), "native",
    "torch", "ref" (:func:`max_pool2d_ref`).
    """
    _check(x, 1, 1, kernel, stride, padding, 4, "max_pool2d")
    if impl == "auto":
        impl = "native" if native_applies(x) else "torch"
    impl = resolve(impl, x.device, ("native", "torch", "ref"))
    if impl == "native":
        return _native(x, 1, 1, kernel, stride, padding, False, "max_pool2d")
    if impl == "torch":
        return _torch(F.max_pool2d, x, kernel, stride, padding)
    return max_pool2d_ref(x, kernel, stride, padding)


def max_pool3d(x: torch.Tensor, kernel, stride, padding=(0, 0, 0), impl: str = "auto") -> torch.Tensor:
    """``max_pool3d(x, kernel, stride, padding)`` as PyTorch computes it for (N, C, T, H, W)
    maps, windows (kt, k, k) with strides (st, s, s) and padding (0, p, p).

    ``impl``: as :func:`max_pool2d` (:func:`max_pool3d_ref` for "ref").
    """
    kt, st, k, s, p = _square("max_pool3d", kernel, stride, padding)
    _check(x, kt, st, k, s, p, 5, "max_pool3d")
    if impl == "auto":
        impl = "native" if native_applies(x) else "torch"
    impl = resolve(impl, x.device, ("native", "torch", "ref"))
    if impl == "native":
        return _native(x, kt, st, k, s, p, False, "max_pool3d")
    if impl == "torch":
        return _torch(F.max_pool3d, x, kernel, stride, padding)
    return max_pool3d_ref(x, kernel, stride, padding)
