"""ONNX artefact -> TensorRT engine, driven by the registry description.

One optimisation profile per component from its min/opt/max dims
(:func:`vpure.runtime.artifacts.trt_profile`), a persistent timing cache shared by every
build in an engines folder, and precision taken from the ONNX itself: on TensorRT >= 10
the network is created strongly typed (the fp16 casts and int8 Q/DQ nodes the exporter
wrote decide every layer's type); older versions get the equivalent builder flags
(:func:`precision_flags`). The engine carries a sidecar like every artefact, plus the
TensorRT version and the GPU family it was built for; the runtime refuses it elsewhere.

``tensorrt`` is imported only inside :func:`build_engine`; the planning functions are pure
and unit-tested on machines without it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from vpure.runtime import artifacts, atomic
from vpure.runtime.errors import ArtifactError, BackendUnavailable
from vpure.runtime.log import get_logger
from vpure.runtime.precision import CalibrationRecipe, Precision
from vpure.runtime.registry import ComponentSpec

log = get_logger(__name__)

TIMING_CACHE = "tensorrt.timing-cache"


def _major(version: str) -> int:
    try:
        return int(version.split(".")[0])
    except ValueError:
        raise ArtifactError(f"cannot parse TensorRT version {version!r}") from None


def strongly_typed(trt_version: str) -> bool:
    """Strongly typed networks are the supported way to honour ONNX types from TensorRT 10 on."""
    return _major(trt_version) >= 10


def precision_flags(trt_version: str, precision: Precision) -> tuple[str, ...]:
    """``trt.BuilderFlag`` names a build needs. Empty for strongly typed networks (the ONNX's
    own types rule and the builder refuses precision flags); otherwise FP16 lets the
    converted fp16 layers run in half, and INT8 enables the explicit Q/DQ quantisation
    (with FP16 for the layers int8 left in float)."""
    if strongly_typed(trt_version):
        return ()
    return {Precision.FP32: (), Precision.FP16: ("FP16",), Precision.INT8: ("INT8", "FP16")}[precision]


def build_plan(spec: ComponentSpec, precision: Precision, recipe: CalibrationRecipe | None, trt_version: str,
               device: str, workspace_gib: float = 4.0) -> dict[str, Any]:
    """Everything a build decides before TensorRT is touched (recorded in the sidecar)."""
    if precision.value not in spec.precisions:
        raise ArtifactError(f"{spec.name}: no {precision.value} TensorRT engine ({spec.precision_note})")
    return {
        "engine": artifacts.engine_name(spec, precision, recipe, trt_version, device),
        "onnx": artifacts.artifact_name(spec, precision, recipe),
        "strongly_typed": strongly_typed(trt_version),
        "flags": list(precision_flags(trt_version, precision)),
        "profile": {k: [list(s) for s in v] for k, v in artifacts.trt_profile(spec).items()},
        "workspace_bytes": int(workspace_gib * (1 << 30)),
    }


def unavailable_reason() -> str | None:
    """Why engines cannot be built here, or None."""
    import torch

    from vpure.runtime.backends.trt_backend import tensorrt_version

    if tensorrt_version() is None:
        return "tensorrt is not installed"
    if not torch.cuda.is_available():
        return "no CUDA device (TensorRT builds for the GPU it runs on)"
    return None


def build_engine(spec: ComponentSpec, engines_dir: str | Path, precision: Precision | str,
                 recipe: CalibrationRecipe | None = None, *, workspace_gib: float = 4.0, force: bool = False,
                 key: bytes | None = None) -> Path:
    """Build (or reuse) the engine for the ONNX artefact of this request in ``engines_dir``."""
    why = unavailable_reason()
    if why:
        raise BackendUnavailable(f"{spec.name}: cannot build a TensorRT engine: {why}")
    import tensorrt as trt
    import torch

    precision = Precision.parse(precision)
    recipe = recipe or (CalibrationRecipe() if precision is Precision.INT8 else None)
    engines_dir = Path(engines_dir)
    tag = artifacts.device_tag(torch.cuda.get_device_capability())
    plan = build_plan(spec, precision, recipe, trt.__version__, tag, workspace_gib)
    onnx_path = artifacts.find_artifact(engines_dir, spec, precision, recipe)
    onnx_side = artifacts.verify(onnx_path, spec, precision, recipe, trust=artifacts.Trust(key=key))
    final = engines_dir / plan["engine"]
    expect = {"tensorrt": trt.__version__, "device_tag": tag}
    if final.is_file() and not force:
        try:
            side = artifacts.verify(final, spec, precision, recipe, expect=expect, trust=artifacts.Trust(key=key))
            if side.get("onnx_sha256") == onnx_side["onnx_sha256"]:
                return final
        except ArtifactError as e:
            log.warning("rebuilding %s: %s", final.name, e)

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if plan["strongly_typed"] else 0
    if _major(trt.__version__) < 10:
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(onnx_path.read_bytes()):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ArtifactError(f"{onnx_path.name}: TensorRT's ONNX parser refused it: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, plan["workspace_bytes"])
    for name in plan["flags"]:
        config.set_flag(getattr(trt.BuilderFlag, name))
    cache_path = engines_dir / TIMING_CACHE
    cache = config.create_timing_cache(cache_path.read_bytes() if cache_path.is_file() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    profile = builder.create_optimization_profile()
    for name, (lo, opt, hi) in plan["profile"].items():
        profile.set_shape(name, tuple(lo), tuple(opt), tuple(hi))
    config.add_optimization_profile(profile)
    blob = builder.build_serialized_network(network, config)
    if blob is None:
        raise ArtifactError(f"{spec.name} {precision.value}: TensorRT failed to build an engine (see its log)")
    data = bytes(blob)
    cache_path.write_bytes(bytes(config.get_timing_cache().serialize()))
    atomic.write_bytes(final, data)
    side = {k: onnx_side[k] for k in ("sidecar_version", "component", "precision", "calibration_id", "calibration",
                                      "profile_id", "profile", "inputs", "outputs", "source", "source_sha256",
                                      "onnx_sha256", "parity", "kept_fp32")}
    side |= {"tensorrt": trt.__version__, "device_tag": tag, "device_name": torch.cuda.get_device_name(),
             "engine_sha256": hashlib.sha256(data).hexdigest(), "build": plan,
             "toolchain": onnx_side["toolchain"] | {"tensorrt": trt.__version__}}
    atomic.write_text(artifacts.sidecar_path(final), json.dumps(artifacts.sign(side, key), indent=2, sort_keys=True))
    log.info("wrote %s", final.name)
    return final
