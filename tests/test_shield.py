"""Shield routing with a frame classifier whose per-frame outputs are set by its weights."""

from __future__ import annotations

import pytest
import torch

from vpure.lab.attacks import pgd, sparse_frames
from vpure.runtime.purifier import VideoPure
from vpure.runtime.errors import ConfigError, InputError
from vpure.runtime.flow import DISFlow
from vpure.runtime.models.comdefend import ComDefend, tiny_comdefend
from vpure.runtime.shield import Shield, ShieldConfig

from tinyworld import tiny_world


class BrightnessClassifier(torch.nn.Module):
    """Per-frame 2-class linear classifier on mean brightness: class 1 iff mean > 0.5.

    A real (linear) model whose decisions are fixed by its weights, so tests control
    per-frame labels through the frames' brightness.
    """

    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(1, 2)
        with torch.no_grad():
            self.fc.weight.copy_(torch.tensor([[-10.0], [10.0]]))
            self.fc.bias.copy_(torch.tensor([5.0, -5.0]))

    def forward(self, clip):  # (B, 3, T, H, W) -> (B, T, 2)
        return self.fc(clip.mean(dim=(1, 3, 4)).unsqueeze(-1))


def _clip(bright_frames, t=8, size=64):
    clip = torch.full((1, 3, t, size, size), 0.3)
    clip[:, :, bright_frames] = 0.7
    return clip


@pytest.fixture(scope="module")
def shield():
    tiny = tiny_world(seed=2)
    vp = VideoPure(tiny.eps_fn, tiny.encoder, tiny.decoder, tiny.recognizer, DISFlow("ultrafast"))
    return Shield(BrightnessClassifier(), tiny.recognizer, videopure=vp, comdefend=tiny_comdefend().eval())


def test_routes(shield):
    # labels 00000000 / 00100100 / 01001010: alpha 0, 2/8 and 4/8 (frame 5 sits between two brights)
    clean, sparse, dense = _clip([]), _clip([2, 5]), _clip([1, 4, 6])
    recs = shield(torch.cat([clean, sparse, dense]))
    assert [r.route for r in recs] == ["clean", "sparse", "dense"]
    assert [r.alpha for r in recs] == [0.0, 0.25, 0.5]
    assert recs[1].exception_frames == [2, 5] and recs[2].exception_frames == [1, 4, 5, 6]
    assert recs[0].votes is None and recs[1].votes is None and len(recs[2].votes) == 7
    assert "temporal_defence" in recs[1].timings_ms and "videopure.unet" in recs[2].timings_ms
    assert set(recs[0].timings_ms) == {"detect", "recognize"}  # clean clips never touch the purifier
    assert recs[0].to_dict()["route"] == "clean"


def test_comdefend_dense_route_and_config(shield):
    tiny = tiny_world(seed=2)
    s = Shield(BrightnessClassifier(), tiny.recognizer, comdefend=tiny_comdefend().eval(),
               config=ShieldConfig(dense="comdefend"))
    (rec,) = s(_clip([1, 3, 5]))
    assert rec.route == "dense" and "comdefend" in rec.timings_ms and rec.votes is None
    with pytest.raises(ConfigError, match="no such defence"):
        Shield(BrightnessClassifier(), tiny.recognizer)
    cfg = ShieldConfig.from_toml(ShieldConfig(dense="comdefend").to_toml())
    assert cfg.dense == "comdefend" and cfg.detection.gamma1 == 0.175


@pytest.mark.parametrize("clip, needle", [
    (torch.rand(1, 3, 0, 64, 64), "empty"), (torch.rand(2, 3, 64, 64), "(B, 3, T, H, W)"),
    (torch.full((1, 3, 4, 64, 64), float("nan")), "NaN"),
])
def test_bad_clips(shield, clip, needle):
    with pytest.raises(InputError) as e:
        shield(clip)
    assert needle in str(e.value)


def test_clips_of_any_float_dtype_give_the_float32_records(shield):
    clip = torch.cat([_clip([]), _clip([2, 5]), _clip([1, 4, 6])])
    want = [(r.route, r.alpha, r.label, r.votes) for r in shield(clip)]
    for dtype in (torch.float64, torch.float16, torch.bfloat16):
        got = [(r.route, r.alpha, r.label, r.votes) for r in shield(clip.to(dtype))]
        assert got == want, dtype
    # A clip that requires grad (an attack's working copy) is read without autograd warnings.
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert [r.route for r in shield(clip[:1].clone().requires_grad_())] == ["clean"]


def test_pgd_sparse_and_dense_respect_the_ball():
    tiny = tiny_world(seed=3)
    clip = torch.rand(1, 3, 8, 64, 64, generator=torch.Generator().manual_seed(0))
    label = tiny.recognizer(clip).argmax(-1)
    frames = sparse_frames(8, 2, seed=1)
    adv = pgd(tiny.recognizer, clip, label, eps=8 / 255, iters=3, frames=frames, seed=0)
    d = (adv - clip).abs()
    assert float(d.max()) <= 8 / 255 + 1e-6 and float(adv.min()) >= 0 and float(adv.max()) <= 1
    untouched = [i for i in range(8) if i not in frames]
    assert float(d[:, :, untouched].max()) == 0.0 and float(d[:, :, frames].max()) > 0
    again = pgd(tiny.recognizer, clip, label, eps=8 / 255, iters=3, frames=frames, seed=0)
    assert torch.equal(adv, again)
    loss = torch.nn.functional.cross_entropy
    dense = pgd(tiny.recognizer, clip, label, eps=8 / 255, iters=5, seed=0)
    assert loss(tiny.recognizer(dense), label) > loss(tiny.recognizer(clip), label)
    per_frame = pgd(BrightnessClassifier(), clip, torch.tensor([0]), eps=4 / 255, iters=2, frames=[3])
    assert per_frame.shape == clip.shape
    with pytest.raises(InputError, match="non-adjacent"):
        sparse_frames(4, 3)


def test_comdefend_trains_and_round_trips(tmp_path, data_dir):
    from tinyworld import real_clip

    from vpure.runtime import registry
    from vpure.runtime.checkpoint import save_safetensors
    from vpure.runtime.errors import CheckpointError
    from vpure.runtime.models.comdefend import comdefend_config, train_comdefend

    frames = real_clip(data_dir, frames=8, size=32)[0].permute(1, 0, 2, 3)  # (T, 3, H, W)
    model = ComDefend(com_widths=(8, 16), rec_widths=(16, 8))
    losses = train_comdefend(model, frames, steps=30, lr=3e-3, seed=0, progress=False)
    assert sum(losses[-5:]) < sum(losses[:5])
    path = save_safetensors(model, tmp_path / "comdefend.safetensors", comdefend_config(model))
    loaded = registry.get("comdefend").load(path)
    x = frames[None].permute(0, 2, 1, 3, 4)
    with torch.inference_mode():
        assert torch.equal(loaded(x), model(x))
    torch.save({"state_dict": model.state_dict()}, tmp_path / "c.pth")
    with pytest.raises(CheckpointError, match="shape mismatches|missing keys"):
        registry.get("comdefend").load(tmp_path / "c.pth")  # default architecture: does not fit
    ok = registry.get("comdefend").load(tmp_path / "c.pth", com_widths=(8, 16), rec_widths=(16, 8))
    with torch.inference_mode():
        assert torch.equal(ok(x), model(x))


def test_frame_classifier_checkpoints(tmp_path):
    from vpure.runtime import registry
    from vpure.runtime.checkpoint import save_safetensors
    from vpure.runtime.errors import CheckpointError
    from vpure.runtime.models.frame_classifier import FrameClassifier, frame_classifier_config

    torch.manual_seed(0)
    model = FrameClassifier(num_classes=7, widths=(8, 16), depths=(1, 2), stem_width=8).eval()
    x = torch.rand(1, 3, 2, 32, 32)
    spec = registry.get("frame_classifier")
    path = save_safetensors(model, tmp_path / "fc.safetensors", frame_classifier_config(model))
    with torch.inference_mode():
        assert torch.equal(spec.load(path)(x), model(x))
    r18 = FrameClassifier(num_classes=10).eval()  # ImageNet-layout ResNet-18 keys, as torchvision saves them
    torch.save({f"module.{k}": v for k, v in r18.state_dict().items()}, tmp_path / "r18.pth")
    with torch.inference_mode():
        assert torch.equal(spec.load(tmp_path / "r18.pth")(x), r18(x))
    state = r18.state_dict()
    state.pop("fc.bias")
    state["extra.weight"] = torch.zeros(1)
    torch.save(state, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError) as e:
        spec.load(tmp_path / "bad.pth")
    assert "missing keys (1): fc.bias" in str(e.value) and "unexpected keys (1): extra.weight" in str(e.value)
    (tmp_path / "junk.safetensors").write_bytes(b"nope")
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        spec.load(tmp_path / "junk.safetensors")
    with pytest.raises(CheckpointError, match="does not exist"):
        spec.load(tmp_path / "missing.pth")
