"""The native channels-last max-pool and antialiased resize (``vpure.kernels.pool`` and
``vpure.kernels.resize``) against their float64 oracles and PyTorch, in both ISA copies, on
odd shapes; where "auto" sends them; and the gate paths that use them (the fused frame
plan's stem pool, the detector's resize to ``frame_size``)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from helpers import assert_close
from vpure.kernels import KernelError, KernelUnavailable, max_pool2d, resize_antialiased
from vpure.kernels._dispatch import native
from vpure.kernels.pool import max_pool2d_native, max_pool2d_ref, max_pool3d, max_pool3d_native, max_pool3d_ref
from vpure.kernels.resize import resize_antialiased_native, resize_antialiased_ref, taps

pytestmark = pytest.mark.skipif(native() is None, reason="the native extension is not built")
COPIES = [pytest.param(True, id="portable"), pytest.param(False, id="dispatched")]


def _values(shape, dtype, g):
    if dtype == torch.uint8:  # an int8 plan's activation codes: every byte value
        return torch.randint(0, 256, shape, generator=g, dtype=torch.uint8)
    return torch.randn(*shape, generator=g).to(dtype)


def _map(n, c, h, w, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return _values((n, c, h, w), dtype, g).contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("portable", COPIES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.uint8])
@pytest.mark.parametrize("n,c,h,w,k,s,p", [(2, 64, 56, 56, 3, 2, 1), (1, 3, 7, 9, 3, 2, 1), (3, 17, 11, 6, 2, 2, 0),
                                           (1, 5, 5, 5, 3, 1, 1), (2, 33, 13, 10, 5, 3, 2)])
def test_max_pool_equals_the_oracle_exactly(portable, dtype, n, c, h, w, k, s, p):
    x = _map(n, c, h, w, dtype)
    got = max_pool2d_native(x, k, s, p, portable=portable)
    want = max_pool2d_ref(x, k, s, p)
    assert got.dtype == dtype and got.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(got, want), f"max abs err {(got.double() - want.double()).abs().max()}"  # a max is exact
    assert torch.equal(got, max_pool2d(x, k, s, p, impl="torch"))


@pytest.mark.parametrize("portable", COPIES)
def test_max_pool_propagates_nan_and_inf_like_pytorch(portable):
    x = _map(1, 16, 9, 9, torch.float32)
    x[0, 3, 4, 4], x[0, 5, 0, 0], x[0, 7, 8, 8] = float("nan"), float("inf"), float("-inf")
    got, want = max_pool2d_native(x, 3, 2, 1, portable=portable), F.max_pool2d(x, 3, 2, 1)
    assert torch.equal(got.isnan(), want.isnan()) and got.isnan().any()
    assert torch.equal(got.nan_to_num(0.0), want.nan_to_num(0.0))


def test_max_pool_auto_dispatch_and_bad_input():
    x = _map(2, 8, 10, 10, torch.float32)
    assert torch.equal(max_pool2d(x, 3, 2, 1), F.max_pool2d(x, 3, 2, 1))
    nchw = x.contiguous()  # not channels-last: PyTorch's kernel, same values
    assert torch.equal(max_pool2d(nchw, 3, 2, 1), F.max_pool2d(nchw, 3, 2, 1))
    leaf = x.clone().requires_grad_()  # gradients needed: PyTorch's kernel, which has them
    max_pool2d(leaf, 3, 2, 1).sum().backward()
    assert leaf.grad is not None and leaf.grad.sum() == 2 * 5 * 5 * 8
    with pytest.raises(KernelError, match="padding"):
        max_pool2d(x, 3, 2, 2)
    with pytest.raises(KernelError, match=r"\(N, C, H, W\)"):
        max_pool2d(x[0], 3, 2, 1)
    with pytest.raises(KernelError, match="does not fit"):
        max_pool2d(_map(1, 2, 2, 2, torch.float32), 5, 1, 1)
    with pytest.raises(KernelError, match="float32/bfloat16/uint8"):
        max_pool2d_native(x.double(), 3, 2, 1)
    with pytest.raises(KernelUnavailable):
        max_pool2d(x, 3, 2, 1, impl="triton")


@pytest.mark.parametrize("portable", COPIES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.uint8])
@pytest.mark.parametrize("shape,kernel,stride,padding", [
    ((1, 64, 16, 28, 28), (1, 3, 3), (2, 2, 2), (0, 1, 1)),  # an I3D stem pool
    ((2, 24, 8, 7, 9), (2, 1, 1), (2, 1, 1), (0, 0, 0)),  # an I3D pool2
    ((1, 5, 7, 6, 5), (3, 3, 3), (2, 1, 1), (0, 1, 1)), ((2, 3, 5, 9, 8), (2, 2, 2), (1, 3, 3), (0, 1, 1))])
def test_max_pool3d_equals_the_oracle_exactly(portable, dtype, shape, kernel, stride, padding):
    g = torch.Generator().manual_seed(5)
    x = _values(shape, dtype, g).contiguous(memory_format=torch.channels_last_3d)
    got = max_pool3d_native(x, kernel, stride, padding, portable=portable)
    assert got.dtype == dtype and got.is_contiguous(memory_format=torch.channels_last_3d)
    assert torch.equal(got, max_pool3d_ref(x, kernel, stride, padding))
    assert torch.equal(got, max_pool3d(x, kernel, stride, padding, impl="torch"))
    assert torch.equal(max_pool3d(x, kernel, stride, padding), got)  # auto: native on this layout


def test_max_pool3d_refuses_what_the_kernel_does_not_do():
    x = torch.rand(1, 4, 6, 8, 8).contiguous(memory_format=torch.channels_last_3d)
    with pytest.raises(KernelError, match="square spatial windows and no temporal padding"):
        max_pool3d(x, (1, 3, 2), (1, 2, 2), (0, 1, 1))
    with pytest.raises(KernelError, match="square spatial windows and no temporal padding"):
        max_pool3d(x, (3, 3, 3), (1, 2, 2), (1, 1, 1))
    with pytest.raises(KernelError, match="3-tuples"):
        max_pool3d(x, 3, 2, 1)
    with pytest.raises(KernelError, match="does not fit"):
        max_pool3d(x, (7, 1, 1), (1, 1, 1), (0, 0, 0))
    with pytest.raises(KernelError, match=r"\(N, C, T, H, W\)"):
        max_pool3d(x[0], (1, 3, 3), (1, 2, 2), (0, 1, 1))


@pytest.mark.parametrize("size_in,size_out", [((224, 224), (112, 112)), ((37, 53), (16, 30)), ((20, 20), (41, 33)),
                                              ((480, 640), (112, 112)), ((9, 4), (3, 2)), ((5, 7), (5, 7))])
def test_resize_taps_are_pytorchs(size_in, size_out):
    # (PyTorch 2.13's antialiased kernel with a one-pixel-wide output repeats its first output
    # row down the column; the taps here, and the native kernel, follow the formula there.)
    x = torch.rand(2, 3, *size_in, generator=torch.Generator().manual_seed(1))
    want = F.interpolate(x, size=size_out, mode="bilinear", align_corners=False, antialias=True)
    assert_close(resize_antialiased_ref(x, size_out), want, atol=5e-6, name="oracle vs interpolate")
    for in_size, out_size in zip(size_in, size_out):
        start, count, weights = taps(in_size, out_size)
        assert_close(weights.sum(1), torch.ones(out_size, dtype=torch.float64), atol=1e-8, rtol=1e-5)
        assert bool((start >= 0).all() and (start + count <= in_size).all())


@pytest.mark.parametrize("portable", COPIES)
@pytest.mark.parametrize("shape,size", [((1, 3, 5, 224, 224), (112, 112)), ((2, 3, 37, 53), (16, 30)),
                                        ((3, 20, 20), (41, 33)), ((1, 480, 640), (112, 97))])
def test_resize_native_matches_the_oracle(portable, shape, size):
    x = torch.rand(*shape, generator=torch.Generator().manual_seed(2))
    got = resize_antialiased_native(x, size, portable=portable)
    assert got.shape == (*shape[:-2], *size) and got.dtype == torch.float32 and got.is_contiguous()
    assert_close(got, resize_antialiased_ref(x, size), atol=5e-6, name="native vs oracle")


def test_resize_strided_input_auto_dispatch_and_bad_input():
    clip = torch.rand(1, 3, 8, 30, 40, generator=torch.Generator().manual_seed(3))
    part = clip[:, :, 2:6]  # a run of frames, as the runner prepares a stream's new ones
    want = F.interpolate(part.transpose(1, 2).reshape(-1, 3, 30, 40), size=(15, 20), mode="bilinear",
                         align_corners=False, antialias=True).reshape(1, 4, 3, 15, 20).transpose(1, 2)
    assert_close(resize_antialiased(part, (15, 20)), want, atol=5e-6, name="auto on a strided run")
    leaf = part.clone().requires_grad_()  # gradients needed (the gate-adaptive attack): PyTorch's kernel
    resize_antialiased(leaf, (15, 20)).sum().backward()
    assert leaf.grad is not None and leaf.grad.shape == part.shape
    with pytest.raises(KernelError, match="floating point"):
        resize_antialiased(torch.zeros(4, 4, dtype=torch.uint8), (2, 2))
    with pytest.raises(KernelError, match="positive"):
        resize_antialiased(clip, (0, 4))
    with pytest.raises(KernelError, match=r"\(h, w\)"):
        resize_antialiased(clip, 4)
    with pytest.raises(KernelError, match="CPU float32"):
        resize_antialiased_native(clip.double(), (4, 4))
    with pytest.raises(KernelUnavailable):
        resize_antialiased(clip, (4, 4), impl="triton")


def test_gate_paths_use_the_kernels(monkeypatch):
    """The detector's resize to frame_size and the fused frame plan's stem pool run the native
    kernels and keep their eager results."""
    import vpure.kernels.pool as pool_mod
    import vpure.kernels.resize as resize_mod
    from vpure.runtime.detect import DetectionConfig, Detector
    from vpure.runtime.models.frame_classifier import FrameClassifier
    from vpure.runtime.models.fused import use_fused_inference

    calls = {"pool": 0, "resize": 0}

    def counted(name, fn):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(pool_mod, "_native", counted("pool", pool_mod._native))
    monkeypatch.setattr(resize_mod, "resize_antialiased_native", counted("resize", resize_mod.resize_antialiased_native))
    torch.manual_seed(0)
    gate = FrameClassifier(num_classes=5, widths=(8, 16), depths=(1, 1), stem_width=8).eval()
    for m in gate.modules():  # non-trivial batch-norm statistics, so the folded plan is tested
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1), m.running_var.uniform_(0.5, 1.5)
    clip = torch.rand(2, 3, 6, 48, 40, generator=torch.Generator().manual_seed(4))
    det = Detector(gate, DetectionConfig(frame_size=32))
    frames = clip.transpose(1, 2).reshape(-1, 3, 48, 40)
    want_in = F.interpolate(frames, size=(32, 32), mode="bilinear", align_corners=False, antialias=True)
    want_in = want_in.reshape(2, 6, 3, 32, 32).transpose(1, 2)
    with torch.inference_mode():
        eager = gate(want_in)
        assert use_fused_inference(gate)
        got_in = det.prepare(clip)
        fused = gate(got_in)
    assert calls == {"pool": 1, "resize": 1}, calls
    assert_close(got_in, want_in, atol=5e-6, name="prepared frames")
    assert_close(fused, eager, atol=1e-4, name="fused plan logits")
