"""SlowFast-R50 (Feichtenhofer et al., ICCV 2019) with the module names of pytorchvideo's
``slowfast_r50`` (``blocks.{i}.multipathway_blocks / multipathway_fusion``,
``res_blocks.{j}.branch1_conv / branch2.conv_a``, ``blocks.6.proj``), so its checkpoints load.

alpha = 4 (the slow pathway sees every 4th frame), beta = 1/8 (fast channels), lateral
fast-to-slow fusion by a 7x1x1 conv with temporal stride alpha after the stem and the
first three stages. Input (B, 3, T, H, W) in [0, 1] with T a multiple of 4 (the fast
pathway); Kinetics normalisation (mean 0.45, std 0.225) is inside. The head averages the
final features globally, which equals pytorchvideo's AvgPool3d((8, 7, 7)) / ((32, 7, 7)) at
the reference 32x224x224 input.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from ..errors import CheckpointError, InputError
from ..registry import RECOGNIZER_IO, ComponentSpec, Role, register
from .fused import FusedInference, SlowFastPlan

KINETICS_MEAN, KINETICS_STD = (0.45, 0.45, 0.45), (0.225, 0.225, 0.225)
R50_DEPTHS = (3, 4, 6, 3)
SLOW_CONV_A_T = (1, 1, 3, 3)  # temporal kernel of conv_a per stage, slow pathway
FAST_CONV_A_T = (3, 3, 3, 3)


class Stem(nn.Module):
    def __init__(self, cout: int, kt: int):
        super().__init__()
        self.conv = nn.Conv3d(3, cout, (kt, 7, 7), stride=(1, 2, 2), padding=(kt // 2, 3, 3), bias=False)
        self.norm = nn.BatchNorm3d(cout)
        self.activation = nn.ReLU()
        self.pool = nn.MaxPool3d((1, 3, 3), stride=(1, 2, 2), padding=(0, 1, 1))

    def forward(self, x):
        return self.pool(self.activation(self.norm(self.conv(x))))


class Bottleneck(nn.Module):
    def __init__(self, cin: int, inner: int, cout: int, kt: int, stride: int):
        super().__init__()
        self.conv_a = nn.Conv3d(cin, inner, (kt, 1, 1), padding=(kt // 2, 0, 0), bias=False)
        self.norm_a, self.act_a = nn.BatchNorm3d(inner), nn.ReLU()
        self.conv_b = nn.Conv3d(inner, inner, (1, 3, 3), stride=(1, stride, stride), padding=(0, 1, 1), bias=False)
        self.norm_b, self.act_b = nn.BatchNorm3d(inner), nn.ReLU()
        self.conv_c = nn.Conv3d(inner, cout, 1, bias=False)
        self.norm_c = nn.BatchNorm3d(cout)

    def forward(self, x):
        x = self.act_a(self.norm_a(self.conv_a(x)))
        x = self.act_b(self.norm_b(self.conv_b(x)))
        return self.norm_c(self.conv_c(x))


class ResBlock(nn.Module):
    def __init__(self, cin: int, inner: int, cout: int, kt: int, stride: int):
        super().__init__()
        self.branch1_conv = self.branch1_norm = None
        if cin != cout or stride != 1:
            self.branch1_conv = nn.Conv3d(cin, cout, 1, stride=(1, stride, stride), bias=False)
            self.branch1_norm = nn.BatchNorm3d(cout)
        self.branch2 = Bottleneck(cin, inner, cout, kt, stride)
        self.activation = nn.ReLU()

    def forward(self, x):
        skip = x if self.branch1_conv is None else self.branch1_norm(self.branch1_conv(x))
        return self.activation(skip + self.branch2(x))


class ResStage(nn.Module):
    def __init__(self, depth: int, cin: int, inner: int, cout: int, kt: int, stride: int):
        super().__init__()
        self.res_blocks = nn.ModuleList(
            [ResBlock(cin if i == 0 else cout, inner, cout, kt, stride if i == 0 else 1) for i in range(depth)])

    def forward(self, x):
        for block in self.res_blocks:
            x = block(x)
        return x


class FuseFastToSlow(nn.Module):
    def __init__(self, fast_dim: int, alpha: int, ratio: int = 2):
        super().__init__()
        self.conv_fast_to_slow = nn.Conv3d(fast_dim, fast_dim * ratio, (7, 1, 1), stride=(alpha, 1, 1),
                                           padding=(3, 0, 0), bias=False)
        self.norm = nn.BatchNorm3d(fast_dim * ratio)
        self.activation = nn.ReLU()

    def forward(self, slow, fast):
        return torch.cat([slow, self.activation(self.norm(self.conv_fast_to_slow(fast)))], dim=1), fast


class MultiPathway(nn.Module):
    def __init__(self, blocks: Sequence[nn.Module], fusion: nn.Module | None):
        super().__init__()
        self.multipathway_blocks = nn.ModuleList(blocks)
        self.multipathway_fusion = fusion if fusion is not None else nn.Identity()

    def forward(self, slow, fast):
        slow, fast = self.multipathway_blocks[0](slow), self.multipathway_blocks[1](fast)
        if isinstance(self.multipathway_fusion, nn.Identity):
            return slow, fast
        return self.multipathway_fusion(slow, fast)


HEAD_POOL_KERNELS = ((8, 7, 7), (32, 7, 7))  # pytorchvideo slowfast_r50's head_pool_kernel_sizes (slow, fast)


def _window_mean(x: torch.Tensor, kernel: tuple[int, int, int]) -> torch.Tensor:
    """The mean over positions of ``AvgPool3d(kernel, stride=1)(x)``, the kernel clipped to
    the map: (B, C, 1, 1, 1)."""
    k = tuple(min(a, b) for a, b in zip(kernel, x.shape[2:]))
    if k != tuple(x.shape[2:]):
        x = nn.functional.avg_pool3d(x, k, stride=1)
    return x.mean(dim=(2, 3, 4), keepdim=True)


class PoolConcat(nn.Module):
    """pytorchvideo's SlowFast head pooling: each pathway average-pooled with its (T, 7, 7)
    kernel at stride 1 and concatenated; its head then projects every pooled position and
    averages the projections, which equals projecting their mean (:class:`Head`; the
    projection is linear). The result is the global average only when the last feature map
    is the kernel's size (224 px, 32 frames); at pytorchvideo's 256-px inference crop it is
    the mean of four overlapping 7x7 windows. Kernels larger than a map are clipped to it
    (pytorchvideo fails there instead)."""

    def __init__(self, kernels: tuple[tuple[int, int, int], tuple[int, int, int]] = HEAD_POOL_KERNELS):
        super().__init__()
        self.kernels = kernels

    def forward(self, slow, fast):
        return torch.cat([_window_mean(slow, self.kernels[0]), _window_mean(fast, self.kernels[1])], dim=1)


class Head(nn.Module):
    def __init__(self, cin: int, num_classes: int, dropout: float):
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.proj = nn.Linear(cin, num_classes)

    def forward(self, x):
        return self.proj(self.dropout(x).flatten(1))


class SlowFast(FusedInference, nn.Module):
    """frames (B, 3, T, H, W) in [0, 1], T % alpha == 0 -> logits (B, num_classes)."""

    plan_type = SlowFastPlan

    def __init__(self, num_classes: int = 400, depths: Sequence[int] = R50_DEPTHS, alpha: int = 4,
                 beta_inv: int = 8, stem_width: int = 64, dropout: float = 0.5):
        super().__init__()
        self.alpha = alpha
        self.register_buffer("mean", torch.tensor(KINETICS_MEAN).view(1, 3, 1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(KINETICS_STD).view(1, 3, 1, 1, 1), persistent=False)
        fast_stem = stem_width // beta_inv
        blocks: list[nn.Module] = [MultiPathway([Stem(stem_width, 1), Stem(fast_stem, 5)],
                                                FuseFastToSlow(fast_stem, alpha))]
        dim_in, dim_out = stem_width, stem_width * 4
        for i, depth in enumerate(depths):
            slow_in = dim_in + dim_in * 2 // beta_inv
            stride = 1 if i == 0 else 2
            slow = ResStage(depth, slow_in, dim_out // 4, dim_out, SLOW_CONV_A_T[i], stride)
            fast = ResStage(depth, dim_in // beta_inv, dim_out // 4 // beta_inv, dim_out // beta_inv, FAST_CONV_A_T[i], stride)
            fusion = FuseFastToSlow(dim_out // beta_inv, alpha) if i < len(depths) - 1 else None
            blocks.append(MultiPathway([slow, fast], fusion))
            dim_in, dim_out = dim_out, dim_out * 2
        blocks.append(PoolConcat())
        blocks.append(Head(dim_in + dim_in // beta_inv, num_classes, dropout))
        self.blocks = nn.ModuleList(blocks)

    def pathways(self, frames: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(slow, fast) pathway inputs: the normalised clip, and every alpha-th frame of it
        (pytorchvideo's PackPathway)."""
        t = frames.shape[2]
        fast = (frames - self.mean) / self.std
        idx = torch.linspace(0, t - 1, t // self.alpha, device=frames.device).long()
        return fast.index_select(2, idx), fast

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        t = frames.shape[2]
        if not torch.jit.is_tracing() and t % self.alpha:
            raise InputError(f"SlowFast needs T to be a multiple of alpha={self.alpha}, got T={t}")
        fused = self.fused_forward(frames)  # vpure.runtime.models.fused, after use_fused_inference
        if fused is not None:
            return fused
        slow, fast = self.pathways(frames)
        for block in self.blocks[:-2]:
            slow, fast = block(slow, fast)
        return self.blocks[-1](self.blocks[-2](slow, fast))


def slowfast_r50(num_classes: int = 400) -> SlowFast:
    return SlowFast(num_classes)


def tiny_slowfast() -> SlowFast:
    return SlowFast(num_classes=5, depths=(1, 1, 1, 1), stem_width=16)


def load_slowfast(path, **overrides) -> SlowFast:
    """pytorchvideo ``slowfast_r50`` checkpoints (plain or under ``model_state``/``state_dict``)
    or vpure safetensors files; depths, widths and classes are read from the keys."""
    from ..checkpoint import construct, load_into, read_state_dict

    state, cfg = read_state_dict(path)
    if not cfg:
        if "blocks.6.proj.weight" not in state:
            raise CheckpointError(f"{path}: no blocks.6.proj.weight, not a pytorchvideo SlowFast checkpoint")
        depths = tuple(1 + max(int(k.split(".")[5]) for k in state
                               if k.startswith(f"blocks.{i}.multipathway_blocks.0.res_blocks.")) for i in range(1, 5))
        cfg = dict(num_classes=int(state["blocks.6.proj.weight"].shape[0]), depths=depths,
                   stem_width=int(state["blocks.0.multipathway_blocks.0.conv.weight"].shape[0]))
    return load_into(construct(SlowFast, {**cfg, **overrides}, path), state, str(path)).eval()


register(ComponentSpec(
    name="slowfast_r50", role=Role.RECOGNIZER,
    **RECOGNIZER_IO,
    profile={"B": (1, 1, 8), "T": (8, 8, 32), "H": (64, 64, 64), "W": (64, 64, 64), "K": (5, 5, 5)},
    build_tiny=f"{__name__}:tiny_slowfast",
    loader=f"{__name__}:load_slowfast",
    exporter="legacy", exporter_reason="two pathways of 3D convs; tracing is stable",
    doc="SlowFast-R50 (pytorchvideo layout), alpha 4, beta 1/8, lateral connections",
))
