"""Named model configurations shared by every benchmark (and ``vpure bench``).

- ``tiny``: T=8 at 64x64, the test-tier random-init models.
- ``small``: T=16 at 112x112, UNet3D widths 64/128/256/256, VAE widths 32/64/128/128.
- ``modelscope``: the real ModelScope text-to-video UNet3D (1.41B parameters) and SD VAE
  configurations with random weights, T=32 at 224x224 (GPU only: latency does not depend
  on the weights).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from .errors import ConfigError
from .models.diffusion import TINY_PROMPT_TOKENS, TINY_UNET, TINY_VAE, EpsUNet, VAEDecoder, VAEEncoder
from .models.frame_classifier import FrameClassifier


@dataclass(frozen=True)
class Preset:
    name: str
    frames: int
    size: int
    unet: dict[str, Any]
    vae: dict[str, Any]
    prompt_tokens: int = 77
    recognizer: dict[str, Any] = field(default_factory=lambda: dict(widths=(16, 32, 64), depths=(1, 1, 1), stem_width=16))
    num_classes: int = 10
    gpu_only: bool = False


from .miniworld import models as _MINI  # noqa: E402  (architecture constants only)

_UNET_BLOCKS = dict(down_block_types=("CrossAttnDownBlock3D",) * 3 + ("DownBlock3D",),
                    up_block_types=("UpBlock3D",) + ("CrossAttnUpBlock3D",) * 3)
_VAE_BLOCKS = dict(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)

PRESETS: dict[str, Preset] = {
    "tiny": Preset("tiny", 8, 64, dict(TINY_UNET), dict(TINY_VAE), prompt_tokens=TINY_PROMPT_TOKENS,
                   recognizer=dict(widths=(8, 16), depths=(1, 1), stem_width=8), num_classes=5),
    "small": Preset("small", 16, 112,
                    dict(in_channels=4, out_channels=4, block_out_channels=(64, 128, 256, 256), layers_per_block=2,
                         norm_num_groups=32, cross_attention_dim=256, attention_head_dim=8, **_UNET_BLOCKS),
                    dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 64, 128, 128),
                         layers_per_block=2, norm_num_groups=32, **_VAE_BLOCKS)),
    # The mini-world's shapes (16 frames at 64x64, 5 classes); its trained models live in
    # vpure.runtime.miniworld, this entry gives their engine profiles.
    "mini": Preset("mini", 16, 64, {k: v for k, v in _MINI.UNET.items()}, dict(_MINI.VAE),
                   prompt_tokens=_MINI.PROMPT_TOKENS, recognizer=dict(widths=(16, 32, 64), depths=(1, 1, 1),
                                                                     stem_width=16), num_classes=5),
    "modelscope": Preset("modelscope", 32, 224,
                         dict(in_channels=4, out_channels=4, block_out_channels=(320, 640, 1280, 1280),
                              layers_per_block=2, norm_num_groups=32, cross_attention_dim=1024,
                              attention_head_dim=64, **_UNET_BLOCKS),
                         dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
                              layers_per_block=2, norm_num_groups=32, scaling_factor=0.18215, **_VAE_BLOCKS),
                         recognizer=dict(), num_classes=400, gpu_only=True),
}


@dataclass
class PresetModels:
    preset: Preset
    unet: EpsUNet
    encoder: VAEEncoder
    decoder: VAEDecoder
    recognizer: torch.nn.Module


class MeanOverTime(torch.nn.Module):
    """A clip recogniser from a per-frame classifier: logits averaged over frames."""

    def __init__(self, frame_classifier: torch.nn.Module):
        super().__init__()
        self.frame_classifier = frame_classifier

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        return self.frame_classifier(frames).mean(dim=1)


def get(name: str) -> Preset:
    if name not in PRESETS:
        raise ConfigError(f"no preset named {name!r}; known: {', '.join(PRESETS)}")
    return PRESETS[name]


def build(name: str, seed: int = 0, device: str = "cpu", dtype: torch.dtype = torch.float32) -> PresetModels:
    """Random-init models of a preset (seeded), in eval mode on ``device``. On ``"meta"``
    nothing is allocated (shapes only: what :mod:`.flops` counts), so every preset builds."""
    import contextlib

    from diffusers import AutoencoderKL, UNet3DConditionModel

    p = get(name)
    kind = torch.device(device).type
    if p.gpu_only and kind not in ("cuda", "meta"):
        raise ConfigError(f"preset {name!r} is GPU only (its UNet alone is 1.41B parameters)")
    with torch.random.fork_rng(devices=[]), (torch.device("meta") if kind == "meta" else contextlib.nullcontext()):
        torch.manual_seed(seed)
        unet = EpsUNet(UNet3DConditionModel(**p.unet), torch.randn(1, p.prompt_tokens, p.unet["cross_attention_dim"]))
        vae = AutoencoderKL(**p.vae)
        rec = MeanOverTime(FrameClassifier(p.num_classes, **p.recognizer))
    mods = [m.to(device, dtype).eval() for m in (unet, VAEEncoder(vae), VAEDecoder(vae), rec)]
    return PresetModels(p, *mods)


def component_spec(name: str, component: str):
    """The registry description of ``component`` re-profiled for preset ``name``'s clips
    (:func:`profiled_spec`)."""
    p = get(name)
    return profiled_spec(component, p.frames, p.size, p.num_classes)


def profiled_spec(component: str, frames: int, size: int, num_classes: int):
    """The registry description of ``component`` at the shapes the runtime calls it with for
    ``frames``-frame clips at ``size`` pixels (latents at size/8) over ``num_classes`` classes.

    Registry profiles describe the tiny test configurations; only the profile changes (and
    with it the artefact's profile id), so the one exporter and backends serve every
    deployment. RAFT's batch covers the T-1 frame pairs of a window in one call.
    """
    import dataclasses

    from . import registry

    spec = registry.get(component)
    s, z = size, size // 8
    sizes = {"T": (1, frames, frames), "H": (s, s, s), "W": (s, s, s), "h": (z, z, z), "w": (z, z, z),
             "K": (num_classes,) * 3}
    if spec.role == registry.Role.EPS:
        sizes["T"] = (2, frames, frames)
    elif spec.role == registry.Role.RECOGNIZER:  # clip recognisers need several frames (I3D: 3 or more)
        lo, _, hi = spec.profile["T"]  # a fixed T (VideoMAE's position embeddings) stays fixed, at `frames`
        sizes["T"] = (frames if lo == hi else min(lo, frames), frames, frames)
    elif spec.role == registry.Role.FLOW:
        sizes["B"] = (1, max(frames - 1, 1), max(frames - 1, 1))
    return dataclasses.replace(spec, profile={d: sizes.get(d, v) for d, v in spec.profile.items()})


def component_module(models: PresetModels, component: str) -> torch.nn.Module:
    """The module of ``models`` that serves registry ``component``."""
    table = {"unet": models.unet, "vae_encoder": models.encoder, "vae_decoder": models.decoder,
             "frame_classifier": getattr(models.recognizer, "frame_classifier", None)}
    module = table.get(component)
    if module is None:
        raise ConfigError(f"preset {models.preset.name!r} has no module for component {component!r}; "
                          f"it has {', '.join(table)}")
    return module
