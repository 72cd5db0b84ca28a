"""Baseline defences behind the :class:`~vpure.runtime.purifier.DefenceResult` interface
(spec/videopure.md, Baselines): none, JPEG, wavelet denoising, Temporal Shuffle, DDIM
inversion, DiffPure-DDIM and DiffPure-DDPM. Randomness is passed in as a seed.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from vpure.runtime import schedule
from vpure.runtime.purifier import DefenceResult, Stopwatch, check_clip, classify
from vpure.runtime.errors import InputError
from vpure.runtime.videopure import EpsFn, temporal_ddim_invert


# -- per-frame transforms -----------------------------------------------------------------
def jpeg_frames(clip: torch.Tensor, quality: int = 75) -> torch.Tensor:
    """JPEG-compress every frame at ``quality`` (1..100); clip (B, 3, T, H, W) in [0, 1]."""
    import cv2

    if not 1 <= quality <= 100:
        raise InputError(f"JPEG quality must be in [1, 100], got {quality}")
    x = (clip.detach().cpu().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 4, 1).numpy()  # B T H W C
    out = np.empty_like(x)
    for b in range(x.shape[0]):
        for t in range(x.shape[1]):
            ok, buf = cv2.imencode(".jpg", x[b, t], [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
            out[b, t] = cv2.imdecode(buf, cv2.IMREAD_UNCHANGED).reshape(x.shape[2:])
    return torch.from_numpy(out).permute(0, 4, 1, 2, 3).to(clip.device, clip.dtype) / 255.0


def wavelet_denoise_frames(clip: torch.Tensor, wavelet: str = "db1", levels: int = 3) -> torch.Tensor:
    """BayesShrink soft-threshold wavelet denoising of every frame and channel.

    sigma is estimated from the finest diagonal subband (median absolute deviation
    / 0.6745); each detail subband gets threshold sigma^2 / sigma_x with
    sigma_x = sqrt(max(var - sigma^2, 0)) (zeroed where the subband is all noise).
    """
    from vpure.runtime.extras import require

    pywt = require("pywt", "lab", "the wavelet-denoising baseline")

    x = clip.detach().cpu().double().numpy()
    out = np.empty_like(x)
    for idx in np.ndindex(*x.shape[:3]):
        plane = x[idx]
        lv = max(1, min(levels, pywt.dwtn_max_level(plane.shape, wavelet)))
        coeffs = pywt.wavedec2(plane, wavelet, level=lv)
        sigma = np.median(np.abs(coeffs[-1][-1])) / 0.6745
        den = [coeffs[0]]
        for detail in coeffs[1:]:
            bands = []
            for c in detail:
                sx = math.sqrt(max(float(np.mean(c * c)) - sigma ** 2, 0.0))
                thr = float(np.max(np.abs(c))) if sx == 0 else sigma ** 2 / sx
                bands.append(pywt.threshold(c, thr, mode="soft"))
            den.append(tuple(bands))
        out[idx] = pywt.waverec2(den, wavelet)[: plane.shape[0], : plane.shape[1]]
    return torch.from_numpy(out).clamp(0, 1).to(clip.device, clip.dtype)


def temporal_shuffle(clip: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """Frames in a random order (seeded, one permutation per clip of the batch)."""
    g = torch.Generator().manual_seed(seed)
    perms = [torch.randperm(clip.shape[2], generator=g) for _ in range(clip.shape[0])]
    return torch.stack([clip[b][:, p.to(clip.device)] for b, p in enumerate(perms)])


class FrameTransformDefence:
    """Transform the clip (or not), then classify it once."""

    def __init__(self, name: str, recognizer, transform=None):
        self.name, self.recognizer, self.transform = name, recognizer, transform

    def __call__(self, clip: torch.Tensor, keep_frames: bool = False) -> DefenceResult:
        clip = check_clip(clip, like=self.recognizer)
        sw = Stopwatch(clip.device)
        with sw("defend"):
            frames = self.transform(clip) if self.transform else clip
        logits = classify(self.recognizer, frames, sw)[None]
        labels = logits.argmax(-1)
        return DefenceResult(labels[0], logits, labels, dict(sw.ms), frames if keep_frames else None)


def no_defence(recognizer) -> FrameTransformDefence:
    return FrameTransformDefence("none", recognizer)


def jpeg_defence(recognizer, quality: int = 75) -> FrameTransformDefence:
    return FrameTransformDefence(f"jpeg{quality}", recognizer, lambda c: jpeg_frames(c, quality))


def wavelet_defence(recognizer, wavelet: str = "db1") -> FrameTransformDefence:
    return FrameTransformDefence("wavelet", recognizer, lambda c: wavelet_denoise_frames(c, wavelet))


def temporal_shuffle_defence(recognizer, seed: int = 0) -> FrameTransformDefence:
    return FrameTransformDefence("temporal_shuffle", recognizer, lambda c: temporal_shuffle(c, seed))


# -- diffusion baselines in latent space ------------------------------------------------------
def ddim_denoise(eps_fn: EpsFn, z: torch.Tensor, timesteps: list[int], step: int) -> torch.Tensor:
    """Plain deterministic DDIM (eta = 0) from the last of ``timesteps`` down to abar[0]."""
    for t in reversed(timesteps):
        eps = eps_fn(z, t)
        a_t, a_prev = schedule.abar(t), schedule.prev_abar(t, step)
        x0 = (z - math.sqrt(1.0 - a_t) * eps) / math.sqrt(a_t)
        z = math.sqrt(a_prev) * x0 + math.sqrt(1.0 - a_prev) * eps
    return z


def ddim_inversion_purify(eps_fn: EpsFn, z0: torch.Tensor, t_star: int = 6, num_inference_steps: int = 50):
    """Plain DDIM inversion to t = 101 and plain DDIM back: one output latent."""
    ts, step = schedule.ddim_timesteps(num_inference_steps, t_star), schedule.step_size(num_inference_steps)
    z = temporal_ddim_invert(eps_fn, z0, ts, replicate_first_frame=False, step=step)
    return ddim_denoise(eps_fn, z, ts, step)


def diffpure_ddim(eps_fn: EpsFn, z0: torch.Tensor, seed: int = 0, t_star: int = 6, num_inference_steps: int = 50):
    """z = sqrt(abar[t]) z0 + sqrt(1 - abar[t]) N(0, I) (seeded), then t_star DDIM steps."""
    ts, step = schedule.ddim_timesteps(num_inference_steps, t_star), schedule.step_size(num_inference_steps)
    g = torch.Generator(device="cpu").manual_seed(seed)
    noise = torch.randn(z0.shape, generator=g, dtype=z0.dtype).to(z0.device)
    a = schedule.abar(ts[-1])
    return ddim_denoise(eps_fn, math.sqrt(a) * z0 + math.sqrt(1.0 - a) * noise, ts, step)


def diffpure_ddpm(eps_fn: EpsFn, z0: torch.Tensor, seed: int = 0, t: int = 100):
    """1000-step DDPM: noise to ``t``, then t + 1 ancestral steps with the posterior variance."""
    g = torch.Generator(device="cpu").manual_seed(seed)

    def randn():
        return torch.randn(z0.shape, generator=g, dtype=z0.dtype).to(z0.device)

    betas = schedule.betas()
    z = math.sqrt(schedule.abar(t)) * z0 + math.sqrt(1.0 - schedule.abar(t)) * randn()
    for s in range(t, -1, -1):
        a_s = schedule.abar(s)
        a_prev = schedule.abar(s - 1) if s > 0 else 1.0
        beta = float(betas[s])
        eps = eps_fn(z, s)
        x0 = (z - math.sqrt(1.0 - a_s) * eps) / math.sqrt(a_s)
        mean = (beta * math.sqrt(a_prev) / (1.0 - a_s)) * x0 + ((1.0 - a_prev) * math.sqrt(1.0 - beta) / (1.0 - a_s)) * z
        z = mean + math.sqrt(beta * (1.0 - a_prev) / (1.0 - a_s)) * randn() if s > 0 else mean
    return z


class LatentDiffusionDefence:
    """Encode, one of the latent baselines, decode, classify once."""

    KINDS = {"ddim_inversion": ddim_inversion_purify, "diffpure_ddim": diffpure_ddim, "diffpure_ddpm": diffpure_ddpm}

    def __init__(self, kind: str, eps_fn: EpsFn, encoder, decoder, recognizer, seed: int = 0, latent_factor: int = 8):
        if kind not in self.KINDS:
            raise InputError(f"latent baseline {kind!r} is not one of {tuple(self.KINDS)}")
        self.name, self.kind = kind, kind
        self.eps_fn, self.encoder, self.decoder, self.recognizer = eps_fn, encoder, decoder, recognizer
        self.seed, self.latent_factor = seed, latent_factor

    @torch.inference_mode()
    def __call__(self, clip: torch.Tensor, keep_frames: bool = False) -> DefenceResult:
        clip = check_clip(clip, self.latent_factor, self.encoder)
        sw = Stopwatch(clip.device)
        with sw("vae_encode"):
            z0 = self.encoder(clip)
        with sw("purify"):
            fn = self.KINDS[self.kind]
            z = fn(self.eps_fn, z0) if self.kind == "ddim_inversion" else fn(self.eps_fn, z0, seed=self.seed)
        with sw("vae_decode"):
            frames = self.decoder(z)
        logits = classify(self.recognizer, frames, sw)[None]
        labels = logits.argmax(-1)
        return DefenceResult(labels[0], logits, labels, dict(sw.ms), frames if keep_frames else None)
