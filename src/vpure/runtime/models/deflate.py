"""Per-frame classifier from a recogniser's 2D stem: I3D deflated back to 2D.

I3D was inflated from a 2D ResNet-50, so its trunk applied to a single frame is a 2D
ResNet whose kernels are the 3D kernels summed over time (exact for a static frame, where
a temporal kernel sees the same image at every tap). Non-local blocks (space-time
attention) are dropped; the recogniser's own classifier labels every frame, so the
detection gate gets per-frame labels over the recogniser's classes without extra training.
"""

from __future__ import annotations

import torch
from torch import nn

from .i3d import I3DResNet
from .layout import frames_to_batch


def _conv2d_from_3d(conv: nn.Conv3d) -> nn.Conv2d:
    out = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size[1:], stride=conv.stride[1:],
                    padding=conv.padding[1:], bias=conv.bias is not None)
    with torch.no_grad():
        out.weight.copy_(conv.weight.sum(dim=2))
        if conv.bias is not None:
            out.bias.copy_(conv.bias)
    return out


def _bn2d_from_3d(bn: nn.BatchNorm3d) -> nn.BatchNorm2d:
    out = nn.BatchNorm2d(bn.num_features, eps=bn.eps, momentum=bn.momentum)
    out.load_state_dict(bn.state_dict())
    return out


class _Block2D(nn.Module):
    def __init__(self, block):
        super().__init__()
        self.conv1, self.bn1 = _conv2d_from_3d(block.conv1), _bn2d_from_3d(block.bn1)
        self.conv2, self.bn2 = _conv2d_from_3d(block.conv2), _bn2d_from_3d(block.bn2)
        self.bottleneck = hasattr(block, "conv3")  # else a basic (ResNet-18/34) block
        if self.bottleneck:
            self.conv3, self.bn3 = _conv2d_from_3d(block.conv3), _bn2d_from_3d(block.bn3)
        self.downsample = None
        if block.downsample is not None:
            self.downsample = nn.Sequential(_conv2d_from_3d(block.downsample[0]), _bn2d_from_3d(block.downsample[1]))
        self.relu = nn.ReLU()

    def forward(self, x):
        idt = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        if not self.bottleneck:
            return self.relu(self.bn2(self.conv2(out)) + idt)
        out = self.relu(self.bn2(self.conv2(out)))
        return self.relu(self.bn3(self.conv3(out)) + idt)


class DeflatedI3DFrameClassifier(nn.Module):
    """frames (B, 3, T, H, W) in [0, 1] -> per-frame logits (B, T, K) over the I3D's classes."""

    def __init__(self, i3d: I3DResNet):
        super().__init__()
        self.register_buffer("mean", i3d.mean.view(1, 3, 1, 1).clone(), persistent=False)
        self.register_buffer("std", i3d.std.view(1, 3, 1, 1).clone(), persistent=False)
        stem = i3d.first_stage
        pool = nn.MaxPool2d(3, stride=2, padding=1) if isinstance(stem[3], nn.MaxPool3d) else nn.Identity()
        self.stem = nn.Sequential(_conv2d_from_3d(stem[0]), _bn2d_from_3d(stem[1]), nn.ReLU(), pool)
        self.stages = nn.Sequential(*[nn.Sequential(*[_Block2D(b) for b in layer]) for layer in i3d.res_layers])
        self.fc = nn.Linear(i3d.fc.in_features, i3d.fc.out_features)
        self.fc.load_state_dict(i3d.fc.state_dict())
        self.eval()

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        b, t = frames.shape[0], frames.shape[2]
        x = (frames_to_batch(frames) - self.mean) / self.std
        x = self.stages(self.stem(x)).mean(dim=(2, 3))
        return self.fc(x).reshape(b, t, -1)
