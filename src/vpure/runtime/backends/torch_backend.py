"""Eager torch execution of a registered component (the reference backend).

int8 runs where a module has an int8 plan (:attr:`int8_plan_type`: the frame classifier's
:class:`~vpure.runtime.models.quantized.Int8FramePlan`, oneDNN's int8 convolutions on CPU),
calibrated when the backend is created on the samples of the choice's
:class:`~vpure.runtime.precision.CalibrationRecipe` (as an int8 ONNX artefact is); the
recipe's 7-bit weights apply where this CPU lacks VNNI, since the plan is built on the CPU
that runs it.
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import BackendUnavailable, ConfigError
from ..log import get_logger
from ..precision import EMULATED_BF16, CalibrationRecipe, Precision, native_bf16, x86_without_vnni
from ..registry import ComponentSpec
from ..runconfig import ComponentChoice
from .base import check_inputs

log = get_logger(__name__)


class TorchBackend:
    name = "torch"

    def __init__(self, spec: ComponentSpec, module: torch.nn.Module, precision: Precision = Precision.FP32,
                 device: str = "cpu", compile: bool = False, calibration: CalibrationRecipe | None = None):
        self.spec = spec
        self.precision = precision
        self.device = torch.device(device)
        if precision is Precision.BF16 and self.device.type == "cpu" and not native_bf16():
            log.warning("component %r runs in bf16, but %s; fp32 is faster here", spec.name, EMULATED_BF16)
        self.dtype = precision.torch_dtype or torch.float32  # int8 plans take fp32 inputs
        self.module = module.to(self.device, self.dtype).eval()
        self._compile_errors: tuple[type[Exception], ...] = ()
        if precision is Precision.INT8:
            self.module = self._int8_plan(spec, self.module, calibration or CalibrationRecipe(), compile)
            return
        if compile:
            from torch._dynamo.exc import BackendCompilerFailed
            from torch._inductor.exc import InvalidCxxCompiler

            from ..models.inference import compile_for_inference

            self.module = compile_for_inference(self.module)
            self._compile_errors = (BackendCompilerFailed, InvalidCxxCompiler)  # raised at a shape's first call

    def __call__(self, **inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        check_inputs(self.spec, inputs)
        args = []
        for t in self.spec.inputs:
            x = inputs[t.name].to(self.device, non_blocking=True)
            args.append(x.to(self.dtype) if x.is_floating_point() else x)
        with torch.inference_mode():
            out = self._forward(args)
        outs = out if isinstance(out, (tuple, list)) else (out,)
        if len(outs) != len(self.spec.outputs):
            raise ConfigError(f"component {self.spec.name!r}: module returned {len(outs)} outputs, "
                              f"the registry declares {self.spec.output_names}")
        return {t.name: (o.float() if o.is_floating_point() else o) for t, o in zip(self.spec.outputs, outs)}

    def _int8_plan(self, spec: ComponentSpec, module: torch.nn.Module, recipe: CalibrationRecipe, compile: bool):
        plan_type = getattr(module, "int8_plan_type", None)
        if plan_type is None:
            raise BackendUnavailable(
                f"component {spec.name!r}: the torch backend runs int8 only for the frame classifier; build an "
                f"int8 engine with `vpure export --precision int8` and select backend 'onnxruntime' or 'tensorrt'")
        if self.device.type != "cpu" or compile:
            raise ConfigError(f"component {spec.name!r}: the torch backend's int8 plan runs on CPU, uncompiled "
                              f"(device {self.device.type}, compile {compile})")
        from ..int8_calibration import calibration_batches

        name = spec.inputs[0].name
        clips = (torch.from_numpy(batch[name]) for batch in calibration_batches(spec, recipe))
        return plan_type(module, clips, method=recipe.method, percentile=recipe.percentile,
                         reduce_range=recipe.reduce_range and x86_without_vnni())

    @property
    def compiled(self) -> bool:
        return bool(self._compile_errors)

    def _forward(self, args: list[torch.Tensor]):
        try:
            return self.module(*args)
        except self._compile_errors as e:  # empty unless compiled: nothing caught then
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise BackendUnavailable(
                f"component {self.spec.name!r}: torch.compile could not compile it ({first}); Inductor needs a "
                f"C++ compiler on CPU and Triton on CUDA. Set compile = false for this component to run it eagerly"
            ) from e


def create(spec: ComponentSpec, choice: ComponentChoice, *, module: Any = None, device: str = "cpu",
           engines_dir: Any = None, reuse_outputs: bool = False, trust=None) -> TorchBackend:
    """``trust`` is for engines; a torch module is its own source."""
    if module is None:
        raise ConfigError(f"component {spec.name!r}: the torch backend needs a module (build or load one)")
    return TorchBackend(spec, module, choice.precision, device, compile=choice.compile, calibration=choice.recipe)
