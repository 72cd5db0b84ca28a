"""Keep freed CPU tensor memory inside the process between calls (glibc malloc).

glibc serves a large allocation with a fresh ``mmap`` and unmaps it on ``free`` (above a
threshold that adapts, from 128 KiB up to 32 MiB), and trims the heap's free top back to
the kernel once it exceeds twice that threshold. An inference call's activations are such
allocations, so every call's tensors come back as new pages that the kernel zero-fills on
first touch: thousands of page faults per gate or recogniser call, a measurable share of
its latency. :func:`retain_cpu_memory` fixes the mmap threshold
at its 32 MiB ceiling and the trim threshold at 1 GiB, so that freed blocks stay in the heap
for the next call: the process keeps its peak heap (resident set stable after warm-up, not
above the peak) instead of handing it back and faulting it in again.

It is process-wide and applied once: by the ``vpure`` command line before every subcommand
but ``info`` (which reports the process as it is), and by :func:`vpure.runtime.runner.load_components` for code that embeds the runtime.
``VPURE_RETAIN_CPU_MEMORY=0`` in the environment turns it off. Elsewhere than glibc
(musl, macOS, Windows) it does nothing and says so in the log.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import threading

from .env import read_environment

log = logging.getLogger(__name__)

ENV = "VPURE_RETAIN_CPU_MEMORY"
# Blocks up to 32 MiB come from the heap (the most any glibc accepts; larger ones keep their
# own mapping, so a freed giant block never strands heap space); up to 1 GiB of free heap
# top is kept rather than trimmed.
MMAP_THRESHOLD = 32 << 20
TRIM_THRESHOLD = 1 << 30
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters

_lock = threading.Lock()
_state: dict[str, object] = {}


@functools.cache  # find_library may run ldconfig: once per process
def _glibc():
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name)
    except OSError:
        return None
    return libc if hasattr(libc, "gnu_get_libc_version") and hasattr(libc, "mallopt") else None


def retain_cpu_memory() -> bool:
    """Raise glibc's mmap and trim thresholds (see the module docstring) once per process.
    True when they are in force (now or from an earlier call), False where the environment
    turns it off or the C library is not glibc."""
    with _lock:
        if "applied" in _state:
            return bool(_state["applied"])
        applied = False
        if not read_environment().retain_cpu_memory:
            log.debug("%s=0: glibc's default mmap and trim thresholds kept", ENV)
        elif (libc := _glibc()) is None:
            log.debug("not glibc: freed CPU memory goes back to the system as the C library decides")
        else:
            applied = bool(libc.mallopt(_M_MMAP_THRESHOLD, ctypes.c_int(MMAP_THRESHOLD))
                           and libc.mallopt(_M_TRIM_THRESHOLD, ctypes.c_int(TRIM_THRESHOLD)))
            log.debug("glibc malloc: mmap threshold %d bytes, trim threshold %d bytes (applied: %s)",
                      MMAP_THRESHOLD, TRIM_THRESHOLD, applied)
        _state["applied"] = applied
        return applied


def describe() -> str:
    """What :func:`retain_cpu_memory` does (or did) in this process, for ``vpure info``."""
    with _lock:
        applied = _state.get("applied")
    if applied:
        return f"glibc, freed memory retained (mmap threshold {MMAP_THRESHOLD >> 20} MiB, trim {TRIM_THRESHOLD >> 30} GiB)"
    if _glibc() is None:
        return "not glibc: left to the C library"
    if not read_environment().retain_cpu_memory:
        return f"glibc defaults ({ENV}=0)"
    return f"glibc; vpure commands and load_components retain freed memory ({ENV}=0: off)"

