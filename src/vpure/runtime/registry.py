"""The one registry of deployable components.

Each component is described once: its role, named inputs and outputs with symbolic
shapes, the shape profile (min/opt/max per named dimension), how to build a tiny
random-init instance, how to load a real checkpoint, which ONNX exporter suits it and the
tolerances its exported forms must meet. Export, runtime, tests and benchmarks iterate
over :func:`components`; adding a recogniser is one new :func:`register` call.
"""

from __future__ import annotations

import enum
import importlib
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Callable, Iterator, Mapping

from .errors import ConfigError, InputError, UnknownComponent


class Role(str, enum.Enum):
    EPS = "eps"  # UNet as eps_fn(z, t)
    VAE_ENCODER = "vae_encoder"
    VAE_DECODER = "vae_decoder"
    FLOW = "flow"
    RECOGNIZER = "recognizer"
    FRAME_CLASSIFIER = "frame_classifier"
    COMDEFEND = "comdefend"


Dim = int | str  # a fixed size or the name of a dimension in the profile


@dataclass(frozen=True)
class TensorSpec:
    """One named input or output. ``shape`` entries are ints or dimension names."""

    name: str
    shape: tuple[Dim, ...]
    dtype: str = "float32"
    value_range: tuple[float, float] = (0.0, 1.0)  # for sample and calibration inputs
    doc: str = ""

    def resolve(self, dims: Mapping[str, int]) -> tuple[int, ...]:
        out = []
        for d in self.shape:
            if isinstance(d, str):
                if d not in dims:
                    raise ConfigError(f"tensor {self.name!r}: dimension {d!r} has no size in the profile")
                out.append(int(dims[d]))
            else:
                out.append(int(d))
        return tuple(out)

    def check(self, tensor: Any, dims: Mapping[str, int] | None = None) -> None:
        """Raise InputError unless ``tensor`` has this spec's rank, dtype and fixed sizes."""
        shape = tuple(tensor.shape)
        if len(shape) != len(self.shape):
            raise InputError(f"input {self.name!r}: expected rank {len(self.shape)} {self.shape}, got shape {shape}")
        for want, got in zip(self.shape, shape):
            if isinstance(want, int) and want != got:
                raise InputError(f"input {self.name!r}: expected shape {self.shape}, got {shape}")
        dtype = str(tensor.dtype).replace("torch.", "")
        if dtype != self.dtype:
            raise InputError(f"input {self.name!r}: expected dtype {self.dtype}, got {dtype}")


@dataclass(frozen=True)
class Tolerance:
    """Parity a component's exported forms must meet against its torch module."""

    fp32_atol: float = 1e-4
    fp32_rtol: float = 1e-4
    fp16_sqnr_db: float = 40.0
    int8_sqnr_db: float = 20.0


@dataclass(frozen=True)
class ComponentSpec:
    name: str
    role: Role
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    # Named dimension -> (min, opt, max) for the tiny configuration; equal values = static.
    profile: Mapping[str, tuple[int, int, int]]
    # "module:function" building a random-init tiny instance (seed the RNG first).
    build_tiny: str
    # "module:function" loading a real checkpoint from a local path, or None.
    loader: str | None = None
    # ONNX exporter that works for this graph and why (dynamo vs TorchScript-based legacy).
    exporter: str = "legacy"
    exporter_reason: str = ""
    opset: int = 17
    tolerance: Tolerance = Tolerance()
    # Op types the fp16 conversion keeps in fp32 for this component.
    fp32_ops: tuple[str, ...] = ()
    # Op types int8 quantisation leaves in float (in addition to fp32_ops).
    int8_float_ops: tuple[str, ...] = ()
    # Engine precisions this component is validated for, and why others are not (bf16 is a
    # torch compute precision only: ONNX Runtime's CPU provider has no bf16 kernels).
    precisions: tuple[str, ...] = ("fp32", "fp16", "int8")
    precision_note: str = ""
    doc: str = ""
    tags: tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        names = [t.name for t in (*self.inputs, *self.outputs)]
        if len(set(names)) != len(names):
            raise ConfigError(f"component {self.name!r}: input/output names must be unique, got {names}")
        for t in (*self.inputs, *self.outputs):
            for d in t.shape:
                if isinstance(d, str) and d not in self.profile:
                    raise ConfigError(f"component {self.name!r}: dimension {d!r} of {t.name!r} missing from profile")
        for d, (lo, opt, hi) in self.profile.items():
            if not (1 <= lo <= opt <= hi):
                raise ConfigError(f"component {self.name!r}: profile of {d!r} must satisfy 1 <= min <= opt <= max")
        object.__setattr__(self, "profile", MappingProxyType(dict(self.profile)))

    @property
    def input_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.inputs)

    @property
    def output_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.outputs)

    def dynamic_dims(self) -> tuple[str, ...]:
        return tuple(d for d, (lo, _, hi) in self.profile.items() if lo != hi)

    def dims(self, which: str = "opt") -> dict[str, int]:
        idx = {"min": 0, "opt": 1, "max": 2}[which]
        return {d: v[idx] for d, v in self.profile.items()}

    def _call(self, ref: str) -> Callable[..., Any]:
        mod, _, fn = ref.partition(":")
        return getattr(importlib.import_module(mod), fn)

    def build(self, seed: int = 0):
        """A random-init tiny instance in eval mode, deterministic for ``seed``."""
        import torch

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            module = self._call(self.build_tiny)()
        return module.eval()

    def load(self, path: str | Path, **kwargs: Any):
        if self.loader is None:
            raise ConfigError(f"component {self.name!r} has no checkpoint loader")
        return self._call(self.loader)(Path(path), **kwargs)

    def sample_inputs(self, dims: Mapping[str, int] | None = None, seed: int = 0) -> dict[str, Any]:
        """Inputs drawn uniformly from each input's declared range at ``dims`` (default: opt)."""
        import torch

        sizes = self.dims("opt") | dict(dims or {})
        gen = torch.Generator().manual_seed(seed)
        out = {}
        for t in self.inputs:
            shape = t.resolve(sizes)
            lo, hi = t.value_range
            if t.dtype.startswith("int"):
                out[t.name] = torch.randint(int(lo), int(hi) + 1, shape, generator=gen, dtype=getattr(torch, t.dtype))
            else:
                x = torch.rand(shape, generator=gen, dtype=torch.float32) * (hi - lo) + lo
                out[t.name] = x.to(getattr(torch, t.dtype))
        return out


# The contract every clip recogniser shares: (B, 3, T, H, W) in [0, 1] -> logits (B, K).
RECOGNIZER_IO = dict(inputs=(TensorSpec("frames", ("B", 3, "T", "H", "W")),),
                     outputs=(TensorSpec("logits", ("B", "K")),))

_REGISTRY: dict[str, ComponentSpec] = {}
_BUILTIN_MODULES = ("vpure.runtime.models.diffusion", "vpure.runtime.models.frame_classifier",
                    "vpure.runtime.models.comdefend", "vpure.runtime.models.i3d", "vpure.runtime.models.raft",
                    "vpure.runtime.models.videomae", "vpure.runtime.models.slowfast")
_loaded = False


def register(spec: ComponentSpec) -> ComponentSpec:
    if spec.name in _REGISTRY and _REGISTRY[spec.name] != spec:
        raise ConfigError(f"component {spec.name!r} is already registered with a different description")
    _REGISTRY[spec.name] = spec
    return spec


def _ensure_builtins() -> None:
    # Model modules describe themselves on import; importing them is cheap (no torch
    # model is built and no heavy third-party library is imported until build()).
    global _loaded
    if not _loaded:
        for mod in _BUILTIN_MODULES:
            importlib.import_module(mod)
        _loaded = True


def components(role: Role | str | None = None) -> Iterator[ComponentSpec]:
    _ensure_builtins()
    role = Role(role) if role is not None else None
    for spec in _REGISTRY.values():
        if role is None or spec.role == role:
            yield spec


def get(name: str) -> ComponentSpec:
    _ensure_builtins()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UnknownComponent(
            f"no component named {name!r}; registered: {', '.join(sorted(_REGISTRY))}"
        ) from None
