"""The frame classifier's int8 plan (vpure.runtime.models.quantized) and the torch backend's int8."""

from __future__ import annotations

import copy

import pytest
import torch

from vpure.runtime import registry
from vpure.runtime.backends import create_backend
from vpure.runtime.errors import BackendUnavailable, ConfigError, InputError
from vpure.runtime.models.frame_classifier import FrameClassifier
from vpure.runtime.models.quantized import Int8FramePlan, QParams, int8_ops_available
from vpure.runtime.precision import CalibrationRecipe, Precision
from vpure.runtime.runconfig import ComponentChoice

from test_fused import _trained_looking

pytestmark = pytest.mark.skipif(
    not int8_ops_available(), reason="needs PyTorch's oneDNN quantised convolutions (torch.ops.onednn.qconv2d_pointwise)")

ARCHS = [dict(num_classes=5, widths=(8, 16, 24), depths=(1, 2, 1), stem_width=8, stem_pool=False),
         dict(num_classes=7, widths=(16, 32), depths=(2, 1), stem_width=16, stem_pool=True)]


def _clips(n, t=4, size=64, seed=0):
    """Frames with image-like structure (smooth blobs plus texture), not i.i.d. noise."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        low = torch.rand(1, 3, t, size // 8, size // 8, generator=g)
        x = torch.nn.functional.interpolate(low, size=(t, size, size), mode="trilinear", align_corners=False)
        out.append((0.8 * x + 0.2 * torch.rand(1, 3, t, size, size, generator=g)).clamp(0, 1))
    return out


def _sqnr_db(got, ref):
    return float(10 * torch.log10(ref.double().pow(2).mean() / (got.double() - ref.double()).pow(2).mean()))


def test_qparams_cover_the_range_and_represent_zero_exactly():
    for lo, hi in [(0.0, 6.0), (-1.3, 2.2), (-4.0, -0.5), (0.0, 0.0)]:
        q = QParams.of_range(lo, hi)
        assert 0 <= q.zero_point <= 255
        assert q.dequantize(torch.tensor([q.zero_point])).item() == 0.0
        assert q.dequantize(torch.tensor([0])).item() <= min(lo, 0.0) + q.scale / 2
        assert q.dequantize(torch.tensor([255])).item() >= max(hi, 0.0) - q.scale / 2
    assert QParams.of_range(0.0, 6.0).zero_point == 0  # after a ReLU: all codes above zero


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("method,reduce_range", [("minmax", False), ("minmax", True), ("percentile", False)])
def test_int8_plan_follows_the_fp32_logits(arch, method, reduce_range):
    model = _trained_looking(FrameClassifier(**arch), seed=1)
    plan = Int8FramePlan(model, _clips(4), method=method, percentile=99.99, reduce_range=reduce_range)
    for shape_clip in _clips(2, t=6, seed=5) + [_clips(1, t=1, size=48, seed=6)[0]]:
        with torch.inference_mode():
            ref, got = model(shape_clip), plan(shape_clip)
        assert got.shape == ref.shape and got.dtype == torch.float32
        assert _sqnr_db(got, ref) > (24 if reduce_range else 28), _sqnr_db(got, ref)
        assert (got.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.8


def test_int8_plan_leaves_the_model_alone_and_refuses_what_it_cannot_do():
    model = _trained_looking(FrameClassifier(**ARCHS[1]))
    before = copy.deepcopy(model.state_dict())
    plan = Int8FramePlan(model, _clips(2))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with pytest.raises(InputError, match=r"\(B, 3, T, H, W\)"):
        plan(torch.rand(3, 4, 64, 64))
    with pytest.raises(InputError, match="float"):
        plan(torch.zeros(1, 3, 2, 64, 64, dtype=torch.uint8))
    with pytest.raises(ConfigError, match="entropy"):
        Int8FramePlan(model, _clips(1), method="entropy")
    with pytest.raises(ConfigError, match="no calibration clips"):
        Int8FramePlan(model, [])
    with pytest.raises(ConfigError, match="training mode"):
        Int8FramePlan(copy.deepcopy(model).train(), _clips(1))


def test_a_bf16_model_is_calibrated_and_quantised_from_an_fp32_copy():
    model = _trained_looking(FrameClassifier(**ARCHS[0]), seed=2)
    x = _clips(1, seed=9)[0]
    plan = Int8FramePlan(copy.deepcopy(model).to(torch.bfloat16), _clips(3))
    with torch.inference_mode():
        assert _sqnr_db(plan(x), model(x)) > 20


def test_the_torch_backend_serves_the_frame_classifier_in_int8():
    spec = registry.get("frame_classifier")
    model = _trained_looking(spec.build(seed=0), seed=3)
    recipe = CalibrationRecipe(count=4, reduce_range=False)
    backend = create_backend(spec, ComponentChoice(precision=Precision.INT8, calibration=recipe),
                             module=copy.deepcopy(model))
    x = _clips(1)[0]
    with torch.inference_mode():
        ref = model(x)
    got = backend(frames=x)["logits"]
    assert got.shape == ref.shape and _sqnr_db(got, ref) > 15  # calibrated on the recipe's uniform noise
    with pytest.raises(InputError):
        backend(frames=torch.rand(1, 3, 4, 64))
    with pytest.raises(BackendUnavailable, match="only for the frame classifier"):
        create_backend(registry.get("vae_encoder"), ComponentChoice(precision=Precision.INT8),
                       module=registry.get("vae_encoder").build(seed=0))
    with pytest.raises(ConfigError, match="uncompiled"):
        create_backend(spec, ComponentChoice(precision=Precision.INT8, compile=True), module=copy.deepcopy(model))


def test_the_shipped_gate_in_int8_labels_test_frames_as_fp32_does():
    """Served by the torch backend in int8, calibrated on the mini-world's training clips (the
    "miniworld" source), the shipped gate's labels agree with fp32's on test clips (measured on
    100 test clips x clean / PGD all frames / PGD 2 frames: 33 of 4800 labels differed)."""
    from vpure.runtime import presets
    from vpure.runtime.miniworld.dataset import make_clip
    from vpure.runtime.miniworld.models import load_world

    gate = load_world(None).frame_classifier
    choice = ComponentChoice(precision=Precision.INT8, calibration=CalibrationRecipe(source="miniworld", count=8))
    backend = create_backend(presets.component_spec("mini", "frame_classifier"), choice, module=copy.deepcopy(gate))
    agree = total = 0
    for i in range(6):
        x = make_clip("test", i).clip[None]
        with torch.inference_mode():
            agree += int((backend(frames=x)["logits"].argmax(-1) == gate(x).argmax(-1)).sum())
        total += x.shape[2]
    assert agree / total >= 0.95, f"{agree}/{total}"
