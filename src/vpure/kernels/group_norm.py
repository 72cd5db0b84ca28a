"""Group normalisation, optionally fused with SiLU, of (N, C, H, W) maps for CPU inference.

``y = act((x - mean_g) / sqrt(var_g + eps) * weight + bias)`` with the mean and biased
variance of each sample's group of C / G channels over all pixels (PyTorch's
``group_norm``), ``act`` the identity or SiLU. The native kernel
(``kernels/src/group_norm.cpp``) takes NCHW or channels-last maps in fp32 or bf16, reads
each map twice and writes it once, and computes in fp32 with the statistics in double
(bf16 output rounded once, after the activation). It exists because Inductor's generated
GroupNorm + SiLU on a channels-last map with few channels per group ran 3-7x slower than
the same bytes in NCHW (the `small` VAE decoder: two thirds of a compiled decode).

``group_norm`` is backed by a ``torch.library`` custom op (``vpure::group_norm``), so a
compiled graph calls it as one opaque kernel. No autograd: ``"auto"`` hands a tensor that
needs gradients to PyTorch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._dispatch import native, resolve
from .errors import KernelError, KernelUnavailable

_DTYPES = (torch.float32, torch.bfloat16)


def group_norm_ref(x: torch.Tensor, groups: int, weight: torch.Tensor | None = None, bias: torch.Tensor | None = None,
                   eps: float = 1e-5, silu: bool = False) -> torch.Tensor:
    """float64 oracle, returned in ``x``'s dtype."""
    y = F.group_norm(x.double(), groups, None if weight is None else weight.double(),
                     None if bias is None else bias.double(), eps)
    return (F.silu(y) if silu else y).to(x.dtype)


def _check(x: torch.Tensor, groups: int, weight, bias, eps: float) -> None:
    if not isinstance(x, torch.Tensor) or x.ndim != 4:
        raise KernelError(f"group_norm: x must be an (N, C, H, W) tensor, got "
                          f"{tuple(getattr(x, 'shape', ())) or type(x).__name__}")
    c = x.shape[1]
    if groups <= 0 or c % groups:
        raise KernelError(f"group_norm: {c} channels do not split into {groups} groups")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and (not isinstance(t, torch.Tensor) or tuple(t.shape) != (c,)):
            raise KernelError(f"group_norm: {name} must be a ({c},) tensor, got "
                              f"{tuple(getattr(t, 'shape', ())) or type(t).__name__}")
    if not eps >= 0.0:
        raise KernelError(f"group_norm: eps must be >= 0, got {eps}")


def _layout(x: torch.Tensor) -> bool | None:
    """True for channels-last, False for NCHW, None for any other memory layout."""
    if x.is_contiguous():
        return False
    if x.is_contiguous(memory_format=torch.channels_last):
        return True
    return None


def native_applies(x: torch.Tensor) -> bool:
    """Whether ``"auto"`` runs the native kernel on ``x``: a CPU fp32/bf16 (N, C, H, W) map,
    NCHW or channels-last, that needs no gradient, with the extension built."""
    return (x.ndim == 4 and x.device.type == "cpu" and x.dtype in _DTYPES and x.numel() > 0
            and _layout(x) is not None and not (x.requires_grad and torch.is_grad_enabled())
            and native() is not None)


@torch.library.custom_op("vpure::group_norm", mutates_args=())
def _op(x: torch.Tensor, groups: int, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float,
        silu: bool, portable: bool) -> torch.Tensor:
    mod = native()
    if mod is None:
        raise KernelUnavailable("group_norm: the native extension is not built")
    _check(x, groups, weight, bias, eps)
    if x.device.type != "cpu" or x.dtype not in _DTYPES:
        raise KernelError(f"group_norm: the native kernel takes CPU float32/bfloat16, got {x.dtype} on {x.device}")
    channels_last = _layout(x)
    if channels_last is None:
        x, channels_last = x.contiguous(), False
    gamma = None if weight is None else weight.detach().float().contiguous()
    beta = None if bias is None else bias.detach().float().contiguous()
    y = torch.empty_like(x)  # the same layout
    n, c, h, w = x.shape
    mod.group_norm(x.dtype == torch.bfloat16, channels_last, x.data_ptr(), y.data_ptr(),
                   0 if gamma is None else gamma.data_ptr(), 0 if beta is None else beta.data_ptr(),
                   n, c, h * w, groups, float(eps), silu, portable)
    return y


@_op.register_fake
def _(x, groups, weight, bias, eps, silu, portable):
    return torch.empty_like(x)


def group_norm_native(x: torch.Tensor, groups: int, weight: torch.Tensor | None = None,
                      bias: torch.Tensor | None = None, eps: float = 1e-5, silu: bool = False, *,
                      portable: bool = False) -> torch.Tensor:
    """The native kernel (any other layout made NCHW first); output in ``x``'s layout.
    ``portable`` forces the baseline (non-AVX2) copy (tests)."""
    # checked here as well as in the op, so that the errors are this package's classes even
    # where a second copy of this folder re-registered the op (see kernels/attention.py)
    _check(x, groups, weight, bias, eps)
    if x.device.type != "cpu" or x.dtype not in _DTYPES:
        raise KernelError(f"group_norm: the native kernel takes CPU float32/bfloat16, got {x.dtype} on {x.device}")
    if native() is None:
        raise KernelUnavailable("group_norm: the native extension is not built")
    return _op(x, groups, weight, bias, float(eps), silu, portable)


def group_norm(x: torch.Tensor, groups: int, weight: torch.Tensor | None = None, bias: torch.Tensor | None = None,
               eps: float = 1e-5, silu: bool = False, impl: str = "auto") -> torch.Tensor:
    """``group_norm(x, groups, weight, bias, eps)``, then SiLU if ``silu``, as PyTorch computes it.

    ``impl``: "auto" (native where :func:`native_applies`, else PyTorch), "native", "torch",
    "ref" (:func:`group_norm_ref`).
    """
    _check(x, groups, weight, bias, eps)
    if impl == "auto":
        impl = "native" if native_applies(x) else "torch"
    impl = resolve(impl, x.device, ("native", "torch", "ref"))
    if impl == "native":
        return group_norm_native(x, groups, weight, bias, eps, silu)
    if impl == "torch":
        y = F.group_norm(x, groups, weight, bias, eps)
        return F.silu(y) if silu else y
    return group_norm_ref(x, groups, weight, bias, eps, silu)
