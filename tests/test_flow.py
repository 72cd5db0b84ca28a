"""RAFT (princeton-vl layout) and DIS flow: layouts, round trips, consistency, real-content accuracy."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vpure.runtime import registry
from vpure.runtime.errors import CheckpointError, InputError
from vpure.runtime.flow import DISFlow
from vpure.runtime.models.raft import RAFT, RAFTFlow, load_raft

from helpers import assert_close


def test_raft_large_and_small_layouts():
    large = {k: tuple(v.shape) for k, v in RAFT(small=False).state_dict().items()}
    assert large["fnet.conv1.weight"] == (64, 3, 7, 7) and large["fnet.conv2.weight"] == (256, 128, 1, 1)
    assert large["cnet.conv2.weight"] == (256, 128, 1, 1) and "cnet.norm1.running_mean" in large
    assert not any(k.startswith("fnet.norm") or ".norm1." in k and k.startswith("fnet") for k in large)
    assert large["cnet.layer2.0.downsample.1.weight"] == large["cnet.layer2.0.norm3.weight"]
    assert large["update_block.encoder.convc1.weight"] == (256, 324, 1, 1)  # 4 levels x 9x9
    assert large["update_block.gru.convz1.weight"] == (128, 384, 1, 5)
    assert large["update_block.mask.2.weight"] == (576, 256, 1, 1)
    small = {k: tuple(v.shape) for k, v in RAFT(small=True).state_dict().items()}
    assert small["fnet.conv1.weight"] == (32, 3, 7, 7) and small["cnet.conv2.weight"] == (160, 96, 1, 1)
    assert small["update_block.encoder.convc1.weight"] == (96, 196, 1, 1)  # 4 levels x 7x7
    assert small["update_block.gru.convz.weight"] == (96, 242, 3, 3)
    assert not any(k.startswith("update_block.mask") for k in small)


@pytest.mark.parametrize("small", [True, False], ids=["small", "large"])
def test_stride_4_variant_halves_the_grid_and_keeps_the_layout(small):
    torch.manual_seed(0)
    fine, coarse = RAFT(small=small, iters=2, corr_levels=3, stride=4).eval(), RAFT(small=small, iters=2, corr_levels=3)
    shapes = {k: tuple(v.shape) for k, v in fine.state_dict().items()}
    if small:  # same weights, one stride-2 conv per encoder becomes stride 1
        assert shapes == {k: tuple(v.shape) for k, v in coarse.state_dict().items()}
    else:  # the convex head predicts 4x4 (not 8x8) weights per cell
        assert shapes["update_block.mask.2.weight"] == (16 * 9, 256, 1, 1)
    assert fine.min_size == 32 and coarse.min_size == 64
    a, b = torch.rand(1, 3, 32, 48), torch.rand(1, 3, 32, 48)
    with torch.inference_mode():
        assert fine.fnet(a).shape[-2:] == (8, 12)
        assert fine(a, b).shape == (1, 2, 32, 48)
        # Upsampling a constant flow (bilinear, or a convex combination) keeps it constant, x stride
        # (convex: away from the border cells, whose 3x3 neighbourhoods are zero-padded as published).
        mask = None if small else torch.randn(1, 16 * 9, 8, 12)
        up = fine._upsample(torch.full((1, 2, 8, 12), 0.75), mask)[..., 4:-4, 4:-4]
        assert_close(up, torch.full_like(up, 3.0), atol=1e-5, name="upsampled constant")
    with pytest.raises(InputError, match="multiples of 4"):
        fine(a[..., :30, :], b[..., :30, :])
    flows = RAFTFlow(fine)(torch.rand(1, 3, 3, 34, 45))  # padded to 36x48, cropped back
    assert flows.shape == (1, 2, 2, 34, 45) and torch.isfinite(flows).all()
    with pytest.raises(ValueError, match="stride must be 4 or 8"):
        RAFT(stride=2)


@pytest.mark.parametrize("small", [True, False], ids=["small", "large"])
def test_princeton_checkpoints_load_with_identical_outputs(tmp_path, small):
    torch.manual_seed(0)
    model = RAFT(small=small, iters=3).eval()
    torch.save({f"module.{k}": v for k, v in model.state_dict().items()}, tmp_path / "raft.pth")
    loaded = load_raft(tmp_path / "raft.pth", iters=3)
    assert loaded.small == small
    a, b = torch.rand(1, 3, 128, 128), torch.rand(1, 3, 128, 128)
    with torch.inference_mode():
        out = model(a, b)
        assert torch.isfinite(out).all() and torch.equal(loaded(a, b), out)
        with pytest.raises(InputError, match=">= 128"):
            model(a[..., :64, :64], b[..., :64, :64])


def test_wrong_checkpoint_fails_clearly(tmp_path):
    torch.save({"conv.weight": torch.zeros(1)}, tmp_path / "x.pth")
    with pytest.raises(CheckpointError, match="not a RAFT checkpoint"):
        load_raft(tmp_path / "x.pth")
    sd = RAFT(small=True).state_dict()
    sd.pop("update_block.flow_head.conv2.bias")
    torch.save(sd, tmp_path / "y.pth")
    with pytest.raises(CheckpointError, match="missing keys.*flow_head.conv2.bias"):
        load_raft(tmp_path / "y.pth")


def test_pairs_batched_like_alone_and_clip_provider():
    model = registry.get("raft").build(seed=0)
    clip = torch.rand(2, 3, 4, 130, 70, generator=torch.Generator().manual_seed(1))  # padded for RAFT
    flows = RAFTFlow(model, pairs_per_call=2)(clip)
    assert flows.shape == (2, 3, 2, 130, 70) and torch.isfinite(flows).all()
    again = RAFTFlow(model, pairs_per_call=5)(clip)
    assert_close(again, flows, atol=1e-4, name="chunking")
    assert torch.equal(RAFTFlow(model, pairs_per_call=2)(clip), flows)
    with pytest.raises(InputError, match="T>=2"):
        RAFTFlow(model)(clip[:, :, :1])


def test_input_range_option_changes_the_input():
    torch.manual_seed(0)
    unit, native = RAFT(small=True, iters=2, input_range="unit").eval(), RAFT(small=True, iters=2, input_range="native")
    native.load_state_dict(unit.state_dict())
    a, b = torch.rand(1, 3, 128, 128), torch.rand(1, 3, 128, 128)
    with torch.inference_mode():
        assert not torch.equal(unit(a, b), native.eval()(a, b))
    with pytest.raises(ValueError, match="input_range"):
        RAFT(input_range="0-255")


def test_dis_recovers_known_subpixel_motion_of_a_real_frame(data_dir):
    cv2 = pytest.importorskip("cv2")
    img = cv2.cvtColor(cv2.imread(str(data_dir / "rubberwhale1.png")), cv2.COLOR_BGR2RGB)[:256, :320]
    dx, dy = 1.5, -0.75  # content moves by (dx, dy): frame1(x) = frame0(x - d)
    ys, xs = np.mgrid[0:img.shape[0], 0:img.shape[1]].astype(np.float32)
    moved = cv2.remap(img, xs - dx, ys - dy, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
    clip = torch.from_numpy(np.stack([img, moved])).permute(3, 0, 1, 2)[None].float() / 255
    flow = DISFlow("medium")(clip)[0, 0]  # (2, H, W)
    inner = flow[:, 16:-16, 16:-16]
    epe = torch.sqrt((inner[0] - dx) ** 2 + (inner[1] - dy) ** 2)
    assert epe.median().item() < 0.15 and epe.mean().item() < 0.35, (epe.median().item(), epe.mean().item())


@pytest.mark.parametrize("small", [True, False], ids=["small", "large"])
def test_torchvision_state_dicts_load(tmp_path, small):
    """torchvision names, written here from its module structure, load with identical outputs."""
    import re

    torch.manual_seed(1)
    model = RAFT(small=small, iters=2).eval()
    tv = {}
    for k, v in model.state_dict().items():
        if re.search(r"\.norm[34]\.", k) and ".downsample." not in k and re.search(r"layer\d\.0\.norm[34]", k):
            continue  # the aliased downsample norm exists once in torchvision
        k2 = re.sub(r"^fnet\.", "feature_encoder.", k)
        k2 = re.sub(r"^cnet\.", "context_encoder.", k2)
        k2 = re.sub(r"_encoder\.conv1\.", "_encoder.convnormrelu.0.", k2)
        k2 = re.sub(r"_encoder\.norm1\.", "_encoder.convnormrelu.1.", k2)
        k2 = re.sub(r"\.conv(\d)\.(weight|bias)$", r".convnormrelu\1.0.\2", k2) if ".layer" in k2 else k2
        k2 = re.sub(r"\.norm(\d)\.", r".convnormrelu\1.1.", k2) if ".layer" in k2 else k2
        k2 = re.sub(r"_encoder\.conv2\.", "_encoder.conv.", k2)
        k2 = k2.replace("update_block.encoder.convc", "update_block.motion_encoder.convcorr")
        k2 = k2.replace("update_block.encoder.convf", "update_block.motion_encoder.convflow")
        k2 = re.sub(r"motion_encoder\.(convcorr\d|convflow\d)\.", r"motion_encoder.\1.0.", k2)
        k2 = k2.replace("update_block.encoder.conv.", "update_block.motion_encoder.conv.0.")
        k2 = re.sub(r"update_block\.gru\.conv([zrq])(\d)\.", r"update_block.recurrent_block.convgru\2.conv\1.", k2)
        k2 = re.sub(r"update_block\.gru\.conv([zrq])\.", r"update_block.recurrent_block.convgru1.conv\1.", k2)
        k2 = k2.replace("update_block.mask.0.", "mask_predictor.convrelu.0.").replace("update_block.mask.2.", "mask_predictor.conv.")
        tv[k2] = v
    assert "feature_encoder.layer2.0.convnormrelu1.0.weight" in tv
    torch.save(tv, tmp_path / "tv.pth")
    loaded = load_raft(tmp_path / "tv.pth", iters=2)
    a, b = torch.rand(1, 3, 128, 128), torch.rand(1, 3, 128, 128)
    with torch.inference_mode():
        assert torch.equal(loaded(a, b), model(a, b))


def test_raft_exports_to_onnx_with_fixed_iterations():
    import io

    ort = pytest.importorskip("onnxruntime")
    spec = registry.get("raft")
    model, inputs = spec.build(seed=0), spec.sample_inputs(seed=0)
    buf = io.BytesIO()
    torch.onnx.export(model, tuple(inputs.values()), buf, input_names=list(spec.input_names),
                      output_names=list(spec.output_names), opset_version=spec.opset, dynamo=False)
    sess = ort.InferenceSession(buf.getvalue(), providers=["CPUExecutionProvider"])
    (out,) = sess.run(None, {k: v.numpy() for k, v in inputs.items()})
    with torch.inference_mode():
        assert_close(torch.from_numpy(out), model(*inputs.values()), atol=spec.tolerance.fp32_atol, name="raft onnx")


def test_raft_flow_pads_centred_like_rafts_input_padder():
    """RAFT's demo and VideoPure's released code pad by replication, centred (InputPadder,
    sintel mode); bottom-right padding shifts the flow field by about half a pixel."""
    import torch.nn.functional as F

    from vpure.runtime.models.raft import RAFTFlow, raft_small

    torch.manual_seed(0)
    model = raft_small(iters=3).eval()
    frames = torch.rand(1, 3, 3, 131, 157)
    h, w = frames.shape[-2:]
    pad_h, pad_w = (((h // 8) + 1) * 8 - h) % 8, (((w // 8) + 1) * 8 - w) % 8  # InputPadder's arithmetic
    pad = [pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2]
    with torch.inference_mode():
        want = []
        for i in range(2):
            a, b = (F.pad(frames[:, :, j], pad, mode="replicate") for j in (i, i + 1))
            flow = model(a, b)
            want.append(flow[..., pad[2]:pad[2] + h, pad[0]:pad[0] + w])
        got = RAFTFlow(model)(frames)
    assert_close(got[0], torch.cat(want), atol=1e-4, rtol=1e-4, name="flow")  # pairs batched vs one by one
