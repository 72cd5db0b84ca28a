"""``vpure demo``: the defences at work on the shipped mini-world models.

A test-split clip (or a user's video, cut to the mini-world's 16 frames at 64x64) is
classified clean, attacked with PGD on the recogniser, and sent through the Shield
(detection gate -> route -> VideoPure for dense attacks). The decision records are printed
and a PNG strip shows clean, adversarial, perturbation (x8), purified frames, the optical
flow and the seven member votes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vpure.runtime.errors import ConfigError, InputError
from vpure.runtime.miniworld.dataset import CLASSES, WorldConfig, make_clip
from vpure.runtime.miniworld.models import MiniWorld, load_world

PICTURE_SUFFIXES = (".png", ".jpg", ".jpeg")


def videopure_config():
    """VideoPure as released, with the STO weights rescaled to the 64-pixel clip size."""
    from vpure.runtime.videopure import VideoPureConfig

    return VideoPureConfig(rescale_to_size=True)


def build_shield(world: MiniWorld, flow: str = "raft"):
    """(Shield, VideoPure) over the mini-world models; ``flow`` is ``raft`` (trained) or ``dis``."""
    from vpure.runtime.purifier import VideoPure
    from vpure.runtime.flow import DISFlow
    from vpure.runtime.models.diffusion import eps_fn_of
    from vpure.runtime.models.raft import RAFTFlow
    from vpure.runtime.shield import Shield

    provider = RAFTFlow(world.raft, pairs_per_call=16) if flow == "raft" else DISFlow("medium")
    vp = VideoPure(eps_fn_of(world.unet), world.encoder, world.decoder, world.recognizer, provider,
                   videopure_config())
    return Shield(world.frame_classifier, world.recognizer, videopure=vp, comdefend=world.comdefend), vp


@dataclass
class DemoResult:
    clean_label: int
    adversarial_label: int
    true_label: int | None
    clean_record: dict[str, Any]
    adversarial_record: dict[str, Any]
    purified_label: int
    votes: list[int]
    png: Path | None
    seconds: float


def _u8(frames: torch.Tensor) -> np.ndarray:
    """(3, T, H, W) [0, 1] -> (T, H, W, 3) uint8 RGB."""
    return (frames.clamp(0, 1).permute(1, 2, 3, 0).numpy() * 255).round().astype(np.uint8)


def flow_to_rgb(flow: torch.Tensor, max_mag: float | None = None) -> np.ndarray:
    """(2, H, W) flow -> (H, W, 3) uint8: hue is direction, saturation magnitude (Middlebury-like)."""
    import cv2

    fx, fy = flow[0].numpy(), flow[1].numpy()
    mag, ang = cv2.cartToPolar(fx.astype(np.float32), fy.astype(np.float32))
    scale = max_mag or max(float(mag.max()), 1e-6)
    hsv = np.zeros((*fx.shape, 3), np.uint8)
    hsv[..., 0] = (ang * 90 / math.pi).astype(np.uint8)
    hsv[..., 1] = np.clip(mag / scale * 255, 0, 255).astype(np.uint8)
    hsv[..., 2] = 255
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)


def strip_png(path: Path, clean: torch.Tensor, adv: torch.Tensor, purified: torch.Tensor, flow: torch.Tensor,
              votes: list[int], title: str, shown: int = 8, scale: int = 2) -> Path:
    """Rows: clean, adversarial, |perturbation| x8, purified, flow; then the member votes."""
    import cv2

    t = clean.shape[1]
    idx = np.linspace(0, t - 1, shown).round().astype(int)
    rows = {"clean": _u8(clean)[idx], "adversarial": _u8(adv)[idx],
            "perturbation x8": _u8(((adv - clean).abs() * 8).clamp(0, 1))[idx], "purified": _u8(purified)[idx]}
    fidx = np.minimum(idx, flow.shape[0] - 1)
    mag = float(flow.pow(2).sum(1).sqrt().max()) or 1.0
    rows["flow"] = np.stack([flow_to_rgb(flow[i], mag) for i in fidx])
    h, w = clean.shape[-2:]
    label_w, pad = 150, 2
    cell_h, cell_w = h * scale, w * scale
    width = label_w + shown * (cell_w + pad)
    vote_h = 40
    canvas = np.full((30 + len(rows) * (cell_h + pad) + vote_h, width, 3), 255, np.uint8)
    cv2.putText(canvas, title, (6, 20), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 0, 0), 1, cv2.LINE_AA)
    y = 30
    for name, frames in rows.items():
        cv2.putText(canvas, name, (6, y + cell_h // 2 + 5), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 1, cv2.LINE_AA)
        for j, f in enumerate(frames):
            x = label_w + j * (cell_w + pad)
            canvas[y:y + cell_h, x:x + cell_w] = cv2.resize(f, (cell_w, cell_h), interpolation=cv2.INTER_NEAREST)
        y += cell_h + pad
    cv2.putText(canvas, "member votes", (6, y + 25), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 1, cv2.LINE_AA)
    palette = [(230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240)]
    box = (width - label_w) // max(1, len(votes))
    for j, v in enumerate(votes):
        x = label_w + j * box
        cv2.rectangle(canvas, (x + 2, y + 6), (x + box - 2, y + vote_h - 4), palette[v % len(palette)], -1)
        name = CLASSES[v] if 0 <= v < len(CLASSES) else str(v)
        cv2.putText(canvas, name, (x + 6, y + 27), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (255, 255, 255), 1, cv2.LINE_AA)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), cv2.cvtColor(canvas, cv2.COLOR_RGB2BGR)):
        raise InputError(f"could not write the picture to {path}")
    return path


def run_demo(*, index: int = 0, video: str | Path | None = None, out: Path | None = Path("vpure-demo.png"),
             eps: float = 8 / 255, iters: int = 10, flow: str = "raft", frames: int | None = None,
             weights_dir: str | Path | None = None, seed: int = 0) -> DemoResult:
    import time

    from vpure.lab.attacks import pgd
    from vpure.runtime.video import load_clip

    cfg = WorldConfig()
    n = cfg.frames if frames is None else frames
    # Checked before any model loads: a bad argument costs nothing.
    if n < 2 or (video is None and n > cfg.frames):
        raise ConfigError(f"frames must be in [2, {cfg.frames}] for a mini-world clip (at least 2 for a video: "
                          f"flow and temporal consistency need frame pairs), got {n}")
    if video is None and index < 0:
        raise ConfigError(f"index must be a test-split clip index >= 0, got {index}")
    if out is not None and Path(out).suffix.lower() not in PICTURE_SUFFIXES:
        raise ConfigError(f"the picture's path must end in {', '.join(PICTURE_SUFFIXES)}, got {out}")
    if not (0.0 < eps <= 1.0 and iters >= 0):
        raise ConfigError(f"eps must be in (0, 1] (pixels are in [0, 1]) and iters >= 0, got eps={eps}, iters={iters}")
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    world = load_world(weights_dir)
    if video is not None:
        clip, truth = load_clip(video, n, cfg.size), None
    else:
        smp = make_clip("test", index, cfg)
        clip, truth = smp.clip[:, :n].unsqueeze(0).contiguous(), smp.label
    shield, vp = build_shield(world, flow)
    with torch.inference_mode():
        clean_label = int(world.recognizer(clip).argmax(-1)[0])
    adv = pgd(world.recognizer, clip, torch.tensor([clean_label]), eps=eps, step=eps / 4, iters=iters, seed=seed)
    with torch.inference_mode():
        adv_label = int(world.recognizer(adv).argmax(-1)[0])
    clean_rec, adv_rec = shield(clip)[0], shield(adv)[0]
    pure = vp(adv, keep_frames=True)  # the picture always shows purification, whatever the route
    votes = pure.member_labels[:, 0].tolist()
    png = None
    if out is not None:
        fl = vp.flow_provider(adv)[0]
        title = (f"true {CLASSES[truth] if truth is not None else '?'} | clean -> {CLASSES[clean_label]} | "
                 f"PGD eps {eps * 255:.0f}/255 -> {CLASSES[adv_label]} | Shield route {adv_rec.route} -> "
                 f"{CLASSES[adv_rec.label]} | VideoPure -> {CLASSES[int(pure.label[0])]}")
        png = strip_png(out, clip[0], adv[0], pure.frames[0], fl, votes, title)
    return DemoResult(clean_label, adv_label, truth, clean_rec.to_dict(), adv_rec.to_dict(), int(pure.label[0]),
                      votes, png, time.perf_counter() - t0)
