"""Which implementation of a kernel runs where.

``impl`` is one of "auto", "triton", "native", "torch", "ref". "auto" picks the fastest
one available for the tensor's device: Triton on CUDA, the native C++ extension on CPU,
torch otherwise. Triton is imported only when a Triton implementation actually runs, so
importing vpure never imports it; on CPU tensors Triton runs only under its interpreter
(TRITON_INTERPRET=1, a test facility).
"""

from __future__ import annotations

import importlib
import importlib.util
from functools import lru_cache
from types import ModuleType

import torch

from .errors import KernelUnavailable

IMPLS = ("triton", "native", "torch", "ref")
_native_error: str | None = None


@lru_cache(maxsize=None)
def native() -> ModuleType | None:
    """The compiled ``vpure.kernels._native`` module, or None where it was not built."""
    global _native_error
    try:
        return importlib.import_module("vpure.kernels._native")
    except ImportError as e:
        _native_error = str(e)
        return None


def native_error() -> str | None:
    native()
    return _native_error


@lru_cache(maxsize=None)
def triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def triton_interpreting() -> bool:
    """True when Triton kernels run on the CPU interpreter (TRITON_INTERPRET=1)."""
    if not triton_installed():
        return False
    import triton

    knobs = getattr(triton, "knobs", None)
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    import os  # triton < 3.4 reads its own variable directly; so do we, only here

    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def available_impls() -> dict[str, str]:
    """name -> "yes" or "no: <reason>" (used by ``vpure info``)."""
    out = {}
    cuda = torch.cuda.is_available()
    if not triton_installed():
        out["triton"] = "no: triton is not installed (pip install 'vpure[triton]')"
        out["triton-interpreter"] = out["triton"]
    else:
        out["triton"] = "yes" if cuda else "no: no CUDA device"
        out["triton-interpreter"] = "yes (TRITON_INTERPRET=1 set)" if triton_interpreting() else "yes (set TRITON_INTERPRET=1)"
    out["native"] = "yes" if native() is not None else f"no: {native_error()}"
    out["torch"] = "yes"
    out["ref"] = "yes"
    return out


def resolve(impl: str, device: torch.device | str, supported: tuple[str, ...] = IMPLS) -> str:
    """Map ``impl`` (possibly "auto") to a concrete implementation for ``device``."""
    dev = torch.device(device)
    if impl == "auto":
        if dev.type == "cuda" and "triton" in supported and triton_installed():
            return "triton"
        if dev.type == "cpu" and "native" in supported and native() is not None:
            return "native"
        return "torch"
    if impl not in IMPLS:
        raise KernelUnavailable(f"impl={impl!r} is not one of 'auto', {', '.join(map(repr, IMPLS))}")
    if impl not in supported:
        raise KernelUnavailable(f"impl={impl!r} is not provided for this op (choose from {supported})")
    if impl == "native":
        if dev.type != "cpu":
            raise KernelUnavailable(f"impl='native' runs on CPU tensors, got device {dev}")
        if native() is None:
            raise KernelUnavailable(f"impl='native' is not built here: {native_error()}")
    if impl == "triton":
        if not triton_installed():
            raise KernelUnavailable("impl='triton' needs triton (pip install 'vpure[triton]')")
        if dev.type != "cuda" and not triton_interpreting():
            raise KernelUnavailable(f"impl='triton' needs a CUDA tensor or TRITON_INTERPRET=1, got device {dev}")
    return impl
