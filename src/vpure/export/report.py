"""What an exported UNet does to VideoPure's output: the seven members, torch vs engine.

The per-tensor SQNR of the exported UNet says little about the defence: its error is
integrated over every inversion and denoising call. This runs VideoPure twice on the same
clip, identical in everything but the UNet (the torch module, then the exported artefact
through the ONNX Runtime backend), and reports how many member labels agree, the largest
member-logit difference and the SQNR of the purified frames.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from vpure.runtime.metrics import sqnr_db


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
    from vpure.runtime.purifier import VideoPure
    from vpure.runtime.flow import DISFlow
    from vpure.runtime.models.diffusion import eps_fn_of

    spec = unet_backend.spec
    lat, ts = spec.input_names

    def eps_engine(z: torch.Tensor, t: int) -> torch.Tensor:
        return unet_backend(**{lat: z, ts: torch.tensor([int(t)])})[spec.output_names[0]]

    flow = DISFlow("medium")
    ref = VideoPure(eps_fn_of(unet), encoder, decoder, recognizer, flow)(clip, keep_frames=True)
    got = VideoPure(eps_engine, encoder, decoder, recognizer, flow)(clip, keep_frames=True)
    agree = int((ref.member_labels == got.member_labels).sum())
    return {
        "members_agree": agree, "members": int(ref.member_labels.numel()),
        "label_torch": int(ref.label.reshape(-1)[0]), "label_engine": int(got.label.reshape(-1)[0]),
        "max_logit_diff": float((ref.logits - got.logits).abs().max()),
        "frames_sqnr_db": sqnr_db(got.frames, ref.frames) if ref.frames is not None else math.nan,
    }
