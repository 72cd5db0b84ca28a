"""The frame classifier's inference plan on CPU: each convolution, its BatchNorm and what
follows it as one oneDNN primitive.

Eager PyTorch runs a ResNet BasicBlock as seven passes over the activations (convolution,
batch norm, ReLU, convolution, batch norm, add, ReLU). With the batch norm's running
statistics folded into the convolution's weight and bias, and the ReLU (or the residual
add and its ReLU) applied by oneDNN as a post-op of the convolution, it is two primitives
whose outputs stay channels-last (NHWC). The weights are folded once and reordered into
oneDNN's blocked layout once, instead of on every call.

:class:`FramePlan` is that plan for a
:class:`~vpure.runtime.models.frame_classifier.FrameClassifier`; after
:func:`use_fused_inference` and the classifier's ``forward`` takes it for
fp32 CPU calls without autograd in eval mode, and its own eager layers for anything else
(training, gradients for the adaptive attacks, autocast, CUDA, tracing or ONNX export).
The plan is not part of the module's state: parameters and state dict are unchanged, and a
plan whose source weights were modified in place (``load_state_dict``, an optimiser step)
is rebuilt on the next call. ``python -m benchmarks.bench_models --fused-gate`` measures it.
"""

from __future__ import annotations

import threading

import torch
from torch import nn

from .conv import _exporting
from .layout import frames_to_batch


def _mkldnn_ops_available() -> bool:
    return (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_convolution_pointwise")
            and hasattr(torch._C._nn, "mkldnn_reorder_conv2d_weight"))


def _fold(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """``bn(conv(x)) == conv'(x)`` in eval mode: the weight scaled per output channel, a bias."""
    scale = bn.weight.detach() / torch.sqrt(bn.running_var + bn.eps)
    weight = conv.weight.detach() * scale.view(-1, 1, 1, 1)
    bias = bn.bias.detach() - bn.running_mean * scale
    if conv.bias is not None:
        bias = bias + conv.bias.detach() * scale
    return weight.contiguous(), bias.contiguous()


class FusedConv:
    """``post(bn(conv(x)))`` for NCHW fp32 CPU inputs as one oneDNN convolution; ``post`` is
    ``"relu"`` or ``"none"``, or, when called with ``residual``, ``relu(. + residual)``.

    The blocked weight layout oneDNN wants depends on the input's shape (a weight blocked for
    16 frames costs one frame 2.5x its eager time), so the weight is reordered once per input
    shape, for the last :attr:`SHAPES` shapes seen (a stream alternates between a window's new
    frames and a single frame)."""

    SHAPES = 4

    def __init__(self, conv: nn.Conv2d, bn: nn.BatchNorm2d, post: str):
        if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            raise ValueError(f"FusedConv needs explicit zero padding, got {conv.padding_mode!r} {conv.padding!r}")
        self.dense_weight, self.bias = _fold(conv, bn)
        self.padding, self.stride = list(conv.padding), list(conv.stride)
        self.dilation, self.groups, self.post = list(conv.dilation), conv.groups, post
        self.packed: dict[tuple[int, ...], torch.Tensor] = {}
        self.lock = threading.Lock()  # one plan may serve several threads

    def weight_for(self, shape: torch.Size) -> torch.Tensor:
        key = tuple(shape)
        with self.lock:
            weight = self.packed.pop(key, None)
            if weight is None:
                weight = torch._C._nn.mkldnn_reorder_conv2d_weight(
                    self.dense_weight.to_mkldnn(), self.padding, self.stride, self.dilation, self.groups, list(key))
                if len(self.packed) >= self.SHAPES:
                    self.packed.pop(next(iter(self.packed)))  # the least recently used
            self.packed[key] = weight
        return weight

    def __call__(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        weight = self.weight_for(x.shape)
        if residual is None:
            return torch.ops.mkldnn._convolution_pointwise(x, weight, self.bias, self.padding, self.stride,
                                                           self.dilation, self.groups, self.post, [], "")
        return torch.ops.mkldnn._convolution_pointwise.binary(x, residual, weight, self.bias, self.padding,
                                                              self.stride, self.dilation, self.groups, "add", None,
                                                              "relu", [], "")


def _versions(model: nn.Module) -> tuple[tuple[int, int], ...]:
    return tuple((t.data_ptr(), t._version) for t in (*model.parameters(), *model.buffers()))


class FramePlan:
    """A FrameClassifier's forward as fused oneDNN convolutions (see the module docstring)."""

    def __init__(self, model: nn.Module):
        self.model_id = id(model)
        self.versions = _versions(model)
        self.mean, self.std = model.mean.view(1, 3, 1, 1, 1), model.std.view(1, 3, 1, 1, 1)
        self.stem = FusedConv(model.conv1, model.bn1, "relu")
        self.stem_pool = model.stem_pool
        self.blocks = []
        for i in range(model.n_layers):
            for blk in getattr(model, f"layer{i + 1}"):
                down = None if blk.downsample is None else FusedConv(blk.downsample[0], blk.downsample[1], "none")
                self.blocks.append((FusedConv(blk.conv1, blk.bn1, "relu"), FusedConv(blk.conv2, blk.bn2, "none"), down))
        self.fc_weight, self.fc_bias = model.fc.weight.detach(), model.fc.bias.detach()
        self.num_classes = model.num_classes

    def stale(self, model: nn.Module) -> bool:
        return self.model_id != id(model) or self.versions != _versions(model)

    def __call__(self, frames: torch.Tensor) -> torch.Tensor:
        b, t = frames.shape[0], frames.shape[2]
        # normalised in the clip's layout (the broadcast runs over whole frames), then frames batched
        x = frames_to_batch((frames - self.mean).div_(self.std))
        x = self.stem(x)  # oneDNN's output is channels-last from here on
        if self.stem_pool:
            x = torch.nn.functional.max_pool2d(x, 3, 2, 1)
        for conv1, conv2, down in self.blocks:
            identity = x if down is None else down(x)
            x = conv2(conv1(x), residual=identity)
        x = torch.addmm(self.fc_bias, x.mean((2, 3)), self.fc_weight.t())
        return x.reshape(b, t, self.num_classes)


def plan_applies(model: nn.Module, frames: torch.Tensor) -> bool:
    """Whether a call of ``model`` on ``frames`` may take the fused plan."""
    return (not model.training and not torch.is_grad_enabled() and frames.device.type == "cpu"
            and frames.dtype == torch.float32 and frames.ndim == 5 and model.conv1.weight.dtype == torch.float32
            and model.conv1.weight.device.type == "cpu" and torch.backends.mkldnn.enabled
            and not torch.is_autocast_enabled("cpu") and not torch.jit.is_tracing()
            and not torch.jit.is_scripting() and not torch.onnx.is_in_onnx_export()
            and not torch.compiler.is_compiling() and not _exporting())


def use_fused_inference(model: nn.Module) -> bool:
    """Let a FrameClassifier run inference through a :class:`FramePlan` (built on first
    use); returns False, changing nothing, for any other module or where PyTorch lacks the
    oneDNN operators."""
    from .frame_classifier import FrameClassifier

    if not isinstance(model, FrameClassifier) or not _mkldnn_ops_available():
        return False
    model.fused_inference = True
    return True
