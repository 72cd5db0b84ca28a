"""Attention processors for diffusers' ``Attention`` layers on the torch inference path.

Short-key attention as fp32 matmuls (:func:`attend`), self-attention without diffusers'
per-call overhead (:class:`LeanSelfAttention`), cross-attention against the baked empty
prompt with its keys and values projected once (:class:`ConstantContextAttention`), and
the native small-head kernel as one custom op in compiled graphs
(:class:`NativeSmallHeadAttention`, :func:`use_native_attention`).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn


# Key lengths up to which attention on CPU runs as two matmuls and a softmax in fp32. PyTorch's
# CPU flash kernel is tuned for long sequences and wide heads; UNet3D's temporal (T keys) and
# cross (prompt) attention have few keys and 8-wide heads, where it is slower than two plain
# matmuls (``python -m benchmarks.bench_models`` measures both on the `small` preset's shapes).
SHORT_KEYS = 96


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``scaled_dot_product_attention(q, k, v)`` (no mask, no dropout, default scale), with
    short key sequences on CPU computed explicitly in fp32 (bf16 inputs are upcast, so the
    softmax is fp32 too; the output keeps ``q``'s dtype). Differentiable either way."""
    if q.device.type != "cpu" or k.shape[-2] > SHORT_KEYS:
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, dropout_p=0.0, is_causal=False)
    qf, kf, vf = q.float() * (q.shape[-1] ** -0.5), k.float(), v.float()  # scaled before: Lq*hd < Lq*Lk values
    scores = torch.matmul(qf, kf.transpose(-1, -2))
    return torch.matmul(scores.softmax(-1), vf).to(q.dtype)


def _plain(attn, hidden_states, attention_mask) -> bool:
    """Whether an ``Attention`` call is the plain case the lean processors compute: (B, L, C)
    hidden states, no mask, no spatial/group/q/k norms, no residual connection."""
    return (attention_mask is None and hidden_states.ndim == 3 and attn.spatial_norm is None
            and attn.group_norm is None and attn.norm_q is None and attn.norm_k is None
            and not attn.residual_connection)


def _attend_heads(attn, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """(B, heads, L, hd) queries, keys and values -> the layer's output: :func:`attend`, heads
    merged, the output projection and dropout, diffusers' output rescale."""
    b, heads, _, hd = q.shape
    return _project_out(attn, attend(q, k, v).transpose(1, 2).reshape(b, -1, heads * hd))


def _project_out(attn, out: torch.Tensor) -> torch.Tensor:
    """An ``Attention`` layer's output projection and dropout, then diffusers' output rescale."""
    return attn.to_out[1](attn.to_out[0](out)) / attn.rescale_output_factor


def _native_kernel():
    """:func:`vpure.kernels.attention.small_head_attention` where its AVX-512 copy runs on
    this CPU, else None (PyTorch's kernels stay)."""
    from vpure.kernels.attention import native_attention_available, small_head_attention

    return small_head_attention if native_attention_available() else None


def _native_applies(attn, hidden_states: torch.Tensor) -> bool:
    """Whether an inference call of ``attn`` on ``hidden_states`` may take the native
    small-head kernel: CPU, fp32 or bf16, no autograd, heads of 8, 16 or 32 channels, keys
    and values as wide as the queries."""
    from vpure.kernels.attention import HEAD_SIZES

    return (hidden_states.device.type == "cpu" and hidden_states.dtype in (torch.float32, torch.bfloat16)
            and not torch.is_grad_enabled() and attn.inner_dim // attn.heads in HEAD_SIZES
            and attn.inner_dim % attn.heads == 0 and attn.inner_kv_dim == attn.inner_dim)


class LeanSelfAttention:
    """Attention processor for a self-attention layer on the torch inference path: diffusers'
    ``AttnProcessor2_0`` arithmetic with the native small-head kernel for inference calls
    where it runs (``native``, :class:`NativeSmallHeadAttention`'s kernel), else
    :func:`attend` (short key sequences, i.e. UNet3D's temporal attention, as fp32 matmuls
    on CPU). Anything it does not cover (masks, norms, 4-D inputs, a context, residual
    connections) goes to diffusers' own processor."""

    def __init__(self, native: bool = False):
        from diffusers.models.attention_processor import AttnProcessor2_0

        self._fallback = AttnProcessor2_0()
        self._native = _native_kernel() if native else None
        self.hits = 0

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 *args, **kwargs):
        if encoder_hidden_states is not None or not _plain(attn, hidden_states, attention_mask):
            return self._fallback(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        self.hits += 1
        b = hidden_states.shape[0]
        q, k, v = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        if self._native is not None and _native_applies(attn, hidden_states):
            return _project_out(attn, self._native(q, k, v, attn.heads, attn.scale))
        hd = k.shape[-1] // attn.heads
        q, k, v = (t.view(b, -1, attn.heads, hd).transpose(1, 2) for t in (q, k, v))
        return _attend_heads(attn, q, k, v)


class ConstantContextAttention:
    """Attention processor for a cross-attention layer whose context is the baked prompt.

    The runtime's conditioning never changes (spec/videopure.md), yet diffusers projects it
    to keys and values in every cross-attention layer, for every frame of every call. This
    processor projects the (1, L, D) prompt once per layer (again only if the prompt, the
    projections or their dtype/device change) and broadcasts it over the batch. It checks
    that the context it is handed is that prompt (every row: an elementwise compare costs
    1/D of the projection it saves), and hands anything it does not cover (masks, norms,
    another context, gradients wanted for the prompt or the projections) to diffusers' own
    processor. Gradients with respect to the hidden states (the latents) flow as usual.
    """

    def __init__(self, prompt: Callable[[], torch.Tensor], native: bool = False):
        from diffusers.models.attention_processor import AttnProcessor2_0

        self.prompt = prompt
        self._fallback = AttnProcessor2_0()  # diffusers' own processor, for what this one does not cover
        self._native = _native_kernel() if native else None  # as LeanSelfAttention's
        self._key: tuple | None = None
        self._kv: tuple[torch.Tensor, torch.Tensor] | None = None  # (1, L, heads*D) each
        self.hits = self.projections = 0

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 *args, **kwargs):
        ctx = self.prompt()
        if (encoder_hidden_states is None or not _plain(attn, hidden_states, attention_mask)
                or encoder_hidden_states.shape[1:] != ctx.shape[1:]
                or (torch.is_grad_enabled() and (ctx.requires_grad or attn.to_k.weight.requires_grad
                                                 or attn.to_v.weight.requires_grad))
                or not torch.equal(encoder_hidden_states,
                                   ctx.to(encoder_hidden_states.dtype).expand_as(encoder_hidden_states))):
            return self._fallback(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        dtype = hidden_states.dtype
        key = (dtype, hidden_states.device, ctx._version, attn.to_k.weight._version, attn.to_v.weight._version)
        if key != self._key:
            with torch.inference_mode(False), torch.no_grad():  # plain tensors: usable under autograd too
                c = ctx.to(dtype)
                if attn.norm_cross:
                    c = attn.norm_encoder_hidden_states(c)
                self._kv = (attn.to_k(c).contiguous(), attn.to_v(c).contiguous())
            self._key = key
            self.projections += 1
        self.hits += 1
        b = hidden_states.shape[0]
        q = attn.to_q(hidden_states)
        if self._native is not None and _native_applies(attn, hidden_states):  # batch broadcast: a 0 stride
            return _project_out(attn, self._native(q, *(t.expand(b, -1, -1) for t in self._kv), attn.heads,
                                                   attn.scale))
        hd = q.shape[-1] // attn.heads
        k, v = (t.view(1, -1, attn.heads, hd).transpose(1, 2).expand(b, -1, -1, -1) for t in self._kv)
        return _attend_heads(attn, q.view(b, -1, attn.heads, hd).transpose(1, 2), k, v)


class NativeSmallHeadAttention:
    """Attention processor for CPU inference (compiled components get it): diffusers'
    ``AttnProcessor2_0`` arithmetic with the native small-head kernel
    (:func:`vpure.kernels.attention.small_head_attention`; a compiled graph calls it as one
    custom op) in place of PyTorch's flash kernel, which is slow for 8-wide heads. The
    projections are passed as they are laid out, so no per-head transposes remain. Anything
    it does not cover (masks, norms, 4-D inputs, residual connections, another device or
    dtype, gradients wanted) goes to diffusers' own processor."""

    def __init__(self):
        from diffusers.models.attention_processor import AttnProcessor2_0

        from vpure.kernels.attention import small_head_attention

        self._fallback = AttnProcessor2_0()
        self._attend = small_head_attention

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 *args, **kwargs):
        if (not _plain(attn, hidden_states, attention_mask) or attn.norm_cross
                or not _native_applies(attn, hidden_states)):
            return self._fallback(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        ctx = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        return _project_out(attn, self._attend(attn.to_q(hidden_states), attn.to_k(ctx), attn.to_v(ctx),
                                               attn.heads, attn.scale))


def use_native_attention(module: nn.Module) -> int:
    """Every diffusers ``Attention`` in ``module`` with heads of 8, 16 or 32 channels gets
    :class:`NativeSmallHeadAttention`, where the kernel's AVX-512 copy runs on this CPU
    (elsewhere only its scalar portable copy exists, so PyTorch's kernel stays). In place;
    returns the count. For inference, compiled or eager: calls under autograd go to
    diffusers' processor."""
    from diffusers.models.attention_processor import Attention

    from vpure.kernels.attention import HEAD_SIZES, native_attention_available

    if not native_attention_available():
        return 0
    n = 0
    for m in module.modules():
        if isinstance(m, Attention) and m.inner_dim // m.heads in HEAD_SIZES:
            m.set_processor(NativeSmallHeadAttention())
            n += 1
    return n
