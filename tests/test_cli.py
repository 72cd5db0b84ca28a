"""`vpure info` runs and reports the native extension as built."""

from __future__ import annotations

import json
import subprocess
import sys


def test_info_json_reports_native(tmp_path):
    out = subprocess.run([sys.executable, "-m", "vpure", "info", "--json"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout)
    assert info["kernels"]["implementations"]["native"] == "yes"
    assert info["kernels"]["native"]["openmp"] in (True, False)
    assert info["backends"]["torch"]["available"]
    assert {c["name"] for c in info["components"]} >= {"unet", "vae_encoder", "vae_decoder"}
    assert "torch" in info["packages"]
    assert info["cpu"]["threads"] >= 1 and isinstance(info["cpu"]["native_bf16"], bool) and info["cpu"]["machine"]


def test_info_report_and_errors(tmp_path, capsys):
    from vpure.runtime.cli import main

    assert main(["info"]) == 0
    text = capsys.readouterr().out
    assert "kernel implementations:" in text and "native build:" in text
    assert main([]) == 2  # no subcommand: help on stderr, usage error
