"""The mini-world: deterministic data with exact flow, trainable networks, shipped weights, the demo."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
import torch.nn.functional as F

from vpure.lab import miniworld_eval as evaluate
from vpure.runtime.miniworld import models as mw
from vpure.runtime.miniworld.dataset import CLASSES, WorldConfig, make_clip, make_split
from vpure.lab.miniworld_train import BUDGETS, ORDER, train


def test_generator_is_deterministic_by_seed_and_splits_differ():
    a, b = make_clip("test", 3), make_clip("test", 3)
    assert torch.equal(a.clip, b.clip) and torch.equal(a.flow, b.flow) and a.label == b.label
    assert not torch.equal(a.clip, make_clip("train", 3).clip)
    assert not torch.equal(a.clip, make_clip("test", 3, WorldConfig(seed=1)).clip)
    clips, labels = make_split("val", 4)
    assert clips.dtype == torch.uint8 and clips.shape == (4, 3, 16, 64, 64)
    assert torch.equal(clips[2], (make_clip("val", 2).clip * 255).round().to(torch.uint8))
    assert set(labels.tolist()) <= set(range(len(CLASSES)))


def test_forced_label_and_class_balance():
    assert make_clip("train", 0, label=4).label == 4
    _, labels = make_split("train", 200)
    counts = torch.bincount(labels, minlength=len(CLASSES))
    assert counts.min() >= 25  # roughly uniform over 5 classes


def _warp(frame: torch.Tensor, flow: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """frame (3, H, W) sampled at x + flow(x): the next frame brought back to this one."""
    _, h, w = frame.shape
    ys, xs = torch.meshgrid(torch.arange(h).float(), torch.arange(w).float(), indexing="ij")
    x, y = xs + flow[0], ys + flow[1]
    grid = torch.stack([2 * x / (w - 1) - 1, 2 * y / (h - 1) - 1], dim=-1)[None]
    inside = (x >= 1) & (x <= w - 2) & (y >= 1) & (y <= h - 2)
    return F.grid_sample(frame[None], grid, align_corners=True)[0], inside


def test_ground_truth_flow_explains_the_motion():
    cfg = WorldConfig(noise_std=0.0)
    for i in range(4):
        s = make_clip("test", i, cfg)
        errs, still = [], []
        for t in range(cfg.frames - 1):
            warped, inside = _warp(s.clip[:, t + 1], s.flow[t])
            keep = inside & ~s.mask[t] & ~s.mask[t + 1]  # background seen in both frames
            errs.append((warped - s.clip[:, t]).abs().mean(0)[keep].mean())
            still.append((s.clip[:, t + 1] - s.clip[:, t]).abs().mean(0)[keep].mean())
        # the residual is bilinear resampling of the photograph (twice), not motion
        assert torch.stack(errs).mean() < 0.5 * torch.stack(still).mean()
        obj = s.flow[0][:, s.mask[0]]  # object pixels move rigidly: flow differs from the camera's
        assert obj.numel() > 0


@pytest.mark.parametrize("component", ORDER)
def test_each_trainer_runs_a_smoke_epoch(component, tmp_path_factory, monkeypatch):
    weights = tmp_path_factory.getbasetemp() / "smoke-weights"
    monkeypatch.setenv("VPURE_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))
    needs = {"unet": "vae", "recognizer": "frame_classifier"}.get(component)  # inflated from / trained on
    if needs and not mw.weights_path(needs, weights).is_file():
        train(BUDGETS[needs].replace(steps=1, batch=2, train_clips=2, eval_clips=1, warmup=1), weights_dir=weights)
    cfg = BUDGETS[component].replace(steps=2, batch=2, train_clips=3, eval_clips=2, warmup=1)
    card = train(cfg, weights_dir=weights, progress=False)
    assert card["steps"] == 2 and card["metrics"] and card["check"]["test_clips"] == evaluate.CHECK_CLIPS[component]
    module = mw.load(component, weights)
    assert mw.read_card(component, weights)["metrics"] == json.loads(json.dumps(card["metrics"]))
    before = {k: v.clone() for k, v in module.state_dict().items()}
    again = mw.load(component, weights)
    assert all(torch.equal(before[k], v) for k, v in again.state_dict().items())
    assert mw.weights_path(component, weights).with_suffix(".md").read_text().startswith(f"# mini-world {component}")


def test_training_is_reproducible_from_its_seed(tmp_path, monkeypatch):
    monkeypatch.setenv("VPURE_CACHE", str(tmp_path / "cache"))
    cfg = BUDGETS["frame_classifier"].replace(steps=3, batch=4, train_clips=3, eval_clips=2, warmup=1)
    train(cfg, weights_dir=tmp_path / "a", progress=False)
    train(cfg, weights_dir=tmp_path / "b", progress=False)
    a, b = mw.load("frame_classifier", tmp_path / "a"), mw.load("frame_classifier", tmp_path / "b")
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_training_precision_is_applied_and_recorded(tmp_path, monkeypatch):
    from vpure.runtime.errors import ConfigError
    from vpure.lab import miniworld_train as training

    monkeypatch.setenv("VPURE_CACHE", str(tmp_path / "cache"))
    seen = []
    real = training.train_comdefend

    def spy(cfg, *args):  # record whether the loss is computed under bf16 autocast
        model_cls = type(mw.build("comdefend"))
        encode = model_cls.encode

        def watched(self, x):
            seen.append((cfg.precision, torch.is_autocast_enabled("cpu")))
            return encode(self, x)

        monkeypatch.setattr(model_cls, "encode", watched)
        try:
            return real(cfg, *args)
        finally:
            monkeypatch.setattr(model_cls, "encode", encode)

    monkeypatch.setitem(training.TRAINERS, "comdefend", spy)
    cfg = BUDGETS["comdefend"].replace(steps=2, batch=2, train_clips=3, eval_clips=2, warmup=1)
    cards = {p: train(cfg.replace(precision=p), weights_dir=tmp_path / p, progress=False) for p in ("fp32", "bf16")}
    assert set(seen) >= {("fp32", False), ("bf16", True)}
    assert cards["fp32"]["precision"] == "fp32" and cards["bf16"]["precision"] == "bf16"
    assert "bf16 forward passes" in mw.weights_path("comdefend", tmp_path / "bf16").with_suffix(".md").read_text()
    a, b = (mw.load("comdefend", tmp_path / p).state_dict() for p in ("fp32", "bf16"))
    assert all(torch.isfinite(v).all() for v in b.values()) and any(not torch.equal(a[k], b[k]) for k in a)
    assert cfg.replace(precision="auto").compute_precision() == ("bf16" if training.native_bf16() else "fp32")
    with pytest.raises(ConfigError, match="precision"):
        cfg.replace(precision="fp16")


def test_resumed_training_starts_from_the_folder_and_records_the_chain(tmp_path, monkeypatch):
    monkeypatch.setenv("VPURE_CACHE", str(tmp_path / "cache"))
    cfg = BUDGETS["comdefend"].replace(steps=2, batch=2, train_clips=3, eval_clips=2, warmup=1)
    train(cfg, weights_dir=tmp_path, progress=False)
    first = mw.load("comdefend", tmp_path).state_dict()
    digest = hashlib.sha256(mw.weights_path("comdefend", tmp_path).read_bytes()).hexdigest()
    card = train(cfg.replace(resume=True, steps=1, crop=32), weights_dir=tmp_path, progress=False)
    assert card["resumed_from"]["sha256"] == digest and card["resumed_from"]["steps"] == 2 and card["crop"] == 32
    assert "resumed from weights sha256 " + digest[:16] in mw.weights_path("comdefend", tmp_path).with_suffix(".md").read_text()
    after = mw.load("comdefend", tmp_path).state_dict()
    # one small step from the first run's weights, not a fresh init
    assert any(not torch.equal(first[k], after[k]) for k in first)
    assert max((first[k].float() - after[k].float()).abs().max() for k in first) < 0.05


def test_object_masks_match_the_generator_and_weight_the_vae_loss(tmp_path, monkeypatch):
    from vpure.lab.miniworld_train import train_masks

    monkeypatch.setenv("VPURE_CACHE", str(tmp_path / "cache"))
    world = WorldConfig()
    masks = train_masks(3, world)
    assert masks.dtype == torch.bool and masks.shape == (3, world.frames, world.size, world.size)
    assert all(torch.equal(masks[i], make_clip("train", i, world).mask) for i in range(3))
    assert torch.equal(train_masks(3, world), masks)  # served from the cache
    # masked PSNR sees only object pixels: a map that ruins the background keeps it infinite
    clips, _ = make_split("train", 3, world)
    ruin_background = lambda x: torch.where(masks[:, None], x, 1 - x)  # noqa: E731
    assert evaluate.reconstruction_psnr(ruin_background, clips, batch=3, masks=masks) == float("inf")
    assert evaluate.reconstruction_psnr(ruin_background, clips, batch=3) < 10
    cfg = BUDGETS["vae"].replace(steps=2, batch=2, train_clips=3, eval_clips=2, warmup=1, object_weight=8.0, crop=32)
    card = train(cfg, weights_dir=tmp_path / "w", progress=False)
    assert card["object_weight"] == 8.0 and "vae_object_psnr_db" in card["metrics"]
    with pytest.raises(Exception, match="object_weight"):
        BUDGETS["vae"].replace(object_weight=-1.0)


def test_decoder_only_vae_run_keeps_the_latents_and_uses_the_frame_classifier(tmp_path, monkeypatch):
    monkeypatch.setenv("VPURE_CACHE", str(tmp_path / "cache"))
    small = dict(steps=2, batch=2, train_clips=3, eval_clips=2, warmup=1)
    with pytest.raises(Exception, match="frame_classifier"):  # the perceptual critic must exist
        train(BUDGETS["vae"].replace(feature_weight=0.1, **small), weights_dir=tmp_path, progress=False)
    train(BUDGETS["frame_classifier"].replace(**small), weights_dir=tmp_path, progress=False)
    train(BUDGETS["vae"].replace(**small), weights_dir=tmp_path, progress=False)
    before = mw.load("vae", tmp_path).state_dict()
    card = train(BUDGETS["vae"].replace(resume=True, freeze_encoder=True, feature_weight=0.1, object_weight=4.0,
                                        **small), weights_dir=tmp_path, progress=False)
    after = mw.load("vae", tmp_path).state_dict()
    frozen = [k for k in before if k.startswith(("encoder.", "quant_conv."))]
    assert frozen and all(torch.equal(before[k], after[k]) for k in frozen)
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("decoder."))
    assert card["freeze_encoder"] and card["feature_weight"] == 0.1
    assert card["metrics"]["scaling_factor"] == card["resumed_from"]["metrics"]["scaling_factor"]
    critic, x = mw.load("frame_classifier", tmp_path).eval(), torch.rand(2, 3, 64, 64)
    with torch.inference_mode():  # the critic's last map is the classifier's own logits
        torch.testing.assert_close(critic.feature_maps(x)[-1], critic(x[:, :, None])[:, 0])
    assert "recognizer_on_reconstruction" not in card["metrics"]  # no recogniser in the folder yet
    train(BUDGETS["recognizer"].replace(**small), weights_dir=tmp_path, progress=False)
    card = train(BUDGETS["vae"].replace(resume=True, freeze_encoder=True, **small), weights_dir=tmp_path, progress=False)
    world, vae, rec = WorldConfig(), mw.load("vae", tmp_path), mw.load("recognizer", tmp_path).eval()
    from vpure.runtime.models.diffusion import VAEDecoder, VAEEncoder

    test = make_split("test", small["eval_clips"], world)
    assert card["metrics"]["recognizer_on_reconstruction"] == round(evaluate.reconstruction_accuracy(
        VAEEncoder(vae).eval(), VAEDecoder(vae).eval(), rec, *test), 4)


def test_missing_weights_are_named():
    from vpure.runtime.errors import CheckpointError

    with pytest.raises(CheckpointError, match="vpure train raft"):
        mw.load("raft", "/nonexistent")


# -- the shipped weights --------------------------------------------------------------

SHIPPED = [c for c in mw.COMPONENTS]


def test_shipped_weights_fit_the_size_budget():
    total = sum(mw.weights_path(c).stat().st_size for c in SHIPPED)
    assert total <= 42 * 2 ** 20, f"shipped weights are {total / 2 ** 20:.1f} MiB"


@pytest.mark.parametrize("component", SHIPPED)
def test_shipped_weights_reproduce_their_recorded_check(component):
    card = mw.read_card(component)
    module = mw.load(component)
    got = evaluate.check_metrics(component, module)
    want = card["check"]
    assert got["test_clips"] == want["test_clips"]
    assert got["value"] == pytest.approx(want["value"], rel=2e-3, abs=2e-3), (component, got, want)


def test_shipped_frame_classifier_is_far_above_chance():
    # The frame classifier drives the detection gate; chance is 20%. (The targets,
    # recogniser >= 90% and frame classifier >= 85%, are reported in the cards and README.)
    assert mw.read_card("frame_classifier")["metrics"]["frame_accuracy"] >= 0.6


def test_demo_runs_end_to_end(tmp_path, capsys):
    from vpure.runtime.cli import main

    png = tmp_path / "demo.png"
    assert main(["demo", "--frames", "8", "--iters", "2", "--flow", "dis", "--out", str(png)]) == 0
    out = capsys.readouterr().out
    assert "recogniser on the clean clip" in out and "Shield on the adversarial clip" in out
    assert f"picture: {png.resolve()}" in out
    import cv2

    img = cv2.imread(str(png))
    assert img is not None and img.shape[0] > 300 and img.shape[1] > 800


def test_vae_bound_linear_codes_are_exact_at_full_rank_and_improve_with_components():
    from benchmarks.vae_bound import patch_pca_psnr

    g = torch.Generator().manual_seed(0)
    smooth = torch.nn.functional.interpolate(torch.rand(40, 3, 4, 4, generator=g), size=16, mode="bilinear")
    train, test = smooth[:32], smooth[32:]
    psnr = patch_pca_psnr(train, test, (1, 4, 16, 192), clips=2)
    assert psnr[192] > 90  # every component kept: the patches come back (fold inverts unfold)
    assert psnr[1] < psnr[4] < psnr[16] < psnr[192]


def test_demo_refuses_bad_arguments_before_loading_anything(tmp_path, capsys):
    from vpure.runtime.cli import main

    audio = tmp_path / "audio.mp4"
    import av
    import numpy as np
    with av.open(str(audio), "w") as c:
        s = c.add_stream("aac", rate=16000)
        f = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
        f.sample_rate = 16000
        for p in [*s.encode(f), *s.encode()]:
            c.mux(p)
    for argv, needle in ((["--frames", "1"], "frames must be in [2, 16]"), (["--index", "-1"], "index must be"),
                         (["--eps", "2"], "eps must be in (0, 1]"), (["--out", str(tmp_path / "x.gif")], "must end in"),
                         (["--video", str(audio), "--no-png"], "no video stream")):
        assert main(["demo", *argv]) == 2, argv
        assert needle in capsys.readouterr().err, argv


def test_i3d_names_its_fewest_frames():
    from vpure.runtime.errors import InputError
    from vpure.runtime.models.i3d import I3DResNet

    small = I3DResNet(5, blocks=(1, 1), inflate=((1,), (1,)), base_width=8, block="basic", stem_pool=False).eval()
    pooled = I3DResNet(5, blocks=(1, 1), inflate=((1,), (1,)), base_width=8, block="basic").eval()
    for model, fewest in ((small, 3), (pooled, 5)):
        assert model.min_frames == fewest
        with torch.inference_mode():
            assert model(torch.rand(1, 3, fewest, 32, 32)).shape == (1, 5)
            with pytest.raises(InputError, match=f"at least {fewest} frames, got {fewest - 1}"):
                model(torch.rand(1, 3, fewest - 1, 32, 32))


def test_vae_bound_renders_other_world_geometries(capsys):
    from benchmarks.vae_bound import main
    from vpure.runtime.errors import ConfigError

    main(["--size", "40", "--train-frames", "48", "--test-clips", "2"])
    out = capsys.readouterr().out
    assert "world at 40 px, photographs at 100 px" in out
    rows = [line.split() for line in out.splitlines() if line.startswith("PCA")]
    assert [r[4] for r in rows] == ["k=4", "k=6", "k=8", "k=12", "k=16"]
    psnr = [float(r[-1]) for r in rows]
    assert psnr == sorted(psnr) and psnr[0] > 10
    with pytest.raises(ConfigError, match="background_short_side is too small"):
        main(["--size", "64", "--background-short-side", "100"])


def test_vpure_train_never_overwrites_the_shipped_weights_unless_asked(capsys):
    from vpure.runtime.cli import main

    assert main(["train", "frame_classifier", "--steps", "1"]) == 2
    assert "--overwrite-shipped" in capsys.readouterr().err
