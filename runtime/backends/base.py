"""The backend contract and the input checks every backend shares."""

from __future__ import annotations

from typing import Any, Mapping, Protocol, runtime_checkable

import torch

from ..errors import InputError
from ..precision import Precision
from ..registry import ComponentSpec


@runtime_checkable
class Backend(Protocol):
    spec: ComponentSpec
    precision: Precision
    name: str

    def __call__(self, **inputs: torch.Tensor) -> dict[str, torch.Tensor]: ...


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
        if check_finite and x.is_floating_point() and not bool(torch.isfinite(x).all()):
            raise InputError(f"component {spec.name!r}: input {t.name!r} contains NaN or Inf")
