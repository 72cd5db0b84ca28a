"""Per-frame 2D classifier for the detection gate (spec/detection.md).

A ResNet-style network (BasicBlock, torchvision module names, so ImageNet-layout
ResNet-18/34 state dicts load) applied to every frame of a clip, frames batched over
time. widths (64, 128, 256, 512) with depths (2, 2, 2, 2) is ResNet-18.
"""

from __future__ import annotations

import torch
from torch import nn

from ..registry import ComponentSpec, Role, TensorSpec, register
from .fused import FramePlan, FusedInference
from .layout import frames_to_batch
from .quantized import Int8FramePlan

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        idt = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + idt)


class FrameClassifier(FusedInference, nn.Module):
    """frames (B, 3, T, H, W) in [0, 1] -> per-frame logits (B, T, num_classes)."""

    plan_type = FramePlan
    int8_plan_type = Int8FramePlan  # the torch backend's int8

    def __init__(self, num_classes: int, widths=(64, 128, 256, 512), depths=(2, 2, 2, 2),
                 stem_width: int = 64, mean=IMAGENET_MEAN, std=IMAGENET_STD, stem_pool: bool = True):
        super().__init__()
        self.num_classes = num_classes
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        self.conv1 = nn.Conv2d(3, stem_width, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(stem_width)
        self.relu = nn.ReLU(inplace=True)
        # ResNet's stem max-pool; small inputs (the mini-world's 64 px) keep their resolution without it.
        self.stem_pool = stem_pool
        self.maxpool = nn.MaxPool2d(3, 2, 1) if stem_pool else nn.Identity()
        cin = stem_width
        for i, (w, d) in enumerate(zip(widths, depths)):
            blocks = [BasicBlock(cin if j == 0 else w, w, (1 if i == 0 else 2) if j == 0 else 1) for j in range(d)]
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))
            cin = w
        self.n_layers = len(widths)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def feature_maps(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Every stage's output for (N, 3, H, W) images in [0, 1], stem first, then the logits
        (N, K): what a perceptual loss built on this classifier compares."""
        x = (images - self.mean) / self.std
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        maps = [x]
        for i in range(self.n_layers):
            x = getattr(self, f"layer{i + 1}")(x)
            maps.append(x)
        maps.append(self.fc(torch.flatten(self.avgpool(x), 1)))
        return maps

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        fused = self.fused_forward(frames)  # vpure.runtime.models.fused, after use_fused_inference
        if fused is not None:
            return fused
        b, t = frames.shape[0], frames.shape[2]
        x = (frames_to_batch(frames) - self.mean) / self.std
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for i in range(self.n_layers):
            x = getattr(self, f"layer{i + 1}")(x)
        x = self.fc(torch.flatten(self.avgpool(x), 1))
        return x.reshape(b, t, self.num_classes)


def load_frame_classifier(path, **overrides) -> FrameClassifier:
    """From a vpure safetensors file (architecture in its metadata) or an ImageNet-layout
    ResNet-18 state dict (.pth/.safetensors; ``num_classes`` read from its fc layer)."""
    from ..checkpoint import construct, load_into, read_state_dict
    from ..errors import CheckpointError

    state, cfg = read_state_dict(path)
    if "fc.weight" in state:
        cfg.setdefault("num_classes", int(state["fc.weight"].shape[0]))
    if "num_classes" not in {**cfg, **overrides}:
        raise CheckpointError(f"{path}: no fc.weight and no architecture metadata, not a frame-classifier "
                              "checkpoint (a vpure safetensors file or an ImageNet-layout ResNet state dict)")
    return load_into(construct(FrameClassifier, {**cfg, **overrides}, path), state, str(path)).eval()


def frame_classifier_config(model: FrameClassifier) -> dict:
    layers = [getattr(model, f"layer{i + 1}") for i in range(model.n_layers)]
    return {"num_classes": model.num_classes, "widths": [layer[0].conv1.out_channels for layer in layers],
            "depths": [len(layer) for layer in layers], "stem_width": model.conv1.out_channels,
            "stem_pool": model.stem_pool}


def tiny_frame_classifier() -> FrameClassifier:
    return FrameClassifier(num_classes=5, widths=(8, 16), depths=(1, 1), stem_width=8)


register(ComponentSpec(
    name="frame_classifier", role=Role.FRAME_CLASSIFIER,
    inputs=(TensorSpec("frames", ("B", 3, "T", "H", "W")),),
    outputs=(TensorSpec("logits", ("B", "T", "K")),),
    profile={"B": (1, 1, 2), "T": (1, 4, 16), "H": (64, 64, 64), "W": (64, 64, 64), "K": (5, 5, 5)},
    build_tiny=f"{__name__}:tiny_frame_classifier",
    loader=f"{__name__}:load_frame_classifier",
    exporter="legacy", exporter_reason="plain conv graph; tracing is stable",
    doc="ResNet-style per-frame classifier; exception index input",
))
