"""vpure.kernels: the hot loops (warp-L1 loss/gradient, block matching, integer DCT, and
for CPU inference small-head attention, ``attention.py``, channels-last max pooling,
``pool.py``, antialiased resizing, ``resize.py``, and group normalisation with SiLU,
``group_norm.py``).

Depends on torch (and triton, imported lazily) only. Each op module follows one order:
``<op>_ref`` (float64 oracle), Triton launcher (its ``@triton.jit`` kernels live in
``_triton_<op>.py``, imported only when the Triton path runs, so importing vpure never
imports triton), autograd wrapper where gradients are needed, native C++ and torch
implementations, then the public ``<op>(..., impl="auto")``.
"""

from ._dispatch import IMPLS, available_impls, native
from .attention import small_head_attention
from .block_match import block_match
from .errors import KernelError, KernelUnavailable
from .group_norm import group_norm
from .intdct import dequantize, forward_transform, inverse_transform, quantize, quantize_residual
from .motion import motion_compensate
from .pool import max_pool2d
from .resize import resize_antialiased
from .warp_l1 import warp_l1, warp_l1_grad

__all__ = [
    "IMPLS", "KernelError", "KernelUnavailable", "available_impls", "block_match", "dequantize",
    "forward_transform", "group_norm", "inverse_transform", "max_pool2d", "motion_compensate", "native", "quantize",
    "quantize_residual", "resize_antialiased", "small_head_attention", "warp_l1", "warp_l1_grad",
]
