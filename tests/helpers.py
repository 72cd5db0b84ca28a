"""Tolerance helpers: verbose allclose here; SQNR is vpure.runtime.metrics.sqnr_db (export uses it too)."""

from __future__ import annotations

import torch


def assert_close(actual: torch.Tensor, expected: torch.Tensor, *, atol: float, rtol: float = 0.0,
                 mask: torch.Tensor | None = None, name: str = "tensor", show: int = 5) -> None:
    """allclose that reports the mismatch count, the first mismatches and the max error."""
    actual = torch.as_tensor(actual).detach().double().cpu()
    expected = torch.as_tensor(expected).detach().double().cpu()
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    err = (actual - expected).abs()
    bad = ~(err <= atol + rtol * expected.abs())  # NaN anywhere is a mismatch, as in torch.allclose
    if mask is not None:
        bad &= mask
    n = int(bad.sum())
    if n:
        idx = bad.nonzero()[:show]
        rows = [f"  at {tuple(i.tolist())}: got {actual[tuple(i)].item():.8g}, want {expected[tuple(i)].item():.8g}"
                for i in idx]
        raise AssertionError(f"{name}: {n}/{bad.numel()} elements off (atol={atol}, rtol={rtol}); "
                             f"max abs err {err.max().item():.3g}\n" + "\n".join(rows))
