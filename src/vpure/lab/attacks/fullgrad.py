"""The exact gradient of VideoPure: the honest adaptive attack on a deterministic purifier.

:func:`member_logits` re-runs VideoPure's map with autograd on: VAE encoder, every
inversion and denoising UNet call (each wrapped in activation checkpointing, so memory
holds one call's activations at a time instead of all of them), the closed-form STO steps,
the VAE decoder (checkpointed per member) and the recogniser. It is differentiated exactly
almost everywhere: the STO temporal term is a sum of signs (zero derivative a.e.) and the
decoder's clamp to [0, 1] is flat outside. The optical flow is recomputed on the attacked
clip at every step but treated as a constant in the backward pass when the flow provider
is not differentiable (DIS); a RAFT provider is differentiated through as well.
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

from vpure.runtime.purifier import VideoPure
from vpure.runtime.flow import downsample_flow
from vpure.runtime.videopure import purify_latents
from vpure.lab.attacks.core import clip_loss


def member_logits(vp: VideoPure, clip: torch.Tensor, *, use_checkpoint: bool = True,
                  differentiable_flow: bool = False) -> torch.Tensor:
    """(M, B, K) member logits of VideoPure on ``clip``, with the autograd graph attached."""
    cfg = vp.config
    if differentiable_flow:
        flow = vp.flow_provider(clip, input_range=cfg.flow_range)
    else:
        with torch.no_grad():
            flow = vp.flow_provider(clip.detach(), input_range=cfg.flow_range)
    z0 = vp.encoder(clip)
    flow = downsample_flow(flow, tuple(z0.shape[-2:]))

    def eps_fn(z, t):
        if use_checkpoint and z.requires_grad:
            return checkpoint(vp.eps_fn, z, t, use_reentrant=False)
        return vp.eps_fn(z, t)

    members = purify_latents(eps_fn, z0, flow, cfg)
    logits = []
    for m in members:
        frames = checkpoint(vp.decoder, m, use_reentrant=False) if use_checkpoint and m.requires_grad else vp.decoder(m)
        logits.append(vp.recognizer(frames))
    return torch.stack(logits)


class FullGradOracle:
    """Loss = cross-entropy averaged over the seven members (a smooth stand-in for the vote),
    gradient exact through the whole map (see the module docstring)."""

    def __init__(self, vp: VideoPure, use_checkpoint: bool = True, differentiable_flow: bool = False):
        self.vp, self.use_checkpoint, self.differentiable_flow = vp, use_checkpoint, differentiable_flow

    def loss(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        logits = member_logits(self.vp, x, use_checkpoint=self.use_checkpoint,
                               differentiable_flow=self.differentiable_flow)
        if self.vp.config.voting == "off":  # the defence answers with the last member alone
            logits = logits[-1:]
        return torch.stack([clip_loss(lg, labels) for lg in logits]).mean(0)

    def __call__(self, x: torch.Tensor, labels: torch.Tensor):
        x = x.detach().requires_grad_(True)
        with torch.enable_grad():
            loss = self.loss(x, labels)
            (grad,) = torch.autograd.grad(loss.sum(), x)
        return loss.detach(), grad
