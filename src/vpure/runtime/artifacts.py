"""Engine artefacts: names that say what built them, JSON sidecars, and verification.

An artefact is ``<component>.<precision>.<calibration>.<profile>.<toolchain>.onnx`` (a TensorRT
engine ends ``.trt<version>-sm<XY>.engine`` instead: engines are tied to a GPU family) with a
sidecar ``<same>.json`` holding the request (component, precision, calibration recipe,
shape profile), the toolchain versions, the source weights' hash, the ONNX file's hash,
the opset and the parity measured at build time. The runtime refuses an artefact whose
sidecar is missing, does not match the request, or whose file hash changed. (Export writes
artefacts; this module only names, reads and checks them, so the runtime never imports
``vpure.export``.)
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from .errors import ArtifactError
from .precision import CalibrationRecipe, Precision
from .registry import ComponentSpec
from .versions import package_version

SIDECAR_VERSION = 1


def toolchain() -> dict[str, str]:
    return {d: package_version(d) or "none" for d in ("torch", "onnx", "onnxruntime")}


def toolchain_id() -> str:
    t = toolchain()
    return f"ort{t['onnxruntime']}"


def profile_id(spec: ComponentSpec) -> str:
    blob = json.dumps({"profile": {k: list(v) for k, v in spec.profile.items()},
                       "inputs": [[t.name, list(t.shape), t.dtype] for t in spec.inputs],
                       "outputs": [[t.name, list(t.shape), t.dtype] for t in spec.outputs]}, sort_keys=True)
    return "p" + hashlib.sha256(blob.encode()).hexdigest()[:8]


def calibration_id(precision: Precision, recipe: CalibrationRecipe | None) -> str:
    if precision is not Precision.INT8:
        return "nocal"
    return (recipe or CalibrationRecipe()).id


def artifact_name(spec: ComponentSpec, precision: Precision, recipe: CalibrationRecipe | None = None) -> str:
    return f"{spec.name}.{precision.value}.{calibration_id(precision, recipe)}.{profile_id(spec)}.{toolchain_id()}.onnx"


def device_tag(capability: tuple[int, int]) -> str:
    """``sm90`` for compute capability (9, 0): TensorRT engines only run on the GPU family they were built for."""
    return f"sm{capability[0]}{capability[1]}"


def engine_name(spec: ComponentSpec, precision: Precision, recipe: CalibrationRecipe | None, trt_version: str,
                device: str) -> str:
    """``<component>.<precision>.<calibration>.<profile>.trt<version>-<device tag>.engine``."""
    return (f"{spec.name}.{precision.value}.{calibration_id(precision, recipe)}.{profile_id(spec)}."
            f"trt{trt_version}-{device}.engine")


def trt_profile(spec: ComponentSpec) -> dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
    """Input name -> (min, opt, max) shapes: one TensorRT optimisation profile from the registry's dims."""
    return {t.name: tuple(t.resolve(spec.dims(w)) for w in ("min", "opt", "max")) for t in spec.inputs}


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def sidecar_path(onnx_path: str | Path) -> Path:
    return Path(onnx_path).with_suffix(".json")


def read_sidecar(onnx_path: str | Path) -> dict[str, Any]:
    side = sidecar_path(onnx_path)
    if not side.is_file():
        raise ArtifactError(f"artefact {onnx_path} has no sidecar {side.name}; re-export it with `vpure export`")
    try:
        data = json.loads(side.read_text())
    except json.JSONDecodeError as e:
        raise ArtifactError(f"sidecar {side} is not valid JSON: {e}") from None
    if data.get("sidecar_version") != SIDECAR_VERSION:
        raise ArtifactError(f"sidecar {side} has version {data.get('sidecar_version')}, expected {SIDECAR_VERSION}")
    return data


def verify(onnx_path: str | Path, spec: ComponentSpec, precision: Precision,
           recipe: CalibrationRecipe | None = None, expect: dict[str, Any] | None = None) -> dict[str, Any]:
    """The sidecar of a matching, untouched artefact; ArtifactError naming the mismatch otherwise.

    Works for ONNX files (hash under ``onnx_sha256``) and TensorRT engines (``engine_sha256``);
    ``expect`` adds keys the sidecar must hold (an engine's TensorRT version and device tag).
    """
    onnx_path = Path(onnx_path)
    if not onnx_path.is_file():
        raise ArtifactError(f"artefact {onnx_path} does not exist")
    side = read_sidecar(onnx_path)
    want = {"component": spec.name, "precision": precision.value, "calibration_id": calibration_id(precision, recipe),
            "profile_id": profile_id(spec)} | dict(expect or {})
    for key, value in want.items():
        if side.get(key) != value:
            raise ArtifactError(f"artefact {onnx_path.name}: sidecar says {key}={side.get(key)!r}, "
                                f"the request needs {value!r}")
    digest = sha256_file(onnx_path)
    key = "engine_sha256" if onnx_path.suffix == ".engine" else "onnx_sha256"
    if side.get(key) != digest:
        raise ArtifactError(f"artefact {onnx_path.name} changed since it was built (sha256 {digest[:12]}... != "
                            f"sidecar {str(side.get(key))[:12]}...); refusing to run it")
    return side


def find_artifact(engines_dir: str | Path, spec: ComponentSpec, precision: Precision,
                  recipe: CalibrationRecipe | None = None, name: str | None = None) -> Path:
    """The artefact ``name`` (default: the ONNX artefact's name for the request) in ``engines_dir``."""
    engines_dir = Path(engines_dir)
    path = engines_dir / (name or artifact_name(spec, precision, recipe))
    if not path.is_file():
        have = sorted(p.name for p in engines_dir.glob(f"{spec.name}.*{path.suffix}")) if engines_dir.is_dir() else []
        raise ArtifactError(f"no {precision.value} artefact for component {spec.name!r} in {engines_dir} "
                            f"(wanted {path.name}); found: {', '.join(have) or 'none'}")
    return path
