"""APGD (Croce and Hein, ICML 2020, AutoAttack's first two attacks), L-inf, one restart.

Step size starts at 2 eps and halves at checkpoints w_j = ceil(p_j N) (p_0 = 0, p_1 = 0.22,
p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06)) when fewer than rho = 0.75 of the steps
since the last checkpoint raised the loss, or when neither the step size nor the best loss
changed since then; the iterate then restarts from the best point. Momentum 0.75. The
best point seen (highest loss) is returned. ``dlr_loss`` is the difference-of-logits-ratio
loss, invariant to the logits' scale.
"""

from __future__ import annotations

import math

import torch

from vpure.runtime.errors import InputError
from vpure.lab.attacks.core import Oracle, frame_mask, project, random_start


def dlr_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """-(z_y - max_{i != y} z_i) / (z_pi1 - z_pi3 + 1e-12) per clip; needs >= 3 classes."""
    if logits.ndim == 3:
        logits = logits.mean(1)
    if logits.shape[-1] < 3:
        raise InputError("the DLR loss needs at least 3 classes")
    srt, _ = logits.sort(dim=1, descending=True)
    zy = logits.gather(1, labels[:, None])[:, 0]
    other = logits.clone()
    other.scatter_(1, labels[:, None], -math.inf)
    return -(zy - other.max(1).values) / (srt[:, 0] - srt[:, 2] + 1e-12)


def _checkpoints(n: int) -> list[int]:
    p = [0.0, 0.22]
    while p[-1] < 1:
        p.append(p[-1] + max(p[-1] - p[-2] - 0.03, 0.06))
    return sorted({math.ceil(q * n) for q in p[1:] if math.ceil(q * n) < n})


def apgd(oracle: Oracle, clip: torch.Tensor, labels: torch.Tensor, *, eps: float = 8 / 255, iters: int = 20,
         seed: int = 0, rho: float = 0.75, trace: list[float] | None = None, frames=None) -> torch.Tensor:
    x0 = clip.detach()
    if iters < 1 or eps <= 0:
        raise InputError(f"APGD needs iters >= 1 and eps > 0, got {iters}, {eps}")
    mask = frame_mask(x0, frames)
    shape = (-1,) + (1,) * (x0.ndim - 1)
    b = x0.shape[0]
    eta = torch.full((b,), 2 * eps, device=x0.device, dtype=x0.dtype)
    x = x0 + random_start(x0, eps, "linf", seed, mask)
    loss, grad = oracle(x, labels)
    best_loss, best_x = loss.clone(), x.clone()
    x_prev = x.clone()
    checks = set(_checkpoints(iters))
    last_check, increases = 0, torch.zeros(b, device=x0.device)
    eta_at_check, best_at_check = eta.clone(), best_loss.clone()
    prev_loss = loss.clone()
    for k in range(iters):
        if trace is not None:
            trace.append(float(loss.mean()))
        z = x0 + project(x - x0 + eta.view(shape) * grad.sign(), x0, eps, "linf", mask)
        a = 0.75 if k > 0 else 1.0
        x_new = x + a * (z - x) + (1 - a) * (x - x_prev)
        x_new = x0 + project(x_new - x0, x0, eps, "linf", mask)
        x_prev, x = x, x_new
        loss, grad = oracle(x, labels)
        increases += (loss > prev_loss).float()
        prev_loss = loss.clone()
        better = loss > best_loss
        best_loss = torch.where(better, loss, best_loss)
        best_x = torch.where(better.view(shape), x, best_x)
        if k + 1 in checks:
            window = k + 1 - last_check
            cond1 = increases < rho * window
            cond2 = (eta_at_check == eta) & (best_at_check == best_loss)
            halve = cond1 | cond2
            eta = torch.where(halve, eta / 2, eta)
            x = torch.where(halve.view(shape), best_x, x)
            if bool(halve.any()):
                loss, grad = oracle(x, labels)
                prev_loss = loss.clone()
            last_check, increases = k + 1, torch.zeros_like(increases)
            eta_at_check, best_at_check = eta.clone(), best_loss.clone()
    if trace is not None:
        trace.append(float(best_loss.mean()))
    return best_x.detach()
