"""vpure.kernels: the hot loops (warp-L1 loss/gradient, block matching, integer DCT).

Depends on torch (and triton, imported lazily) only. Every op has a float64 ``_ref``
oracle, a Triton kernel for CUDA, a native C++ CPU implementation and a vectorised torch
implementation; the public function takes ``impl="auto"``.
"""

from ._dispatch import IMPLS, available_impls, native
from .errors import KernelError, KernelUnavailable

__all__ = ["IMPLS", "KernelError", "KernelUnavailable", "available_impls", "native"]
