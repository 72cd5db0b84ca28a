"""Eager inference rewrites of diffusers' UNet3D and VAE modules, applied in place.

Each rewrite computes what the module it replaces computes (outputs equal to float
rounding, the same parameters and state dict) faster on the torch inference path, and
steps aside where a graph is exported or gradients are wanted for the weights, so
exporters and the released-code reference see diffusers' own modules:

- :class:`TemporalConv`: UNet3D's (k, 1, 1) temporal convolutions as 2-D convolutions;
- :class:`SubpixelUpsample`: a nearest 2x upsample and 3x3 convolution as one 2x2
  convolution per output phase on the low-resolution input;
- :class:`NativeGroupNorm`: group norm with its SiLU in vpure's native kernel;
- :class:`FlatLinear`: linear layers that flatten their input to one matrix product;
- :func:`optimise_for_inference`: all of the above plus the attention processors of
  :mod:`.attention_processors` for an :class:`~.diffusion.EpsUNet`.
"""

from __future__ import annotations

import torch
from torch import nn

from .conv import graph_capture_active, graph_export_active
from .attention_processors import ConstantContextAttention, LeanSelfAttention
from .diffusion import EpsUNet


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
