"""Recognisers: layouts that real checkpoints use, round trips, clear errors, batch invariance."""

from __future__ import annotations

import pytest
import torch

from vpure.runtime import registry
from vpure.runtime.errors import CheckpointError
from vpure.runtime.models.i3d import i3d_nl5_resnet50, i3d_resnet50, load_i3d
from helpers import assert_close


def test_i3d_nl5_r50_has_the_gluoncv_layout():
    sd = i3d_nl5_resnet50(400).state_dict()
    shapes = {k: tuple(v.shape) for k, v in sd.items()}
    assert shapes["first_stage.0.weight"] == (64, 3, 5, 7, 7)
    assert shapes["res_layers.0.0.conv1.weight"] == (64, 64, 3, 1, 1)  # inflated 3x1x1
    assert shapes["res_layers.1.1.conv1.weight"] == (128, 512, 1, 1, 1)  # pattern (1, 0, 1, 0)
    assert shapes["res_layers.3.0.conv1.weight"] == (512, 1024, 1, 1, 1)  # pattern (0, 1, 0)
    assert shapes["res_layers.3.1.conv1.weight"] == (512, 2048, 3, 1, 1)
    assert shapes["res_layers.1.0.downsample.0.weight"] == (512, 256, 1, 1, 1)
    nl = sorted({k.split(".nonlocal_block")[0] for k in sd if ".nonlocal_block." in k})
    assert nl == ["res_layers.1.1", "res_layers.1.3", "res_layers.2.1", "res_layers.2.3", "res_layers.2.5"]
    for alias in ("res_layers.2.5.nonlocal_block.W_bn.0.weight", "res_layers.2.5.nonlocal_block.W_bn.1.running_var",
                  "head.1.weight", "fc.weight"):
        assert alias in sd, alias
    assert shapes["fc.weight"] == (400, 2048)
    assert "mean" not in sd and "std" not in sd  # normalisation constants are not checkpoint keys


@pytest.mark.parametrize("builder", [i3d_nl5_resnet50, i3d_resnet50], ids=["nl5", "plain"])
def test_gluoncv_state_dicts_load_with_identical_outputs(tmp_path, builder):
    torch.manual_seed(0)
    model = builder(7).eval()
    torch.save({f"module.{k}": v for k, v in model.state_dict().items()}, tmp_path / "gluoncv.pth")
    loaded = load_i3d(tmp_path / "gluoncv.pth")
    x = torch.rand(1, 3, 8, 64, 64)
    with torch.inference_mode():
        assert torch.equal(loaded(x), model(x))
    assert sum(".nonlocal_block." in k for k in loaded.state_dict()) == sum(".nonlocal_block." in k for k in model.state_dict())


def test_wrong_checkpoints_fail_clearly(tmp_path):
    sd = i3d_nl5_resnet50(5).state_dict()
    sd["res_layers.0.0.conv2.weight"] = torch.zeros(1)
    torch.save(sd, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError, match="shape mismatches.*res_layers.0.0.conv2.weight"):
        load_i3d(tmp_path / "bad.pth")
    torch.save({"conv.weight": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(CheckpointError, match="not an I3D-ResNet"):
        load_i3d(tmp_path / "other.pth")


def test_unreadable_or_foreign_files_fail_clearly_for_every_loader(tmp_path):
    from safetensors.torch import save_file

    from vpure.runtime.models.comdefend import load_comdefend
    from vpure.runtime.models.frame_classifier import load_frame_classifier, tiny_frame_classifier
    from vpure.runtime.models.slowfast import load_slowfast

    (tmp_path / "empty.pth").write_bytes(b"")
    torch.save({"foo": torch.zeros(3)}, tmp_path / "foreign.pth")
    sd = {k: v.contiguous() for k, v in tiny_frame_classifier().state_dict().items()}
    save_file(sd, tmp_path / "tampered.safetensors", metadata={"vpure_config": '{"num_classes": 5, "wings": 2}'})
    save_file(sd, tmp_path / "garbled.safetensors", metadata={"vpure_config": "{not json"})
    loaders = (load_i3d, load_slowfast, load_comdefend, load_frame_classifier)
    for load in loaders:
        for name, needle in (("empty.pth", "is empty"), (".", "is a folder"), ("garbled.safetensors", "not JSON")):
            with pytest.raises(CheckpointError, match=needle):
                load(tmp_path / name)
        with pytest.raises(CheckpointError):  # another model's keys: named as not this model
            load(tmp_path / "foreign.pth")
    with pytest.raises(CheckpointError, match="not a frame-classifier checkpoint"):
        load_frame_classifier(tmp_path / "foreign.pth")
    with pytest.raises(CheckpointError, match="does not build a FrameClassifier.*wings"):
        load_frame_classifier(tmp_path / "tampered.safetensors")


def test_batch_invariance_and_determinism():
    spec = registry.get("i3d_nl5_r50")
    m = spec.build(seed=0)
    a = torch.rand(1, 3, 8, 64, 64, generator=torch.Generator().manual_seed(1))
    b = torch.rand(1, 3, 8, 64, 64, generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        alone, batch = m(a), m(torch.cat([a, b]))
        assert_close(alone[0], batch[0], atol=1e-5, rtol=1e-5)
        assert torch.equal(m(a), alone)


def test_videomae_folder_round_trip(tmp_path):
    import json

    from vpure.runtime.models.videomae import load_videomae, tiny_videomae

    torch.manual_seed(0)
    rec = tiny_videomae().eval()
    rec.model.save_pretrained(tmp_path / "vmae")
    (tmp_path / "vmae" / "preprocessor_config.json").write_text(json.dumps({"image_mean": [0.5, 0.5, 0.5],
                                                                             "image_std": [0.5, 0.5, 0.5]}))
    loaded = registry.get("videomae").load(tmp_path / "vmae")
    x = torch.rand(2, 3, 4, 32, 32)
    with torch.inference_mode():
        out = loaded(x)
        assert out.shape == (2, 5)
        assert_close(loaded.mean.flatten(), torch.full((3,), 0.5), atol=1e-8, rtol=1e-5)
        rec.mean.fill_(0.5)
        rec.std.fill_(0.5)
        assert_close(out, rec(x), atol=1e-6, rtol=1e-5)
        assert_close(loaded(x[:1])[0], out[0], atol=1e-5, rtol=1e-5)  # batch invariance
    with pytest.raises(CheckpointError, match="not a VideoMAE folder"):
        load_videomae(tmp_path / "nowhere")
    from vpure.runtime.errors import InputError

    for shape in ((1, 3, 8, 32, 32), (1, 3, 4, 64, 64)):  # other T or size: named, not a broadcast error
        with pytest.raises(InputError, match="exactly 4 frames at 32x32"), torch.inference_mode():
            loaded(torch.rand(shape))


def test_slowfast_r50_layout_and_checkpoints(tmp_path):
    from vpure.runtime.errors import InputError
    from vpure.runtime.models.slowfast import SlowFast, load_slowfast, slowfast_r50

    big = slowfast_r50(400)
    sd = {k: tuple(v.shape) for k, v in big.state_dict().items()}
    assert sum(p.numel() for p in big.parameters()) == 34_566_488  # pytorchvideo's SlowFast-R50 8x8
    assert sd["blocks.0.multipathway_blocks.1.conv.weight"] == (8, 3, 5, 7, 7)
    assert sd["blocks.0.multipathway_fusion.conv_fast_to_slow.weight"] == (16, 8, 7, 1, 1)
    assert sd["blocks.1.multipathway_blocks.0.res_blocks.0.branch1_conv.weight"] == (256, 80, 1, 1, 1)
    assert sd["blocks.3.multipathway_blocks.0.res_blocks.0.branch2.conv_a.weight"] == (256, 640, 3, 1, 1)
    assert sd["blocks.6.proj.weight"] == (400, 2304)
    assert not any(k.startswith("blocks.4.multipathway_fusion") for k in sd)  # no fusion after the last stage

    torch.manual_seed(0)
    small = SlowFast(num_classes=6, depths=(1, 2, 1, 1), stem_width=16).eval()
    torch.save({"model_state": small.state_dict()}, tmp_path / "sf.pyth")
    loaded = load_slowfast(tmp_path / "sf.pyth")
    x = torch.rand(1, 3, 8, 64, 64)
    with torch.inference_mode():
        assert torch.equal(loaded(x), small(x))
        with pytest.raises(InputError, match="multiple of alpha"):
            small(x[:, :, :6])
    torch.save({"x": torch.zeros(1)}, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError, match="not a pytorchvideo SlowFast"):
        load_slowfast(tmp_path / "bad.pth")


def test_deflated_i3d_frame_classifier_is_exact_on_static_frames():
    from vpure.runtime.models.deflate import DeflatedI3DFrameClassifier, _conv2d_from_3d

    torch.manual_seed(0)
    conv3 = torch.nn.Conv3d(4, 6, (3, 3, 3), padding=(1, 1, 1))
    frame = torch.rand(1, 4, 1, 10, 12)
    static = frame.expand(1, 4, 7, 10, 12)
    with torch.inference_mode():
        # away from the temporal borders, a 3D conv over a static clip is the summed 2D conv
        assert_close(conv3(static)[:, :, 3], _conv2d_from_3d(conv3)(frame[:, :, 0]), atol=1e-5, rtol=1e-5)
    i3d = registry.get("i3d_nl5_r50").build(seed=0)
    fc = DeflatedI3DFrameClassifier(i3d)
    with torch.inference_mode():
        out = fc(torch.rand(2, 3, 5, 64, 64))
    assert out.shape == (2, 5, i3d.fc.out_features)
    from vpure.runtime.detect import Detector

    assert len(Detector(fc)(torch.rand(1, 3, 6, 64, 64)).route) == 1


def test_basic_block_i3d_inflates_a_2d_resnet_and_deflates_back_exactly(tmp_path):
    from vpure.runtime.models.deflate import DeflatedI3DFrameClassifier
    from vpure.runtime.models.frame_classifier import FrameClassifier
    from vpure.runtime.models.i3d import I3DResNet, inflate_from_2d

    torch.manual_seed(0)
    fc = FrameClassifier(5, widths=(8, 16), depths=(1, 2), stem_width=8, stem_pool=False).eval()
    for m in fc.modules():  # non-trivial batch-norm statistics
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2), m.running_var.uniform_(0.5, 1.5)
    i3d = I3DResNet(5, block="basic", blocks=(1, 2), inflate=((1,), (1, 0)), nonlocal_=((0,), (1, 0)),
                    base_width=8, stem_pool=False)
    inflate_from_2d(i3d, fc).eval()
    assert i3d.res_layers[1][0].conv1.weight.shape[2:] == (3, 3, 3)
    x = torch.rand(2, 3, 4, 32, 32)
    with torch.inference_mode():
        # kernels repeated over time / taps: summed back over time they are the 2D kernels
        assert_close(DeflatedI3DFrameClassifier(i3d)(x), fc(x), atol=1e-5, rtol=1e-5)
        # a static clip, away from the temporal borders, sees the 2D stem
        static = x[:, :, :1].expand(2, 3, 9, 32, 32)
        stem2d = fc.bn1(fc.conv1(x[:, :, 0]))
        assert_close(i3d.first_stage[1](i3d.first_stage[0](static))[:, :, 2], stem2d, atol=1e-5, rtol=1e-5)
        # the non-local block starts as the identity (zero-init batch-norm scale)
        nl = i3d.res_layers[1][0].nonlocal_block
        feat = torch.rand(1, 16, 2, 4, 4)
        assert torch.equal(nl(feat), feat)
    torch.save(i3d.state_dict(), tmp_path / "basic.pth")  # layout read back from the keys
    loaded = load_i3d(tmp_path / "basic.pth", stem_pool=False)  # the one thing keys cannot tell
    assert loaded.block == "basic"
    with torch.inference_mode():
        assert torch.equal(loaded(x), i3d(x))
    centre = inflate_from_2d(I3DResNet(5, block="basic", blocks=(1, 2), inflate=((1,), (1, 0)),
                                       nonlocal_=((0,), (1, 0)), base_width=8, stem_pool=False), fc, "centre").eval()
    with torch.inference_mode():
        assert_close(DeflatedI3DFrameClassifier(centre)(x), fc(x), atol=1e-5, rtol=1e-5)
        # centre taps: every (strided) time step is the 2D stem on its own frame, borders included
        moving = torch.rand(2, 3, 6, 32, 32)
        got = centre.first_stage[0](moving)  # temporal stride 2: frames 0, 2, 4
        for k in range(3):
            assert_close(got[:, :, k], fc.conv1(moving[:, :, 2 * k]), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="mean or centre"):
        inflate_from_2d(i3d, fc, "edge")
    with pytest.raises(ValueError, match="stages do not match"):
        inflate_from_2d(I3DResNet(5, block="basic", blocks=(1, 1), inflate=((1,), (1,)), nonlocal_=None,
                                  base_width=8), fc)


@pytest.mark.parametrize("name", ["slowfast_r50", "videomae", "i3d_nl5_r50"])
def test_recognizer_batch_invariance(name):
    spec = registry.get(name)
    m = spec.build(seed=0)
    x = spec.sample_inputs(dims={"B": 2}, seed=3)["frames"]
    with torch.inference_mode():
        both = m(x)
        assert_close(m(x[:1])[0], both[0], atol=1e-5, rtol=1e-5)
        assert_close(m(x[1:])[0], both[1], atol=1e-5, rtol=1e-5)


def test_blocked_conv3d_runs_batch_1_clips_through_onednn_with_the_same_outputs_and_gradients(monkeypatch, tmp_path):
    """PyTorch sends small batch-1 3-D convolutions to slow_conv3d on CPU; BlockedConv3d
    sends them to oneDNN, computing the same function, and steps aside for ONNX export."""
    import copy

    from vpure.runtime.models.conv import BlockedConv3d, restore_conv3d, use_blocked_conv3d
    from vpure.runtime.models.i3d import I3DResNet

    torch.manual_seed(0)
    plain = I3DResNet(5, block="basic", blocks=(1, 1), inflate=((1,), (1,)), nonlocal_=((0,), (1,)),
                      base_width=8, stem_pool=False).eval()
    x = torch.rand(1, 3, 8, 32, 32)
    c = plain.res_layers[0][0].conv1
    hit = torch._C._select_conv_backend(torch.rand(1, 8, 4, 16, 16), c.weight, c.bias, c.stride, c.padding,
                                        c.dilation, False, (0, 0, 0), c.groups, None)
    assert str(hit).endswith("Slow3d")  # what the blocked layers avoid
    blocked = copy.deepcopy(plain)
    n = use_blocked_conv3d(blocked)
    assert n == sum(isinstance(m, torch.nn.Conv3d) for m in plain.modules()) and n > 5
    assert all(isinstance(m, torch.nn.Conv3d) for m in blocked.modules() if isinstance(m, BlockedConv3d))
    assert blocked.state_dict().keys() == plain.state_dict().keys()
    calls = {"n": 0}
    real = torch.mkldnn_convolution

    def counting(*a):
        calls["n"] += 1
        return real(*a)

    monkeypatch.setattr(torch, "mkldnn_convolution", counting)
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    ya, yb = plain(xa), blocked(xb)
    assert calls["n"] == n
    assert_close(ya, yb, atol=1e-5, rtol=1e-5)
    ya.square().sum().backward(), yb.square().sum().backward()
    assert_close(xa.grad, xb.grad, atol=1e-6, rtol=1e-4)
    # ONNX export traces nn.Conv3d's own path: a standard Conv node, no oneDNN call
    calls["n"] = 0
    torch.onnx.export(blocked, (x,), str(tmp_path / "b.onnx"), opset_version=17, dynamo=False)
    assert calls["n"] == 0
    assert restore_conv3d(blocked) == n and not any(isinstance(m, BlockedConv3d) for m in blocked.modules())


@pytest.mark.parametrize("size", [64, 256])
def test_slowfast_head_pools_as_pytorchvideo_at_any_size(size):
    """pytorchvideo: AvgPool3d((8, 7, 7)) / ((32, 7, 7)) at stride 1 per pathway, the
    projection at every position, then the average. At 256 px the last map is 8x8, where a
    global average differs; at 64 px the kernels exceed the map (clipped: the global mean)."""
    from vpure.runtime.models.fused import use_fused_inference
    from vpure.runtime.models.slowfast import tiny_slowfast

    torch.manual_seed(0)
    model = tiny_slowfast().eval()
    x = torch.rand(1, 3, 32, size, size)
    with torch.inference_mode():
        slow, fast = model.pathways(x)
        for block in model.blocks[:-2]:
            slow, fast = block(slow, fast)
        pools = []
        for feat, (kt, kh, kw) in ((slow, (8, 7, 7)), (fast, (32, 7, 7))):
            k = (min(kt, feat.shape[2]), min(kh, feat.shape[3]), min(kw, feat.shape[4]))
            pools.append(torch.nn.AvgPool3d(k, stride=1)(feat))
        pooled = torch.cat(pools, dim=1)  # (B, C, t, h, w) positions
        proj = model.blocks[-1].proj
        want = proj(pooled.permute(0, 2, 3, 4, 1)).mean(dim=(1, 2, 3))  # project each position, then average
        if size == 256:
            assert pooled.shape[-2:] == (2, 2)  # four windows: not the global average
        assert_close(model(x), want, atol=1e-5, rtol=1e-5, name="eager")
        use_fused_inference(model)
        assert_close(model(x), want, atol=1e-4, rtol=1e-4, name="fused plan")
