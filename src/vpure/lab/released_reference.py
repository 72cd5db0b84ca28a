"""The released-code-equivalent eager VideoPure path: the reference for equivalence
tests and benchmark ratios, written independently of :mod:`vpure.runtime.videopure`.

What the released implementation does and the fast path avoids:
- classifier-free guidance on two identical empty prompts, so the UNet runs at batch 2
  and the guided eps equals either half;
- STO through autograd: x0 as a function of z (eps detached), MSE via ``F.mse_loss``, the
  warp via ``grid_sample`` (align_corners=True, zero padding), ``torch.autograd.grad``;
- members decoded and classified one by one.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from vpure.runtime import schedule
from vpure.runtime.purifier import DefenceResult, Stopwatch, TimedEps, check_clip
from vpure.runtime.flow import downsample_flow
from vpure.runtime.videopure import VideoPureConfig, vote

GUIDANCE_SCALE = 9.0


def _cfg_eps(eps_fn, z: torch.Tensor, t: int) -> torch.Tensor:
    both = eps_fn(torch.cat([z, z], dim=0), t)  # [uncond; cond], both the empty prompt
    uncond, cond = both.chunk(2)
    return uncond + GUIDANCE_SCALE * (cond - uncond)


def _grid_warp(frame: torch.Tensor, flow: torch.Tensor) -> torch.Tensor:
    _, _, h, w = frame.shape
    gy, gx = torch.meshgrid(torch.arange(h, dtype=frame.dtype, device=frame.device),
                            torch.arange(w, dtype=frame.dtype, device=frame.device), indexing="ij")
    grid = torch.stack([2.0 * (gx + flow[:, 0]) / (w - 1) - 1.0, 2.0 * (gy + flow[:, 1]) / (h - 1) - 1.0], dim=-1)
    return F.grid_sample(frame, grid, mode="bilinear", padding_mode="zeros", align_corners=True)


def _sto_autograd(z, eps, z0, flow, t, cfg: VideoPureConfig, lam_spa, lam_temp):
    a_t = schedule.abar(t)
    with torch.enable_grad():
        zr = z.detach().clone().requires_grad_(True)
        x0 = (zr - math.sqrt(1.0 - a_t) * eps.detach()) / math.sqrt(a_t)
        loss = lam_spa * torch.stack([F.mse_loss(x0[i], z0[i]) for i in range(x0.shape[0])]).sum()
        temp = 0.0
        for i in range(1, x0.shape[2]):
            nxt = x0[:, :, i].detach() if cfg.detach_warp else x0[:, :, i]
            temp = temp + (_grid_warp(nxt, flow[:, i - 1]) - x0[:, :, i - 1]).abs().mean(dim=(1, 2, 3)).sum()
        loss = loss - lam_temp * temp
        (grad,) = torch.autograd.grad(loss, zr)
    c_t = cfg.alpha_s * math.log(schedule.sigma2(t, cfg.step))
    return z.detach() + c_t * grad


def purify_latents_released(eps_fn, z0: torch.Tensor, flow: torch.Tensor, config: VideoPureConfig | None = None):
    cfg = config or VideoPureConfig()
    step, ts = cfg.step, cfg.timesteps
    lam_spa, lam_temp = cfg.lambdas(tuple(z0.shape))
    z = z0
    for tau in ts:  # inversion
        eps = _cfg_eps(eps_fn, z, tau)
        if cfg.temporal_inversion:
            eps = eps[:, :, 0:1].repeat(1, 1, z.shape[2], 1, 1)
        a_cur = schedule.abar(tau - step) if tau - step >= 0 else schedule.abar(0)
        a_next = schedule.abar(tau)
        x0 = (z - (1 - a_cur) ** 0.5 * eps) / a_cur ** 0.5
        z = a_next ** 0.5 * x0 + (1 - a_next) ** 0.5 * eps
    members = []
    for t in reversed(ts):
        eps = _cfg_eps(eps_fn, z, t)
        a_t = schedule.abar(t)
        a_prev = schedule.abar(t - step) if t - step >= 0 else schedule.abar(0)
        x0 = (z - (1 - a_t) ** 0.5 * eps) / a_t ** 0.5
        if cfg.sto:
            z_opt = _sto_autograd(z, eps, z0, flow, t, cfg, lam_spa, lam_temp)
            member = (z_opt - (1 - a_t) ** 0.5 * eps) / a_t ** 0.5
        else:
            member = x0
        members.append(member)
        nxt = member if cfg.sto_feedback else x0
        z = a_prev ** 0.5 * nxt + (1 - a_prev) ** 0.5 * eps
    t1 = ts[0]
    members.append(_sto_autograd(z, eps, z0, flow, t1, cfg, lam_spa, lam_temp) if cfg.sto else z)
    return members


class ReleasedVideoPure:
    """Same interface and components as :class:`vpure.runtime.purifier.VideoPure`."""

    name = "videopure-released"

    def __init__(self, eps_fn, encoder, decoder, recognizer, flow_provider, config: VideoPureConfig | None = None,
                 latent_factor: int = 8):
        self.eps_fn, self.encoder, self.decoder = eps_fn, encoder, decoder
        self.recognizer, self.flow_provider = recognizer, flow_provider
        self.config = config or VideoPureConfig()
        self.latent_factor = latent_factor

    def __call__(self, clip: torch.Tensor, keep_frames: bool = False) -> DefenceResult:
        clip = check_clip(clip, self.latent_factor, self.encoder)
        cfg, sw = self.config, Stopwatch(clip.device)
        with torch.no_grad():
            with sw("flow"):
                flow = self.flow_provider(clip, input_range=cfg.flow_range)
            with sw("vae_encode"):
                z0 = self.encoder(clip)
            flow = downsample_flow(flow, tuple(z0.shape[-2:]))
            eps = TimedEps(self.eps_fn, sw, "unet")
            with sw("purify"):
                members = purify_latents_released(eps, z0, flow, cfg)
            logits, frames = [], None
            for m in members:  # one by one, each frame on its own (as released)
                with sw("vae_decode"):
                    frames = torch.cat([self.decoder(m[:, :, i:i + 1]) for i in range(m.shape[2])], dim=2)
                with sw("recognize"):
                    logits.append(self.recognizer(frames).float())
            with sw("vote"):
                stacked = torch.stack(logits)
                label, member_labels = vote(stacked, cfg.voting)
        timings = dict(sw.ms)
        timings["sto_and_schedule"] = timings.pop("purify") - timings.get("unet", 0.0)
        timings["unet_calls"] = float(eps.calls)
        return DefenceResult(label, stacked, member_labels, timings, frames if keep_frames else None)
