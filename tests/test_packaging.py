"""Layout and namespace: vpure.* only, editable and wheel installs both import."""

from __future__ import annotations

import importlib.metadata as md
import os
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(code: str, cwd: Path, env: dict | None = None, exe: str = sys.executable) -> str:
    out = subprocess.run([exe, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_installed_files_are_under_vpure_only():
    files = [str(f) for f in md.distribution("vpure").files or [] if not str(f).startswith("../")]
    # An editable install adds its import hook (a .pth and one _editable* module) beside vpure/.
    editable_hook = [f for f in files if f.endswith(".pth") or "_editable" in f.split("/")[-1]]
    tops = {f.split("/")[0] for f in files if f not in editable_hook}
    bad = sorted(t for t in tops if t != "vpure" and not t.startswith("vpure-"))
    assert not bad, f"vpure installs top-level names other than vpure: {bad}"


def _bare_names_stay_outside_the_checkout(cwd: Path) -> None:
    """From ``cwd``, vpure.* imports, and bare ``runtime``/``kernels``/``export`` are never
    the checkout's folders (a third-party ``kernels``, transformers' dependency, may exist)."""
    code = (
        "import importlib.util, vpure.runtime, vpure.kernels, vpure.export, vpure.kernels._native\n"
        "for bare in ('runtime', 'kernels', 'export'):\n"
        "    spec = importlib.util.find_spec(bare)\n"
        "    print(bare, spec.origin if spec else None)\n"
    )
    root = str(ROOT)
    for line in _run(code, cwd=cwd).splitlines():
        bare, origin = line.split(" ", 1)
        assert origin == "None" or not origin.startswith(root + os.sep) or "site-packages" in origin, \
            f"Python started in {cwd} imports the checkout's {bare!r}: {origin}"


def test_editable_install_imports_namespace_only(tmp_path):
    _bare_names_stay_outside_the_checkout(tmp_path)


def test_no_folder_of_the_checkout_shadows_a_package_from_its_root():
    _bare_names_stay_outside_the_checkout(ROOT)
    code = ("from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL\n"
            "import transformers\nprint('ok')\n")
    assert _run(code, cwd=ROOT).strip() == "ok"


def test_python_dash_m_vpure_info_from_the_checkout_root():
    out = subprocess.run([sys.executable, "-m", "vpure", "info", "--json"], cwd=ROOT, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert '"vpure"' in out.stdout


BENCHMARKS = sorted(p.stem for p in (ROOT / "benchmarks").glob("*.py") if p.stem not in ("__init__", "footage"))


@pytest.mark.parametrize("module", BENCHMARKS)
def test_each_benchmark_answers_help_from_the_checkout_root(module):
    out = subprocess.run([sys.executable, "-m", f"benchmarks.{module}", "--help"], cwd=ROOT, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, f"python -m benchmarks.{module} --help: {out.stderr[-2000:]}"
    assert "usage" in out.stdout.lower()


def test_a_ray_worker_started_from_the_checkout_root_imports_diffusers():
    ray = pytest.importorskip("ray", reason="Ray is not installed (it comes with the test extras)")
    code = (
        "import ray\n"
        "ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)\n"
        "@ray.remote\n"
        "def probe():\n"
        "    import importlib.util, os\n"
        "    from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL\n"
        "    spec = importlib.util.find_spec('kernels')\n"
        "    return os.getcwd(), spec.origin if spec else None\n"
        "cwd, origin = ray.get(probe.remote(), timeout=240)\n"
        "ray.shutdown()\n"
        "print(cwd)\nprint(origin)\n"
    )
    del ray
    out = _run(code, cwd=ROOT)
    origin = out.strip().splitlines()[-1]
    assert origin == "None" or not origin.startswith(str(ROOT / "src")), origin


def test_the_environment_is_the_lock():
    """./dev.sh installs with the lock as pip constraints; what runs the suite is what it lists."""
    lock = ROOT / "requirements-lock.txt"
    dev = (ROOT / "dev.sh").read_text()
    assert "LOCK=requirements-lock.txt" in dev and 'install "$VENV" -c "$LOCK"' in dev
    pins = {}
    for line in lock.read_text().splitlines():
        if line and not line.startswith("#"):
            name, version = line.split("==")
            pins[name.lower().replace("_", "-")] = version
    assert {"torch", "transformers", "diffusers", "numpy"} <= set(pins)
    if os.environ.get("VPURE_UNLOCKED") == "1":
        pytest.skip("running under ./dev.sh latest or lock: versions are resolved afresh on purpose")
    wrong = {}
    for name, version in pins.items():
        try:
            have = md.version(name)
        except md.PackageNotFoundError:
            wrong[name] = (version, None)
            continue
        if have.split("+")[0] != version.split("+")[0]:
            wrong[name] = (version, have)
    assert not wrong, f"installed versions differ from requirements-lock.txt (locked, installed): {wrong}"


def test_python_dash_m_vpure(tmp_path):
    out = subprocess.run([sys.executable, "-m", "vpure", "--version"], cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("vpure ")


@pytest.mark.slow
def test_wheel_builds_and_installs(tmp_path):
    wheel_dir = tmp_path / "wheels"
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation", "-q",
         "-w", str(wheel_dir), "-C", f"build-dir={tmp_path / 'build'}"],
        capture_output=True, text=True, timeout=900)
    assert build.returncode == 0, build.stderr[-3000:]
    (wheel,) = wheel_dir.glob("vpure-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    assert tops == {"vpure", f"vpure-{md.version('vpure')}.dist-info"}, tops
    assert any(n.startswith("vpure/kernels/_native") for n in names), "native extension missing from wheel"
    assert "vpure/__main__.py" in names and "vpure/runtime/__init__.py" in names
    assert not any(n.endswith((".cpp", ".h", ".inc")) for n in names)
    from vpure.runtime.miniworld.models import COMPONENTS

    for c in COMPONENTS:  # `vpure demo` needs nothing outside the installed package
        assert f"vpure/runtime/miniworld/weights/{c}.safetensors" in names, f"{c} weights missing from wheel"
        assert f"vpure/runtime/miniworld/weights/{c}.md" in names, f"{c} model card missing from wheel"

    # A clean environment that sees this venv's dependencies but not the editable install.
    env_dir = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env_dir)], check=True)
    py = env_dir / "bin" / "python"
    site = Path(_run("import sysconfig; print(sysconfig.get_paths()['purelib'])", cwd=tmp_path, exe=str(py)).strip())
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(wheel)],
                   check=True)
    code = ("import vpure.runtime, vpure.kernels, vpure.kernels._native as n\n"
            f"assert vpure.runtime.__file__.startswith({str(site)!r}), vpure.runtime.__file__\n"
            "print(n.build_info()['openmp'])\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    _run(code, cwd=tmp_path, env=env, exe=str(py))
    out = subprocess.run([str(py), "-m", "vpure", "info", "--json"], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr


def test_gpu_tier_script_parses_and_names_its_steps():
    script = ROOT / "benchmarks" / "gpu_tier.sh"
    out = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    text = script.read_text()
    for step in ("bench_modelscope", "gpu_tests", "bench_warp_l1"):
        assert f"step {step} " in text
    assert "--configs modelscope" in text and "-m gpu" in text
