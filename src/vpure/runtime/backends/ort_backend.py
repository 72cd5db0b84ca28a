"""ONNX Runtime backend: a verified artefact behind the one backend call.

The artefact is found by name from the request (component, precision, calibration,
profile, toolchain) and its sidecar verified before a session is created. CUDA and
TensorRT execution providers are used when the installed build really offers them
(``get_available_providers()``, then ``session.get_providers()``), never by package name.

Calls go through IO binding: inputs are bound where they already live (no staging copy),
outputs land in buffers preallocated per input shape (:class:`~.base.OutputBuffers`).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ..artifacts import find_artifact, verify
from ..errors import BackendUnavailable, ConfigError
from ..log import get_logger
from ..precision import Precision, x86_without_vnni
from ..registry import ComponentSpec
from ..runconfig import ComponentChoice
from .base import OutputBuffers, check_inputs, check_profile

_NP = {"float32": np.float32, "float16": np.float16, "int64": np.int64, "int32": np.int32}

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

    def __init__(self, spec: ComponentSpec, path, precision: Precision, recipe=None, device: str = "cpu", *,
                 reuse_outputs: bool = False, trust=None):
        import onnxruntime as ort

        self.spec, self.precision, self.path = spec, precision, path
        self.sidecar = verify(path, spec, precision, recipe, trust=trust)
        cal = self.sidecar.get("calibration") or {}
        if (precision is Precision.INT8 and torch.device(device).type == "cpu" and cal.get("reduce_range") is False
                and x86_without_vnni()):
            log.warning("%s: %s has 8-bit int8 weights, and this x86 CPU has no VNNI: its int8 kernels saturate "
                        "with them (re-export without --int8-full-range for 7-bit weights)", spec.name, path.name)
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.log_severity_level = 3  # the optimiser's notes on unused initialisers are noise at run time
        self.session = ort.InferenceSession(str(path), opts, providers=select_providers(device))
        got = self.session.get_providers()
        if torch.device(device).type == "cuda" and got == ["CPUExecutionProvider"]:
            raise BackendUnavailable(f"{spec.name}: onnxruntime fell back to CPU for a CUDA request ({got})")
        self.device = torch.device(device)
        self.reuse_outputs = reuse_outputs
        self._outputs = OutputBuffers(spec, self.device)
        log.info("%s: %s on %s", spec.name, path.name, got)

    def __call__(self, **inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        check_inputs(self.spec, inputs)
        dims = check_profile(self.spec, inputs)
        bufs = self._outputs.get(dims)
        binding = self.session.io_binding()
        keep = []  # contiguous inputs must outlive the run
        for t in self.spec.inputs:
            x = inputs[t.name].detach()
            x = x if x.device == self.device else x.to(self.device)
            x = x.contiguous()
            keep.append(x)
            binding.bind_input(t.name, self.device.type, self.device.index or 0, _NP[t.dtype], tuple(x.shape),
                               x.data_ptr())
        for t in self.spec.outputs:
            if bufs is None:
                binding.bind_output(t.name, self.device.type, self.device.index or 0)
            else:
                b = bufs[t.name]
                binding.bind_output(t.name, self.device.type, self.device.index or 0, _NP[t.dtype], tuple(b.shape),
                                    b.data_ptr())
        self.session.run_with_iobinding(binding)
        if bufs is None:
            return {t.name: torch.from_numpy(o) for t, o in zip(self.spec.outputs, binding.copy_outputs_to_cpu())}
        return bufs if self.reuse_outputs else {k: v.clone() for k, v in bufs.items()}


def create(spec: ComponentSpec, choice: ComponentChoice, *, module: Any = None, device: str = "cpu",
           engines_dir: Any = None, reuse_outputs: bool = False, trust=None) -> OrtBackend:
    if engines_dir is None:
        raise ConfigError(f"component {spec.name!r}: the onnxruntime backend needs engines_dir")
    path = find_artifact(engines_dir, spec, choice.precision, choice.recipe)
    return OrtBackend(spec, path, choice.precision, choice.recipe, device, reuse_outputs=reuse_outputs, trust=trust)
