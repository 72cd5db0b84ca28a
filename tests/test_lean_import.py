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


LAB_OR_EXPORT = ("vpure.lab", "vpure.export")
HEAVY = ("onnx", "ray", "pywt", "transformers", "diffusers", "torch")


def _modules_after(code: str, cwd) -> list[str]:
    out = subprocess.run([sys.executable, "-c", "import sys\n" + code + "\nprint('MODULES', *sorted(sys.modules))"],
                         cwd=cwd, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout.split("MODULES", 1)[1].split()  # after what the command itself printed


def test_vpure_run_help_imports_nothing_of_the_lab_the_exporter_or_the_models(tmp_path):
    mods = _modules_after("from vpure.runtime.cli import main\ntry:\n    main(['run', '--help'])\n"
                          "except SystemExit:\n    pass", tmp_path)
    bad = [m for m in mods if m.startswith(LAB_OR_EXPORT) or m.split(".")[0] in HEAVY]
    assert not bad, bad


def test_a_run_on_the_default_deployment_imports_no_lab_or_export_module(tmp_path, data_dir):
    mods = _modules_after("from vpure.runtime.cli import main\n"
                          f"assert main(['run', {str(data_dir / 'vtest.avi')!r}, '--frame-step', '16', '--out', "
                          f"{str(tmp_path / 'r.jsonl')!r}]) == 0", tmp_path)
    bad = [m for m in mods if m.startswith(LAB_OR_EXPORT) or m.split(".")[0] in ("onnx", "ray", "pywt")]
    assert not bad, bad
    assert (tmp_path / "r.jsonl").read_text().count("\n") >= 1
