"""Gradient oracles: what an attack differentiates.

Each is ``oracle(x, labels) -> (loss (B,), grad (B, 3, T, H, W))`` with the loss to ascend.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from vpure.lab.attacks.core import clip_loss


class ModelOracle:
    """The bare model (gray-box on the recogniser, or a frame classifier)."""

    def __init__(self, model, loss: Callable = clip_loss):
        self.model, self.loss = model, loss

    def __call__(self, x: torch.Tensor, labels: torch.Tensor):
        x = x.detach().requires_grad_(True)
        with torch.enable_grad():
            loss = self.loss(self.model(x), labels)
            (grad,) = torch.autograd.grad(loss.sum(), x)
        return loss.detach(), grad


class BPDAOracle:
    """BPDA through a purifier: ``members(x) -> list of purified clips``; the backward pass
    treats the purifier as the identity, so the gradient is the recogniser's gradient at
    each purified clip, averaged over the members (as the released evaluation does for
    VideoPure's seven; a single-output defence has one member)."""

    def __init__(self, members: Callable[[torch.Tensor], Sequence[torch.Tensor]], recognizer, loss: Callable = clip_loss):
        self.members, self.recognizer, self.loss = members, recognizer, loss

    def __call__(self, x: torch.Tensor, labels: torch.Tensor):
        with torch.no_grad():
            outs = list(self.members(x.detach()))
        losses, grads = [], []
        for m in outs:
            m = m.clone().requires_grad_(True)  # a normal tensor even if the purifier ran in inference mode
            with torch.enable_grad():
                loss = self.loss(self.recognizer(m), labels)
                (g,) = torch.autograd.grad(loss.sum(), m)
            losses.append(loss.detach())
            grads.append(g)
        return torch.stack(losses).mean(0), torch.stack(grads).mean(0)


class EOTOracle:
    """Expectation over transformation: the mean of ``make(seed)``'s oracle over ``samples``
    seeds (a stochastic defence drawn afresh per sample)."""

    def __init__(self, make: Callable[[int], Callable], samples: int = 4, seed: int = 0):
        self.make, self.samples, self.seed = make, samples, seed
        self._round = 0

    def __call__(self, x: torch.Tensor, labels: torch.Tensor):
        losses, grads = [], []
        for k in range(self.samples):
            loss, g = self.make(self.seed + 1000 * self._round + k)(x, labels)
            losses.append(loss)
            grads.append(g)
        self._round += 1
        return torch.stack(losses).mean(0), torch.stack(grads).mean(0)


class TTOracle:
    """Temporal translation (TT): gradients of ``inner`` at temporally shifted copies of the
    clip, shifted back and averaged, so the perturbation survives temporal misalignment."""

    def __init__(self, inner: Callable, shifts: Sequence[int] = (-2, -1, 0, 1, 2)):
        self.inner, self.shifts = inner, tuple(shifts)

    def __call__(self, x: torch.Tensor, labels: torch.Tensor):
        losses, grads = [], []
        for s in self.shifts:
            loss, g = self.inner(torch.roll(x, shifts=s, dims=2), labels)
            losses.append(loss)
            grads.append(torch.roll(g, shifts=-s, dims=2))
        return torch.stack(losses).mean(0), torch.stack(grads).mean(0)
