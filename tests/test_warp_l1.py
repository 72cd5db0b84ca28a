"""warp_l1 / warp_l1_grad: every implementation against the float64 reference."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from vpure.kernels import KernelError, warp_l1, warp_l1_grad
from vpure.kernels.warp_l1 import warp_l1_grad_ref, warp_l1_grad_triton, warp_l1_ref

from helpers import assert_close

IMPLS = ["native", "torch", "triton"]
SHAPES = [(1, 4, 2, 5, 7), (2, 3, 4, 7, 9), (1, 1, 3, 1, 6), (2, 4, 5, 9, 3)]


def _inputs(shape, seed, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    b, c, t, h, w = shape
    return torch.randn(shape, generator=g), torch.randn(b, t - 1, 2, h, w, generator=g) * scale


def _run(impl, x, flow, detach):
    if impl == "triton":  # small tiles so several programs share a frame under the interpreter
        return warp_l1_grad_triton(x, flow, detach_warp=detach, block_p=16)
    return warp_l1_grad(x, flow, detach_warp=detach, impl=impl)


def _differentiable(x, flow, detach, eps=1e-4):
    """Elements where no |d| term is near its kink (L1 is not differentiable at 0)."""
    b, c, t, h, w = x.shape
    from vpure.kernels.warp_l1 import _bilinear_ref

    nxt = x[:, :, 1:].permute(0, 2, 1, 3, 4).reshape(-1, c, h, w).double()
    d = _bilinear_ref(nxt, flow.reshape(-1, 2, h, w).double()) - x[:, :, :-1].permute(0, 2, 1, 3, 4).reshape(-1, c, h, w)
    near = (d.abs() < eps).view(b, t - 1, c, h, w).permute(0, 2, 1, 3, 4)
    mask = torch.ones_like(x, dtype=torch.bool)
    mask[:, :, :-1] &= ~near
    if not detach and bool(near.any()):
        return None  # a kink's scatter can land anywhere; the caller re-seeds
    return mask


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("detach", [True, False], ids=["detached", "full"])
def test_matches_reference(impl, shape, detach):
    seed = sum(shape)
    x, flow = _inputs(shape, seed)
    while (mask := _differentiable(x, flow, detach)) is None:  # re-draw until no residual sits at a kink
        seed += 1000
        x, flow = _inputs(shape, seed)
    loss_ref, grad_ref = warp_l1_grad_ref(x, flow, detach_warp=detach)
    loss, grad = _run(impl, x, flow, detach)
    assert_close(loss, loss_ref, atol=0, rtol=1e-5, name=f"{impl} loss")
    assert_close(grad, grad_ref, atol=1e-5, mask=mask, name=f"{impl} grad")


def test_matches_grid_sample_definition():
    """The spec's warp: grid_sample, zero padding, align_corners=True, grid 2v/(size-1)-1."""
    x, flow = _inputs((2, 3, 4, 6, 8), seed=3)
    b, c, t, h, w = x.shape
    gy, gx = torch.meshgrid(torch.arange(h).double(), torch.arange(w).double(), indexing="ij")
    total = torch.zeros(b, dtype=torch.float64)
    for i in range(t - 1):
        grid = torch.stack([2 * (gx + flow[:, i, 0]) / (w - 1) - 1, 2 * (gy + flow[:, i, 1]) / (h - 1) - 1], -1)
        warped = F.grid_sample(x[:, :, i + 1].double(), grid, mode="bilinear", padding_mode="zeros", align_corners=True)
        total += (warped - x[:, :, i].double()).abs().mean(dim=(1, 2, 3))
    assert_close(warp_l1_ref(x, flow), total, atol=1e-12, name="ref vs grid_sample")


def test_zero_flow_is_identity_warp():
    x, _ = _inputs((1, 2, 3, 5, 5), seed=1)
    flow = torch.zeros(1, 2, 2, 5, 5)
    expected = sum((x[:, :, i + 1] - x[:, :, i]).abs().mean(dim=(1, 2, 3)) for i in range(2))
    for impl in ("native", "torch"):
        assert_close(warp_l1(x, flow, impl=impl), expected, atol=1e-6, name=impl)


def test_integer_flow_is_exact_shift():
    g = torch.Generator().manual_seed(2)
    h, w = 9, 12
    nxt = torch.randn(1, 2, h, w, generator=g)
    flow = torch.zeros(1, 1, 2, h, w)
    flow[:, :, 0], flow[:, :, 1] = 2.0, -1.0  # sample frame 1 at (x + 2, y - 1)
    shifted = torch.zeros_like(nxt)
    shifted[:, :, 1:, : w - 2] = nxt[:, :, : h - 1, 2:]  # zero padding outside
    x = torch.stack([shifted, nxt], dim=2)
    for impl in ("native", "torch", "ref"):
        loss, _ = warp_l1_grad(x, flow, impl=impl)
        assert loss.item() == 0.0, impl
    x2 = torch.stack([shifted + 1.0, nxt], dim=2)  # constant offset: loss is exactly 1
    assert_close(warp_l1(x2, flow, impl="native"), torch.ones(1), atol=1e-6, name="offset")


def test_adjoint_identity_of_full_gradient_scatter():
    """<Warp x, y> = <x, Warp^T y>: the full-gradient scatter is the warp's adjoint."""
    g = torch.Generator().manual_seed(5)
    b, c, h, w = 1, 2, 6, 7
    flow = torch.randn(b, 1, 2, h, w, generator=g) * 1.5
    nxt = torch.randn(b, c, h, w, generator=g)
    # With x[:, :, 0] far below everything, sign(d) = +1 everywhere, so the gradient into
    # frame 1 is Warp^T applied to the constant 1/n: compare with <Warp(nxt), 1>/n.
    x = torch.stack([torch.full((b, c, h, w), -1e3), nxt], dim=2)
    n = c * h * w
    from vpure.kernels.warp_l1 import _bilinear_ref

    lhs = (_bilinear_ref(nxt.double(), flow[:, 0].double())).sum() / n
    for impl in ("native", "torch"):
        _, grad = warp_l1_grad(x, flow, detach_warp=False, impl=impl)
        rhs = (nxt.double() * grad[:, :, 1].double()).sum()
        assert abs(lhs.item() - rhs.item()) < 1e-5, (impl, lhs.item(), rhs.item())


def test_autograd_wrapper_and_determinism():
    x, flow = _inputs((2, 3, 4, 6, 5), seed=9)
    for impl in ("native", "torch"):
        xr = x.clone().requires_grad_(True)
        (warp_l1(xr, flow, impl=impl) * torch.tensor([1.0, 2.0])).sum().backward()
        _, g = warp_l1_grad(x, flow, impl=impl)
        assert_close(xr.grad, g * torch.tensor([1.0, 2.0]).view(2, 1, 1, 1, 1), atol=1e-7, name=impl)
    a = warp_l1_grad(x, flow, detach_warp=False, impl="native")[1]
    b = warp_l1_grad(x, flow, detach_warp=False, impl="native")[1]
    assert torch.equal(a, b)
    t1 = warp_l1_grad_triton(x, flow, detach_warp=False, block_p=8)[1]
    t2 = warp_l1_grad_triton(x, flow, detach_warp=False, block_p=8)[1]
    assert torch.equal(t1, t2)


@pytest.mark.parametrize("bad, needle", [
    (lambda x, f: (x[0], f), "must be (B, C, T, h, w)"),
    (lambda x, f: (x[:, :, :1], f[:, :0]), "at least 2 frames"),
    (lambda x, f: (x, f[:, :, :1]), "flow must be (B, T-1, 2, h, w)"),
    (lambda x, f: (x.long(), f), "floating point"),
])
def test_bad_arguments(bad, needle):
    x, flow = _inputs((1, 2, 3, 4, 4), seed=0)
    with pytest.raises(KernelError) as e:
        warp_l1_grad(*bad(x, flow))
    assert needle in str(e.value)


@pytest.mark.parametrize("impl", ["native", "torch"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16], ids=str)
def test_results_come_back_in_the_input_dtype(impl, dtype):
    """api.md: ``grad like x``: computed in float32 whatever x's dtype and returned in it, so
    a half-precision latent's STO step stays half precision (float64 accuracy: impl="ref")."""
    x, flow = _inputs((1, 2, 3, 5, 6), 7)
    x, flow = x.to(dtype), flow.to(dtype)
    loss, grad = warp_l1_grad(x, flow, impl=impl)
    assert loss.dtype == dtype and grad.dtype == dtype and grad.shape == x.shape
    loss32, grad32 = warp_l1_grad(x.float(), flow.float(), impl=impl)
    assert torch.equal(loss, loss32.to(dtype)) and torch.equal(grad, grad32.to(dtype))
    assert warp_l1(x, flow, impl=impl).dtype == dtype
