"""Tolerance helpers in one place: verbose allclose, low-precision rule, SQNR."""

from __future__ import annotations

import math

import torch


def assert_close(actual: torch.Tensor, expected: torch.Tensor, *, atol: float, rtol: float = 0.0,
                 mask: torch.Tensor | None = None, name: str = "tensor", show: int = 5) -> None:
    """allclose that reports the mismatch count, the first mismatches and the max error."""
    actual = torch.as_tensor(actual).detach().double().cpu()
    expected = torch.as_tensor(expected).detach().double().cpu()
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    err = (actual - expected).abs()
    bad = err > atol + rtol * expected.abs()
    if mask is not None:
        bad &= mask
    n = int(bad.sum())
    if n:
        idx = bad.nonzero()[:show]
        rows = [f"  at {tuple(i.tolist())}: got {actual[tuple(i)].item():.8g}, want {expected[tuple(i)].item():.8g}"
                for i in idx]
        raise AssertionError(f"{name}: {n}/{bad.numel()} elements off (atol={atol}, rtol={rtol}); "
                             f"max abs err {err.max().item():.3g}\n" + "\n".join(rows))


def sqnr_db(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Signal-to-quantisation-noise ratio in dB (int8 and fp16 parity)."""
    expected = expected.double()
    noise = (actual.double() - expected).pow(2).sum().item()
    signal = expected.pow(2).sum().item()
    return math.inf if noise == 0 else 10.0 * math.log10(signal / noise)


def assert_lowp_close(actual: torch.Tensor, expected_fp64: torch.Tensor, torch_lowp: torch.Tensor,
                      factor: float = 2.0, name: str = "tensor") -> None:
    """fp16/bf16 rule: error at most ``factor`` x PyTorch's own low-precision error."""
    ours = (actual.double() - expected_fp64).abs().max().item()
    theirs = (torch_lowp.double() - expected_fp64).abs().max().item()
    assert ours <= factor * theirs + 1e-12, f"{name}: max err {ours:.3g} > {factor} x torch's {theirs:.3g}"
