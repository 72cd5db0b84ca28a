"""Engine artefacts: names that say what built them, JSON sidecars, and verification.

An artefact is ``<component>.<precision>.<calibration>.<profile>.<toolchain>.onnx`` (a TensorRT
engine ends ``.trt<version>-sm<XY>.engine`` instead: engines are tied to a GPU family) with a
sidecar ``<same>.json`` holding the request (component, precision, calibration recipe,
shape profile), the toolchain versions, the source weights' hash, the ONNX file's hash,
the opset and the parity measured at build time. The runtime refuses an artefact whose
sidecar is missing, does not match the request, or whose file hash changed. (Export writes
artefacts; this module only names, reads and checks them, so the runtime never imports
``vpure.export``.)

Two further checks close what the file hash alone leaves open (:class:`Trust`):

- **Stale engines.** The sidecar's ``source_sha256`` is the hash of the exported module's
  state dict. ``vpure run`` hashes the weights it actually loaded and refuses an engine
  built from others (weights edited, retrained in place, another checkpoint), naming both
  hashes; ``allow_stale`` serves it anyway, with a warning. Hashing a large checkpoint
  costs seconds, so the hash of the state dict loaded from given files is cached by each
  file's path, size and modification time (:func:`source_hash`).
- **Signed folders.** Whoever can write the engines folder can replace an ONNX file and
  rewrite its sidecar's hashes to match. With a key (``VPURE_ENGINES_KEY`` or
  ``runtime.engines_key_file``), export signs each sidecar (HMAC-SHA256 over its canonical
  JSON, which holds the engine's hash) and the runtime refuses an unsigned or wrongly
  signed artefact. The key must live outside the engines folder.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

from .errors import ArtifactError
from .log import get_logger
from .precision import CalibrationRecipe, Precision
from .registry import ComponentSpec
from .versions import package_version

SIDECAR_VERSION = 1
log = get_logger(__name__)


@dataclass(frozen=True)
class Trust:
    """What an engine must match beyond its request: the weights it was exported from
    (``source_sha256``; None skips the check) and a signing key (None: unsigned is fine)."""

    source_sha256: str | None = None
    key: bytes | None = None
    allow_stale: bool = False
    # The deployment's identity of the weights (their files' hashes and its config of the
    # network): checked against a sidecar that records one, without building the network.
    source_id: str | Callable[[], str | None] | None = None
    # The loaded module's state hash, computed on demand (sidecars without a source id).
    state_hash: Callable[[], str] | None = None


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


def state_hash(module) -> str:
    """sha256 over a torch module's state dict (names and bytes, sorted by name): the source
    identity an artefact's sidecar records."""
    import torch

    h = hashlib.sha256()
    for k, v in sorted(module.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())  # any dtype
    return h.hexdigest()


def _cached_digest(key: list, compute: Callable[[], str]) -> str:
    """``compute()``, remembered under ``key`` (paths with their sizes and modification times)
    in the cache folder's ``source-hashes.json``: large weights are hashed once, not at every start."""
    from . import atomic
    from .env import read_environment

    key_text = json.dumps(key)
    cache = read_environment().cache_dir / "source-hashes.json"
    try:
        known = json.loads(cache.read_text())
        known = known if isinstance(known, dict) else {}
    except (OSError, ValueError):
        known = {}
    if isinstance(known.get(key_text), str):
        return known[key_text]
    digest = known[key_text] = compute()
    try:
        atomic.write_text(cache, json.dumps(known))
    except OSError as e:
        log.warning("could not cache the hash in %s: %s", cache, e)
    return digest


def source_hash(module, files: Iterable[str | Path] = ()) -> str:
    """:func:`state_hash` of ``module``, cached by the (path, size, mtime) of the ``files`` it
    was loaded from; computed afresh when no file is given."""
    files = [Path(f).resolve() for f in files]
    if not files:
        return state_hash(module)
    try:
        key = [[str(f), f.stat().st_size, f.stat().st_mtime_ns] for f in files]
    except OSError:
        return state_hash(module)
    return _cached_digest(key, lambda: state_hash(module))


def file_digest(path: str | Path) -> str:
    """sha256 of a file's bytes, cached by its path, size and modification time."""
    path = Path(path).resolve()
    st = path.stat()
    return _cached_digest(["file", str(path), st.st_size, st.st_mtime_ns], lambda: sha256_file(path))


def engines_key(key_file: str | Path | None = None) -> bytes | None:
    """The signing key: the file's contents (surrounding whitespace stripped) when given,
    else ``VPURE_ENGINES_KEY``; None when neither is set."""
    from .env import read_environment

    if key_file is not None:
        try:
            key = Path(key_file).read_bytes().strip()
        except OSError as e:
            raise ArtifactError(f"engines key file {key_file} cannot be read: {e.strerror or e}") from None
        if not key:
            raise ArtifactError(f"engines key file {key_file} is empty")
        return key
    return read_environment().engines_key


def signature(side: dict[str, Any], key: bytes) -> str:
    """HMAC-SHA256 of a sidecar's canonical JSON without its ``signature`` field."""
    body = json.dumps({k: v for k, v in side.items() if k != "signature"}, sort_keys=True, separators=(",", ":"))
    return hmac.new(key, body.encode(), hashlib.sha256).hexdigest()


def sign(side: dict[str, Any], key: bytes | None) -> dict[str, Any]:
    """``side`` with its signature when a key is given (unchanged otherwise)."""
    return side | {"signature": signature(side, key)} if key else side


def check_trust(path: Path, side: dict[str, Any], trust: Trust) -> None:
    """Refuse a wrongly signed artefact (when a key is set) or a stale one (when the
    deployment's source hash is known and staleness is not allowed)."""
    if trust.key is not None:
        sig = side.get("signature")
        if not isinstance(sig, str):
            raise ArtifactError(f"artefact {path.name} is unsigned and an engines key is set; re-export it with "
                                "the key (vpure export signs with VPURE_ENGINES_KEY)")
        if not hmac.compare_digest(sig, signature(side, trust.key)):
            raise ArtifactError(f"artefact {path.name}: its sidecar's signature does not verify with the engines "
                                "key (edited after export, or signed with another key); refusing to run it")
    field, want = "source_sha256", trust.source_sha256
    source_id = trust.source_id() if callable(trust.source_id) and side.get("source_id") else trust.source_id
    if source_id is not None and side.get("source_id") is not None:
        field, want = "source_id", source_id
    elif want is None and trust.state_hash is not None:
        want = trust.state_hash()
    if want is not None and side.get(field) != want:
        kind, verb = ("hash", "hash to") if field == "source_sha256" else ("source id", "give source id")
        what = (f"artefact {path.name} was exported from weights with {kind} {str(side.get(field))[:12]}..., "
                f"but the deployment's weights {verb} {want[:12]}... (changed or retrained since the export)")
        if not trust.allow_stale:
            raise ArtifactError(f"{what}; re-export it, or run with --allow-stale to serve it anyway")
        log.warning("%s; serving it anyway (allow_stale)", what)


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
    if not isinstance(data, dict):
        raise ArtifactError(f"sidecar {side} holds a JSON {type(data).__name__}, not an object; re-export the artefact")
    if data.get("sidecar_version") != SIDECAR_VERSION:
        raise ArtifactError(f"sidecar {side} has version {data.get('sidecar_version')}, expected {SIDECAR_VERSION}")
    return data


def verify(onnx_path: str | Path, spec: ComponentSpec, precision: Precision,
           recipe: CalibrationRecipe | None = None, expect: dict[str, Any] | None = None,
           trust: Trust | None = None) -> dict[str, Any]:
    """The sidecar of a matching, untouched artefact; ArtifactError naming the mismatch otherwise.

    Works for ONNX files (hash under ``onnx_sha256``) and TensorRT engines (``engine_sha256``);
    ``expect`` adds keys the sidecar must hold (an engine's TensorRT version and device tag);
    ``trust`` the source and signature checks (:class:`Trust`).
    """
    onnx_path = Path(onnx_path)
    if not onnx_path.is_file():
        raise ArtifactError(f"artefact {onnx_path} does not exist")
    side = read_sidecar(onnx_path)
    check_trust(onnx_path, side, trust or Trust())
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
