"""The native group-norm (+ SiLU) kernel (vpure.kernels.group_norm) and the VAE rewrite that uses it."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from vpure.kernels._dispatch import native
from vpure.kernels.errors import KernelError, KernelUnavailable
from vpure.kernels.group_norm import group_norm, group_norm_native, group_norm_ref, native_applies
from helpers import assert_close

pytestmark = pytest.mark.skipif(native() is None, reason="the native extension is not built")

COPIES = pytest.mark.parametrize("portable", [False, True], ids=["dispatched", "portable"])
LAYOUTS = pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"])


def _map(shape, dtype, layout, seed=0, offset=3.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g) * 2 + offset  # a mean well away from 0: the shifted sums matter
    return x.to(dtype).contiguous(memory_format=layout)


def _affine(c, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(c, generator=g) + 0.5, torch.randn(c, generator=g) * 0.1


@COPIES
@LAYOUTS
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("silu", [False, True])
@pytest.mark.parametrize("shape,groups", [((8, 64, 28, 28), 32), ((1, 32, 17, 9), 8), ((3, 12, 7, 5), 4),
                                          ((2, 6, 1, 1), 3), ((1, 16, 64, 64), 16)])
def test_group_norm_matches_the_oracle(portable, layout, dtype, silu, shape, groups):
    x = _map(shape, dtype, layout)
    w, b = _affine(shape[1])
    got = group_norm_native(x, groups, w, b, 1e-6, silu, portable=portable)
    want = group_norm_ref(x, groups, w, b, 1e-6, silu)
    assert got.dtype == dtype and got.shape == x.shape and got.stride() == x.stride()
    # fp32: a few ulp of values ~4; bf16: one rounding of the result (the oracle rounds once too)
    tol = 2e-5 if dtype == torch.float32 else 2 ** -7 * 4.0
    err = (got.double() - want.double()).abs().max().item()
    assert err <= tol, err
    if dtype == torch.bfloat16:  # most values round to the oracle's bf16 exactly
        assert (got == want).float().mean() > 0.97


def test_group_norm_without_affine_large_mean_and_strided_input():
    x = _map((2, 8, 16, 16), torch.float32, torch.contiguous_format, offset=1e4)  # var 4 under a mean of 1e4
    got, want = group_norm_native(x, 4), group_norm_ref(x, 4)
    assert (got - want).abs().max() < 2e-3  # the shift keeps the variance: naive E[x^2]-E[x]^2 in fp32 fails
    strided = _map((2, 8, 16, 32), torch.float32, torch.contiguous_format)[..., ::2]  # neither layout: made NCHW
    assert_close(group_norm_native(strided, 4), group_norm_ref(strided, 4), atol=2e-5, rtol=1e-5)


@COPIES
def test_nan_and_inf_spread_over_their_group_only(portable):
    x = _map((2, 8, 6, 6), torch.float32, torch.channels_last)
    x[0, 1, 2, 2] = float("nan")
    x[1, 6, 0, 0] = float("inf")
    got = group_norm_native(x, 4, silu=True, portable=portable)
    want = F.silu(F.group_norm(x, 4))
    assert torch.equal(got.isnan(), want.isnan()) and got[0, :2].isnan().all() and got[1, 6:].isnan().all()
    assert_close(got.nan_to_num(0.0), want.nan_to_num(0.0), atol=2e-5, rtol=1e-5)


def test_silu_saturates_like_pytorch():
    x = torch.tensor([-200.0, -90.0, -20.0, -1e-30, 0.0, 1e-30, 20.0, 90.0, 200.0]).view(1, 9, 1, 1)
    # one channel per group, one pixel: the normalised value is 0 + bias, so the bias is the input
    got = group_norm_native(torch.zeros(1, 9, 1, 1), 9, torch.ones(9), x.flatten(), 1.0, True)  # rstd 1
    assert_close(got, F.silu(x), rtol=1e-6, atol=1e-30)


def test_auto_dispatch_and_bad_input():
    x = _map((2, 8, 10, 10), torch.float32, torch.channels_last)
    assert native_applies(x)
    assert_close(group_norm(x, 4, silu=True), F.silu(F.group_norm(x, 4)), atol=2e-5, rtol=1e-5)
    leaf = x.clone().requires_grad_()  # gradients needed: PyTorch's layers, which have them
    assert not native_applies(leaf)
    group_norm(leaf, 4, silu=True).sum().backward()
    assert leaf.grad is not None
    assert not native_applies(x.double()) and group_norm(x.double(), 4).dtype == torch.float64
    with pytest.raises(KernelError, match="do not split into 3 groups"):
        group_norm(x, 3)
    with pytest.raises(KernelError, match=r"\(N, C, H, W\)"):
        group_norm(x[0], 4)
    with pytest.raises(KernelError, match=r"weight must be a \(8,\) tensor"):
        group_norm(x, 4, torch.ones(4))
    with pytest.raises(KernelError, match="float32/bfloat16"):
        group_norm_native(x.double(), 4)
    with pytest.raises(KernelUnavailable):
        group_norm(x, 4, impl="triton")


def test_the_op_is_one_opaque_kernel_in_a_compiled_graph():
    norm = torch.nn.GroupNorm(4, 8).eval()
    x = _map((2, 8, 12, 12), torch.float32, torch.channels_last)

    def f(t):
        return torch.ops.vpure.group_norm(t * 2, 4, norm.weight, norm.bias, norm.eps, True, False) + 1

    compiled = torch.compile(f, fullgraph=True, dynamic=False)
    with torch.inference_mode():
        assert_close(compiled(x), f(x), atol=1e-5, rtol=1e-5)


def _tiny_vae():
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32),
                         layers_per_block=1, norm_num_groups=8,
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2).eval()


def test_the_vae_rewrite_keeps_its_outputs_and_autograd():
    from vpure.runtime.models.diffusion import VAEDecoder
    from vpure.runtime.models.rewrites import NativeGroupNorm, use_native_group_norm

    ref = VAEDecoder(_tiny_vae())
    fast = copy.deepcopy(ref)
    n = use_native_group_norm(fast)
    # per decoder block: layers_per_block + 1 resnets of two norms; the mid block's two resnets; the output norm
    assert n == 2 * (2 * 2) + 2 * 2 + 1
    assert sum(isinstance(m, NativeGroupNorm) for m in fast.modules()) == n
    assert fast.state_dict().keys() == ref.state_dict().keys()  # the norms changed class in place
    assert all(torch.equal(v, ref.state_dict()[k]) for k, v in fast.state_dict().items())
    z = torch.randn(1, 4, 3, 4, 4)
    with torch.inference_mode():
        want, got = ref(z), fast(z)
    assert_close(got, want, atol=1e-5, rtol=1e-5)
    z.requires_grad_(True)  # under autograd the wrapped PyTorch layers run
    fast(z).sum().backward()
    assert z.grad is not None and torch.isfinite(z.grad).all()


def test_compiled_decoder_takes_the_native_norms():
    from vpure.runtime.models.diffusion import VAEDecoder
    from vpure.runtime.models.rewrites import NativeGroupNorm
    from vpure.runtime.models.inference import compile_for_inference

    ref = VAEDecoder(_tiny_vae())
    dec = copy.deepcopy(ref)
    compiled = compile_for_inference(dec)
    assert any(isinstance(m, NativeGroupNorm) for m in dec.modules())
    z = torch.randn(1, 4, 2, 4, 4)
    with torch.inference_mode():
        assert_close(compiled(z), ref(z), atol=1e-4, rtol=1e-5)
        with torch.profiler.profile() as prof:
            compiled(z)
    assert any(e.name == "vpure::group_norm" for e in prof.events())  # the op is in the compiled graph


def test_the_eager_inference_decoder_takes_the_native_norms_too():
    from vpure.runtime.models.diffusion import VAEDecoder
    from vpure.runtime.models.rewrites import NativeGroupNorm
    from vpure.runtime.models.inference import prepare_decoder

    ref = VAEDecoder(_tiny_vae())
    dec = copy.deepcopy(ref)
    prepare_decoder(dec)  # as vpure run's torch path loads the decoder
    assert any(isinstance(m, NativeGroupNorm) for m in dec.modules())
    z = torch.randn(1, 4, 2, 4, 4)
    with torch.inference_mode():
        assert_close(dec(z), ref(z), atol=1e-4, rtol=1e-5)


def test_the_eager_inference_encoder_takes_the_native_norms_and_vpure_run_loads_it_so():
    from vpure.runtime.models.diffusion import VAEEncoder
    from vpure.runtime.models.rewrites import NativeGroupNorm
    from vpure.runtime.models.inference import prepare_encoder
    from vpure.runtime.runner import RunConfig, load_components

    ref = VAEEncoder(_tiny_vae())
    enc = copy.deepcopy(ref)
    prepare_encoder(enc)
    assert any(isinstance(m, NativeGroupNorm) for m in enc.modules())
    assert list(enc.state_dict()) == list(ref.state_dict())
    x = torch.rand(1, 3, 2, 32, 32)
    with torch.inference_mode():
        assert_close(enc(x), ref(x), atol=1e-4, rtol=1e-5)
    x.requires_grad_(True)  # gradients (the attacks') go through PyTorch's layers
    enc(x).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    comps = load_components(RunConfig())  # the embedded mini-world, served eagerly by torch
    assert any(isinstance(m, NativeGroupNorm) for m in comps.encoder.modules())


def test_an_exported_decoder_records_pytorchs_group_norm():
    from vpure.runtime.models.diffusion import VAEDecoder
    from vpure.runtime.models.inference import prepare_decoder

    dec = VAEDecoder(_tiny_vae())
    prepare_decoder(dec)
    z = torch.randn(1, 4, 2, 4, 4)
    with torch.no_grad():
        graph = torch.jit.trace(dec, (z,), check_trace=False).inlined_graph
    kinds = {node.kind() for node in graph.nodes()}
    assert "aten::group_norm" in kinds and not any(k.startswith("vpure::") for k in kinds)
