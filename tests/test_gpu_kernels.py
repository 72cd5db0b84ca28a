"""GPU tier: compiled Triton kernels on CUDA against the CPU implementations.

Skipped (with the reason) on machines without a CUDA device; the same kernels run under
the Triton interpreter in the CPU tier.
"""

from __future__ import annotations

import pytest
import torch

from vpure.kernels import block_match, warp_l1_grad
from helpers import assert_close

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
def test_triton_block_match_matches_native(dtype):
    g = torch.Generator().manual_seed(0)
    cur = torch.randint(0, 256, (31, 3, 224, 224), generator=g).to(dtype)
    ref = torch.randint(0, 256, (31, 3, 224, 224), generator=g).to(dtype)
    for radius in (7, 16):
        mv, sad = block_match(cur, ref, radius=radius, impl="native")
        mv_t, sad_t = block_match(cur.cuda(), ref.cuda(), radius=radius, impl="triton")
        assert torch.equal(mv_t.cpu(), mv) and torch.equal(sad_t.cpu(), sad)


@pytest.mark.parametrize("detach", [True, False])
def test_triton_warp_l1_matches_native(detach):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 4, 32, 28, 28, generator=g)
    flow = torch.randn(1, 31, 2, 28, 28, generator=g) * 2
    loss, grad = warp_l1_grad(x, flow, detach_warp=detach, impl="native")
    loss_t, grad_t = warp_l1_grad(x.cuda(), flow.cuda(), detach_warp=detach, impl="triton")
    assert_close(loss_t.cpu(), loss, rtol=1e-5, atol=1e-8)
    assert (grad_t.cpu() - grad).abs().max().item() < 1e-5
    again = warp_l1_grad(x.cuda(), flow.cuda(), detach_warp=detach, impl="triton")[1]
    assert torch.equal(again, grad_t), "Triton gradient is not deterministic"
