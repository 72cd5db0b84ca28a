"""I3D-ResNet with optional non-local blocks, laid out like GluonCV-torch's
``I3D_ResNetV1`` (``i3d_resnet50_v1_kinetics400``, ``i3d_nl5_resnet50_v1_kinetics400``), so
their state dicts load unchanged.

Layout facts that matter for checkpoints: ``first_stage`` = (Conv3d 5x7x7 stride 2, BN,
ReLU, MaxPool 1x3x3 stride (2, 2, 2)); ``pool2`` (temporal max-pool by 2) after the first
residual stage; ``res_layers.{stage}.{block}`` Bottlenecks whose conv1 is 3x1x1 where the
stage's inflate pattern says so (else 1x1x1); gaussian non-local blocks after the blocks
its pattern marks, registered as ``theta/phi/g/W/bn`` and again as ``W_bn``; the
classifier registered as ``fc`` and again as ``head.1``. Input (B, 3, T, H, W) in [0, 1];
ImageNet normalisation is inside the module.

``block="basic"`` gives the ResNet-18/34 members of the family (GluonCV's
``i3d_resnet18_v1``): two-conv blocks whose first conv is 3x3x3 where inflated (else
1x3x3). ``inflate_from_2d`` is I3D's bootstrap from a trained 2D ResNet: its kernels
repeated over time and divided by the temporal extent (I3D's mean inflation), or placed on
the centre tap, so the inflated network starts from the 2D network's features before it
is fine-tuned on video.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from ..errors import InputError
from ..registry import RECOGNIZER_IO, ComponentSpec, Role, register
from .conv import graph_capture_active
from .frame_classifier import IMAGENET_MEAN, IMAGENET_STD
from .fused import ClipPlan, FusedInference

R50_BLOCKS = (3, 4, 6, 3)
R101_BLOCKS = (3, 4, 23, 3)
R50_INFLATE = ((1, 1, 1), (1, 0, 1, 0), (1, 0, 1, 0, 1, 0), (0, 1, 0))
NL5_R50 = ((0, 0, 0), (0, 1, 0, 1), (0, 1, 0, 1, 0, 1), (0, 0, 0))


class NonLocal(nn.Module):
    """Embedded-gaussian non-local block: z = W(softmax(theta^T phi / sqrt(d)) g) + x."""

    def __init__(self, channels: int):
        super().__init__()
        self.embed_dim = channels // 2
        self.theta = nn.Conv3d(channels, self.embed_dim, 1)
        self.phi = nn.Conv3d(channels, self.embed_dim, 1)
        self.g = nn.Conv3d(channels, self.embed_dim, 1)
        self.W = nn.Conv3d(self.embed_dim, channels, 1)
        # torch's momentum is the new batch's weight (MXNet's 0.9 means keeping 0.9 of the old).
        self.bn = nn.BatchNorm3d(channels)
        nn.init.zeros_(self.bn.weight)  # the non-local paper's init: the block starts as the identity
        self.W_bn = nn.Sequential(self.W, self.bn)  # the same modules under a second name, as saved

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        theta = self.theta(x)
        b, c = theta.shape[:2]
        t = theta.reshape(b, c, -1)
        p = self.phi(x).reshape(b, c, -1)
        g = self.g(x).reshape(b, c, -1)
        attn = torch.softmax(torch.bmm(t.transpose(1, 2), p) * (self.embed_dim ** -0.5), dim=-1)
        y = torch.bmm(g, attn.transpose(1, 2)).reshape(theta.shape)
        return self.W_bn(y) + x


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int, inflate: bool, nonlocal_: bool, downsample: nn.Module | None):
        super().__init__()
        self.conv1 = (nn.Conv3d(cin, planes, (3, 1, 1), padding=(1, 0, 0), bias=False) if inflate
                      else nn.Conv3d(cin, planes, 1, bias=False))
        self.conv2 = nn.Conv3d(planes, planes, (1, 3, 3), stride=(1, stride, stride), padding=(0, 1, 1), bias=False)
        self.bn1 = nn.BatchNorm3d(planes)
        self.bn2 = nn.BatchNorm3d(planes)
        self.conv3 = nn.Conv3d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm3d(planes * 4)
        self.downsample = downsample
        self.nonlocal_block = NonLocal(planes * 4) if nonlocal_ else None
        self.relu = nn.ReLU(inplace=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        idt = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.relu(self.bn3(self.conv3(out)) + idt)
        return out if self.nonlocal_block is None else self.nonlocal_block(out)


class BasicBlock3D(nn.Module):
    expansion = 1

    def __init__(self, cin: int, planes: int, stride: int, inflate: bool, nonlocal_: bool, downsample: nn.Module | None):
        super().__init__()
        kt = 3 if inflate else 1
        self.conv1 = nn.Conv3d(cin, planes, (kt, 3, 3), stride=(1, stride, stride), padding=(kt // 2, 1, 1), bias=False)
        self.bn1 = nn.BatchNorm3d(planes)
        self.conv2 = nn.Conv3d(planes, planes, (1, 3, 3), padding=(0, 1, 1), bias=False)
        self.bn2 = nn.BatchNorm3d(planes)
        self.downsample = downsample
        self.nonlocal_block = NonLocal(planes) if nonlocal_ else None
        self.relu = nn.ReLU(inplace=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        idt = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)) + idt)
        return out if self.nonlocal_block is None else self.nonlocal_block(out)


BLOCKS = {"bottleneck": Bottleneck, "basic": BasicBlock3D}


class I3DResNet(FusedInference, nn.Module):
    """frames (B, 3, T, H, W) in [0, 1] -> logits (B, num_classes)."""

    plan_type = ClipPlan

    def __init__(self, num_classes: int = 400, blocks: Sequence[int] = R50_BLOCKS,
                 inflate: Sequence[Sequence[int]] = R50_INFLATE, nonlocal_: Sequence[Sequence[int]] | None = NL5_R50,
                 base_width: int = 64, dropout: float = 0.5, stem_pool: bool = True, block: str = "bottleneck"):
        super().__init__()
        if block not in BLOCKS:
            raise ValueError(f"block must be one of {', '.join(BLOCKS)}, got {block!r}")
        unit = BLOCKS[block]
        self.block = block
        if len(inflate) != len(blocks) or any(len(f) != n for f, n in zip(inflate, blocks)):
            raise ValueError("inflate pattern must give one flag per block of every stage")
        nonlocal_ = nonlocal_ or tuple((0,) * n for n in blocks)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1, 1), persistent=False)
        self.first_stage = nn.Sequential(
            nn.Conv3d(3, base_width, (5, 7, 7), stride=(2, 2, 2), padding=(2, 3, 3), bias=False),
            nn.BatchNorm3d(base_width), nn.ReLU(inplace=False),
            # The stem's max-pool; small inputs (the mini-world's 64 px) keep their resolution without it.
            nn.MaxPool3d((1, 3, 3), stride=(2, 2, 2), padding=(0, 1, 1)) if stem_pool else nn.Identity())
        self.pool2 = nn.MaxPool3d((2, 1, 1), stride=(2, 1, 1))
        stages, cin = [], base_width
        for i, n in enumerate(blocks):
            planes, stride = base_width * 2 ** i, 1 if i == 0 else 2
            down = None
            cout = planes * unit.expansion
            if stride != 1 or cin != cout:
                down = nn.Sequential(nn.Conv3d(cin, cout, 1, stride=(1, stride, stride), bias=False),
                                     nn.BatchNorm3d(cout))
            layer = [unit(cin, planes, stride, bool(inflate[i][0]), bool(nonlocal_[i][0]), down)]
            layer += [unit(cout, planes, 1, bool(inflate[i][j]), bool(nonlocal_[i][j]), None) for j in range(1, n)]
            stages.append(nn.Sequential(*layer))
            cin = cout
        self.res_layers = nn.Sequential(*stages)
        self.st_avg = nn.AdaptiveAvgPool3d(1)
        self.dp = nn.Dropout(dropout)
        self.fc = nn.Linear(cin, num_classes)
        self.head = nn.Sequential(self.dp, self.fc)  # the same modules under a second name, as saved
        # The fewest frames the network takes: pool2 needs 2 time steps after the stem's stride 2.
        self.min_frames = next(t for t in range(1, 64) if self._frames_after_stem(t) >= 2)

    def _frames_after_stem(self, t: int) -> int:
        conv = self.first_stage[0]
        t = (t + 2 * conv.padding[0] - conv.kernel_size[0]) // conv.stride[0] + 1
        pool = self.first_stage[3]
        return t if isinstance(pool, nn.Identity) else (t - 1) // pool.stride[0] + 1

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        if not graph_capture_active() and frames.ndim == 5 and frames.shape[2] < self.min_frames:
            raise InputError(f"{type(self).__name__} needs clips of at least {self.min_frames} frames, "
                             f"got {frames.shape[2]}")
        fused = self.fused_forward(frames)  # vpure.runtime.models.fused, after use_fused_inference
        if fused is not None:
            return fused
        x = self.first_stage((frames - self.mean) / self.std)
        for i, layer in enumerate(self.res_layers):
            x = layer(x)
            if i == 0:
                x = self.pool2(x)
        return self.head(self.st_avg(x).flatten(1))


def inflate_from_2d(model: I3DResNet, resnet2d: nn.Module, mode: str = "mean") -> I3DResNet:
    """Initialise basic-block ``model`` from a trained 2D ResNet (``FrameClassifier`` layout:
    ``conv1/bn1``, ``layer{i}.{j}.conv1/bn1/conv2/bn2/downsample``, ``fc``) of the same widths
    and depths. ``mode="mean"`` (I3D's): each 2D kernel is repeated over the 3D kernel's
    temporal taps and divided by their number, exact on static clips away from the temporal
    borders. ``mode="centre"``: the 2D kernel on the centre tap, zeros elsewhere, so every
    time step starts as the 2D network on its own frame (exact on any clip, borders included).
    Batch norms and the classifier are copied; non-local blocks keep their identity init.
    Returns ``model``."""
    if model.block != "basic":
        raise ValueError("inflate_from_2d needs a basic-block I3DResNet")
    if mode not in ("mean", "centre"):
        raise ValueError(f"inflate_from_2d mode must be mean or centre, got {mode!r}")

    def conv(dst: nn.Conv3d, src: nn.Conv2d) -> None:
        if dst.weight.shape[:2] != src.weight.shape[:2] or dst.weight.shape[3:] != src.weight.shape[2:]:
            raise ValueError(f"cannot inflate a {tuple(src.weight.shape)} kernel into {tuple(dst.weight.shape)}")
        kt = dst.weight.shape[2]
        if mode == "mean":
            dst.weight.copy_(src.weight[:, :, None].expand_as(dst.weight) / kt)
        else:
            dst.weight.zero_()
            dst.weight[:, :, kt // 2].copy_(src.weight)

    def bn(dst: nn.BatchNorm3d, src: nn.BatchNorm2d) -> None:
        dst.load_state_dict(src.state_dict())

    stages = [getattr(resnet2d, f"layer{i + 1}", None) for i in range(len(model.res_layers))]
    if any(s is None or len(s) != len(m) for s, m in zip(stages, model.res_layers)):
        raise ValueError("the 2D network's stages do not match the I3D's depths")
    with torch.no_grad():
        conv(model.first_stage[0], resnet2d.conv1)
        bn(model.first_stage[1], resnet2d.bn1)
        for stage3d, stage2d in zip(model.res_layers, stages):
            for b3, b2 in zip(stage3d, stage2d):
                if (b3.downsample is None) != (b2.downsample is None):
                    raise ValueError("the 2D network's shortcuts do not match the I3D's")
                pairs = [(b3.conv1, b2.conv1, b3.bn1, b2.bn1), (b3.conv2, b2.conv2, b3.bn2, b2.bn2)]
                if b3.downsample is not None:
                    pairs.append((b3.downsample[0], b2.downsample[0], b3.downsample[1], b2.downsample[1]))
                for c3, c2, n3, n2 in pairs:
                    conv(c3, c2)
                    bn(n3, n2)
        model.fc.load_state_dict(resnet2d.fc.state_dict())
    return model


def i3d_nl5_resnet50(num_classes: int = 400) -> I3DResNet:
    return I3DResNet(num_classes, R50_BLOCKS, R50_INFLATE, NL5_R50)


def i3d_resnet50(num_classes: int = 400) -> I3DResNet:
    return I3DResNet(num_classes, R50_BLOCKS, R50_INFLATE, None)


def tiny_i3d() -> I3DResNet:
    return I3DResNet(num_classes=5, blocks=(1, 2, 1, 1), inflate=((1,), (1, 0), (0,), (0,)),
                     nonlocal_=((0,), (0, 1), (0,), (0,)), base_width=4)


def load_i3d(path, **overrides) -> I3DResNet:
    """A GluonCV-torch I3D-ResNet50/101 checkpoint (with or without non-local blocks), or a
    vpure safetensors file. The stage depths, inflation and non-local placement are read
    from the keys; ``num_classes`` from ``fc.weight``."""
    from ..checkpoint import construct, load_into, read_state_dict

    state, cfg = read_state_dict(path)
    if not cfg:
        if "fc.weight" not in state:
            from ..errors import CheckpointError

            raise CheckpointError(f"{path}: no fc.weight, not an I3D-ResNet checkpoint")
        stages = 1 + max([int(k.split(".")[1]) for k in state if k.startswith("res_layers.")] or [-1])
        blocks = tuple(1 + max([int(k.split(".")[2]) for k in state if k.startswith(f"res_layers.{i}.")] or [-1])
                       for i in range(stages))
        inflate = tuple(tuple(int(state.get(f"res_layers.{i}.{j}.conv1.weight", torch.zeros(1, 1, 1)).shape[2] == 3)
                              for j in range(n)) for i, n in enumerate(blocks))
        nonlocal_ = tuple(tuple(int(f"res_layers.{i}.{j}.nonlocal_block.theta.weight" in state) for j in range(n))
                          for i, n in enumerate(blocks))
        basic = "res_layers.0.0.conv3.weight" not in state
        cfg = dict(num_classes=int(state["fc.weight"].shape[0]), blocks=blocks, inflate=inflate, nonlocal_=nonlocal_,
                   base_width=int(state["first_stage.0.weight"].shape[0]), block="basic" if basic else "bottleneck")
    return load_into(construct(I3DResNet, {**cfg, **overrides}, path), state, str(path)).eval()


register(ComponentSpec(
    name="i3d_nl5_r50", role=Role.RECOGNIZER,
    **RECOGNIZER_IO,
    # T >= 8: the stem and pool2 divide time by 8.
    profile={"B": (1, 1, 8), "T": (8, 8, 32), "H": (64, 64, 64), "W": (64, 64, 64), "K": (5, 5, 5)},
    build_tiny=f"{__name__}:tiny_i3d",
    loader=f"{__name__}:load_i3d",
    exporter="legacy", exporter_reason="3D convs, bmm and softmax only; tracing is stable",
    doc="I3D-ResNet50 with 5 non-local blocks (GluonCV-torch layout), the recogniser VideoPure evaluates",
))
