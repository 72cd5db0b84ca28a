"""The backend contract and the input checks every backend shares."""

from __future__ import annotations

import math
from typing import Any, Mapping, Protocol, runtime_checkable

import torch

from ..errors import InputError, NonFiniteOutput
from ..precision import Precision
from ..registry import ComponentSpec


@runtime_checkable
class Backend(Protocol):
    spec: ComponentSpec
    precision: Precision
    name: str

    def __call__(self, **inputs: torch.Tensor) -> dict[str, torch.Tensor]: ...


def all_finite(x: torch.Tensor) -> bool:
    """Whether every element of a floating-point tensor is finite, in one reduction: a finite
    sum (accumulated in fp32, or fp64 for fp64) means no NaN or Inf is among the elements,
    since either would make the sum NaN or infinite. Only a non-finite sum (a bad element,
    or finite elements whose sum overflows) pays for the element-wise check, which costs
    ~25x the sum on CPU (``torch.isfinite(x).all()`` writes a boolean per element)."""
    if x.device.type == "meta":  # shapes only (FLOP counting): nothing to check
        return True
    total = x.sum(dtype=torch.float64 if x.dtype == torch.float64 else torch.float32)
    return math.isfinite(float(total)) or bool(torch.isfinite(x).all())


def require_finite(x: torch.Tensor, component: str, detail: str = "") -> torch.Tensor:
    """``x`` itself if every element is finite, else :class:`NonFiniteOutput` naming
    ``component``. One reduction (:func:`all_finite`) on the hot path."""
    if x.is_floating_point() and not all_finite(x):
        raise NonFiniteOutput(component, detail)
    return x


def check_inputs(spec: ComponentSpec, inputs: Mapping[str, Any], *, check_finite: bool = True) -> None:
    """Names, ranks, fixed sizes, dtypes and (for float inputs) finiteness."""
    missing = [n for n in spec.input_names if n not in inputs]
    extra = sorted(set(inputs) - set(spec.input_names))
    if missing or extra:
        raise InputError(
            f"component {spec.name!r} takes inputs {spec.input_names}; "
            f"missing {missing or 'none'}, unexpected {extra or 'none'}"
        )
    for t in spec.inputs:
        x = inputs[t.name]
        if not isinstance(x, torch.Tensor):
            raise InputError(f"component {spec.name!r}: input {t.name!r} must be a torch.Tensor, got {type(x).__name__}")
        t.check(x)
        if check_finite and x.is_floating_point() and not all_finite(x):
            raise InputError(f"component {spec.name!r}: input {t.name!r} contains NaN or Inf")


def check_profile(spec: ComponentSpec, inputs: Mapping[str, Any]) -> dict[str, int]:
    """Sizes of the named dimensions in ``inputs``; InputError if one is outside the profile
    (an engine built for it would fail or be wrong there) or disagrees between inputs."""
    seen: dict[str, int] = {}
    for t in spec.inputs:
        for d, size in zip(t.shape, inputs[t.name].shape):
            if isinstance(d, str):
                lo, _, hi = spec.profile[d]
                if not lo <= size <= hi:
                    raise InputError(f"{spec.name}: input {t.name!r} dimension {d}={size} is outside the "
                                     f"artefact's profile [{lo}, {hi}]")
                if seen.setdefault(d, size) != size:
                    raise InputError(f"{spec.name}: dimension {d} is {seen[d]} in one input and {size} in another")
    return seen


def output_shapes(spec: ComponentSpec, dims: Mapping[str, int]) -> dict[str, tuple[int, ...]] | None:
    """Output shapes implied by the input dims (fixed profile dims fill the rest); None when an
    output has a dynamic dimension no input determines (the engine must allocate it)."""
    sizes = {d: lo for d, (lo, _, hi) in spec.profile.items() if lo == hi} | dict(dims)
    try:
        return {t.name: t.resolve(sizes) for t in spec.outputs}
    except Exception:  # ConfigError: an undetermined dimension
        return None


class OutputBuffers:
    """Preallocated output tensors, one set per input-shape key, reused across calls.

    Backends write into these buffers; ``__call__`` hands the caller a copy unless the
    backend was created with ``reuse_outputs=True``, in which case the caller gets the
    buffers themselves, valid until the next call with the same shapes (the lean runtime
    uses that where it consumes each output before the next call).
    """

    def __init__(self, spec: ComponentSpec, device: torch.device, max_sets: int = 4):
        self.spec, self.device, self.max_sets = spec, device, max_sets
        self._sets: dict[tuple, dict[str, torch.Tensor]] = {}

    def get(self, dims: Mapping[str, int]) -> dict[str, torch.Tensor] | None:
        key = tuple(sorted(dims.items()))
        bufs = self._sets.get(key)
        if bufs is None:
            shapes = output_shapes(self.spec, dims)
            if shapes is None:
                return None
            if len(self._sets) >= self.max_sets:  # bounded: a stream of odd shapes cannot grow memory
                self._sets.pop(next(iter(self._sets)))
            bufs = {t.name: torch.empty(shapes[t.name], dtype=getattr(torch, t.dtype), device=self.device)
                    for t in self.spec.outputs}
            self._sets[key] = bufs
        return bufs
