"""PGD over any gradient oracle; L-inf and L2 projections; sparse frame selection.

An oracle is ``oracle(x, labels) -> (loss per clip (B,), gradient d loss / d x)``: the
attack ascends the loss. ``model(clip)`` for :func:`pgd` returns clip logits (B, K) (a
recogniser) or per-frame logits (B, T, K) (a frame classifier, each frame scored against
the clip's label). A sparse attack perturbs only the chosen frames; a dense one every frame.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from vpure.runtime.errors import InputError

NORMS = ("linf", "l2")
Oracle = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def clip_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy per clip (B,); per-frame logits are averaged over frames."""
    if logits.ndim == 3:
        b, t, k = logits.shape
        return F.cross_entropy(logits.reshape(b * t, k), labels.repeat_interleave(t), reduction="none").view(b, t).mean(1)
    return F.cross_entropy(logits, labels, reduction="none")


def _flat_norm(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *([1] * (x.ndim - 1)))


def project(delta: torch.Tensor, x0: torch.Tensor, eps: float, norm: str, mask: torch.Tensor | None = None) -> torch.Tensor:
    """The perturbation brought back into the ``norm`` ball of radius ``eps`` and into [0, 1]."""
    if mask is not None:
        delta = delta * mask
    if norm == "linf":
        delta = delta.clamp(-eps, eps)
    else:
        delta = delta * (eps / _flat_norm(delta)).clamp(max=1.0)
    return (x0 + delta).clamp(0, 1) - x0


def _check(clip: torch.Tensor, eps: float, step: float, iters: int, norm: str) -> None:
    if clip.ndim != 5:
        raise InputError(f"clip must be (B, 3, T, H, W), got {tuple(clip.shape)}")
    if eps < 0 or step <= 0 or iters < 0:
        raise InputError(f"need eps >= 0, step > 0, iters >= 0; got {eps}, {step}, {iters}")
    if norm not in NORMS:
        raise InputError(f"norm {norm!r} is not one of {NORMS}")


def frame_mask(clip: torch.Tensor, frames: Sequence[int] | None) -> torch.Tensor:
    mask = torch.zeros_like(clip)
    if frames is None:
        return mask.fill_(1.0)
    idx = sorted(set(int(f) for f in frames))
    if any(f < 0 or f >= clip.shape[2] for f in idx):
        raise InputError(f"attacked frames must lie in [0, {clip.shape[2]}), got {idx}")
    mask[:, :, idx] = 1.0
    return mask


def random_start(x0: torch.Tensor, eps: float, norm: str, seed: int, mask: torch.Tensor) -> torch.Tensor:
    g = torch.Generator(device="cpu").manual_seed(seed)
    if norm == "linf":
        d = (torch.rand(x0.shape, generator=g) * 2 - 1) * eps
    else:  # uniform direction, radius uniform in the ball
        d = torch.randn(x0.shape, generator=g)
        d = d / _flat_norm(d) * eps * torch.rand(x0.shape[0], generator=g).view(-1, *([1] * (x0.ndim - 1)))
    return project(d.to(x0.device, x0.dtype), x0, eps, norm, mask)


def attack(oracle: Oracle, clip: torch.Tensor, labels: torch.Tensor, *, eps: float = 8 / 255, step: float = 2 / 255,
           iters: int = 10, norm: str = "linf", frames: Sequence[int] | None = None, seed: int = 0,
           random_start_: bool = True, trace: list[float] | None = None) -> torch.Tensor:
    """Untargeted PGD maximising ``oracle``'s loss; ``trace`` (if given) receives the mean loss
    before every step and after the last one (``iters + 1`` values)."""
    _check(clip, eps, step, iters, norm)
    x0 = clip.detach()
    mask = frame_mask(x0, frames)
    delta = random_start(x0, eps, norm, seed, mask) if random_start_ and eps > 0 else torch.zeros_like(x0)
    for _ in range(iters):
        loss, grad = oracle(x0 + delta, labels)
        if trace is not None:
            trace.append(float(loss.mean()))
        if norm == "linf":
            delta = delta + step * grad.sign()
        else:
            delta = delta + step * grad / _flat_norm(grad * mask)
        delta = project(delta, x0, eps, norm, mask)
    if trace is not None:
        trace.append(float(oracle(x0 + delta, labels)[0].mean()) if iters else float("nan"))
    return (x0 + delta).detach()


def pgd(model, clip: torch.Tensor, labels: torch.Tensor, *, eps: float = 8 / 255, step: float = 2 / 255,
        iters: int = 10, frames: Sequence[int] | None = None, seed: int = 0, random_start: bool = True,
        norm: str = "linf") -> torch.Tensor:
    """Gray-box PGD on ``model`` itself (``frames`` limits the perturbation: sparse)."""
    from vpure.lab.attacks.oracles import ModelOracle

    return attack(ModelOracle(model), clip, labels, eps=eps, step=step, iters=iters, norm=norm, frames=frames,
                  seed=seed, random_start_=random_start)


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
