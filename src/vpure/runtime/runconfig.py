"""Runtime configuration: which backend and precision serves each component.

Swapping an fp16 engine for an int8 one is an edit of this file (or its TOML), never of
code::

    device = "cuda"
    engines_dir = "engines"
    [components.unet]
    backend = "onnxruntime"
    precision = "int8"
    [components.unet.calibration]
    count = 32
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

from .config import ConfigBase, check
from .precision import CalibrationRecipe, Precision

BACKEND_NAMES = ("torch", "onnxruntime", "tensorrt")


@dataclass(frozen=True)
class ComponentChoice(ConfigBase):
    backend: str = "torch"
    precision: Precision = Precision.FP32
    calibration: CalibrationRecipe | None = None  # int8 only; None = the default recipe
    # TensorRT only: capture each input shape's execution in a CUDA graph after one warm-up run.
    cuda_graph: bool = False
    # torch only: compile the module with Inductor, weights frozen (compile_for_inference);
    # the first call of each input shape compiles (minutes for a UNet on a small CPU).
    compile: bool = False

    def validate(self) -> None:
        check(self.backend in BACKEND_NAMES,
              f"ComponentChoice.backend {self.backend!r} is not one of {', '.join(BACKEND_NAMES)}")
        check(self.calibration is None or self.precision is Precision.INT8,
              f"ComponentChoice.calibration is only meaningful for int8, precision is {self.precision.value}")
        check(not self.cuda_graph or self.backend == "tensorrt",
              f"ComponentChoice.cuda_graph is a TensorRT option, backend is {self.backend!r}")
        check(not self.compile or self.backend == "torch",
              f"ComponentChoice.compile is a torch option, backend is {self.backend!r}")

    @property
    def recipe(self) -> CalibrationRecipe | None:
        if self.precision is not Precision.INT8:
            return None
        return self.calibration or CalibrationRecipe()


@dataclass(frozen=True)
class RuntimeConfig(ConfigBase):
    device: str = "cpu"
    engines_dir: Path | None = None
    components: Mapping[str, ComponentChoice] = field(default_factory=dict)
    # Serve engines exported from other weights than the deployment's (refused otherwise).
    allow_stale: bool = False
    # File holding the key engines must be signed with (else VPURE_ENGINES_KEY; neither: unsigned).
    engines_key_file: Path | None = None

    def validate(self) -> None:
        check(self.device == "cpu" or self.device == "cuda" or
              (self.device.startswith("cuda:") and self.device[5:].isdigit()),
              f"RuntimeConfig.device {self.device!r} must be 'cpu', 'cuda' or 'cuda:N'")
        from . import registry

        known = {s.name for s in registry.components()}
        unknown = sorted(set(self.components) - known)
        check(not unknown, f"RuntimeConfig.components: unknown component(s) {', '.join(unknown)}; "
                           f"registered: {', '.join(sorted(known))}")
        for name, choice in self.components.items():
            check(choice.backend == "torch" or self.engines_dir is not None,
                  f"RuntimeConfig.components.{name}: backend {choice.backend!r} needs engines_dir")

    def choice(self, name: str) -> ComponentChoice:
        return self.components.get(name) or ComponentChoice()
