"""3-D convolutions on CPU through oneDNN, whatever the clip's size.

PyTorch picks a CPU convolution kernel per call with a heuristic written for images: a
batch-1 input whose ``N*C*D*H`` is at most 20480, with kernels no wider than 3, goes to
``slow_conv3d`` (an unblocked im2col loop) instead of oneDNN. A recogniser on one clip of
16 frames at 64 px meets that rule in almost every layer, and runs faster with every layer
on oneDNN (``python -m benchmarks.bench_models --conv3d``; same logits and gradients to
float rounding). At 224 px most layers are above the threshold.

:func:`use_blocked_conv3d` switches the ``Conv3d`` layers of a module to
:class:`BlockedConv3d` in place (same parameters, same state dict, still ``nn.Conv3d``);
:func:`restore_conv3d` switches them back.
"""

from __future__ import annotations

import torch
from torch import nn


def graph_export_active() -> bool:
    """Whether a graph is being exported (tracing, scripting, ONNX or ``torch.export``): an
    exported graph must hold the standard PyTorch operators, not a runtime's own."""
    return torch.jit.is_tracing() or torch.jit.is_scripting() or torch.onnx.is_in_onnx_export() or _exporting()


def graph_capture_active() -> bool:
    """Whether a graph is being captured (:func:`graph_export_active`, or ``torch.compile``):
    such captures must record the standard PyTorch operators, not an inference path's
    rewrite of them."""
    return graph_export_active() or torch.compiler.is_compiling()


def onednn_call_allowed() -> bool:
    """Whether an fp32 CPU call may go straight to oneDNN: it is available and enabled, and
    nothing is autocasting or capturing a graph."""
    return (torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled
            and not torch.is_autocast_enabled("cpu") and not graph_capture_active())


def _onednn_applies(conv: nn.Conv3d, x: torch.Tensor, weight: torch.Tensor) -> bool:
    return (x.device.type == "cpu" and x.ndim == 5 and x.dtype == torch.float32 and weight.dtype == x.dtype
            and conv.padding_mode == "zeros" and not isinstance(conv.padding, str) and onednn_call_allowed())


def _exporting() -> bool:
    is_exporting = getattr(torch.compiler, "is_exporting", None)
    return bool(is_exporting and is_exporting())


class BlockedConv3d(nn.Conv3d):
    """``nn.Conv3d`` that runs fp32 CPU inputs through oneDNN (``torch.mkldnn_convolution``)
    instead of letting the size heuristic pick ``slow_conv3d``; anything else (CUDA, other
    dtypes, autocast, padding modes, tracing for export, ``torch.compile``) takes
    ``nn.Conv3d``'s own path. Differentiable either way."""

    def _conv_forward(self, input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None):
        if _onednn_applies(self, input, weight):
            return torch.mkldnn_convolution(input, weight, bias, self.padding, self.stride, self.dilation,
                                            self.groups)
        return super()._conv_forward(input, weight, bias)


def use_blocked_conv3d(module: nn.Module) -> int:
    """Make every plain ``nn.Conv3d`` in ``module`` a :class:`BlockedConv3d` in place;
    returns how many. Subclasses of ``Conv3d`` are left alone."""
    n = 0
    for m in module.modules():
        if type(m) is nn.Conv3d:
            m.__class__ = BlockedConv3d
            n += 1
    return n


def restore_conv3d(module: nn.Module) -> int:
    """Undo :func:`use_blocked_conv3d` in place; returns how many layers were switched back."""
    n = 0
    for m in module.modules():
        if type(m) is BlockedConv3d:
            m.__class__ = nn.Conv3d
            n += 1
    return n


def use_channels_last(module: nn.Module) -> int:
    """Store the weight of every 2-D and 3-D convolution of ``module`` (on CPU) channels-last
    in place; returns how many. oneDNN then runs those layers in NHWC / NDHWC: activations
    follow the weights' layout from the first convolution on, and no layer reorders its
    input and output per call. Same parameters (values, names, state dict) and outputs to
    float rounding. ``python -m benchmarks.bench_models --conv-layout`` measures it: the
    frame classifiers gain, the I3D recognisers do not, so only the frame classifiers are
    loaded this way."""
    n = 0
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.Conv3d)) and m.weight.device.type == "cpu":
            fmt = torch.channels_last if m.weight.ndim == 4 else torch.channels_last_3d
            with torch.no_grad():
                m.weight.data = m.weight.data.contiguous(memory_format=fmt)
            n += 1
    return n
