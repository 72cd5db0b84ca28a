"""Fused oneDNN inference plans of the frame classifier and the I3D recognisers (vpure.runtime.models.fused)."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch

from vpure.runtime.models.frame_classifier import FrameClassifier
from vpure.runtime.models.fused import ClipPlan, FramePlan, SlowFastPlan, use_fused_inference
from vpure.runtime.errors import InputError
from vpure.runtime.models.i3d import I3DResNet
from vpure.runtime.models.slowfast import SlowFast
from vpure.runtime.precision import native_bf16

from helpers import assert_close

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="needs PyTorch's oneDNN (mkldnn)")


def _trained_looking(model, seed: int = 0):
    """Batch norms with non-trivial statistics and affine terms, as a trained network has."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g) * 0.2)
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(n, generator=g) * 0.1)
    return model.eval()


def _pair(**arch):
    ref = _trained_looking(FrameClassifier(**arch))
    fused = copy.deepcopy(ref)
    assert use_fused_inference(fused)
    return ref, fused


ARCHS = [dict(num_classes=5, widths=(8, 16, 24), depths=(1, 2, 1), stem_width=8, stem_pool=False),
         dict(num_classes=7, widths=(16, 32), depths=(2, 1), stem_width=16, stem_pool=True)]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("shape", [(1, 3, 16, 64, 64), (2, 3, 5, 48, 40), (1, 3, 1, 64, 64)])
def test_fused_plan_gives_the_eager_logits(arch, shape):
    ref, fused = _pair(**arch)
    x = torch.rand(shape, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        want, got = ref(x), fused(x)
    with torch.no_grad():
        got_no_grad = fused(x[:, :, :, :-8])
        want_no_grad = ref(x[:, :, :, :-8])
    assert isinstance(fused._plan, FramePlan)
    assert got.shape == want.shape == (shape[0], shape[2], arch["num_classes"])
    assert_close(got, want, atol=1e-4, rtol=1e-4, name="logits")
    assert_close(got_no_grad, want_no_grad, atol=1e-4, rtol=1e-4, name="logits under no_grad")
    # a view with odd strides (a time slice of a channels-last clip) reads the same frames
    xs = x.contiguous(memory_format=torch.channels_last_3d)[:, :, ::2]
    with torch.inference_mode():
        assert_close(fused(xs), ref(xs.contiguous()), atol=1e-4, rtol=1e-4, name="logits of a strided view")


def test_gradients_training_and_state_take_the_eager_layers():
    ref, fused = _pair(**ARCHS[1])
    assert fused.state_dict().keys() == ref.state_dict().keys()
    x = torch.rand(1, 3, 4, 32, 32, generator=torch.Generator().manual_seed(2))
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ref(xa).logsumexp(-1).sum().backward()
    fused(xb).logsumexp(-1).sum().backward()  # the adaptive gate attack differentiates the gate
    assert torch.equal(xa.grad, xb.grad)
    ref.train(), fused.train()
    with torch.no_grad():  # training mode normalises with batch statistics: eager only
        assert torch.equal(ref(x), fused(x))


def test_weights_changed_in_place_rebuild_the_plan_and_copies_drop_it():
    _, fused = _pair(**ARCHS[0])
    other = _trained_looking(FrameClassifier(**ARCHS[0]), seed=5)
    x = torch.rand(1, 3, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        before = fused(x)
    plan = fused._plan
    fused.load_state_dict(other.state_dict())  # copies in place: same tensors, new versions
    with torch.inference_mode():
        after, want = fused(x), other(x)
    assert fused._plan is not plan
    assert_close(after, want, atol=1e-4, rtol=1e-4, name="logits after load_state_dict")
    assert not torch.allclose(after, before, atol=1e-3)
    for clone in (copy.deepcopy(fused), pickle.loads(pickle.dumps(fused))):
        assert clone._plan is None and clone.fused_inference
        with torch.inference_mode():
            assert_close(clone(x), want, atol=1e-4, rtol=1e-4, name="logits of a copy")


def test_tracing_records_the_eager_graph_and_other_modules_are_left_alone():
    ref, fused = _pair(**ARCHS[0])
    x = torch.rand(1, 3, 2, 64, 64)
    with torch.no_grad():
        traced = torch.jit.trace(fused, x)
    graph = str(traced.inlined_graph)
    assert "_convolution_pointwise" not in graph and "aten::_convolution" in graph
    with torch.inference_mode():
        assert_close(traced(x), ref(x), atol=1e-5, name="traced logits")
    conv = torch.nn.Conv2d(3, 4, 3)
    assert not use_fused_inference(conv) and not hasattr(conv, "fused_inference")


def test_weights_are_blocked_per_input_shape_for_the_last_few_shapes():
    ref, fused = _pair(**ARCHS[0])
    g = torch.Generator().manual_seed(4)
    with torch.inference_mode():
        for t in (16, 1, 7, 2, 3, 16, 5, 1):  # more shapes than are kept, some coming back
            x = torch.rand(1, 3, t, 64, 64, generator=g)
            assert_close(fused(x), ref(x), atol=1e-4, rtol=1e-4, name=f"logits at {t} frames")
    plan = fused._plan
    for conv in [plan.stem] + [c for convs, down, _ in plan.blocks for c in convs + [down] if c is not None]:
        assert len(conv.packed) == conv.SHAPES
        assert [shape[0] for shape in conv.packed] == [2, 3, 16, 5, 1][-conv.SHAPES:]  # least recent first


CLIP_ARCHS = [  # the mini-world's kind (basic blocks, a non-local block, no stem pool) and I3D-R50's kind
    dict(num_classes=5, blocks=(1, 1), inflate=((1,), (0,)), nonlocal_=((0,), (1,)), base_width=8,
         block="basic", stem_pool=False),
    dict(num_classes=6, blocks=(2, 1), inflate=((1, 0), (1,)), nonlocal_=((0, 1), (0,)), base_width=4,
         block="bottleneck", stem_pool=True),
]


def _check_recogniser(ref, classes: int, plan_type, shapes, seed: int, name: str):
    """A fused copy of ``ref`` gives its ``classes`` logits on each clip shape through a ``plan_type``
    plan, and bit-identical input gradients through the eager layers; returns the copy."""
    fused = copy.deepcopy(ref)
    assert use_fused_inference(fused)
    g = torch.Generator().manual_seed(seed)
    for shape in shapes:
        x = torch.rand(shape, generator=g)
        with torch.inference_mode():
            want, got = ref(x), fused(x)
        assert isinstance(fused._plan, plan_type) and got.shape == want.shape == (shape[0], classes)
        assert_close(got, want, atol=1e-4, rtol=1e-4, name=f"{name} logits {shape}")
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ref(xa).logsumexp(-1).sum().backward()
    fused(xb).logsumexp(-1).sum().backward()  # attacks differentiate the recogniser: eager
    assert torch.equal(xa.grad, xb.grad)
    return fused


@pytest.mark.parametrize("arch", CLIP_ARCHS)
def test_i3d_plan_gives_the_eager_logits_and_gradients_take_the_eager_layers(arch):
    ref = _trained_looking(I3DResNet(**arch))
    fused = _check_recogniser(ref, arch["num_classes"], ClipPlan, [(1, 3, 16, 64, 64), (2, 3, 8, 48, 56)], 6, "I3D")
    assert fused.state_dict().keys() == ref.state_dict().keys()


def test_slowfast_plan_gives_the_eager_logits_and_keeps_the_input_check():
    ref = _trained_looking(SlowFast(num_classes=5, depths=(1, 2, 1, 1), stem_width=16))
    fused = _check_recogniser(ref, 5, SlowFastPlan, [(1, 3, 16, 64, 64), (2, 3, 8, 40, 48)], 7, "SlowFast")
    with torch.inference_mode(), pytest.raises(InputError, match="multiple of alpha"):
        fused(torch.rand(1, 3, 6, 64, 64))


@pytest.mark.skipif(not native_bf16(), reason="bf16 plans need oneDNN's bf16 convolutions (AVX512-BF16 or AMX)")
@pytest.mark.parametrize("name", ["frame classifier", "I3D", "SlowFast"])
def test_bf16_plans_err_like_eager_bf16(name):
    """A model cast to bf16 takes its plan (batch norm folded in fp32, rounded once), and its
    logits are as close to the fp32 model's as the eager bf16 layers' are."""
    build, plan_type, shape = {
        "frame classifier": (lambda: FrameClassifier(**ARCHS[1]), FramePlan, (1, 3, 8, 64, 64)),
        "I3D": (lambda: I3DResNet(**CLIP_ARCHS[0]), ClipPlan, (1, 3, 16, 64, 64)),
        "SlowFast": (lambda: SlowFast(num_classes=5, depths=(1, 2, 1, 1), stem_width=16), SlowFastPlan,
                     (1, 3, 16, 64, 64)),
    }[name]
    ref = _trained_looking(build())
    eager = copy.deepcopy(ref).to(torch.bfloat16)
    fused = copy.deepcopy(ref)
    assert use_fused_inference(fused)
    fused = fused.to(torch.bfloat16)
    x = torch.rand(shape, generator=torch.Generator().manual_seed(8))
    with torch.inference_mode():
        want, got_eager, got = ref(x), eager(x.bfloat16()), fused(x.bfloat16())
    assert isinstance(fused._plan, plan_type) and got.dtype == torch.bfloat16
    eager_err = (got_eager.float() - want).abs().max().item()
    plan_err = (got.float() - want).abs().max().item()
    scale = want.abs().max().item()
    assert plan_err <= 2 * eager_err + 1e-2 * scale, (name, plan_err, eager_err, scale)
