"""TensorRT: naming, profiles and builder decisions everywhere; engine builds where TensorRT and a GPU exist."""

from __future__ import annotations

import pytest
import torch

from vpure.export.tensorrt_builder import build_plan, precision_flags, strongly_typed
from vpure.runtime import artifacts, registry
from vpure.runtime.backends import create_backend
from vpure.runtime.backends.trt_backend import tensorrt_version, unavailable_reason
from vpure.runtime.errors import ArtifactError, BackendUnavailable, ConfigError
from vpure.runtime.precision import CalibrationRecipe, Precision
from vpure.runtime.runconfig import ComponentChoice
from helpers import assert_close


@pytest.mark.parametrize("spec", list(registry.components()), ids=lambda s: s.name)
def test_profile_covers_every_input_from_the_registry(spec):
    prof = artifacts.trt_profile(spec)
    assert list(prof) == list(spec.input_names)
    for t in spec.inputs:
        lo, opt, hi = prof[t.name]
        assert len(lo) == len(t.shape) and all(a <= b <= c for a, b, c in zip(lo, opt, hi))
        for d, a, c in zip(t.shape, lo, hi):
            if isinstance(d, int):
                assert a == c == d
            else:
                assert (a, c) == (spec.profile[d][0], spec.profile[d][2])


def test_engine_names_say_what_built_them():
    spec = registry.get("unet")
    a = artifacts.engine_name(spec, Precision.FP16, None, "10.3.0", artifacts.device_tag((9, 0)))
    assert a.startswith("unet.fp16.nocal.") and a.endswith(".trt10.3.0-sm90.engine")
    assert artifacts.profile_id(spec) in a
    b = artifacts.engine_name(spec, Precision.INT8, CalibrationRecipe(count=8), "10.3.0", "sm89")
    assert CalibrationRecipe(count=8).id in b and b != a
    assert artifacts.sidecar_path(a).name == a[: -len(".engine")] + ".json"


def test_builder_precision_decisions():
    assert strongly_typed("10.0.1") and not strongly_typed("8.6.1")
    for p in Precision.FP32, Precision.FP16, Precision.INT8:
        assert precision_flags("10.3.0", p) == ()  # the ONNX's own types rule
    assert precision_flags("8.6.1", Precision.FP16) == ("FP16",)
    assert precision_flags("8.6.1", Precision.INT8) == ("INT8", "FP16")
    assert precision_flags("8.6.1", Precision.FP32) == ()
    with pytest.raises(ArtifactError, match="cannot parse"):
        strongly_typed("dev")
    plan = build_plan(registry.get("i3d_nl5_r50"), Precision.INT8, CalibrationRecipe(), "10.3.0", "sm90", 2.0)
    assert plan["onnx"] == artifacts.artifact_name(registry.get("i3d_nl5_r50"), Precision.INT8, CalibrationRecipe())
    assert plan["strongly_typed"] and plan["flags"] == [] and plan["workspace_bytes"] == 2 << 30
    assert plan["profile"]["frames"][0] == [1, 3, 8, 64, 64]
    with pytest.raises(ArtifactError, match="no int8 TensorRT engine"):
        build_plan(registry.get("raft"), Precision.INT8, CalibrationRecipe(), "10.3.0", "sm90")


def test_cuda_graph_is_a_tensorrt_option():
    assert ComponentChoice(backend="tensorrt", cuda_graph=True).cuda_graph
    with pytest.raises(ConfigError, match="cuda_graph is a TensorRT option"):
        ComponentChoice(backend="onnxruntime", cuda_graph=True)


@pytest.mark.skipif(unavailable_reason() is None, reason="TensorRT and a GPU are present: the real tier runs instead")
def test_backend_states_why_it_is_unavailable(tmp_path):
    with pytest.raises(BackendUnavailable, match="tensorrt backend is unavailable: .+"):
        create_backend(registry.get("frame_classifier"), ComponentChoice(backend="tensorrt"), device="cuda",
                       engines_dir=tmp_path)


@pytest.mark.gpu
@pytest.mark.skipif(tensorrt_version() is None, reason="tensorrt is not installed (the lent GPU machines lack it too)")
@pytest.mark.parametrize("cuda_graph", [False, True])
def test_engine_builds_runs_and_refuses_tampering(tmp_path, cuda_graph):
    from vpure.export import export_component
    from vpure.export.tensorrt_builder import build_engine

    spec = registry.get("frame_classifier")
    module = spec.build(seed=0)
    export_component(spec, module, tmp_path, "fp16")
    engine = build_engine(spec, tmp_path, "fp16")
    assert build_engine(spec, tmp_path, "fp16") == engine  # reused
    backend = create_backend(spec, ComponentChoice(backend="tensorrt", precision="fp16", cuda_graph=cuda_graph),
                             device="cuda", engines_dir=tmp_path)
    x = spec.sample_inputs(seed=1)
    with torch.inference_mode():
        ref = module(*x.values())
    for _ in range(3):  # warm-up, capture, replay
        out = backend(**x)["logits"].cpu()
        assert_close(out, ref, atol=5e-2, rtol=5e-2)
    data = bytearray(engine.read_bytes())
    data[len(data) // 2] ^= 0xFF
    engine.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="changed since it was built"):
        create_backend(spec, ComponentChoice(backend="tensorrt", precision="fp16"), device="cuda", engines_dir=tmp_path)
