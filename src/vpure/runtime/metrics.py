"""Numerical parity measures shared by export (build-time parity) and the tests."""

from __future__ import annotations

import math

import torch


def sqnr_db(actual, expected) -> float:
    """Signal-to-quantisation-noise ratio in dB, 10 log10(sum e^2 / sum (a - e)^2); inf if exact."""
    a = torch.as_tensor(actual).double()
    e = torch.as_tensor(expected).double()
    noise = (a - e).pow(2).sum().item()
    return math.inf if noise == 0 else 10.0 * math.log10(e.pow(2).sum().item() / noise)
