"""H.264 integer transform, quantisation and dequantisation."""

from __future__ import annotations

import pytest
import torch

from vpure.kernels import KernelError, dequantize, forward_transform, inverse_transform, quantize, quantize_residual

CF4 = torch.tensor([[1, 1, 1, 1], [2, 1, -1, -2], [1, -1, -1, 1], [1, -2, 2, -1]])


def _blocks(n, size, lo=-255, hi=255, seed=0):
    return torch.randint(lo, hi + 1, (n, size, size), generator=torch.Generator().manual_seed(seed))


def test_forward_4x4_is_the_core_matrix():
    x = _blocks(64, 4)
    assert torch.equal(forward_transform(x, 4), CF4 @ x @ CF4.T)


@pytest.mark.parametrize("size", [4, 8])
def test_round_trip_at_qp0_within_rounding(size):
    x = _blocks(2000, size)
    rec = inverse_transform(dequantize(quantize(forward_transform(x, size), 0, size), 0, size), size)
    assert (rec - x).abs().max().item() <= 1
    assert (rec - x).abs().float().mean().item() < 0.1


@pytest.mark.parametrize("size", [4, 8])
def test_quantisation_is_monotone_in_qp(size):
    coeffs = forward_transform(_blocks(500, size, seed=1), size)
    prev_levels, prev_err = None, -1.0
    x = _blocks(500, size, seed=1)
    for qp in range(0, 52):
        levels = quantize(coeffs, qp, size)
        if prev_levels is not None:
            assert (levels.abs() <= prev_levels.abs()).all(), f"levels grew from QP {qp - 1} to {qp}"
        prev_levels = levels
        if qp % 6 == 0:
            err = (inverse_transform(dequantize(levels, qp, size), size) - x).abs().float().mean().item()
            assert err >= prev_err, f"error fell from QP {qp - 6} to {qp}"
            prev_err = err


def test_quantize_residual_pads_and_crops():
    r = torch.randint(-40, 41, (3, 13, 18), generator=torch.Generator().manual_seed(3), dtype=torch.int32)
    out = quantize_residual(r, qp=0, size=4)
    assert out.shape == r.shape and out.dtype == torch.int32
    assert (out - r).abs().max().item() <= 1
    coarse = quantize_residual(r, qp=40, size=8)
    assert (coarse - r).abs().float().mean() > (out - r).abs().float().mean()


@pytest.mark.parametrize("call, needle", [
    (lambda: forward_transform(torch.zeros(1, 5, 5), 5), "size must be 4 or 8"),
    (lambda: quantize(torch.zeros(1, 4, 4, dtype=torch.int64), 52), "QP must be in"),
    (lambda: quantize_residual(torch.zeros(4, 4), 10), "integer tensor"),
])
def test_bad_arguments(call, needle):
    with pytest.raises(KernelError, match=needle):
        call()
