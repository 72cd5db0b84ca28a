"""`import vpure.runtime` stays lean: no onnx, TensorRT, Triton, vpure.export, no CUDA init."""

from __future__ import annotations

import subprocess
import sys

FORBIDDEN = ("onnx", "onnxruntime", "tensorrt", "triton", "vpure.export", "diffusers", "transformers")


def test_runtime_import_is_lean(tmp_path):
    code = (
        "import sys\n"
        "import vpure.runtime, vpure.kernels\n"
        "from vpure.runtime import registry, config, runconfig, precision, backends\n"
        "from vpure.runtime.backends import torch_backend\n"
        "specs = list(registry.components())\n"
        "import torch\n"
        f"bad = [m for m in {FORBIDDEN!r} if m in sys.modules]\n"
        "assert not bad, bad\n"
        "assert not torch.cuda.is_initialized()\n"
        "print(len(specs))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert int(out.stdout) >= 5
