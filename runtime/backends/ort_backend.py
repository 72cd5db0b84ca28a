"""ONNX Runtime backend: a verified artefact behind the one backend call.

The artefact is found by name from the request (component, precision, calibration,
profile, toolchain) and its sidecar verified before a session is created. CUDA and
TensorRT execution providers are used when the installed build really offers them
(``get_available_providers()``, then ``session.get_providers()``), never by package name.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ..artifacts import find_artifact, verify
from ..errors import BackendUnavailable, ConfigError, InputError
from ..log import get_logger
from ..precision import Precision
from ..registry import ComponentSpec
from ..runconfig import ComponentChoice
from .base import check_inputs

log = get_logger(__name__)


def select_providers(device: str) -> list[str]:
    import onnxruntime as ort

    available = ort.get_available_providers()
    wanted = ["CPUExecutionProvider"]
    if torch.device(device).type == "cuda":
        wanted = [p for p in ("TensorrtExecutionProvider", "CUDAExecutionProvider") if p in available] + wanted
        if len(wanted) == 1:
            raise BackendUnavailable(f"device {device!r} requested but this onnxruntime offers only {available} "
                                     f"(install onnxruntime-gpu)")
    return wanted


class OrtBackend:
    name = "onnxruntime"

    def __init__(self, spec: ComponentSpec, path, precision: Precision, recipe=None, device: str = "cpu"):
        import onnxruntime as ort

        self.spec, self.precision, self.path = spec, precision, path
        self.sidecar = verify(path, spec, precision, recipe)
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = ort.InferenceSession(str(path), opts, providers=select_providers(device))
        got = self.session.get_providers()
        if torch.device(device).type == "cuda" and got == ["CPUExecutionProvider"]:
            raise BackendUnavailable(f"{spec.name}: onnxruntime fell back to CPU for a CUDA request ({got})")
        self.profile = spec.profile
        log.info("%s: %s on %s", spec.name, path.name, got)

    def _check_profile(self, inputs: dict[str, torch.Tensor]) -> None:
        seen: dict[str, int] = {}
        for t in self.spec.inputs:
            for d, size in zip(t.shape, inputs[t.name].shape):
                if isinstance(d, str):
                    lo, _, hi = self.profile[d]
                    if not lo <= size <= hi:
                        raise InputError(f"{self.spec.name}: input {t.name!r} dimension {d}={size} is outside the "
                                         f"artefact's profile [{lo}, {hi}]")
                    if seen.setdefault(d, size) != size:
                        raise InputError(f"{self.spec.name}: dimension {d} is {seen[d]} in one input and {size} in another")

    def __call__(self, **inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        check_inputs(self.spec, inputs)
        self._check_profile(inputs)
        feeds = {k: np.ascontiguousarray(v.detach().cpu().numpy()) for k, v in inputs.items()}
        outs = self.session.run(list(self.spec.output_names), feeds)
        return {t.name: torch.from_numpy(np.asarray(o, dtype=np.float32) if t.dtype == "float32" else o)
                for t, o in zip(self.spec.outputs, outs)}


def create(spec: ComponentSpec, choice: ComponentChoice, *, module: Any = None, device: str = "cpu",
           engines_dir: Any = None) -> OrtBackend:
    if engines_dir is None:
        raise ConfigError(f"component {spec.name!r}: the onnxruntime backend needs engines_dir")
    path = find_artifact(engines_dir, spec, choice.precision, choice.recipe)
    return OrtBackend(spec, path, choice.precision, choice.recipe, device)
