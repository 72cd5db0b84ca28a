"""Registry-wide export: every component, every precision, refusals, VideoPure on ONNX Runtime."""

from __future__ import annotations

import json
import logging
import warnings

import pytest
import torch

from vpure.export import export_component
from vpure.runtime import artifacts, registry
from vpure.runtime.backends import create_backend
from vpure.runtime.errors import ArtifactError, ConfigError, InputError
from vpure.runtime.precision import Precision
from vpure.runtime.runconfig import ComponentChoice
from helpers import assert_close

SPECS = list(registry.components())


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    warnings.filterwarnings("ignore")
    logging.getLogger("root").setLevel(logging.ERROR)
    return tmp_path_factory.mktemp("engines")


CASES = [(spec, p) for spec in SPECS for p in spec.precisions]


@pytest.mark.parametrize("spec, precision", CASES, ids=lambda c: getattr(c, "name", c))
def test_every_component_exports_and_meets_its_declared_tolerance(spec, precision, engines):
    module = spec.build(seed=0)
    path = export_component(spec, module, engines, precision)
    side = artifacts.read_sidecar(path)
    assert side["component"] == spec.name and side["precision"] == precision and side["opset"] == spec.opset
    tol = spec.tolerance
    if precision == "fp32":
        assert side["parity"]["max_abs"] <= tol.fp32_atol + 10 * tol.fp32_rtol
    else:
        assert side["parity"]["sqnr_db"] >= (tol.fp16_sqnr_db if precision == "fp16" else tol.int8_sqnr_db)
    backend = create_backend(spec, ComponentChoice(backend="onnxruntime", precision=precision), engines_dir=engines)
    inputs = spec.sample_inputs(seed=11)
    out = backend(**inputs)
    with torch.inference_mode():
        ref = module(*inputs.values())
    ref = ref if isinstance(ref, (tuple, list)) else (ref,)
    for name, r in zip(spec.output_names, ref):
        assert out[name].shape == r.shape
        if precision == "fp32":
            assert_close(out[name], r.float(), atol=tol.fp32_atol, rtol=tol.fp32_rtol, name=name)


def test_export_is_idempotent(engines):
    spec = registry.get("frame_classifier")
    module = spec.build(seed=0)
    first = export_component(spec, module, engines, "fp32")
    stamp = first.stat().st_mtime_ns
    assert export_component(spec, module, engines, "fp32") == first and first.stat().st_mtime_ns == stamp
    other = spec.build(seed=1)  # different weights: rebuilt
    export_component(spec, other, engines, "fp32")
    assert json.loads(artifacts.sidecar_path(first).read_text())["source_sha256"] != ""
    assert first.stat().st_mtime_ns != stamp


def test_refusals(engines, tmp_path):
    spec = registry.get("comdefend")
    path = export_component(spec, spec.build(seed=0), tmp_path, "fp32")
    choice = ComponentChoice(backend="onnxruntime")
    # wrong precision request: only fp32 was built here
    with pytest.raises(ArtifactError, match="no fp16 artefact for component 'comdefend'"):
        create_backend(spec, ComponentChoice(backend="onnxruntime", precision="fp16"), engines_dir=tmp_path)
    # shape outside the profile
    backend = create_backend(spec, choice, engines_dir=tmp_path)
    with pytest.raises(InputError, match="outside the artefact's profile"):
        backend(frames=torch.rand(1, 3, 17, 64, 64))
    # tampered ONNX file
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="changed since it was built"):
        create_backend(spec, choice, engines_dir=tmp_path)
    # missing sidecar
    artifacts.sidecar_path(path).unlink()
    with pytest.raises(ArtifactError, match="has no sidecar"):
        create_backend(spec, choice, engines_dir=tmp_path)
    # a sidecar that belongs to another request
    good = export_component(spec, spec.build(seed=0), tmp_path / "b", "fp32")
    side = json.loads(artifacts.sidecar_path(good).read_text())
    side["precision"] = "fp16"
    artifacts.sidecar_path(good).write_text(json.dumps(side))
    with pytest.raises(ArtifactError, match="sidecar says precision='fp16'"):
        artifacts.verify(good, spec, Precision.FP32)
    with pytest.raises(ArtifactError, match="bf16 artefacts are not offered"):
        export_component(spec, spec.build(seed=0), tmp_path, "bf16")
    raft = registry.get("raft")
    with pytest.raises(ArtifactError, match="int8 artefacts are not offered.*correlation volume"):
        export_component(raft, raft.build(seed=0), tmp_path, "int8")


def test_videopure_on_onnxruntime_matches_torch(engines, data_dir):
    from tinyworld import real_clip

    from vpure.runtime.purifier import VideoPure
    from vpure.runtime.flow import DISFlow
    from vpure.runtime.models.diffusion import eps_fn_of

    names = ("unet", "vae_encoder", "vae_decoder", "i3d_nl5_r50")
    mods = {n: registry.get(n).build(seed=0) for n in names}
    ort = {}
    for n in names:
        export_component(registry.get(n), mods[n], engines, "fp32")
        ort[n] = create_backend(registry.get(n), ComponentChoice(backend="onnxruntime"), engines_dir=engines)

    def eps_ort(z, t):
        return ort["unet"](latents=z, timestep=torch.tensor([int(t)]))["eps"]

    clip = real_clip(data_dir, frames=8, size=64)
    flow = DISFlow("fast")
    vp_torch = VideoPure(eps_fn_of(mods["unet"]), mods["vae_encoder"], mods["vae_decoder"], mods["i3d_nl5_r50"], flow)
    vp_ort = VideoPure(eps_ort, lambda x: ort["vae_encoder"](frames=x)["latents"],
                       lambda z: ort["vae_decoder"](latents=z)["frames"],
                       lambda x: ort["i3d_nl5_r50"](frames=x)["logits"], flow)
    a, b = vp_torch(clip), vp_ort(clip)
    assert torch.equal(a.member_labels, b.member_labels) and torch.equal(a.label, b.label)


def test_export_cli(tmp_path, capsys):
    from vpure.runtime.cli import main

    code = main(["export", "--tiny", "--components", "frame_classifier,comdefend", "--precision", "fp32,int8",
                 "--check-clips", "2", "--out", str(tmp_path)])
    assert code == 0
    out = capsys.readouterr().out
    assert "| frame_classifier | int8 |" in out and "the gate's route kept on" in out
    assert len(list(tmp_path.glob("*.onnx"))) == 4 and len(list(tmp_path.glob("*.json"))) == 5  # + engines.json
    assert main(["export", "--tiny", "--components", "raft", "--out", str(tmp_path)]) == 2
    assert "'raft' is not a network of this deployment" in capsys.readouterr().err  # tiny runs DIS flow


def test_export_cli_refuses_arguments_it_would_ignore_or_trip_on(tmp_path, capsys):
    from vpure.runtime.cli import main

    (tmp_path / "file").write_text("x")
    fc = ["export", "--components", "frame_classifier"]
    for argv, needle in (
            ([*fc, "--tiny", "--checkpoint", f"frame_classifier={tmp_path}", "--out", str(tmp_path)], "a deployment names its own weights"),
            ([*fc, "--model-dir", str(tmp_path), "--checkpoint", "frame_classifier=/nowhere.pth", "--out", str(tmp_path)],
             "no such file"),
            ([*fc, "--tiny", "--out", str(tmp_path / "file")], "is a file, not an artefact folder")):
        assert main(argv) == 2, argv
        assert needle in capsys.readouterr().err, argv
    assert not list(tmp_path.glob("*.onnx"))


def test_swapping_engines_is_a_config_change(tmp_path):
    from vpure.runtime.backends import backend_from_config
    from vpure.runtime.runconfig import RuntimeConfig

    spec = registry.get("frame_classifier")
    module = spec.build(seed=0)
    for p in ("fp32", "int8"):
        export_component(spec, module, tmp_path, p)
    x = spec.sample_inputs(seed=5)
    outs = {}
    for p in ("fp32", "int8"):
        toml = f'engines_dir = "{tmp_path}"\n[components.frame_classifier]\nbackend = "onnxruntime"\nprecision = "{p}"\n'
        cfg = RuntimeConfig.from_toml(toml)
        backend = backend_from_config(cfg, "frame_classifier")
        assert backend.precision.value == p and backend.name == "onnxruntime"
        outs[p] = backend(**x)["logits"]
    torch_out = backend_from_config(RuntimeConfig(), "frame_classifier", module=module)(**x)["logits"]
    assert_close(outs["fp32"], torch_out, atol=1e-4, rtol=1e-5)
    assert not torch.equal(outs["int8"], outs["fp32"])


def test_int8_calibrated_from_real_clips(tmp_path, data_dir):
    from vpure.runtime.precision import CalibrationRecipe

    spec = registry.get("frame_classifier")
    recipe = CalibrationRecipe(source=f"clips:{data_dir}", count=3)
    path = export_component(spec, spec.build(seed=0), tmp_path, "int8", calibration=recipe)
    side = artifacts.read_sidecar(path)
    assert side["calibration"]["source"] == f"clips:{data_dir}" and side["calibration_id"] == recipe.id
    assert side["parity"]["sqnr_db"] >= spec.tolerance.int8_sqnr_db
    # the runtime finds it only when asked for that recipe
    choice = ComponentChoice(backend="onnxruntime", precision="int8", calibration=recipe)
    assert create_backend(spec, choice, engines_dir=tmp_path).path == path
    with pytest.raises(ArtifactError, match="no int8 artefact"):
        create_backend(spec, ComponentChoice(backend="onnxruntime", precision="int8"), engines_dir=tmp_path)


def test_clip_calibration_samples_and_refusals(tmp_path, data_dir):
    from vpure.runtime.int8_calibration import calibration_batches, parity_batches
    from vpure.runtime.precision import CalibrationRecipe

    unet = registry.get("unet")
    recipe = CalibrationRecipe(source=f"clips:{data_dir}", count=2)
    with pytest.raises(ArtifactError, match="needs the VAE encoder"):
        next(calibration_batches(unet, recipe))
    enc = registry.get("vae_encoder").build(seed=0)
    batches = list(calibration_batches(unet, recipe, {"vae_encoder": enc}))
    assert len(batches) == 2
    t = batches[0]["timestep"]
    lo, hi = unet.inputs[1].value_range
    assert t.dtype.name == "int64" and lo <= int(t[0]) <= hi
    assert batches[0]["latents"].shape == unet.inputs[0].resolve(unet.dims("opt"))
    assert list(calibration_batches(unet, recipe, {"vae_encoder": enc}))[0]["latents"].tobytes() == \
        batches[0]["latents"].tobytes()  # reproducible
    flow = registry.get("raft")
    pair = next(calibration_batches(flow, recipe))
    assert set(pair) == {"image1", "image2"} and pair["image1"].shape == (1, 3, 128, 128)
    # held-out parity windows are not the calibration windows
    fc = registry.get("frame_classifier")
    cal = next(calibration_batches(fc, recipe))["frames"]
    held = parity_batches(fc, recipe)[0]["frames"].numpy()
    assert cal.shape == held.shape and not (cal == held).all()
    (tmp_path / "empty").mkdir()
    with pytest.raises(ArtifactError, match="holds no video files"):
        next(calibration_batches(fc, CalibrationRecipe(source=f"clips:{tmp_path / 'empty'}")))


def test_miniworld_calibration_samples():
    from vpure.runtime.int8_calibration import calibration_batches, parity_batches
    from vpure.runtime.miniworld.dataset import make_clip
    from vpure.runtime.precision import CalibrationRecipe

    fc = registry.get("frame_classifier")  # opt: 4 frames at 64 px, the mini-world's size
    recipe = CalibrationRecipe(source="miniworld", count=3)
    batches = list(calibration_batches(fc, recipe))
    assert len(batches) == 3 and batches[0]["frames"].shape == (1, 3, 4, 64, 64)
    assert (batches[1]["frames"] == make_clip("train", 1).clip[None, :, :4].numpy()).all()
    held = parity_batches(fc, recipe)[0]["frames"]  # training clips after the calibration ones
    assert torch.equal(held, make_clip("train", 3).clip[None, :, :4])
    flow = registry.get("raft")  # opt 128 px: the clips resized
    pair = next(calibration_batches(flow, recipe))
    assert pair["image1"].shape == (1, 3, 128, 128) and 0 <= pair["image1"].min() and pair["image1"].max() <= 1
    with pytest.raises(ConfigError, match="'miniworld'"):
        CalibrationRecipe(source="mini")


def test_io_binding_outputs_copied_unless_reuse_requested(engines):
    spec = registry.get("frame_classifier")
    export_component(spec, spec.build(seed=0), engines, "fp32")
    choice = ComponentChoice(backend="onnxruntime")
    x = spec.sample_inputs(seed=3)
    safe = create_backend(spec, choice, engines_dir=engines)
    a, b = safe(**x)["logits"], safe(**x)["logits"]
    assert a.data_ptr() != b.data_ptr() and torch.equal(a, b)
    fast = create_backend(spec, choice, engines_dir=engines, reuse_outputs=True)
    c, d = fast(**x)["logits"], fast(**x)["logits"]
    assert c.data_ptr() == d.data_ptr() and torch.equal(c, a)
    # a second shape gets its own buffers and the right answer
    x2 = spec.sample_inputs(spec.dims("min"), seed=3)
    e = fast(**x2)["logits"]
    with torch.inference_mode():
        ref = spec.build(seed=0)(*x2.values())
    assert e.shape == ref.shape and torch.allclose(e, ref, atol=1e-4)


def test_unet_member_effect_report(engines):
    from vpure.export.report import synthetic_clip, unet_member_effect
    from vpure.runtime.presets import MeanOverTime

    spec = registry.get("unet")
    unet = spec.build(seed=0)
    export_component(spec, unet, engines, "fp32")
    backend = create_backend(spec, ComponentChoice(backend="onnxruntime"), engines_dir=engines)
    clip = synthetic_clip(4, 64)
    assert clip.shape == (1, 3, 4, 64, 64) and 0 <= float(clip.min()) and float(clip.max()) <= 1
    rec = MeanOverTime(registry.get("frame_classifier").build(seed=0)).eval()
    e = unet_member_effect(unet, backend, registry.get("vae_encoder").build(seed=0),
                           registry.get("vae_decoder").build(seed=0), rec, clip)
    assert e["members"] == 7 and e["members_agree"] == 7 and e["label_engine"] == e["label_torch"]
    assert e["max_logit_diff"] < 1e-3 and e["frames_sqnr_db"] > 60


def test_int8_weights_are_7_bit_by_default_so_non_vnni_cpus_cannot_saturate(tmp_path):
    """x86 int8 kernels without VNNI sum u8 x s8 products in 16-bit pairs; 7-bit weights
    (reduce_range, the recipe's default) keep every pair sum in range. The choice is part of
    the recipe id, so artefacts of the two kinds never stand in for each other."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    from vpure.export import export_component
    from vpure.runtime import registry
    from vpure.runtime.precision import CalibrationRecipe

    assert CalibrationRecipe().reduce_range and CalibrationRecipe().id != CalibrationRecipe(reduce_range=False).id
    spec = registry.get("frame_classifier")
    path = export_component(spec, spec.build(seed=0), tmp_path, "int8", calibration=CalibrationRecipe(count=2))
    weights = [numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer
               if t.data_type == onnx.TensorProto.INT8 and t.dims]
    assert weights and max(int(np.abs(w.astype(np.int32)).max()) for w in weights) <= 64


def test_full_range_int8_artefact_on_a_cpu_without_vnni_warns(tmp_path, monkeypatch, caplog):
    from vpure.runtime.backends import ort_backend
    from vpure.runtime.precision import CalibrationRecipe, Precision, x86_without_vnni

    assert isinstance(x86_without_vnni(), bool)
    spec = registry.get("frame_classifier")
    recipe = CalibrationRecipe(count=2)
    path = export_component(spec, spec.build(seed=0), tmp_path, "int8", calibration=recipe)
    real = ort_backend.verify

    def full_range(*a, **k):  # as if exported with --int8-full-range (which fails parity on AVX2 itself)
        side = real(*a, **k)
        return {**side, "calibration": {**side["calibration"], "reduce_range": False}}

    monkeypatch.setattr(ort_backend, "verify", full_range)
    for no_vnni in (True, False):
        monkeypatch.setattr(ort_backend, "x86_without_vnni", lambda v=no_vnni: v)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="vpure"):
            ort_backend.OrtBackend(spec, path, Precision.INT8, recipe)
        assert ("no VNNI" in caplog.text) == no_vnni


def test_a_decoder_prepared_for_inference_exports_pytorchs_norms(tmp_path):
    """vpure export --miniworld exports load_world's decoder, which prepare_decoder gave the native
    group norm: the artefact records ONNX's own normalisation and passes its parity check."""
    import onnx

    from vpure.runtime.models.rewrites import NativeGroupNorm
    from vpure.runtime.models.inference import prepare_decoder

    spec = registry.get("vae_decoder")
    dec = spec.build(seed=0)
    prepare_decoder(dec)
    assert any(isinstance(m, NativeGroupNorm) for m in dec.modules())
    path = export_component(spec, dec, tmp_path, "fp32")
    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert ops & {"GroupNormalization", "InstanceNormalization"} and not any(n.domain == "vpure" for n in
                                                                             onnx.load(str(path)).graph.node)


def test_an_int8_unet_that_flips_videopures_label_is_removed_and_the_export_fails(tmp_path, capsys, monkeypatch):
    """Parity per call can pass while the purified clip's label flips (a badly calibrated
    int8 UNet): that artefact must not be served, and the export must say so in its exit code."""
    import vpure.export.report as report
    from vpure.runtime.cli import main

    real = report.videopure_effect

    def flipped(*args, **kwargs):
        e = real(*args, **kwargs)
        return e | {"members_agree": 5, "label_engine": e["label_torch"] + 1, "frames_sqnr_db": 13.8}

    monkeypatch.setattr(report, "videopure_effect", flipped)
    argv = ["export", "--tiny", "--components", "unet", "--precision", "fp16", "--check-clips", "2", "--out", str(tmp_path)]
    assert main(argv) == 1
    out = capsys.readouterr().out
    assert "5/7 VideoPure members agree" in out and "flips VideoPure's label" in out and "removed" in out
    assert not list(tmp_path.glob("unet.*.onnx")) and not list(tmp_path.glob("unet.*.json"))
    assert "fp16" not in json.loads((tmp_path / "engines.json").read_text())["networks"].get("unet", {}).get("artefacts", {})
    assert main(argv + ["--allow-degraded"]) == 0  # kept on request, and said so
    assert "DEGRADED" in capsys.readouterr().out and list(tmp_path.glob("unet.fp16.*.onnx"))
