"""A one-line description of the machine, for benchmark rows and ``vpure info``."""

from __future__ import annotations

import os
import platform


def machine_id() -> str:
    """CPU model, core count and the vector ISA torch dispatches to, e.g. ``AMD EPYC x2
    (family 25 model 1, AVX2)``: virtual machines often name only the vendor line, and the
    same line spans generations with and without AVX-512 or native bf16."""
    import torch

    from .env import cpuinfo
    from .precision import native_bf16

    info = cpuinfo()
    cpu = info.get("model name") or platform.processor() or platform.machine()
    isa = [f"family {info['cpu family']} model {info['model']}"] if "cpu family" in info and "model" in info else []
    try:
        isa.append(torch.backends.cpu.get_cpu_capability())
    except (AttributeError, RuntimeError):
        pass
    if native_bf16():
        isa.append("native bf16")
    return f"{cpu} x{os.cpu_count()}" + (f" ({', '.join(isa)})" if isa else "")
