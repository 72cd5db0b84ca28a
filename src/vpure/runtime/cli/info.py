"""``vpure info``: what this installation can do."""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import sys
from typing import Any

from vpure.runtime.versions import package_version

_PACKAGES = ("vpure", "torch", "numpy", "diffusers", "transformers", "safetensors", "onnx",
             "onnxruntime", "onnxruntime-gpu", "tensorrt", "triton", "cupy-cuda12x", "av",
             "opencv-python-headless")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a report")


def _onnxruntime() -> dict[str, Any]:
    if importlib.util.find_spec("onnxruntime") is None:
        return {"available": False, "reason": "onnxruntime is not installed"}
    try:
        import onnxruntime as ort

        # What the installed build can actually run, not what its package name promises.
        return {"available": True, "providers": list(ort.get_available_providers())}
    except Exception as e:  # a broken install should be reported, not crash `info`
        return {"available": False, "reason": f"import failed: {e}"}


def _tensorrt() -> dict[str, Any]:
    if importlib.util.find_spec("tensorrt") is None:
        return {"available": False, "reason": "tensorrt is not installed (pip install 'vpure[tensorrt]')"}
    return {"available": True, "version": package_version("tensorrt")}


def collect() -> dict[str, Any]:
    import torch

    from vpure import kernels
    from vpure.runtime import memory, registry
    from vpure.runtime.backends import backend_names
    from vpure.runtime.machine import machine_id
    from vpure.runtime.env import read_environment
    from vpure.runtime.models.quantized import int8_ops_available
    from vpure.runtime.precision import native_bf16, x86_without_vnni

    cuda = torch.cuda.is_available()
    native = kernels.native()
    env = read_environment()
    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "packages": {p: v for p in _PACKAGES if (v := package_version(p)) is not None},
        "cpu": {"machine": machine_id(), "threads": torch.get_num_threads(), "native_bf16": native_bf16(),
                "torch_int8": int8_ops_available(), "int8_vnni": not x86_without_vnni(),
                "memory": memory.describe()},
        "cuda": {"available": cuda, "torch_cuda": torch.version.cuda,
                 "devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if cuda else []},
        "backends": {"torch": {"available": True, "devices": ["cpu"] + (["cuda"] if cuda else [])},
                     "onnxruntime": _onnxruntime(), "tensorrt": _tensorrt(),
                     "runtime_backends": list(backend_names())},
        "kernels": {"implementations": kernels.available_impls(),
                    "native": native.build_info() if native is not None else None},
        "components": [
            {"name": s.name, "role": s.role.value,
             "inputs": [f"{t.name}{list(t.shape)}:{t.dtype}" for t in s.inputs],
             "outputs": [f"{t.name}{list(t.shape)}:{t.dtype}" for t in s.outputs],
             "loader": s.loader is not None}
            for s in registry.components()
        ],
        "data_dir": str(env.data_dir) if env.data_dir else None,
        "cache_dir": str(env.cache_dir),
    }


def render(info: dict[str, Any]) -> str:
    lines = [f"vpure {info['packages'].get('vpure', '?')}  (python {info['python']}, {info['platform']})", "",
             "packages:"]
    lines += [f"  {k:<24} {v}" for k, v in info["packages"].items()]
    cpu = info["cpu"]
    lines += ["", f"cpu: {cpu['machine']}, torch threads {cpu['threads']}, bf16 "
                  f"{'native' if cpu['native_bf16'] else 'emulated (choose fp32 on this CPU)'}, torch int8 "
                  f"{('yes' + ('' if cpu['int8_vnni'] else ' (no VNNI: 7-bit weights)')) if cpu['torch_int8'] else 'no'}",
              f"cpu memory: {cpu['memory']}"]
    cuda = info["cuda"]
    lines += ["", f"cuda: {'yes ' + ', '.join(cuda['devices']) if cuda['available'] else 'no'}"
                  f" (torch built for CUDA {cuda['torch_cuda']})", "", "backends:"]
    for name in ("torch", "onnxruntime", "tensorrt"):
        b = info["backends"][name]
        detail = (", ".join(b.get("providers", b.get("devices", []))) or b.get("version", "")) if b["available"] else b["reason"]
        lines.append(f"  {name:<12} {'yes' if b['available'] else 'no '}  {detail}")
    lines += ["", "kernel implementations:"]
    lines += [f"  {k:<20} {v}" for k, v in info["kernels"]["implementations"].items()]
    nat = info["kernels"]["native"]
    if nat:
        lines.append(f"  native build: openmp={nat['openmp']} threads={nat['max_threads']} "
                     f"avx2={nat['avx2']} compiler={nat.get('compiler', '?')}")
    lines += ["", "components:"]
    for c in info["components"]:
        lines.append(f"  {c['name']:<18} {c['role']:<17} {', '.join(c['inputs'])} -> {', '.join(c['outputs'])}")
    lines += ["", f"data dir: {info['data_dir'] or 'not found (set VPURE_DATA)'}", f"cache dir: {info['cache_dir']}"]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    info = collect()
    print(json.dumps(info, indent=2) if args.json else render(info))
    return 0
