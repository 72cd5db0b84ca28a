"""Tiny random-init components and real footage shared by the VideoPure tests."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from vpure.runtime import registry
from vpure.runtime.models.diffusion import eps_fn_of


@dataclass
class Tiny:
    unet: torch.nn.Module
    encoder: torch.nn.Module
    decoder: torch.nn.Module
    recognizer: torch.nn.Module

    @property
    def eps_fn(self):
        return eps_fn_of(self.unet)


class MeanFrameRecognizer(torch.nn.Module):
    """A recogniser built from the registered frame classifier: logits averaged over time."""

    def __init__(self, frame_classifier: torch.nn.Module):
        super().__init__()
        self.frame_classifier = frame_classifier

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        return self.frame_classifier(frames).mean(dim=1)


def tiny_world(seed: int = 0) -> Tiny:
    return Tiny(
        unet=registry.get("unet").build(seed),
        encoder=registry.get("vae_encoder").build(seed),
        decoder=registry.get("vae_decoder").build(seed),
        recognizer=MeanFrameRecognizer(registry.get("frame_classifier").build(seed)).eval(),
    )


def real_clip(data_dir, frames: int = 8, size: int = 64, name: str = "vtest.avi", start: int = 0) -> torch.Tensor:
    """(1, 3, T, size, size) float in [0, 1] from real footage (centre crop, area resize)."""
    import av
    import cv2

    out = []
    with av.open(str(data_dir / name)) as c:
        for i, f in enumerate(c.decode(video=0)):
            if i < start:
                continue
            rgb = f.to_ndarray(format="rgb24")
            h, w = rgb.shape[:2]
            s = min(h, w)
            crop = rgb[(h - s) // 2:(h - s) // 2 + s, (w - s) // 2:(w - s) // 2 + s]
            out.append(cv2.resize(crop, (size, size), interpolation=cv2.INTER_AREA))
            if len(out) == frames:
                break
    x = torch.from_numpy(np.stack(out)).float().div(255.0)  # T H W C
    return x.permute(3, 0, 1, 2)[None].contiguous()
