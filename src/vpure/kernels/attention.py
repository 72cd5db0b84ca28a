"""Small-head attention for CPU inference: ``softmax(q k^T * scale) v`` per (batch, head).

The `small` UNet's heads are 8 channels wide. PyTorch's CPU flash kernel is blocked for
wide heads and spends most of its time on bookkeeping there; the native kernel (``kernels/src/attention.cpp``) is its
narrow-head counterpart: keys converted once per (batch, head), scores 16 keys at a time
in AVX-512, a vectorised exp, fp32 arithmetic on fp32 or bf16 tensors.

Tensors are taken as an attention layer's projections lay them out, ``(B, L, H*D)``,
so no per-head transposes are needed. ``small_head_attention`` is a ``torch.library``
custom op (``vpure::small_head_attention``): a compiled graph calls it as one opaque
kernel. It has no autograd formula: callers use it for inference only (the attention
processor ``vpure.runtime.models.attention_processors.NativeSmallHeadAttention`` steps aside under autograd).
"""

from __future__ import annotations

import math

import torch

from ._dispatch import native
from .errors import KernelError, KernelUnavailable

HEAD_SIZES = (8, 16, 32)
_DTYPES = (torch.float32, torch.bfloat16)


def native_attention_available() -> bool:
    """Whether the fast (AVX-512) copy of the native kernel runs on this CPU. Elsewhere the
    native module has only its scalar portable copy (tests use it), so callers keep
    PyTorch's kernel there."""
    mod = native()
    return mod is not None and bool(mod.cpu_has_avx512())


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> int:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.ndim != 3:
            raise KernelError(f"small_head_attention: {name} must be a (B, L, heads*D) tensor, "
                              f"got {tuple(getattr(t, 'shape', ())) or type(t).__name__}")
        if t.device.type != "cpu":
            raise KernelError(f"small_head_attention: {name} is on {t.device}; the native kernel is CPU only")
        if t.dtype != q.dtype or t.dtype not in _DTYPES:
            raise KernelError(f"small_head_attention: q, k, v must share one dtype of float32/bfloat16, "
                              f"got {q.dtype}, {k.dtype}, {v.dtype}")
    if heads <= 0 or q.shape[-1] % heads:
        raise KernelError(f"small_head_attention: {q.shape[-1]} channels do not split into {heads} heads")
    d = q.shape[-1] // heads
    if d not in HEAD_SIZES:
        raise KernelError(f"small_head_attention: head size {d} is not one of {HEAD_SIZES}")
    if k.shape != v.shape or k.shape[0] != q.shape[0] or k.shape[2] != q.shape[2]:
        raise KernelError(f"small_head_attention: k and v must be (B, Lk, {q.shape[2]}) with q's batch "
                          f"{q.shape[0]}, got {tuple(k.shape)} and {tuple(v.shape)}")
    if k.shape[1] == 0:
        raise KernelError("small_head_attention: empty key sequence")
    return d


def _heads_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(2) == 1 else t.contiguous()


@torch.library.custom_op("vpure::small_head_attention", mutates_args=())
def _op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, scale: float, portable: bool) -> torch.Tensor:
    mod = native()
    if mod is None:
        raise KernelUnavailable("small_head_attention: the native extension is not built")
    d = _check(q, k, v, heads)
    # The vectorised maximum (max_ps) drops a NaN operand, so the AVX-512 copy would return
    # finite values where the scalar copy and PyTorch give NaN: non-finite inputs are refused
    # in every copy instead (three reductions, O(L) against the kernel's O(L^2)).
    if not all(math.isfinite(float(t.sum(dtype=torch.float32))) for t in (q, k, v)):
        raise KernelError("small_head_attention: q, k or v contains NaN or Inf")
    q, k, v = (_heads_contiguous(t) for t in (q, k, v))
    out = torch.empty(q.shape, dtype=q.dtype)
    b, lq, _ = q.shape

    def strides(t):  # (batch, position, head) in elements; within a head D is contiguous
        return [t.stride(0), t.stride(1), d]

    mod.small_head_attention(q.dtype == torch.bfloat16, q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(),
                             b, heads, lq, k.shape[1], d, strides(q), strides(k), strides(v), strides(out),
                             float(scale), portable)
    return out


@_op.register_fake
def _(q, k, v, heads, scale, portable):
    return torch.empty(q.shape, dtype=q.dtype, device=q.device)


def small_head_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int,
                         scale: float | None = None, *, portable: bool = False) -> torch.Tensor:
    """``softmax(q_h k_h^T * scale) v_h`` for every head h, as (B, Lq, heads*D).

    q (B, Lq, heads*D), k and v (B, Lk, heads*D): CPU, one dtype of float32/bfloat16, the
    channel dimension contiguous; D in ``HEAD_SIZES``; ``scale`` defaults to D**-0.5.
    Arithmetic in fp32 (bf16 inputs are widened, the output rounded to bf16). No autograd.
    Inputs must be finite (KernelError otherwise, from every copy of the kernel).
    ``portable`` forces the scalar copy (the one CPUs without AVX-512 would run; tests).
    """
    # Checked here as well as in the op: a process whose sys.path holds the checkout's root
    # (`python -m ...` run there) may also import this folder as a bare `kernels` package
    # (transformers imports any `kernels` it finds, looking for Hugging Face's), which
    # re-registers the op with that copy's error classes; the wrapper's stay vpure's.
    d = _check(q, k, v, heads)
    return _op(q, k, v, heads, d ** -0.5 if scale is None else float(scale), portable)


def small_head_attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int,
                             scale: float | None = None) -> torch.Tensor:
    """float64 oracle of :func:`small_head_attention`."""
    b, lq, c = q.shape
    d = c // heads
    qh, kh, vh = (t.double().reshape(b, -1, heads, d).transpose(1, 2) for t in (q, k, v))
    w = (qh @ kh.transpose(-1, -2) * (d ** -0.5 if scale is None else scale)).softmax(-1)
    return (w @ vh).transpose(1, 2).reshape(b, lq, c)
