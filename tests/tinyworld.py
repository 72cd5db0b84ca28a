"""Tiny random-init components and real footage shared by the VideoPure tests."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vpure.runtime import registry
from vpure.runtime.presets import MeanOverTime
from vpure.runtime.video import load_clip
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


def tiny_world(seed: int = 0) -> Tiny:
    return Tiny(
        unet=registry.get("unet").build(seed),
        encoder=registry.get("vae_encoder").build(seed),
        decoder=registry.get("vae_decoder").build(seed),
        recognizer=MeanOverTime(registry.get("frame_classifier").build(seed)).eval(),
    )


def real_clip(data_dir, frames: int = 8, size: int = 64, name: str = "vtest.avi", start: int = 0) -> torch.Tensor:
    """(1, 3, T, size, size) float in [0, 1] from real footage."""
    return load_clip(data_dir / name, frames, size, start)
