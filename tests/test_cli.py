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
    assert isinstance(info["cpu"]["torch_int8"], bool) and isinstance(info["cpu"]["int8_vnni"], bool)
    assert "retained (" not in info["cpu"]["memory"]  # info reports the process as it is, applying nothing


def test_info_report_and_errors(tmp_path, capsys):
    from vpure.runtime.cli import main

    assert main(["info"]) == 0
    text = capsys.readouterr().out
    assert "kernel implementations:" in text and "native build:" in text
    assert main([]) == 2  # no subcommand: help on stderr, usage error


def test_bad_command_lines_get_one_clear_error_line(tmp_path, capsys):
    from vpure.runtime.cli import main

    junk = tmp_path / "junk.toml"
    junk.write_bytes(bytes(range(128, 256)))
    video = tmp_path / "v.mp4"
    video.write_bytes(b"")  # never opened: each line fails on its arguments first
    cases = [
        (["bench", "--configs", "tiny,bogus"], "unknown configuration(s) 'bogus'"),
        (["run", str(video), "--tiny", "--stride", "0"], "stride must be in [1, 512], got 0"),
        (["run", str(video), "--tiny", "--frame-step", "0"], "frame_step must be >= 1, got 0"),
        (["run", str(video), "--config", str(junk)], "not a TOML text file"),
        (["run", str(video), "--engines", str(tmp_path / "none")], "engines folder"),
    ]
    for argv, needle in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert needle in err and "Traceback" not in err, (argv, err)
