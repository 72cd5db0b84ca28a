"""Defences behind one interface: ``defence(clip) -> DefenceResult``.

A clip is (B, 3, T, H, W) float in [0, 1]. Every defence (VideoPure, its ablations and
the baselines in :mod:`vpure.lab.baselines`) returns the final label per clip, the
per-member logits and labels (one member for single-output defences) and wall-clock
milliseconds per stage.
"""

from __future__ import annotations

import math
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch

from .backends.base import require_finite
from .errors import InputError
from .flow import downsample_flow
from .videopure import VideoPureConfig, purify_latents, vote

Module = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class DefenceResult:
    label: torch.Tensor  # (B,) int64
    logits: torch.Tensor  # (M, B, K) per member
    member_labels: torch.Tensor  # (M, B)
    timings_ms: dict[str, float] = field(default_factory=dict)
    frames: torch.Tensor | None = None  # defended frames (B, 3, T, H, W) of the last member, if kept


class Stopwatch:
    """Accumulates wall-clock milliseconds per stage, synchronising CUDA at stage ends."""

    def __init__(self, device: torch.device | str = "cpu"):
        self.ms: dict[str, float] = {}
        self.cuda = torch.device(device).type == "cuda"

    @contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        if self.cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            if self.cuda:
                torch.cuda.synchronize()
            self.ms[stage] = self.ms.get(stage, 0.0) + (time.perf_counter() - t0) * 1e3


def _parameter_dtype(model) -> torch.dtype | None:
    """The dtype of a torch module's first floating-point parameter (None for engines)."""
    if isinstance(model, torch.nn.Module):
        for p in model.parameters():
            if p.is_floating_point():
                return p.dtype
    return None


def check_clip(clip: torch.Tensor, multiple: int = 1, like=None) -> torch.Tensor:
    """Check a clip: (B, 3, T, H, W) floating point, finite, in [0, 1], H and W multiples of
    ``multiple``. Returns it in the dtype the components take: a float32 clip as is (the
    backends choose their own precision inside); any other float clip converted to the
    parameters' dtype of ``like`` (the first model to read it), float32 for engines."""
    if not isinstance(clip, torch.Tensor):
        raise InputError(f"clip must be a torch.Tensor, got {type(clip).__name__}")
    if clip.ndim != 5 or clip.shape[1] != 3:
        raise InputError(f"clip must be (B, 3, T, H, W), got shape {tuple(clip.shape)}")
    if min(clip.shape) == 0:
        raise InputError(f"clip is empty: shape {tuple(clip.shape)}")
    if not clip.is_floating_point():
        raise InputError(f"clip must be floating point in [0, 1], got {clip.dtype}")
    lo, hi = (float(v) for v in torch.aminmax(clip.detach()))  # one pass; NaN propagates to both
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise InputError("clip contains NaN or Inf")
    if lo < 0.0 or hi > 1.0:
        raise InputError(f"clip values must lie in [0, 1], got [{lo:.3g}, {hi:.3g}]")
    if clip.shape[-2] % multiple or clip.shape[-1] % multiple:
        raise InputError(f"clip H and W must be multiples of {multiple}, got {tuple(clip.shape[-2:])}")
    if clip.dtype == torch.float32:
        return clip
    return clip.to(_parameter_dtype(like) or torch.float32)


def classify(recognizer: Module, frames: torch.Tensor, sw: Stopwatch | None = None) -> torch.Tensor:
    with (sw("recognize") if sw else _null()):
        with torch.inference_mode():
            return recognizer(frames).float()


@contextmanager
def _null() -> Iterator[None]:
    yield


def decode_frames(decoder: Module, z: torch.Tensor, frames_per_call: int = 0) -> torch.Tensor:
    """Decode latents (N, 4, T, h, w) frame by frame in calls of ``frames_per_call`` frames.

    The VAE decodes every frame independently, so the N*T frames are one stream cut into
    calls; 0 picks all at once on CUDA and 8 per call on CPU (where larger calls gained
    nothing measurable and 8 still fits the tiny engines' T <= 8 profiles), and never more
    than a backend-served decoder's (``as_module_call``) shape profile admits.
    """
    n, c, t, h, w = z.shape
    k = frames_per_call or min(n * t if z.device.type == "cuda" else 8, profile_max(decoder, "T") or n * t)
    flat = z.permute(0, 2, 1, 3, 4).reshape(1, n * t, c, h, w).permute(0, 2, 1, 3, 4)  # (1, 4, N*T, h, w)
    out = torch.cat([decoder(flat[:, :, i:i + k]) for i in range(0, n * t, k)], dim=2)
    return out.permute(0, 2, 1, 3, 4).reshape(n, t, *out.shape[1:2], *out.shape[-2:]).permute(0, 2, 1, 3, 4)


def profile_max(module, dim: str) -> int | None:
    """The largest size of ``dim`` a backend-served module's shape profile admits (a decoder
    engine built for T <= 8 takes no 16-frame call), or None for a plain module."""
    spec = getattr(getattr(module, "backend", None), "spec", None)
    profile = getattr(spec, "profile", None) or {}
    return profile[dim][2] if dim in profile else None


class TimedEps:
    """eps_fn wrapper counting UNet calls and their time (for per-stage timings)."""

    def __init__(self, eps_fn, sw: Stopwatch, stage: str = "unet"):
        self.eps_fn, self.sw, self.calls, self.stage = eps_fn, sw, 0, stage

    def __call__(self, z: torch.Tensor, t: int) -> torch.Tensor:
        self.calls += 1
        with self.sw(self.stage):
            return self.eps_fn(z, t)


class VideoPure:
    """Flow -> VAE encode -> temporal inversion -> denoising with STO -> decode -> vote.

    ``eps_fn(z, t)``, ``encoder(frames) -> latents``, ``decoder(latents) -> frames``,
    ``recognizer(frames) -> logits`` and ``flow_provider(frames, input_range) -> flows``
    are callables (torch modules or engine backends).
    """

    name = "videopure"

    def __init__(self, eps_fn, encoder: Module, decoder: Module, recognizer: Module, flow_provider,
                 config: VideoPureConfig | None = None, latent_factor: int = 8):
        self.eps_fn, self.encoder, self.decoder = eps_fn, encoder, decoder
        self.recognizer, self.flow_provider = recognizer, flow_provider
        self.config = config or VideoPureConfig()
        self.latent_factor = latent_factor

    def decode_members(self, members: list[torch.Tensor]) -> torch.Tensor:
        """Members (each (B, 4, T, h, w)) -> frames (M*B, 3, T, H, W), decode_batch_frames per call."""
        z = torch.cat(members, dim=0)
        return decode_frames(self.decoder, z, self.config.decode_batch_frames)

    @torch.inference_mode()
    def purified_members(self, clip: torch.Tensor) -> list[torch.Tensor]:
        """The M purified clips (each (B, 3, T, H, W)) the recogniser votes over (BPDA uses them)."""
        clip, cfg = check_clip(clip, self.latent_factor, self.encoder), self.config
        flow = require_finite(self.flow_provider(clip, input_range=cfg.flow_range), "flow")
        z0 = require_finite(self.encoder(clip), "vae_encoder")
        flow = downsample_flow(flow, tuple(z0.shape[-2:]))
        members = purify_latents(self.eps_fn, z0, flow, cfg)
        frames = self.decode_members(members)
        return list(frames.reshape(len(members), clip.shape[0], *frames.shape[1:]).unbind(0))

    @torch.inference_mode()
    def __call__(self, clip: torch.Tensor, keep_frames: bool = False) -> DefenceResult:
        clip, cfg = check_clip(clip, self.latent_factor, self.encoder), self.config
        sw = Stopwatch(clip.device)
        b = clip.shape[0]
        with sw("flow"):
            flow = require_finite(self.flow_provider(clip, input_range=cfg.flow_range), "flow")
        with sw("vae_encode"):
            z0 = require_finite(self.encoder(clip), "vae_encoder")
        with sw("flow"):
            flow = downsample_flow(flow, tuple(z0.shape[-2:]))
        inv, eps = TimedEps(self.eps_fn, sw, "unet_invert"), TimedEps(self.eps_fn, sw, "unet_denoise")
        with sw("purify"):
            members = purify_latents(eps, z0, flow, cfg, invert_eps_fn=inv)
        with sw("vae_decode"):
            frames = require_finite(self.decode_members(members), "vae_decoder")
        logits = classify(self.recognizer, frames, sw).reshape(len(members), b, -1)
        require_finite(logits, "recognizer", "on the purified members")
        with sw("vote"):
            label, member_labels = vote(logits, cfg.voting)
        timings = dict(sw.ms)
        timings["unet"] = timings.get("unet_invert", 0.0) + timings.get("unet_denoise", 0.0)
        timings["sto_and_schedule"] = timings.pop("purify") - timings["unet"]
        timings["unet_calls"] = float(inv.calls + eps.calls)
        return DefenceResult(label, logits, member_labels, timings, frames[-b:] if keep_frames else None)
