"""The video latent diffusion model as three deployable components.

- ``unet``: ``eps_fn(z, t)``, a diffusers ``UNet3DConditionModel`` with the empty-prompt
  embedding baked in as a buffer (spec/videopure.md: conditioning is constant, so the
  runtime needs no text encoder and runs batch 1 unconditional).
- ``vae_encoder``: ``z0 = s * E(2x - 1).mean`` frame by frame, s the VAE's scaling factor.
- ``vae_decoder``: ``x = clamp(D(z / s) * 0.5 + 0.5, 0, 1)`` frame by frame.

diffusers is imported only when a module is built.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from ..registry import ComponentSpec, Role, TensorSpec, Tolerance, register
from .conv import graph_capture_active, graph_export_active
from .layout import batch_to_frames, frames_to_batch


class EpsUNet(nn.Module):
    """eps_fn(latents (B, 4, T, h, w) float32, timestep () or (B,) int64) -> eps like latents."""

    def __init__(self, unet: nn.Module, prompt_embedding: torch.Tensor):
        super().__init__()
        self.unet = unet
        if prompt_embedding.ndim != 3 or prompt_embedding.shape[0] != 1:
            raise ValueError(f"prompt_embedding must be (1, L, D), got {tuple(prompt_embedding.shape)}")
        self.register_buffer("prompt_embedding", prompt_embedding.detach().clone(), persistent=True)

    def forward(self, latents: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        b = latents.shape[0]
        emb = self.prompt_embedding.to(latents.dtype).expand(b, -1, -1)
        return self.unet(latents, timestep, encoder_hidden_states=emb, return_dict=False)[0]


class VAEEncoder(nn.Module):
    """frames (B, 3, T, H, W) in [0, 1] -> latents (B, 4, T, H/8, W/8), scaled mean."""

    def __init__(self, vae: nn.Module, chunk: int = 0):
        super().__init__()
        self.encoder = vae.encoder
        self.quant_conv = getattr(vae, "quant_conv", None)
        self.latent_channels = int(vae.config.latent_channels)
        self.scaling_factor = float(vae.config.scaling_factor)
        self.chunk = chunk  # frames per encoder call; 0 = all at once

    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        h = self.encoder(x * 2.0 - 1.0)
        if self.quant_conv is not None:
            h = self.quant_conv(h)
        return h[:, : self.latent_channels] * self.scaling_factor

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        x = frames_to_batch(frames)
        if self.chunk and x.shape[0] > self.chunk and not torch.jit.is_tracing():
            z = torch.cat([self._encode(p) for p in x.split(self.chunk)])
        else:
            z = self._encode(x)
        return batch_to_frames(z, frames.shape[0])


class VAEDecoder(nn.Module):
    """latents (B, 4, T, h, w) -> frames (B, 3, T, 8h, 8w) in [0, 1]."""

    def __init__(self, vae: nn.Module, chunk: int = 0):
        super().__init__()
        self.decoder = vae.decoder
        self.post_quant_conv = getattr(vae, "post_quant_conv", None)
        self.scaling_factor = float(vae.config.scaling_factor)
        self.chunk = chunk

    def _decode(self, z: torch.Tensor) -> torch.Tensor:
        z = z / self.scaling_factor
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return (self.decoder(z) * 0.5 + 0.5).clamp(0.0, 1.0)

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        z = frames_to_batch(latents)
        if self.chunk and z.shape[0] > self.chunk and not torch.jit.is_tracing():
            x = torch.cat([self._decode(p) for p in z.split(self.chunk)])
        else:
            x = self._decode(z)
        return batch_to_frames(x, latents.shape[0])


# -- tiny random-init configurations (tests, CI) -----------------------------------
TINY_UNET = dict(
    sample_size=8, in_channels=4, out_channels=4,
    down_block_types=("CrossAttnDownBlock3D", "DownBlock3D"),
    up_block_types=("UpBlock3D", "CrossAttnUpBlock3D"),
    block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8,
    cross_attention_dim=32, attention_head_dim=8,
)
TINY_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, sample_size=64,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(8, 16, 32, 32), layers_per_block=1, norm_num_groups=8,
)
TINY_PROMPT_TOKENS = 8


def tiny_unet() -> EpsUNet:
    from diffusers import UNet3DConditionModel

    unet = UNet3DConditionModel(**TINY_UNET)
    emb = torch.randn(1, TINY_PROMPT_TOKENS, TINY_UNET["cross_attention_dim"])
    return EpsUNet(unet, emb)


def tiny_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(**TINY_VAE)


def eps_fn_of(module: nn.Module):
    """Adapt an EpsUNet (timestep tensor input) to eps_fn(z, t: int)."""

    def eps_fn(z: torch.Tensor, t: int) -> torch.Tensor:
        return module(z, torch.tensor([int(t)], dtype=torch.int64, device=z.device))

    return eps_fn


class TemporalConv(nn.Module):
    """A ``Conv3d`` with a (k, 1, 1) kernel computed as a 2-D convolution over (T, H*W).

    UNet3D's temporal layers are such convolutions; on CPU PyTorch serves them with its
    unblocked ``slow_conv3d`` kernel, while the same arithmetic as a (k, 1) ``conv2d``
    reaches oneDNN (2.2x faster on the `small` UNet's layers here). Exact up to float
    rounding; the parameters stay the original ``weight`` and ``bias``, so state dicts keep
    their keys and shapes.
    """

    def __init__(self, conv: nn.Conv3d):
        super().__init__()
        self.weight, self.bias = conv.weight, conv.bias
        self.pad = conv.padding[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, t, h, w = x.shape
        y = torch.nn.functional.conv2d(x.flatten(3), self.weight.squeeze(-1), self.bias, padding=(self.pad, 0))
        return y.view(b, -1, y.shape[2], h, w)


def fold_temporal_convs(module: nn.Module) -> int:
    """Replace, in place, every (k, 1, 1) ``Conv3d`` (stride 1, no dilation, one group, zero
    padding on T only) in ``module`` by :class:`TemporalConv`; returns how many. Other
    convolutions are left alone. For the torch inference path: exporters keep the original."""
    n = 0
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if (isinstance(child, nn.Conv3d) and child.kernel_size[1:] == (1, 1) and child.stride == (1, 1, 1)
                    and child.dilation == (1, 1, 1) and child.groups == 1 and child.padding_mode == "zeros"
                    and isinstance(child.padding, tuple) and child.padding[1:] == (0, 0)):
                setattr(parent, name, TemporalConv(child))
                n += 1
    return n


def unfold_temporal_convs(module: nn.Module) -> int:
    """Undo :func:`fold_temporal_convs` in place: every :class:`TemporalConv` becomes a
    ``Conv3d`` holding the same parameter objects (so a module folded for training ends with
    its trained weights in the original layout); returns how many."""
    n = 0
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, TemporalConv):
                out_c, in_c, k = child.weight.shape[:3]
                conv = nn.Conv3d(in_c, out_c, (k, 1, 1), padding=(child.pad, 0, 0), bias=child.bias is not None,
                                 device="meta")
                conv.weight, conv.bias = child.weight, child.bias
                setattr(parent, name, conv)
                n += 1
    return n


_PHASES = ((0, 0), (0, 1), (1, 0), (1, 1))  # (row parity, column parity) of a 2x upsample's outputs


def _tap_groups(phase: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Which taps of a 3-wide kernel land on input rows (i - 1, i) for output row 2i
    (phase 0) and on (i, i + 1) for output row 2i + 1 (phase 1), after a nearest 2x upsample."""
    return ((0,), (1, 2)) if phase == 0 else ((0, 1), (2,))


def subpixel_weights(weight: torch.Tensor, bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A 3x3 convolution's ``(Co, Ci, 3, 3)`` weight after a nearest 2x upsample, as one 2x2
    convolution on the low-resolution input with ``4 * Co`` outputs: output phase
    ``(a, b)`` (row parity, column parity) holds channels ``(2a + b) * Co`` onwards."""
    w = weight.float()
    phases = []
    for a in (0, 1):
        rows = [w[:, :, list(g)].sum(2) for g in _tap_groups(a)]  # (Co, Ci, 3) per input row
        for b in (0, 1):
            phases.append(torch.stack([torch.stack([r[:, :, list(g)].sum(2) for g in _tap_groups(b)], -1)
                                       for r in rows], -2))
    out = torch.cat(phases).to(weight.dtype).contiguous()
    return out, (None if bias is None else bias.repeat(4))


class SubpixelUpsample(nn.Module):
    """diffusers' ``Upsample2D`` (nearest 2x, then a 3x3 convolution) computed on the
    low-resolution input: each of the four output phases is a 2x2 convolution whose taps are
    sums of the 3x3 kernel's, so the layer does 16 multiply-adds per input pixel and output
    channel where the upsampled convolution does 36, and the 4x upsampled input is never
    written. Exact up to float rounding (the kernel sums). The ``conv`` child is the original
    one, so parameters and state dict keys are unchanged; the 2x2 weights are derived from it
    and rebuilt whenever it changes (in place, dtype or device).

    Falls back to upsample-then-convolve where the rewrite does not apply or must not be
    seen: a size other than 2x asked, gradients wanted for the weights (training), or a
    graph being captured (tracing, ONNX or ``torch.export``, ``torch.compile``), which must
    record diffusers' operators. The VAE decoder spends about a quarter of its arithmetic in
    these layers (``python -m benchmarks.bench_models --subpixel``)."""

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        self.conv = conv
        self._cache: tuple | None = None

    def _weights(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        w, b = self.conv.weight, self.conv.bias
        b_version = None if b is None else b._version
        c = self._cache  # (source weight, its version, source bias, its version, derived weight and bias)
        if c is None or c[0] is not w or c[1] != w._version or c[2] is not b or c[3] != b_version:
            # Plain tensors even under inference_mode, so a later call under autograd can use
            # them; holding the sources keeps their identities theirs.
            with torch.inference_mode(False), torch.no_grad():
                c = self._cache = (w, w._version, b, b_version,
                                   *subpixel_weights(w.detach(), None if b is None else b.detach()))
        return c[4], c[5]

    def __getstate__(self):  # derived weights are not state: copies and pickles rebuild them
        return {**self.__dict__, "_cache": None}

    def _applies(self, x: torch.Tensor, output_size) -> bool:
        h, w = x.shape[-2:]
        return (x.ndim == 4 and (output_size is None or tuple(output_size) == (2 * h, 2 * w))
                and not (torch.is_grad_enabled() and self.conv.weight.requires_grad) and not graph_capture_active())

    def forward(self, x: torch.Tensor, output_size=None, *args, **kwargs) -> torch.Tensor:
        if not self._applies(x, output_size):
            size = None if output_size is None else tuple(output_size)
            up = torch.nn.functional.interpolate(x, size=size, scale_factor=None if size else 2.0, mode="nearest")
            return self.conv(up)
        weight, bias = self._weights()
        n, _, h, w = x.shape
        co = weight.shape[0] // 4
        y = torch.nn.functional.conv2d(x, weight, bias, padding=1)  # (n, 4 co, h + 1, w + 1)
        # The output keeps the convolution's memory layout: oneDNN hands channels-last
        # activations on, and the next layers would pay to reorder anything else.
        if y.is_contiguous(memory_format=torch.channels_last) and not y.is_contiguous():
            src = y.permute(0, 2, 3, 1)  # (n, h + 1, w + 1, 4 co), contiguous
            out = y.new_empty(n, h, 2, w, 2, co)
            for a, b in _PHASES:  # phase (a, b) at input pixel (i, j) is y's pixel (i + a, j + b)
                p = 2 * a + b
                out[:, :, a, :, b] = src[:, a:a + h, b:b + w, p * co:(p + 1) * co]
            return out.view(n, 2 * h, 2 * w, co).permute(0, 3, 1, 2)
        out = y.new_empty(n, co, h, 2, w, 2)
        for a, b in _PHASES:
            p = 2 * a + b
            out[:, :, :, a, :, b] = y[:, p * co:(p + 1) * co, a:a + h, b:b + w]
        return out.view(n, co, 2 * h, 2 * w)


def use_subpixel_upsampling(module: nn.Module) -> int:
    """Replace, in place, every diffusers ``Upsample2D`` of ``module`` that is a nearest 2x
    upsample followed by a 3x3, stride-1, padding-1 convolution (SD's VAE decoder, UNet3D's up
    blocks) by :class:`SubpixelUpsample`; returns how many. For the torch inference path:
    exporters and the released-code reference keep diffusers' modules."""
    from diffusers.models.upsampling import Upsample2D

    n = 0
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            conv = getattr(child, "conv", None)
            if (type(child) is Upsample2D and child.use_conv and not child.use_conv_transpose and child.interpolate
                    and child.norm is None and child.name == "conv" and type(conv) is nn.Conv2d
                    and conv.kernel_size == (3, 3) and conv.stride == (1, 1) and conv.padding == (1, 1)
                    and conv.dilation == (1, 1) and conv.groups == 1 and conv.padding_mode == "zeros"):
                setattr(parent, name, SubpixelUpsample(conv))
                n += 1
    return n


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


class NativeGroupNorm(nn.GroupNorm):
    """A ``GroupNorm``, with the SiLU that follows it when :attr:`silu`, as one call of
    :func:`vpure.kernels.group_norm.group_norm`'s custom op (``vpure::group_norm``: one
    opaque kernel in a compiled graph) for CPU fp32/bf16 (N, C, H, W) maps without
    autograd; PyTorch's layers otherwise, and when a graph is exported (tracing, ONNX,
    ``torch.export``). Made from an ``nn.GroupNorm`` in place (:meth:`adopt`), so parameters
    and state dict keys stay the norm's."""

    silu = False

    @classmethod
    def adopt(cls, norm: nn.GroupNorm, silu: bool) -> "NativeGroupNorm":
        import vpure.kernels.group_norm  # noqa: F401  (registers vpure::group_norm)

        norm.__class__ = cls
        norm.silu = silu
        return norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (x.device.type == "cpu" and x.ndim == 4 and x.dtype in (torch.float32, torch.bfloat16)
                and not (torch.is_grad_enabled() and (x.requires_grad or self.weight is not None
                                                      and self.weight.requires_grad))
                and not graph_export_active()):  # torch.compile keeps the op: it pays there
            return torch.ops.vpure.group_norm(x, self.num_groups, self.weight, self.bias, self.eps, self.silu, False)
        y = super().forward(x)
        return torch.nn.functional.silu(y) if self.silu else y


def use_native_group_norm(module: nn.Module) -> int:
    """Each group norm of ``module``'s diffusers ``ResnetBlock2D`` without a time embedding
    (the VAE's), and its decoder's or encoder's output norm, with the SiLU after it, as one
    :class:`NativeGroupNorm` (the block's separate SiLU becomes the identity), where the
    native extension is built; in place, returns how many norms. For the torch inference path
    on CPU, compiled (:func:`~.inference.compile_for_inference`: Inductor's own GroupNorm +
    SiLU on a channels-last map with two channels per group ran 3-7x slower than the native
    kernel) or eager (:func:`~.inference.prepare_encoder`, :func:`~.inference.prepare_decoder`:
    one pass instead of two).
    Blocks with a time embedding (the UNet's) apply their SiLU to it too and are left alone."""
    from diffusers.models.resnet import ResnetBlock2D

    from vpure.kernels._dispatch import native

    if native() is None:
        return 0
    n = 0
    for m in module.modules():
        if (type(m) is ResnetBlock2D and m.time_emb_proj is None and type(m.nonlinearity) is nn.SiLU
                and type(m.norm1) is nn.GroupNorm and type(m.norm2) is nn.GroupNorm):
            NativeGroupNorm.adopt(m.norm1, True), NativeGroupNorm.adopt(m.norm2, True)
            m.nonlinearity = nn.Identity()
            n += 2
        elif type(getattr(m, "conv_norm_out", None)) is nn.GroupNorm and type(getattr(m, "conv_act", None)) is nn.SiLU:
            NativeGroupNorm.adopt(m.conv_norm_out, True)
            m.conv_act = nn.Identity()
            n += 1
    return n


class FlatLinear(nn.Linear):
    """A ``Linear`` that flattens its input's leading dimensions itself: one (N, in) x
    (in, out) product. PyTorch's matmul (eager, and the decomposition Inductor traces) folds
    a 3-D input into 2-D only when its batch strides allow a view or the weight requires
    gradients; otherwise (diffusers' transformers permute the feature map into tokens just
    before ``proj_in``, and compiled weights are frozen) it runs a batched product against
    the weight expanded per batch row, which oneDNN needs materialised: 196 copies of a
    64x64 weight per temporal transformer of the `small` UNet, 10 such products a call.
    Flattening copies the (smaller) input instead. Made from an ``nn.Linear`` in place
    (:meth:`adopt`): parameters and state dict keys stay the layer's."""

    @classmethod
    def adopt(cls, linear: nn.Linear) -> "FlatLinear":
        linear.__class__ = cls
        return linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.nn.functional.linear(x.reshape(-1, x.shape[-1]), self.weight, self.bias)
        return y.view(*x.shape[:-1], self.out_features)


def use_flat_linears(module: nn.Module) -> int:
    """Every plain ``nn.Linear`` of ``module`` as a :class:`FlatLinear`, in place; returns
    how many (:func:`optimise_for_inference`, and :func:`~.inference.compile_for_inference`
    on CPU)."""
    linears = [m for m in module.modules() if type(m) is nn.Linear]
    for m in linears:
        FlatLinear.adopt(m)
    return len(linears)


def optimise_for_inference(eps_unet: "EpsUNet", native_attention: bool = True) -> dict[str, int]:
    """The torch inference path's rewrites of an :class:`EpsUNet`, in place: temporal
    convolutions as 2-D ones (:func:`fold_temporal_convs`), the baked prompt's keys and
    values projected once (:class:`ConstantContextAttention`), attention by the native
    small-head kernel where it runs and ``native_attention`` (inference calls), else short-key
    attention as fp32 matmuls on CPU (:func:`attend`, :class:`LeanSelfAttention`), the up blocks'
    upsampling as sub-pixel convolutions (:func:`use_subpixel_upsampling`) and linear layers
    that flatten their inputs (:class:`FlatLinear`: with the weights frozen, eager matmul
    too runs the transformers' input projections as batched products against a copied
    weight). The parameters are frozen (``requires_grad_(False)``): the inference path
    differentiates with respect to latents only. Returns what was rewritten. Exporters and
    the released-code reference keep diffusers' modules."""
    from diffusers.models.attention_processor import Attention

    eps_unet.requires_grad_(False)
    n_conv = fold_temporal_convs(eps_unet)
    n_attn = n_self = 0
    for m in eps_unet.unet.modules():
        if isinstance(m, Attention) and m.is_cross_attention:
            m.set_processor(ConstantContextAttention(lambda e=eps_unet: e.prompt_embedding, native_attention))
            n_attn += 1
        elif isinstance(m, Attention):
            m.set_processor(LeanSelfAttention(native_attention))
            n_self += 1
    n_up = use_subpixel_upsampling(eps_unet)
    return {"temporal_convs": n_conv, "cross_attention": n_attn, "self_attention": n_self, "upsamplers": n_up,
            "linears": use_flat_linears(eps_unet)}


class GraphedEps:
    """``eps_fn(z, t: int)`` replayed from one CUDA graph per latent shape and dtype.

    A UNet call at purification sizes launches hundreds of small kernels; on a GPU the
    launches, not the arithmetic, bound it. The first call of each shape runs the module
    twice on a side stream (allocator and cuDNN warm-up), then captures one call into a
    graph whose static inputs are ``z`` and the timestep; later calls copy into those
    buffers and replay. The output is cloned, so callers may keep it across calls.

    Eager where a graph cannot help or would be wrong: on CPU, when gradients must flow to
    ``z`` (the full-gradient attack), and for good once a capture has failed (the reason
    is kept in ``failure`` and logged). Graphs hold their inputs' memory, so one instance
    serves one module.
    """

    def __init__(self, module: nn.Module, warmup: int = 2):
        self.module, self.warmup = module, warmup
        self._eager = eps_fn_of(module)
        self.graphs: dict[tuple, tuple] = {}
        self.failure: str | None = None
        self.replays = 0

    def _capture(self, z: torch.Tensor, t: int) -> tuple:
        static_z = z.detach().clone()
        static_t = torch.full((1,), int(t), dtype=torch.int64, device=z.device)
        side = torch.cuda.Stream(z.device)
        side.wait_stream(torch.cuda.current_stream(z.device))
        with torch.no_grad(), torch.cuda.stream(side):
            for _ in range(self.warmup):
                self.module(static_z, static_t)
        torch.cuda.current_stream(z.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.no_grad(), torch.cuda.graph(graph):
            static_out = self.module(static_z, static_t)
        return static_z, static_t, static_out, graph

    def __call__(self, z: torch.Tensor, t: int) -> torch.Tensor:
        if z.device.type != "cuda" or self.failure is not None or (torch.is_grad_enabled() and z.requires_grad):
            return self._eager(z, t)
        key = (tuple(z.shape), z.dtype, z.device)
        entry = self.graphs.get(key)
        if entry is None:
            try:
                entry = self._capture(z, t)
            except RuntimeError as e:  # an op that cannot be captured: stay eager from now on
                from ..log import get_logger

                self.failure = f"{type(e).__name__}: {e}".splitlines()[0]
                get_logger(__name__).warning("CUDA graph capture of the UNet failed, running eagerly: %s",
                                             self.failure)
                torch.cuda.synchronize(z.device)
                return self._eager(z, t)
            self.graphs[key] = entry
        static_z, static_t, static_out, graph = entry
        static_z.copy_(z)
        static_t.fill_(int(t))
        graph.replay()
        self.replays += 1
        return static_out.clone()


def tiny_vae_encoder() -> VAEEncoder:
    return VAEEncoder(tiny_vae())


def tiny_vae_decoder() -> VAEDecoder:
    return VAEDecoder(tiny_vae())


_LATENT = ("B", 4, "T", "h", "w")
_FRAMES = ("B", 3, "T", "H", "W")

register(ComponentSpec(
    name="unet", role=Role.EPS,
    inputs=(TensorSpec("latents", _LATENT, value_range=(-3.0, 3.0)),
            TensorSpec("timestep", (1,), dtype="int64", value_range=(1, 101))),
    outputs=(TensorSpec("eps", _LATENT),),
    profile={"B": (1, 1, 2), "T": (2, 4, 8), "h": (8, 8, 8), "w": (8, 8, 8)},
    build_tiny=f"{__name__}:tiny_unet",
    loader="vpure.runtime.models.modelscope:load_unet",
    exporter="legacy",
    exporter_reason="the dynamo exporter fails on UNet3D's batch-2 temporal reshapes; TorchScript tracing handles them",
    tolerance=Tolerance(fp32_atol=1e-4, fp32_rtol=1e-3, fp16_sqnr_db=35.0, int8_sqnr_db=15.0),
    fp32_ops=("GroupNormalization", "InstanceNormalization", "Softmax"),
    # int8 covers the convolutions; attention, time embedding and norms stay float.
    int8_float_ops=("MatMul", "Gemm", "Sin", "Cos", "Mul", "Add", "Div", "Sigmoid"),
    doc="UNet3D noise predictor conditioned on the baked empty-prompt embedding",
))
register(ComponentSpec(
    name="vae_encoder", role=Role.VAE_ENCODER,
    inputs=(TensorSpec("frames", _FRAMES),),
    outputs=(TensorSpec("latents", _LATENT),),
    profile={"B": (1, 1, 2), "T": (1, 2, 8), "H": (64, 64, 64), "W": (64, 64, 64),
             "h": (8, 8, 8), "w": (8, 8, 8)},
    build_tiny=f"{__name__}:tiny_vae_encoder",
    loader="vpure.runtime.models.modelscope:load_vae_encoder",
    exporter="legacy", exporter_reason="plain conv graph; tracing is fastest and stable",
    fp32_ops=("GroupNormalization", "InstanceNormalization", "Softmax"),
    doc="SD AutoencoderKL encoder, scaled latent mean, frame by frame",
))
register(ComponentSpec(
    name="vae_decoder", role=Role.VAE_DECODER,
    inputs=(TensorSpec("latents", _LATENT, value_range=(-3.0, 3.0)),),
    outputs=(TensorSpec("frames", _FRAMES),),
    profile={"B": (1, 1, 2), "T": (1, 2, 8), "H": (64, 64, 64), "W": (64, 64, 64),
             "h": (8, 8, 8), "w": (8, 8, 8)},
    build_tiny=f"{__name__}:tiny_vae_decoder",
    loader="vpure.runtime.models.modelscope:load_vae_decoder",
    exporter="legacy", exporter_reason="plain conv graph; tracing is fastest and stable",
    # The decoder's output feeds the recogniser directly: keep its whole tail in fp32.
    fp32_ops=("GroupNormalization", "InstanceNormalization", "Softmax"),
    tolerance=Tolerance(fp16_sqnr_db=30.0),
    doc="SD AutoencoderKL decoder to [0, 1] frames, frame by frame",
))
