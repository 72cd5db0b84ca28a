"""An int8 inference plan on CPU for the ResNet-style frame classifier (the Shield's gate).

The gate labels every frame of every clip, clean ones included, so its latency is the clean
route's overhead over the recogniser alone. oneDNN's int8 convolutions (VNNI, AMX) run
several times the bf16 ones on a CPU that has them (``python -m benchmarks.bench_models
--int8``). :class:`Int8FramePlan`
runs the whole classifier in the integer domain:

- the input is normalised and quantised in one pass (the normalisation folded into the
  per-channel quantisation affine), to uint8 codes with a zero point;
- every convolution has its batch norm folded in (fp32), per-output-channel symmetric int8
  weights (7-bit with ``reduce_range``, for x86 CPUs without VNNI whose u8 x s8 pair sums
  saturate; see :class:`~vpure.runtime.precision.CalibrationRecipe`), an fp32 bias, and
  writes uint8 codes at its output's calibrated scale; the ReLU, or a residual block's
  ``relu(. + identity)``, is a oneDNN post-op (the sum written into the identity's codes);
- the stem max-pool pools the codes (quantisation is monotonic, so the maximum's code is
  the codes' maximum) in :mod:`vpure.kernels.pool`'s native kernel;
- the global average pool and the linear head run in fp32 on the last map's dequantised mean.

Activation scales are calibrated once, from fp32 runs of the same folded network over the
calibration clips: per activation, the minimum and maximum (``"minmax"``) or the given
percentiles of its values (``"percentile"``, each clip's percentile, then the extremes
over clips). The plan snapshots the weights at calibration. The torch backend serves it for
``precision = "int8"``; ``python -m benchmarks.bench_models --int8`` measures it against the
fp32 and bf16 plans, and ``vpure bench --clean-route --precisions fp32,bf16,int8`` in the clean
route.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Iterable

import torch
from torch import nn

from vpure.kernels.pool import max_pool2d

from ..errors import BackendUnavailable, ConfigError, InputError
from .fused import FramePlan, PerShape, _fold
from .layout import frames_to_batch

INT8_METHODS = ("minmax", "percentile")
_SUBSAMPLE = 1 << 20  # values per activation and clip that a percentile is taken over


def int8_ops_available() -> bool:
    """Whether this PyTorch has oneDNN's quantised convolution operators (x86 and ARM builds with
    oneDNN do)."""
    onednn = getattr(torch.ops, "onednn", None)
    return (torch.backends.mkldnn.is_available() and onednn is not None
            and hasattr(onednn, "qconv_prepack") and hasattr(onednn, "qconv2d_pointwise"))


@dataclass(frozen=True)
class QParams:
    """uint8 codes ``q = clamp(round(x / scale) + zero_point, 0, 255)``."""

    scale: float
    zero_point: int

    @classmethod
    def of_range(cls, lo: float, hi: float) -> "QParams":
        """The codes covering [min(lo, 0), max(hi, 0)] (zero exactly representable); a
        non-negative range (after a ReLU) gets zero point 0 and all 256 codes above it."""
        lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
        scale = max(hi - lo, 1e-8) / 255.0
        return cls(scale, int(min(max(round(-lo / scale), 0), 255)))

    def dequantize(self, q: torch.Tensor) -> torch.Tensor:
        return (q.float() - self.zero_point) * self.scale


class _Observer:
    """The range of one activation over the calibration clips."""

    def __init__(self, method: str, percentile: float):
        self.method, self.percentile = method, percentile
        self.lo, self.hi = float("inf"), float("-inf")

    def __call__(self, x: torch.Tensor) -> None:
        if self.method == "minmax":
            lo, hi = torch.aminmax(x)
        else:
            flat = x.reshape(-1)
            if flat.numel() > _SUBSAMPLE:
                flat = flat[:: -(-flat.numel() // _SUBSAMPLE)]
            q = torch.tensor([1.0 - self.percentile / 100.0, self.percentile / 100.0])
            lo, hi = torch.quantile(flat.float(), q)
        self.lo, self.hi = min(self.lo, float(lo)), max(self.hi, float(hi))

    def qparams(self) -> QParams:
        if self.lo > self.hi:
            raise ConfigError("int8 calibration saw no clips")
        return QParams.of_range(self.lo, self.hi)


class QConv:
    """``post(bn(conv(x)))`` on uint8 codes as one oneDNN int8 convolution: codes of ``x`` at
    ``x_q`` in, codes at ``out_q`` out. ``post`` is ``"relu"`` or ``"none"``; called with
    ``accum`` (codes at ``accum_q``, overwritten and returned) it is ``relu(. + accum)``. The
    weight is packed once per input shape (the last :attr:`SHAPES` shapes)."""

    SHAPES = 4

    def __init__(self, conv: nn.Conv2d, bn: nn.Module, x_q: QParams, out_q: QParams, post: str,
                 reduce_range: bool):
        if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            raise ValueError(f"QConv needs explicit zero padding, got {conv.padding_mode!r} {conv.padding!r}")
        weight, self.bias = (t.float() for t in _fold(conv, bn))
        qmax = 63 if reduce_range else 127
        self.w_scale = (weight.abs().amax((1, 2, 3)) / qmax).clamp_min(1e-12)
        self.w_int8 = torch.round(weight / self.w_scale.view(-1, 1, 1, 1)).clamp_(-qmax, qmax).to(torch.int8)
        self.w_zero_point = torch.zeros(weight.shape[0], dtype=torch.int64)
        self.stride, self.padding = list(conv.stride), list(conv.padding)
        self.dilation, self.groups = list(conv.dilation), conv.groups
        self.x_q, self.out_q, self.post = x_q, out_q, post
        self.packed = PerShape(self.SHAPES, lambda key: torch.ops.onednn.qconv_prepack(
            self.w_int8, self.w_scale, x_q.scale, x_q.zero_point, self.stride, self.padding, self.dilation,
            self.groups, list(key)))

    def __call__(self, qx: torch.Tensor, accum: torch.Tensor | None = None, accum_q: QParams | None = None):
        weight = self.packed(qx.shape)
        x_q, out_q = self.x_q, self.out_q
        if accum is None:
            return torch.ops.onednn.qconv2d_pointwise(
                qx, x_q.scale, x_q.zero_point, weight, self.w_scale, self.w_zero_point, self.bias, self.stride,
                self.padding, self.dilation, self.groups, out_q.scale, out_q.zero_point, torch.uint8, self.post, [], "")
        return torch.ops.onednn.qconv2d_pointwise.binary(
            qx, x_q.scale, x_q.zero_point, weight, self.w_scale, self.w_zero_point, accum, self.bias, self.stride,
            self.padding, self.dilation, self.groups, out_q.scale, out_q.zero_point, torch.uint8, accum_q.scale,
            accum_q.zero_point, "sum", 1.0, "relu", [], "")


def _walk(plan: FramePlan, frames: torch.Tensor, seen) -> None:
    """The fp32 plan's forward, handing each activation the int8 plan quantises to ``seen``
    in order: the normalised input, the stem's output, then per block its downsample's
    output (if any), its first convolution's and its own."""
    x = frames_to_batch((frames - plan.mean) / plan.std)
    seen(x)
    x = plan.stem(x)
    seen(x)
    if plan.stem_pool:
        x = max_pool2d(x, 3, 2, 1)
    for (conv1, conv2), down, _ in plan.blocks:
        identity = x
        if down is not None:
            identity = down(x)
            seen(identity)
        h = conv1(x)
        seen(h)
        x = conv2(h, residual=identity)
        seen(x)


class Int8FramePlan:
    """A :class:`~vpure.runtime.models.frame_classifier.FrameClassifier` as int8 oneDNN
    convolutions on CPU (see the module docstring): calibrated on ``clips`` ((B, 3, T, H, W)
    tensors in [0, 1]), then called like the model on fp32 frames, returning fp32 logits.
    Frames are taken as finite: a NaN has no uint8 code (the torch backend and the Shield
    refuse non-finite input before the gate runs)."""

    def __init__(self, model: nn.Module, clips: Iterable[torch.Tensor], method: str = "minmax",
                 percentile: float = 99.99, reduce_range: bool = True):
        if not int8_ops_available():
            raise BackendUnavailable("int8 frame classifier: this PyTorch lacks oneDNN's quantised convolutions "
                                     "(torch.ops.onednn.qconv2d_pointwise)")
        if method not in INT8_METHODS:
            raise ConfigError(f"int8 frame classifier: calibration method {method!r} is not one of {INT8_METHODS} "
                              "(entropy calibration is ONNX Runtime's: use backend 'onnxruntime' for it)")
        if model.training:
            raise ConfigError("int8 frame classifier: the model is in training mode; call .eval() first")
        if next(model.parameters()).dtype != torch.float32:
            model = copy.deepcopy(model).float()  # calibrated against fp32, the reference
        fp32 = FramePlan(model)
        observers: list[_Observer] = []
        calls = 0
        with torch.inference_mode():
            for clip in clips:
                calls += 1
                i = iter(range(1 << 30))

                def seen(x, i=i):
                    k = next(i)
                    if k == len(observers):
                        observers.append(_Observer(method, percentile))
                    observers[k](x)
                _walk(fp32, clip.float(), seen)
        if not calls:
            raise ConfigError("int8 frame classifier: no calibration clips")
        q = iter([o.qparams() for o in observers])
        self.in_q = next(q)
        # normalisation and quantisation in one affine per input channel: x * a + b, then rounded
        a = 1.0 / (fp32.std * self.in_q.scale)
        self.in_a_last, self.in_b_last = a.view(3), (self.in_q.zero_point - fp32.mean * a).view(3)
        self.stem = QConv(model.conv1, model.bn1, self.in_q, next(q), "relu", reduce_range)
        self.stem_pool = model.stem_pool
        self.blocks = []
        x_q = self.stem.out_q
        for blk in (b for i in range(model.n_layers) for b in getattr(model, f"layer{i + 1}")):
            down = None
            if blk.downsample is not None:
                down = QConv(blk.downsample[0], blk.downsample[1], x_q, next(q), "none", reduce_range)
            conv1 = QConv(blk.conv1, blk.bn1, x_q, next(q), "relu", reduce_range)
            conv2 = QConv(blk.conv2, blk.bn2, conv1.out_q, next(q), "relu", reduce_range)
            self.blocks.append((conv1, conv2, down))
            x_q = conv2.out_q
        self.out_q = x_q
        self.fc_weight, self.fc_bias = model.fc.weight.detach().float(), model.fc.bias.detach().float()
        self.num_classes = model.num_classes

    def quantize_input(self, frames: torch.Tensor) -> torch.Tensor:
        """(B, 3, T, H, W) frames -> (B*T, 3, H, W) uint8 codes of the normalised frames, channels-last."""
        b, c, t, h, w = frames.shape
        q = torch.empty((b, t, h, w, c))  # written in the channels-last order the stem reads
        torch.addcmul(self.in_b_last, frames.permute(0, 2, 3, 4, 1), self.in_a_last, out=q)
        return q.round_().clamp_(0, 255).to(torch.uint8).view(b * t, h, w, c).permute(0, 3, 1, 2)

    def __call__(self, frames: torch.Tensor) -> torch.Tensor:
        if frames.ndim != 5 or frames.shape[1] != 3 or not frames.is_floating_point() or frames.device.type != "cpu":
            raise InputError(f"int8 frame classifier: frames must be a CPU float (B, 3, T, H, W) tensor, got "
                             f"{frames.dtype} {tuple(frames.shape)} on {frames.device}")
        b, t = frames.shape[0], frames.shape[2]
        x = self.stem(self.quantize_input(frames.float()))
        if self.stem_pool:
            x = max_pool2d(x, 3, 2, 1)  # on the codes, in the native kernel
        x_q = self.stem.out_q
        for conv1, conv2, down in self.blocks:
            if down is None:
                identity, identity_q = x, x_q  # the block's input, overwritten by the sum below
            else:
                identity, identity_q = down(x), down.out_q
            x = conv2(conv1(x), accum=identity, accum_q=identity_q)
            x_q = conv2.out_q
        pooled = (x.float().mean((2, 3)) - x_q.zero_point) * x_q.scale
        return torch.addmm(self.fc_bias, pooled, self.fc_weight.t()).reshape(b, t, self.num_classes)
