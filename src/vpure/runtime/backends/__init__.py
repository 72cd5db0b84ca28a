"""Backends behind one call: ``backend(**named_inputs) -> {output_name: tensor}``.

Each backend is chosen per component by :class:`~vpure.runtime.runconfig.ComponentChoice`;
callers never branch on which one they got. Inputs and outputs are float32 (or the
declared dtype) whatever the compute precision.
"""

from __future__ import annotations

import importlib
from typing import Any

from ..errors import BackendUnavailable
from ..registry import ComponentSpec
from ..runconfig import ComponentChoice
from .base import Backend

# backend name -> "module:factory"; a factory is (spec, choice, *, module, device, engines_dir, reuse_outputs).
_FACTORIES: dict[str, str] = {
    "torch": "vpure.runtime.backends.torch_backend:create",
    "onnxruntime": "vpure.runtime.backends.ort_backend:create",
    "tensorrt": "vpure.runtime.backends.trt_backend:create",
}


def register_backend(name: str, factory: str) -> None:
    _FACTORIES[name] = factory


def backend_names() -> tuple[str, ...]:
    return tuple(_FACTORIES)


def create_backend(spec: ComponentSpec, choice: ComponentChoice, *, module: Any = None,
                   device: str = "cpu", engines_dir: Any = None, reuse_outputs: bool = False,
                   trust: Any = None) -> Backend:
    """The backend ``choice`` names for ``spec``.

    ``reuse_outputs``: engine backends return their preallocated output buffers themselves
    (valid until the next call) instead of copies; for callers that consume each output
    before calling again. ``trust`` (:class:`~vpure.runtime.artifacts.Trust`): what an engine
    must match beyond its request, the weights it came from and the folder's signing key.
    """
    ref = _FACTORIES.get(choice.backend)
    if ref is None:
        raise BackendUnavailable(
            f"component {spec.name!r}: backend {choice.backend!r} is not available in this vpure; "
            f"available: {', '.join(_FACTORIES)}"
        )
    mod, _, fn = ref.partition(":")
    factory = getattr(importlib.import_module(mod), fn)
    return factory(spec, choice, module=module, device=device, engines_dir=engines_dir, reuse_outputs=reuse_outputs,
                   trust=trust)


def backend_from_config(config, name: str, *, module: Any = None, reuse_outputs: bool = False) -> Backend:
    """The backend a :class:`~vpure.runtime.runconfig.RuntimeConfig` chooses for component ``name``."""
    from ..registry import get

    return create_backend(get(name), config.choice(name), module=module, device=config.device,
                          engines_dir=config.engines_dir, reuse_outputs=reuse_outputs)


def as_module_call(backend: Backend):
    """``backend`` with its torch module's positional call signature: ``f(*inputs) -> first output``
    (so a backend drops in wherever the module was used)."""
    names, out = backend.spec.input_names, backend.spec.output_names[0]

    def call(*args):
        return backend(**dict(zip(names, args)))[out]

    call.backend = backend  # type: ignore[attr-defined]
    return call


__all__ = ["as_module_call", "Backend", "backend_from_config", "backend_names", "create_backend", "register_backend"]
