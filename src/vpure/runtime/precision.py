"""Precision is one enum; int8 comes with a calibration recipe."""

from __future__ import annotations

import enum
import functools
import hashlib
import json
from dataclasses import dataclass

from .config import ConfigBase, check
from .errors import ConfigError


@functools.cache
def native_bf16() -> bool:
    """Whether this CPU runs bf16 convolutions and matmuls natively (oneDNN's check: AVX512-BF16
    or AMX). Without it PyTorch emulates bf16 on CPU, an order of magnitude slower than fp32.
    Fixed for the process, so cached (the fused plans ask on every call)."""
    import torch

    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def x86_without_vnni() -> bool:
    """True on an x86 CPU whose flags lack AVX512-VNNI and AVX-VNNI: its int8 kernels add
    u8 x s8 products in saturating 16-bit pairs (see ``CalibrationRecipe.reduce_range``).
    False elsewhere, or where /proc/cpuinfo cannot be read."""
    import platform

    from .env import cpuinfo

    if platform.machine().lower() not in ("x86_64", "amd64", "i686", "x86"):
        return False
    flags = cpuinfo().get("flags")
    return flags is not None and not ({"avx512_vnni", "avx_vnni"} & set(flags.split()))


EMULATED_BF16 = ("this CPU has no native bf16 (AVX512-BF16 or AMX); PyTorch emulates it, "
                 "an order of magnitude slower than fp32")


class Precision(str, enum.Enum):
    FP32 = "fp32"
    FP16 = "fp16"
    BF16 = "bf16"
    INT8 = "int8"

    @classmethod
    def parse(cls, value: "str | Precision") -> "Precision":
        if isinstance(value, Precision):
            return value
        try:
            return cls(str(value).lower())
        except ValueError:
            raise ConfigError(
                f"precision {value!r} is not one of {', '.join(p.value for p in cls)}"
            ) from None

    @property
    def torch_dtype(self):
        """Compute dtype for torch execution; int8 has none (it is an engine precision)."""
        import torch

        return {Precision.FP32: torch.float32, Precision.FP16: torch.float16, Precision.BF16: torch.bfloat16}.get(self)

    def __str__(self) -> str:
        return self.value


CALIBRATION_METHODS = ("minmax", "entropy", "percentile")


@dataclass(frozen=True)
class CalibrationRecipe(ConfigBase):
    """How int8 scales were measured; its ``id`` goes into engine names and sidecars.

    ``source`` is ``"random"`` (samples drawn from each input's declared range),
    ``"clips:<folder>"`` (decoded clips from a folder) or ``"miniworld"`` (the mini-world's
    training clips, rendered from their seeds: the calibration of the embedded default models,
    which needs no files).

    ``reduce_range`` quantises weights to 7 bits. x86 int8 kernels without VNNI (AVX2, and
    AVX-512 before VNNI) multiply u8 activations by s8 weights in 16-bit pair sums, which
    saturate with full-range weights (measured: the frame classifier's int8 artefact fell
    from >= 20 dB SQNR to 13 dB on an AVX2 CPU); 7-bit weights cannot saturate there, so an
    artefact stays accurate on any x86 box it is copied to. ``False`` keeps 8-bit weights
    for deployments known to have VNNI, ARM or TensorRT.
    """

    source: str = "random"
    count: int = 16
    method: str = "minmax"
    percentile: float = 99.99
    seed: int = 0
    reduce_range: bool = True

    def validate(self) -> None:
        check(self.count >= 1, f"CalibrationRecipe.count must be >= 1, got {self.count}")
        check(self.method in CALIBRATION_METHODS, f"CalibrationRecipe.method {self.method!r} is not one of {CALIBRATION_METHODS}")
        check(0.0 < self.percentile <= 100.0, f"CalibrationRecipe.percentile must be in (0, 100], got {self.percentile}")
        check(self.source in ("random", "miniworld") or self.source.startswith("clips:"),
              f"CalibrationRecipe.source {self.source!r} must be 'random', 'miniworld' or 'clips:<folder>'")

    @property
    def id(self) -> str:
        blob = json.dumps(self.to_dict(), sort_keys=True).encode()
        return f"{self.method}{self.count}-{hashlib.sha256(blob).hexdigest()[:8]}"
