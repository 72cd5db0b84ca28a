"""ViT-style video recogniser: transformers' ``VideoMAEForVideoClassification`` from a local
folder (``save_pretrained`` layout). Input (B, 3, T, H, W) in [0, 1]; the image mean/std of
the folder's ``preprocessor_config.json`` (ImageNet's when absent) are applied inside.
T, H and W are fixed by the checkpoint (``num_frames``, ``image_size``)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from ..errors import CheckpointError, InputError, first_line
from ..registry import RECOGNIZER_IO, ComponentSpec, Role, register
from .conv import graph_capture_active
from .frame_classifier import IMAGENET_MEAN, IMAGENET_STD


class VideoMAERecognizer(nn.Module):
    def __init__(self, model: nn.Module, mean=IMAGENET_MEAN, std=IMAGENET_STD):
        super().__init__()
        self.model = model
        size = model.config.image_size
        self.clip_shape = (model.config.num_frames, *(size if isinstance(size, (list, tuple)) else (size, size)))
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1, 1), persistent=False)

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        t, h, w = self.clip_shape
        if not graph_capture_active() and (frames.ndim != 5 or tuple(frames.shape[2:]) != self.clip_shape):
            raise InputError(f"this VideoMAE takes clips of exactly {t} frames at {h}x{w} "
                             f"(its position embeddings fix them), got shape {tuple(frames.shape)}")
        x = ((frames - self.mean) / self.std).permute(0, 2, 1, 3, 4)  # VideoMAE takes (B, T, C, H, W)
        return self.model(pixel_values=x).logits


TINY = dict(image_size=32, patch_size=8, num_channels=3, num_frames=4, tubelet_size=2, hidden_size=32,
            num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, num_labels=5, use_mean_pooling=True)


def tiny_videomae() -> VideoMAERecognizer:
    from ..extras import require

    transformers = require("transformers", "transformers", "a VideoMAE recogniser")
    VideoMAEConfig, VideoMAEForVideoClassification = transformers.VideoMAEConfig, transformers.VideoMAEForVideoClassification

    return VideoMAERecognizer(VideoMAEForVideoClassification(VideoMAEConfig(**TINY)))


def load_videomae(path, dtype: torch.dtype = torch.float32) -> VideoMAERecognizer:
    from ..extras import require

    VideoMAEForVideoClassification = require("transformers", "transformers",
                                             "a VideoMAE recogniser").VideoMAEForVideoClassification

    path = Path(path)
    if not (path / "config.json").is_file():
        raise CheckpointError(f"{path} is not a VideoMAE folder (no config.json)")
    try:
        model = VideoMAEForVideoClassification.from_pretrained(str(path), local_files_only=True, dtype=dtype)
    except Exception as e:  # noqa: BLE001 - any loader failure (a pickle weights_only refuses too) is one line
        raise CheckpointError(f"cannot load VideoMAE from {path}: {first_line(e)}") from None
    mean, std = IMAGENET_MEAN, IMAGENET_STD
    pre = path / "preprocessor_config.json"
    if pre.is_file():
        cfg = json.loads(pre.read_text())
        mean, std = tuple(cfg.get("image_mean", mean)), tuple(cfg.get("image_std", std))
    return VideoMAERecognizer(model, mean, std).eval()


register(ComponentSpec(
    name="videomae", role=Role.RECOGNIZER,
    **RECOGNIZER_IO,
    profile={"B": (1, 1, 8), "T": (4, 4, 4), "H": (32, 32, 32), "W": (32, 32, 32), "K": (5, 5, 5)},
    build_tiny=f"{__name__}:tiny_videomae",
    loader=f"{__name__}:load_videomae",
    exporter="legacy", exporter_reason="fixed T, H, W: TorchScript tracing handles the attention graph without onnxscript",
    fp32_ops=("Softmax", "LayerNormalization"),
    doc="VideoMAE video transformer (transformers), loaded from a local folder",
))
