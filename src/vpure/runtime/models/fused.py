"""Inference plans on CPU for the ResNet-style gate and recognisers: each convolution, its
BatchNorm and what follows it as one oneDNN primitive.

Eager PyTorch runs a ResNet BasicBlock as seven passes over the activations (convolution,
batch norm, ReLU, convolution, batch norm, add, ReLU). With the batch norm's running
statistics folded into the convolution's weight and bias, and the ReLU (or the residual
add and its ReLU) applied by oneDNN as a post-op of the convolution, it is two primitives
whose outputs stay in oneDNN's channels-last layout. The weights are folded once and
reordered into oneDNN's blocked layout once per input shape, instead of on every call. The
stems' max-pools (and I3D's temporal pool) run in :mod:`vpure.kernels.pool`'s native
channels-last kernel, which writes no argmax indices.

:class:`FramePlan` is that plan for a
:class:`~vpure.runtime.models.frame_classifier.FrameClassifier` (2-D, frames batched) and
:class:`ClipPlan` for an :class:`~vpure.runtime.models.i3d.I3DResNet` (3-D, basic or
bottleneck blocks; non-local blocks run eagerly), :class:`SlowFastPlan` for a
:class:`~vpure.runtime.models.slowfast.SlowFast`. After :func:`use_fused_inference` the
model's ``forward`` takes its plan for fp32 or bf16 CPU calls (input and weights of one
dtype) without autograd in eval mode, and its own eager layers for anything else
(training, gradients for the adaptive attacks, autocast, CUDA, tracing or ONNX export). A
bf16 plan folds the batch norm in fp32 and rounds the folded weight to bf16 once, so its
error is that of one bf16 convolution per layer (AMX runs them where the CPU has it). The
plan is not part of the module's state: parameters and state dict are unchanged, copies
and pickles leave it behind, and a plan whose source weights were modified in place
(``load_state_dict``, an optimiser step, ``.to()``) is rebuilt on the next call; a
parameter *replaced* by a new object needs :func:`use_fused_inference` again. ``python -m
benchmarks.bench_models --fused`` measures it.
"""

from __future__ import annotations

import threading

import torch
from torch import nn

from vpure.kernels.pool import max_pool2d, max_pool3d

from ..precision import native_bf16
from .conv import onednn_call_allowed
from .layout import frames_to_batch


PLAN_DTYPES = (torch.float32, torch.bfloat16)


def _mkldnn_ops_available() -> bool:
    return (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_convolution_pointwise")
            and hasattr(torch._C._nn, "mkldnn_reorder_conv2d_weight")
            and hasattr(torch._C._nn, "mkldnn_reorder_conv3d_weight"))


def _fold(conv: nn.Module, bn: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """``bn(conv(x)) == conv'(x)`` in eval mode: the weight scaled per output channel, a bias;
    computed in fp32 and returned in the convolution's dtype."""
    dtype = conv.weight.dtype
    scale = bn.weight.detach().float() / torch.sqrt(bn.running_var.float() + bn.eps)
    weight = conv.weight.detach().float() * scale.view(-1, *(1,) * (conv.weight.ndim - 1))
    bias = bn.bias.detach().float() - bn.running_mean.float() * scale
    if conv.bias is not None:
        bias = bias + conv.bias.detach().float() * scale
    return weight.to(dtype).contiguous(), bias.to(dtype).contiguous()


class PerShape:
    """``make(shape)`` kept for the last ``size`` input shapes seen (the least recently used
    dropped first), behind one lock since a plan may serve several threads; iterates over
    its shapes, least recent first."""

    def __init__(self, size: int, make):
        self.size, self.make = size, make
        self.values: dict[tuple[int, ...], torch.Tensor] = {}
        self.lock = threading.Lock()

    def __call__(self, shape: torch.Size) -> torch.Tensor:
        key = tuple(shape)
        with self.lock:
            value = self.values.pop(key, None)
            if value is None:
                value = self.make(key)
                if len(self.values) >= self.size:
                    self.values.pop(next(iter(self.values)))
            self.values[key] = value
        return value

    def __len__(self) -> int:
        return len(self.values)

    def __iter__(self):
        return iter(list(self.values))


class FusedConv:
    """``post(bn(conv(x)))`` for fp32 or bf16 CPU inputs of a ``Conv2d`` or ``Conv3d`` as one oneDNN
    convolution; ``post`` is ``"relu"`` or ``"none"``, or, when called with ``residual``,
    ``relu(. + residual)``.

    The blocked weight layout oneDNN wants depends on the input's shape (a weight blocked for
    16 frames costs one frame 2.5x its eager time), so the weight is reordered once per input
    shape, for the last :attr:`SHAPES` shapes seen (a stream alternates between a window's new
    frames and a single frame)."""

    SHAPES = 4

    def __init__(self, conv: nn.Module, bn: nn.Module, post: str):
        if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            raise ValueError(f"FusedConv needs explicit zero padding, got {conv.padding_mode!r} {conv.padding!r}")
        self.dense_weight, self.bias = _fold(conv, bn)
        self.padding, self.stride = list(conv.padding), list(conv.stride)
        self.dilation, self.groups, self.post = list(conv.dilation), conv.groups, post
        reorder = (torch._C._nn.mkldnn_reorder_conv2d_weight if conv.weight.ndim == 4
                   else torch._C._nn.mkldnn_reorder_conv3d_weight)
        self.packed = PerShape(self.SHAPES, lambda key: reorder(self.dense_weight.to_mkldnn(), self.padding, self.stride,
                                                                self.dilation, self.groups, list(key)))

    def __call__(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        weight = self.packed(x.shape)
        if residual is None:
            return torch.ops.mkldnn._convolution_pointwise(x, weight, self.bias, self.padding, self.stride,
                                                           self.dilation, self.groups, self.post, [], "")
        return torch.ops.mkldnn._convolution_pointwise.binary(x, residual, weight, self.bias, self.padding,
                                                              self.stride, self.dilation, self.groups, "add", None,
                                                              "relu", [], "")


def _native_pool(pool: nn.Module):
    """A ``MaxPool3d`` as :func:`vpure.kernels.pool.max_pool3d` (the native channels-last
    kernel where it applies, PyTorch's elsewhere), or the module itself (an ``Identity``,
    or a pool the kernel does not take)."""
    if not isinstance(pool, nn.MaxPool3d) or pool.ceil_mode or pool.dilation not in (1, (1, 1, 1)):
        return pool
    k, s, p = (v if isinstance(v, tuple) else (v,) * 3 for v in (pool.kernel_size, pool.stride, pool.padding))
    if k[1] != k[2] or s[1] != s[2] or p[1] != p[2] or p[0]:
        return pool
    return lambda x: max_pool3d(x, k, s, p)


def _versions(tensors) -> tuple[tuple[int, int], ...]:
    return tuple((t.data_ptr(), t._version) for t in tensors)


class _Plan:
    def __init__(self, model: nn.Module):
        self.model_id = id(model)
        # the tensors the plan was built from, checked on every call: walking the module tree
        # instead costs ~0.2 ms, 1/8 of a single frame's label on the mini-world gate
        self.sources = [*model.parameters(), *model.buffers()]
        self.versions = _versions(self.sources)

    def stale(self, model: nn.Module) -> bool:
        return self.model_id != id(model) or self.versions != _versions(self.sources)


def _residual_blocks(blocks, convs_of, down_of=lambda b: b.downsample) -> list:
    """(fused convolutions, fused downsample or None, the eager non-local block or None) per
    block; ``convs_of(block)`` names its (conv, bn) pairs in order, ``down_of(block)`` its
    shortcut's (conv, bn) or None."""
    plan = []
    for blk in blocks:
        pairs, down = convs_of(blk), down_of(blk)
        convs = [FusedConv(c, b, "relu") for c, b in pairs[:-1]] + [FusedConv(*pairs[-1], "none")]
        plan.append((convs, None if down is None else FusedConv(down[0], down[1], "none"),
                     getattr(blk, "nonlocal_block", None)))
    return plan


def _run_blocks(x: torch.Tensor, blocks) -> torch.Tensor:
    for convs, down, nonlocal_block in blocks:
        identity = x if down is None else down(x)
        for conv in convs[:-1]:
            x = conv(x)
        x = convs[-1](x, residual=identity)  # relu(bn(conv(x)) + identity)
        if nonlocal_block is not None:
            x = nonlocal_block(x)
    return x


class FramePlan(_Plan):
    """A FrameClassifier's forward as fused oneDNN convolutions (see the module docstring)."""

    def __init__(self, model: nn.Module):
        super().__init__(model)
        self.mean, self.std = model.mean.view(1, 3, 1, 1, 1), model.std.view(1, 3, 1, 1, 1)
        self.stem = FusedConv(model.conv1, model.bn1, "relu")
        self.stem_pool = model.stem_pool
        self.blocks = _residual_blocks([blk for i in range(model.n_layers) for blk in getattr(model, f"layer{i + 1}")],
                                       lambda b: [(b.conv1, b.bn1), (b.conv2, b.bn2)])
        self.fc_weight, self.fc_bias = model.fc.weight.detach(), model.fc.bias.detach()
        self.num_classes = model.num_classes

    def __call__(self, frames: torch.Tensor) -> torch.Tensor:
        b, t = frames.shape[0], frames.shape[2]
        # normalised in the clip's layout (the broadcast runs over whole frames), then frames batched
        x = frames_to_batch((frames - self.mean).div_(self.std))
        x = self.stem(x)  # oneDNN's output is channels-last from here on
        if self.stem_pool:
            x = max_pool2d(x, 3, 2, 1)  # the native channels-last kernel where built
        x = _run_blocks(x, self.blocks)
        x = torch.addmm(self.fc_bias, x.mean((2, 3)), self.fc_weight.t())
        return x.reshape(b, t, self.num_classes)


class ClipPlan(_Plan):
    """An I3DResNet's forward as fused oneDNN 3-D convolutions (see the module docstring)."""

    def __init__(self, model: nn.Module):
        super().__init__(model)
        self.mean, self.std = model.mean, model.std
        conv, bn, _, stem_pool = model.first_stage
        self.stem = FusedConv(conv, bn, "relu")
        self.stem_pool, self.pool2 = _native_pool(stem_pool), _native_pool(model.pool2)
        bottleneck = model.block == "bottleneck"
        self.stages = [_residual_blocks(layer, lambda b: [(b.conv1, b.bn1), (b.conv2, b.bn2)]
                                        + ([(b.conv3, b.bn3)] if bottleneck else []))
                       for layer in model.res_layers]
        self.fc_weight, self.fc_bias = model.fc.weight.detach(), model.fc.bias.detach()

    def __call__(self, frames: torch.Tensor) -> torch.Tensor:
        x = self.stem_pool(self.stem((frames - self.mean).div_(self.std)))
        for i, stage in enumerate(self.stages):
            x = _run_blocks(x, stage)
            if i == 0:
                x = self.pool2(x)
        return torch.addmm(self.fc_bias, x.mean((2, 3, 4)), self.fc_weight.t())  # dropout: identity in eval


class SlowFastPlan(_Plan):
    """A SlowFast's forward as fused oneDNN 3-D convolutions: both pathways' stems and
    bottleneck blocks and the fast-to-slow lateral convolutions (see the module docstring)."""

    def __init__(self, model: nn.Module):
        super().__init__(model)
        self.pathways = model.pathways
        self.stages = []  # per MultiPathway block: ([slow path, fast path], lateral conv or None)
        for block in model.blocks[:-2]:
            paths = [self._path(p) for p in block.multipathway_blocks]
            fusion = block.multipathway_fusion
            lateral = None if isinstance(fusion, nn.Identity) else FusedConv(fusion.conv_fast_to_slow, fusion.norm,
                                                                              "relu")
            self.stages.append((paths, lateral))
        self.head_pool = model.blocks[-2]  # the model's own head pooling (pytorchvideo's windows)
        proj = model.blocks[-1].proj
        self.fc_weight, self.fc_bias = proj.weight.detach(), proj.bias.detach()

    @staticmethod
    def _path(stage: nn.Module):
        if hasattr(stage, "res_blocks"):
            return _residual_blocks(
                stage.res_blocks, lambda b: [(b.branch2.conv_a, b.branch2.norm_a), (b.branch2.conv_b, b.branch2.norm_b),
                                             (b.branch2.conv_c, b.branch2.norm_c)],
                lambda b: None if b.branch1_conv is None else (b.branch1_conv, b.branch1_norm))
        return FusedConv(stage.conv, stage.norm, "relu"), _native_pool(stage.pool)  # a stem

    @staticmethod
    def _run(x: torch.Tensor, path) -> torch.Tensor:
        if isinstance(path, tuple):
            conv, pool = path
            return pool(conv(x))
        return _run_blocks(x, path)

    def __call__(self, frames: torch.Tensor) -> torch.Tensor:
        slow, fast = self.pathways(frames)
        for (slow_path, fast_path), lateral in self.stages:
            slow, fast = self._run(slow, slow_path), self._run(fast, fast_path)
            if lateral is not None:
                slow = torch.cat([slow, lateral(fast)], dim=1)
        pooled = self.head_pool(slow, fast).flatten(1)
        return torch.addmm(self.fc_bias, pooled, self.fc_weight.t())  # dropout: identity in eval


class FusedInference:
    """Mixin of the models that have a plan (``plan_type``): off until
    :func:`use_fused_inference`; the plan is built on first use and never copied or pickled."""

    plan_type: type | None = None
    fused_inference = False
    _plan = None

    def __getstate__(self):
        return {**self.__dict__, "_plan": None}

    def fused_forward(self, frames: torch.Tensor) -> torch.Tensor | None:
        """The plan's output for ``frames`` where it applies (:func:`plan_applies`), else None."""
        if not self.fused_inference or not plan_applies(self, frames):
            return None
        if self._plan is None or self._plan.stale(self):
            self._plan = self.plan_type(self)
        return self._plan(frames)


def plan_applies(model: nn.Module, frames: torch.Tensor) -> bool:
    """Whether a call of ``model`` on ``frames`` may take the fused plan."""
    weight = next(model.parameters())
    return (not model.training and not torch.is_grad_enabled() and frames.device.type == "cpu"
            and frames.dtype in PLAN_DTYPES and frames.ndim == 5 and weight.dtype == frames.dtype
            and weight.device.type == "cpu" and onednn_call_allowed()
            and (frames.dtype == torch.float32 or native_bf16()))  # PyTorch refuses bf16 convolutions elsewhere


def use_fused_inference(model: nn.Module) -> bool:
    """Let a FrameClassifier, I3DResNet or SlowFast run inference through its plan (built on first
    use); returns False, changing nothing, for any other module or where PyTorch lacks the
    oneDNN operators."""
    if getattr(model, "plan_type", None) is None or not _mkldnn_ops_available():
        return False
    model.fused_inference = True
    model._plan = None
    return True
