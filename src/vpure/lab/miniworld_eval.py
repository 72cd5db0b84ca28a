"""Metrics of the mini-world models on a split (the numbers their model cards record).

All functions are deterministic: fixed clips, fixed noise seeds, eval mode.
"""

from __future__ import annotations

import math

import torch

from vpure.runtime import schedule
from vpure.runtime.miniworld.dataset import WorldConfig, make_clip, make_split


def _batches(n: int, size: int):
    for i in range(0, n, size):
        yield slice(i, min(n, i + size))


@torch.inference_mode()
def recognizer_accuracy(model, clips_u8: torch.Tensor, labels: torch.Tensor, batch: int = 16) -> float:
    correct = 0
    for s in _batches(len(labels), batch):
        correct += int((model(clips_u8[s].float() / 255).argmax(-1) == labels[s]).sum())
    return correct / len(labels)


@torch.inference_mode()
def frame_accuracy(model, clips_u8: torch.Tensor, labels: torch.Tensor, batch: int = 16) -> float:
    """Per-frame top-1 accuracy of a frame classifier (every frame carries its clip's label)."""
    correct = total = 0
    for s in _batches(len(labels), batch):
        pred = model(clips_u8[s].float() / 255).argmax(-1)  # (B, T)
        correct += int((pred == labels[s, None]).sum())
        total += pred.numel()
    return correct / total


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = float((a.double() - b.double()).pow(2).mean())
    return math.inf if mse == 0 else 10 * math.log10(1.0 / mse)


@torch.inference_mode()
def reconstruction_psnr(fn, clips_u8: torch.Tensor, batch: int = 8, masks: torch.Tensor | None = None) -> float:
    """Mean PSNR (dB, peak 1) of ``fn(clip)`` against the clip, per clip, averaged; with
    ``masks`` (N, T, H, W) bool, over the masked (object) pixels only."""
    vals = []
    for s in _batches(len(clips_u8), batch):
        x = clips_u8[s].float() / 255
        y = fn(x)
        if masks is None:
            vals += [psnr(y[i], x[i]) for i in range(len(x))]
        else:
            m = masks[s][:, None].expand_as(x)
            vals += [psnr(y[i][m[i]], x[i][m[i]]) for i in range(len(x))]
    return sum(vals) / len(vals)


@torch.inference_mode()
def reconstruction_accuracy(vae_encoder, vae_decoder, recognizer, clips_u8: torch.Tensor, labels: torch.Tensor,
                            batch: int = 8) -> float:
    """The recogniser's accuracy on VAE reconstructions of the clips: every VideoPure member
    is a decoded latent, so this bounds what the purifier can keep of the clean accuracy."""
    return recognizer_accuracy(lambda x: recognizer(vae_decoder(vae_encoder(x))), clips_u8, labels, batch)


@torch.inference_mode()
def unet_loss(unet, encoder, clips_u8: torch.Tensor, timesteps=(21, 41, 61, 81, 101, 301, 601), seed: int = 0,
              batch: int = 8) -> float:
    """Mean epsilon-prediction MSE over the clips at fixed timesteps (the first five are the
    ones VideoPure's inversion visits) with fixed noise."""
    g = torch.Generator().manual_seed(seed)
    total, n = 0.0, 0
    for s in _batches(len(clips_u8), batch):
        z0 = encoder(clips_u8[s].float() / 255)
        for t in timesteps:
            noise = torch.randn(z0.shape, generator=g)
            ab = schedule.abar(t)
            zt = ab ** 0.5 * z0 + (1 - ab) ** 0.5 * noise
            eps = unet(zt, torch.tensor([t]))
            total += float((eps - noise).pow(2).mean()) * len(z0)
            n += len(z0)
    return total / n


def flow_pairs(split: str, count: int, cfg: WorldConfig | None = None, start: int = 0):
    """``count`` clips' frames and ground-truth flows: (N, 3, T, H, W) float, (N, T-1, 2, H, W)."""
    samples = [make_clip(split, start + i, cfg) for i in range(count)]
    return torch.stack([s.clip for s in samples]), torch.stack([s.flow for s in samples])


def endpoint_error(pred: torch.Tensor, gt: torch.Tensor) -> float:
    """Mean Euclidean distance between flows (..., 2, H, W)."""
    return float((pred - gt).pow(2).sum(-3).sqrt().mean())


@torch.inference_mode()
def raft_epe(raft, clips: torch.Tensor, flows: torch.Tensor) -> float:
    from vpure.runtime.models.raft import RAFTFlow

    provider = RAFTFlow(raft.eval(), pairs_per_call=16)
    return endpoint_error(torch.cat([provider(clips[i:i + 1]) for i in range(len(clips))]), flows)


def dis_epe(clips: torch.Tensor, flows: torch.Tensor, preset: str = "medium") -> float:
    from vpure.runtime.flow import DISFlow

    dis = DISFlow(preset)
    return endpoint_error(torch.cat([dis(clips[i:i + 1]) for i in range(len(clips))]), flows)


CHECK_CLIPS = {"vae": 8, "unet": 4, "recognizer": 32, "frame_classifier": 16, "comdefend": 8, "raft": 4}


def check_metrics(component: str, module, world: WorldConfig | None = None, weights_dir=None) -> dict:
    """The metric of ``component`` on the first few test clips: recorded in its model card at
    training time and recomputed by the tests, so shipped weights prove they are the ones
    that were measured."""
    from vpure.runtime.models.diffusion import VAEDecoder, VAEEncoder
    from vpure.runtime.miniworld import models as mw

    n = CHECK_CLIPS[component]
    clips, labels = make_split("test", n, world)
    if component == "vae":
        enc, dec = VAEEncoder(module).eval(), VAEDecoder(module).eval()
        value = reconstruction_psnr(lambda x: dec(enc(x)), clips)
    elif component == "unet":
        value = unet_loss(module, VAEEncoder(mw.load("vae", weights_dir)).eval(), clips)
    elif component == "recognizer":
        value = recognizer_accuracy(module, clips, labels)
    elif component == "frame_classifier":
        value = frame_accuracy(module, clips, labels)
    elif component == "comdefend":
        value = reconstruction_psnr(module, clips)
    else:
        value = raft_epe(module, *flow_pairs("test", n, world))
    return {"test_clips": n, "value": round(float(value), 6)}
