"""int8 calibration samples, for ONNX Runtime artefacts and the torch backend's int8 plans:
drawn from declared input ranges, decoded from real clips or rendered from the mini-world.

``CalibrationRecipe.source`` is ``"random"``, ``"clips:<folder>"`` or ``"miniworld"``. For
clips, every video file PyAV decodes in the folder (sorted by name, so the sample set is
reproducible) is cut into non-overlapping windows of the component's opt frame count at its
opt spatial size; ``"miniworld"`` takes the mini-world's training clips in order instead
(rendered from their seeds, cut to the opt frame count and resized to the opt size where
those differ). The windows are then turned into the component's inputs by its role:

- recogniser, frame classifier, ComDefend, VAE encoder: the clip itself, (B, 3, T, H, W) in [0, 1];
- flow: consecutive frame pairs, (B, 3, H, W) each;
- VAE decoder: the clip's latents from the companion VAE encoder;
- UNet: those latents noised to a timestep VideoPure visits (``z_t = sqrt(abar) z0 +
  sqrt(1 - abar) n``, t drawn from the timestep input's declared range, the steps VideoPure visits), as eq. (2) of the spec.

The latent-space roles need the VAE encoder module (``companions["vae_encoder"]``); without
it they are refused rather than calibrated on something unrepresentative.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np
import torch

from vpure.runtime import schedule
from vpure.runtime.errors import ArtifactError, InputError
from vpure.runtime.precision import CalibrationRecipe
from vpure.runtime.registry import ComponentSpec, Role

VIDEO_SUFFIXES = (".avi", ".mp4", ".mkv", ".mov", ".webm", ".m4v", ".mpg", ".mpeg", ".ts", ".y4m")
PIXEL_ROLES = (Role.RECOGNIZER, Role.FRAME_CLASSIFIER, Role.COMDEFEND, Role.VAE_ENCODER)
LATENT_ROLES = (Role.EPS, Role.VAE_DECODER)


def _clip_windows(folder: Path, frames: int, size: int, count: int, skip: int = 0) -> Iterator[torch.Tensor]:
    """Up to ``count`` clips (3, frames, size, size) in [0, 1] from the videos in ``folder``,
    after the first ``skip`` windows (held-out parity samples skip the calibration ones).
    Each video is decoded once, front to back (centre crop, area resize)."""
    from vpure.runtime.stream import StreamConfig
    from vpure.runtime.stream import frames as decode

    videos = sorted(p for p in folder.iterdir() if p.suffix.lower() in VIDEO_SUFFIXES) if folder.is_dir() else []
    if not videos:
        raise ArtifactError(f"calibration folder {folder} holds no video files ({', '.join(VIDEO_SUFFIXES)})")
    made = seen = 0
    cfg = StreamConfig(size=size)
    for video in videos:
        window: list[np.ndarray] = []
        try:
            for f in decode(video, cfg):
                window.append(f.rgb)
                if len(window) < frames:
                    continue
                seen += 1
                if seen > skip:
                    yield torch.from_numpy(np.stack(window)).permute(3, 0, 1, 2).float().div_(255.0)
                    made += 1
                    if made >= count:
                        return
                window = []
        except InputError:
            continue  # an unreadable video: go on with the next one
    if made == 0:
        raise ArtifactError(f"no {frames}-frame window could be decoded from the videos in {folder}")


def _miniworld_windows(frames: int, size: int, count: int, skip: int = 0) -> Iterator[torch.Tensor]:
    """The first ``frames`` frames of mini-world training clips ``skip``, ``skip + 1``, ...:
    ``count`` clips (3, frames, size, size) in [0, 1]."""
    from vpure.runtime.miniworld.dataset import WorldConfig, make_clip

    if frames > WorldConfig().frames:
        raise ArtifactError(f"miniworld calibration clips have {WorldConfig().frames} frames, the component "
                            f"takes {frames}")
    for i in range(skip, skip + count):
        clip = make_clip("train", i).clip[:, :frames]
        if clip.shape[-1] != size:
            clip = torch.nn.functional.interpolate(clip.transpose(0, 1), size=(size, size), mode="bilinear",
                                                   antialias=True, align_corners=False).transpose(0, 1).clamp(0, 1)
        yield clip.contiguous()


def _sizes(spec: ComponentSpec) -> tuple[int, int]:
    dims = spec.dims("opt")
    t = int(dims.get("T", 2))
    if "H" in dims:
        size = int(dims["H"])
    else:  # latent-space component: pixel size is 8x the latent size
        size = 8 * int(dims["h"])
    if Role(spec.role) is Role.FLOW:
        t = max(2, t)
    return t, size


def clip_batches(spec: ComponentSpec, recipe: CalibrationRecipe, companions: Mapping[str, Any] | None = None,
                 skip: int = 0) -> Iterator[dict[str, np.ndarray]]:
    """``recipe.count`` input dicts for ``spec`` built from the clips of ``recipe.source``
    (after ``skip`` windows)."""
    role = Role(spec.role)
    encoder = (companions or {}).get("vae_encoder")
    if role in LATENT_ROLES and encoder is None:
        raise ArtifactError(f"{spec.name}: calibrating from clips needs the VAE encoder to make latents; export "
                            f"vae_encoder in the same command or use source='random'")
    frames, size = _sizes(spec)
    gen = torch.Generator().manual_seed(recipe.seed)
    windows = (_miniworld_windows(frames, size, recipe.count, skip) if recipe.source == "miniworld" else
               _clip_windows(Path(recipe.source.partition(":")[2]).expanduser(), frames, size, recipe.count, skip))
    for clip in windows:
        x = clip.unsqueeze(0)
        if role in PIXEL_ROLES:
            yield {spec.inputs[0].name: x.numpy()}
        elif role is Role.FLOW:
            i = int(torch.randint(0, frames - 1, (1,), generator=gen))
            a, b = spec.input_names
            yield {a: x[:, :, i].contiguous().numpy(), b: x[:, :, i + 1].contiguous().numpy()}
        else:
            with torch.inference_mode():
                z0 = encoder(x)
            if role is Role.VAE_DECODER:
                yield {spec.inputs[0].name: z0.numpy()}
                continue
            lat, ts = spec.inputs
            lo, hi = (int(v) for v in ts.value_range)
            t = int(torch.randint(lo, hi + 1, (1,), generator=gen))
            ab = schedule.abar(t)
            noise = torch.randn(z0.shape, generator=gen)
            zt = (ab ** 0.5) * z0 + ((1 - ab) ** 0.5) * noise
            yield {lat.name: zt.float().numpy(), ts.name: np.array([t], dtype=np.int64)}


def calibration_batches(spec: ComponentSpec, recipe: CalibrationRecipe,
                        companions: Mapping[str, Any] | None = None) -> Iterator[dict[str, np.ndarray]]:
    """The samples ``recipe`` names for ``spec`` (see the module docstring)."""
    if recipe.source == "random":
        for i in range(recipe.count):
            yield {k: v.numpy() for k, v in spec.sample_inputs(seed=recipe.seed + i).items()}
    else:
        yield from clip_batches(spec, recipe, companions)


def parity_batches(spec: ComponentSpec, recipe: CalibrationRecipe | None,
                   companions: Mapping[str, Any] | None = None) -> list[dict[str, torch.Tensor]]:
    """Inputs an artefact's parity is measured on: the profile's min and opt shapes from the
    declared ranges, or, for a clip-calibrated int8 artefact, two held-out windows of the same
    source (the distribution it was calibrated for, none of the calibration samples)."""
    if recipe is None or recipe.source == "random":
        return [spec.sample_inputs(spec.dims(w), seed=7) for w in ("min", "opt")]
    held = recipe.replace(count=2, seed=recipe.seed + 1)
    out = [{k: torch.from_numpy(v) for k, v in b.items()} for b in clip_batches(spec, held, companions, recipe.count)]
    if not out:
        raise ArtifactError(f"{spec.name}: no held-out clip windows left after {recipe.count} calibration samples "
                            f"in {recipe.source}; add videos or lower the count")
    return out
