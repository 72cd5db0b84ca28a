"""The native small-head attention kernel (``vpure.kernels.attention``) against a float64
oracle, in both of its copies, as a custom op inside a compiled graph, and as the attention
processor compiled UNets get (``use_native_attention``)."""

from __future__ import annotations

import pytest
import torch

from vpure.kernels import KernelError
from vpure.kernels._dispatch import native
from vpure.kernels.attention import (
    native_attention_available,
    small_head_attention,
    small_head_attention_ref,
)

pytestmark = pytest.mark.skipif(native() is None, reason="the native extension is not built")
COPIES = [pytest.param(True, id="portable"),
          pytest.param(False, id="avx512", marks=pytest.mark.skipif(
              not native_attention_available(), reason="this CPU has no AVX-512"))]


def _qkv(b, lq, lk, heads, d, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, n, heads * d, generator=g).to(dtype) for n in (lq, lk, lk)]


@pytest.mark.parametrize("portable", COPIES)
@pytest.mark.parametrize("b,lq,lk,heads,d", [(2, 5, 3, 2, 8), (3, 17, 33, 4, 16), (1, 40, 77, 2, 32),
                                             (4, 16, 16, 8, 8), (2, 49, 196, 3, 8), (3, 1, 1, 1, 16)])
def test_matches_the_float64_oracle(portable, b, lq, lk, heads, d):
    q, k, v = _qkv(b, lq, lk, heads, d, torch.float32)
    want = small_head_attention_ref(q, k, v, heads)
    got = small_head_attention(q, k, v, heads, portable=portable)
    assert got.shape == q.shape and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=0, atol=2e-6)
    # bf16 in and out: fp32 arithmetic on the widened inputs, the output rounded once
    qb, kb, vb = (t.bfloat16() for t in (q, k, v))
    want_b = small_head_attention_ref(qb, kb, vb, heads)
    got_b = small_head_attention(qb, kb, vb, heads, portable=portable)
    assert got_b.dtype == torch.bfloat16
    torch.testing.assert_close(got_b.double(), want_b, rtol=2 ** -8, atol=1e-6)


@pytest.mark.parametrize("portable", COPIES)
def test_strided_projections_and_an_explicit_scale(portable):
    # q, k, v as column blocks of one fused projection: batch and position strides are 3C
    b, l, heads, d = 2, 21, 4, 8
    qkv = torch.randn(b, l, 3 * heads * d, generator=torch.Generator().manual_seed(1))
    q, k, v = qkv.chunk(3, dim=-1)
    assert not q.is_contiguous()
    got = small_head_attention(q, k, v, heads, scale=0.3, portable=portable)
    torch.testing.assert_close(got.double(), small_head_attention_ref(q, k, v, heads, scale=0.3), rtol=0, atol=2e-6)


def test_extreme_scores_stay_finite():
    q, k, v = _qkv(1, 8, 40, 2, 8, torch.float32, seed=2)
    got = small_head_attention(q * 200, k, v, 2)  # scores in the thousands: the row maximum is subtracted
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.double(), small_head_attention_ref(q * 200, k, v, 2), rtol=0, atol=1e-5)


def test_bad_inputs_name_the_problem():
    q, k, v = _qkv(1, 4, 4, 2, 8, torch.float32)
    with pytest.raises(KernelError, match="share one dtype"):
        small_head_attention(q.half(), k.half(), v.half(), 2)
    with pytest.raises(KernelError, match="share one dtype"):
        small_head_attention(q, k.bfloat16(), v, 2)
    with pytest.raises(KernelError, match="head size 4"):
        small_head_attention(q, k, v, 4)
    with pytest.raises(KernelError, match="do not split into 3 heads"):
        small_head_attention(q, k, v, 3)
    with pytest.raises(KernelError, match="k and v must be"):
        small_head_attention(q, k[:, :3], v, 2)
    with pytest.raises(KernelError, match=r"\(B, L, heads\*D\)"):
        small_head_attention(q[0], k, v, 2)
    with pytest.raises(KernelError, match="empty key sequence"):
        small_head_attention(q, k[:, :0], v[:, :0], 2)


@pytest.mark.slow
def test_a_compiled_graph_calls_it_as_one_op():
    q, k, v = _qkv(2, 16, 24, 2, 8, torch.float32, seed=3)

    def layer(q, k, v):
        return small_head_attention(q * 1.5, k, v + 1, 2).relu()

    compiled = torch.compile(layer, fullgraph=True, dynamic=False)  # a graph break would raise
    torch.testing.assert_close(compiled(q, k, v), layer(q, k, v), rtol=0, atol=1e-6)


@pytest.mark.skipif(not native_attention_available(), reason="this CPU has no AVX-512: processors are not swapped")
def test_the_processor_gives_diffusers_outputs_and_steps_aside_for_autograd():
    from vpure.runtime import presets
    from vpure.runtime.models.attention_processors import NativeSmallHeadAttention, use_native_attention

    unet = presets.build("tiny").unet
    z = torch.randn(1, 4, 8, 8, 8, generator=torch.Generator().manual_seed(4))
    t = torch.tensor([500])
    with torch.no_grad():
        want = unet(z, t)
    n = use_native_attention(unet)
    assert n > 0 and n == sum(isinstance(getattr(m, "processor", None), NativeSmallHeadAttention)
                              for m in unet.modules())
    with torch.no_grad():
        torch.testing.assert_close(unet(z, t), want, rtol=1e-5, atol=1e-5)
    zg = z.clone().requires_grad_(True)
    out = unet(zg, t)  # under autograd: diffusers' processor, so gradients reach the latents
    out.square().sum().backward()
    assert zg.grad is not None and torch.isfinite(zg.grad).all()
    torch.testing.assert_close(out.detach(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not native_attention_available(), reason="this CPU has no AVX-512")
def test_the_eager_inference_processors_use_the_kernel_and_step_aside_for_autograd():
    """optimise_for_inference's processors (self-attention, the baked prompt's cross-attention)
    call the kernel for inference calls, with the outputs of their PyTorch path, and keep
    that path under autograd."""
    import copy

    from vpure.runtime import presets
    from vpure.runtime.models.attention_processors import ConstantContextAttention, LeanSelfAttention
    from vpure.runtime.models.rewrites import optimise_for_inference

    base = presets.build("tiny").unet
    lean, fast = copy.deepcopy(base), copy.deepcopy(base)
    optimise_for_inference(lean, native_attention=False)
    optimise_for_inference(fast, native_attention=True)
    calls = {LeanSelfAttention: 0, ConstantContextAttention: 0}
    for m in fast.modules():
        proc = getattr(m, "processor", None)
        if isinstance(proc, (LeanSelfAttention, ConstantContextAttention)):
            def counted(*args, _kernel=proc._native, _kind=type(proc), **kwargs):
                calls[_kind] += 1
                return _kernel(*args, **kwargs)
            proc._native = counted
    z = torch.randn(2, 4, 8, 8, 8, generator=torch.Generator().manual_seed(5))
    t = torch.tensor([500, 20])
    with torch.inference_mode():
        want, got = lean(z, t), fast(z, t)
    assert calls[LeanSelfAttention] > 0 and calls[ConstantContextAttention] > 0
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    before = dict(calls)
    zg = z.clone().requires_grad_(True)
    fast(zg, t).square().sum().backward()  # gradients wanted for the latents: PyTorch's path
    assert calls == before and zg.grad is not None and torch.isfinite(zg.grad).all()
