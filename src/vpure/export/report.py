"""What an exported UNet does to VideoPure's output: the seven members, torch vs engine.

The per-tensor SQNR of the exported UNet says little about the defence: its error is
integrated over every inversion and denoising call. This runs VideoPure twice on the same
clip, identical in everything but the UNet (the torch module, then the exported artefact
through the ONNX Runtime backend), and reports how many member labels agree, the largest
member-logit difference and the SQNR of the purified frames.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from vpure.runtime.metrics import sqnr_db
from vpure.runtime.precision import CalibrationRecipe


def synthetic_clip(frames: int, size: int, seed: int = 0) -> torch.Tensor:
    """(1, 3, frames, size, size) in [0, 1]: smooth colour blobs translating by a whole pixel
    per frame, so flow is meaningful; used when no real clip is given."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(size * 2.0), torch.arange(size * 2.0), indexing="ij")
    canvas = torch.zeros(3, size * 2, size * 2)
    for _ in range(6):
        cy, cx, r = (torch.rand(3, generator=g) * torch.tensor([2 * size, 2 * size, size / 3])).tolist()
        colour = torch.rand(3, 1, 1, generator=g)
        canvas += colour * torch.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * (r + 2) ** 2))
    canvas = canvas.clamp(0, 1)
    out = torch.stack([canvas[:, t: t + size, 2 * t: 2 * t + size] for t in range(frames)], dim=1)
    return out.unsqueeze(0).contiguous()


def unet_member_effect(unet: torch.nn.Module, unet_backend: Any, encoder, decoder, recognizer,
                       clip: torch.Tensor) -> dict[str, Any]:
    """Members agreeing (of 7), the final labels, max |logit difference| and purified-frame SQNR."""
    from vpure.runtime.models.diffusion import eps_fn_of

    return videopure_effect((eps_fn_of(unet), encoder, decoder), (backend_eps_fn(unet_backend), encoder, decoder),
                            recognizer, clip)


def backend_eps_fn(unet_backend: Any):
    """``eps_fn(z, t)`` over a UNet backend."""
    spec = unet_backend.spec
    lat, ts = spec.input_names

    def eps_engine(z: torch.Tensor, t: int) -> torch.Tensor:
        return unet_backend(**{lat: z, ts: torch.tensor([int(t)])})[spec.output_names[0]]

    return eps_engine


def videopure_effect(reference: tuple, served: tuple, recognizer, clip: torch.Tensor) -> dict[str, Any]:
    """VideoPure on ``clip`` twice, with ``reference`` and with ``served`` (eps_fn, encoder,
    decoder) and everything else the same: members agreeing (of 7), both labels, the largest
    member-logit difference and the purified frames' SQNR."""
    from vpure.runtime.flow import DISFlow
    from vpure.runtime.purifier import VideoPure

    flow = DISFlow("medium")
    ref = VideoPure(*reference, recognizer, flow)(clip, keep_frames=True)
    got = VideoPure(*served, recognizer, flow)(clip, keep_frames=True)
    agree = int((ref.member_labels == got.member_labels).sum())
    return {
        "members_agree": agree, "members": int(ref.member_labels.numel()),
        "label_torch": int(ref.label.reshape(-1)[0]), "label_engine": int(got.label.reshape(-1)[0]),
        "max_logit_diff": float((ref.logits - got.logits).abs().max()),
        "frames_sqnr_db": sqnr_db(got.frames, ref.frames) if ref.frames is not None else math.nan,
    }


def held_out_clips(recipe: CalibrationRecipe | None, frames: int, size: int, n: int) -> list[torch.Tensor]:
    """``n`` clips (1, 3, frames, size, size) none of ``recipe``'s calibration or parity samples:
    what an engine's effect on the defence is judged on. Clips of a folder come after the
    calibration and parity windows; the mini-world's from its test split; without data
    (``random``), smooth synthetic clips."""
    if recipe is None or recipe.source == "random":
        return [synthetic_clip(frames, size, seed=i) for i in range(n)]
    if recipe.source == "miniworld":
        from vpure.runtime.miniworld.dataset import make_clip

        out = []
        for i in range(n):
            clip = make_clip("test", i).clip[:, :frames]
            if clip.shape[-1] != size:
                clip = torch.nn.functional.interpolate(clip.transpose(0, 1), size=(size, size), mode="bilinear",
                                                       antialias=True, align_corners=False).transpose(0, 1).clamp(0, 1)
            out.append(clip[None].contiguous())
        return out
    from vpure.runtime.int8_calibration import _clip_windows

    folder = Path(recipe.source.partition(":")[2]).expanduser()
    return [c[None] for c in _clip_windows(folder, frames, size, n, skip=recipe.count + 2)]
