"""Attack generators for tests and calibration: L-inf PGD on frames, sparse or dense.

``model(clip)`` returns clip logits (B, K) (a recogniser) or per-frame logits (B, T, K)
(a frame classifier, each frame scored against the clip's label). A sparse attack
perturbs only the chosen frames; a dense one every frame. Seeded random start; the
result stays in the eps-ball around the clip and in [0, 1].
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from .errors import InputError


def _loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    if logits.ndim == 3:  # per-frame logits: every frame against the clip label
        b, t, k = logits.shape
        return F.cross_entropy(logits.reshape(b * t, k), labels.repeat_interleave(t))
    return F.cross_entropy(logits, labels)


def pgd(model, clip: torch.Tensor, labels: torch.Tensor, *, eps: float = 8 / 255, step: float = 2 / 255,
        iters: int = 10, frames: Sequence[int] | None = None, seed: int = 0, random_start: bool = True) -> torch.Tensor:
    """Untargeted L-inf PGD maximising cross-entropy; ``frames`` limits the perturbation (sparse)."""
    if clip.ndim != 5:
        raise InputError(f"clip must be (B, 3, T, H, W), got {tuple(clip.shape)}")
    if eps < 0 or step <= 0 or iters < 0:
        raise InputError(f"need eps >= 0, step > 0, iters >= 0; got {eps}, {step}, {iters}")
    mask = torch.zeros_like(clip)
    if frames is None:
        mask.fill_(1.0)
    else:
        idx = sorted(set(int(f) for f in frames))
        if any(f < 0 or f >= clip.shape[2] for f in idx):
            raise InputError(f"attacked frames must lie in [0, {clip.shape[2]}), got {idx}")
        mask[:, :, idx] = 1.0
    x0 = clip.detach()
    delta = torch.zeros_like(x0)
    if random_start and eps > 0:
        g = torch.Generator(device="cpu").manual_seed(seed)
        delta = ((torch.rand(x0.shape, generator=g) * 2 - 1) * eps).to(x0.device, x0.dtype)
    delta = ((x0 + delta * mask).clamp(0, 1) - x0)
    for _ in range(iters):
        delta.requires_grad_(True)
        with torch.enable_grad():
            loss = _loss(model(x0 + delta), labels)
            (grad,) = torch.autograd.grad(loss, delta)
        delta = (delta.detach() + step * grad.sign() * mask).clamp(-eps, eps)
        delta = (x0 + delta).clamp(0, 1) - x0
    return (x0 + delta).detach()


def sparse_frames(t: int, k: int, seed: int = 0) -> list[int]:
    """k distinct interior frames of a T-frame clip, no two adjacent, chosen by seed."""
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(max(t - 2, 0), generator=g).tolist()
    chosen: list[int] = []
    for i in order:
        f = i + 1
        if all(abs(f - c) > 1 for c in chosen):
            chosen.append(f)
        if len(chosen) == k:
            break
    if len(chosen) < k:
        raise InputError(f"cannot place {k} non-adjacent interior frames in a {t}-frame clip")
    return sorted(chosen)
