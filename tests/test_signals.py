"""SIGTERM ends a run with its summary; a second signal ends it at once, without a traceback."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest


def _start(data_dir, out):
    return subprocess.Popen([sys.executable, "-m", "vpure", "run", str(data_dir / "vtest.avi"), "--tiny", "--flow",
                             "dis", "--window", "8", "--stride", "4", "--realtime", "--out", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_a_record(p, out, timeout=240):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if out.is_file() and out.read_text().count("\n") >= 1:
            return
        if p.poll() is not None:
            pytest.fail(f"vpure run ended early: {p.stderr.read()}")
        time.sleep(0.1)
    p.kill()
    pytest.fail("no record within the time limit")


def test_sigterm_stops_like_ctrl_c_with_the_summary_and_exit_143(tmp_path, data_dir):
    out = tmp_path / "r.jsonl"
    p = _start(data_dir, out)
    _wait_for_a_record(p, out)
    p.send_signal(signal.SIGTERM)
    stdout, stderr = p.communicate(timeout=120)
    assert p.returncode == 143, stderr
    assert "ended by: SIGTERM" in stderr and "Traceback" not in stderr
    summary = json.loads(stdout)["summary"]
    assert summary["interrupted"] and summary["clips"] == len(out.read_text().splitlines())


def test_a_second_signal_exits_at_once_without_a_traceback(tmp_path, data_dir):
    out = tmp_path / "r.jsonl"
    p = _start(data_dir, out)
    _wait_for_a_record(p, out)
    p.send_signal(signal.SIGINT)
    p.send_signal(signal.SIGINT)
    _, stderr = p.communicate(timeout=120)
    assert p.returncode == 130 and "Traceback" not in stderr, stderr
    assert all(json.loads(line)["clip"] >= 0 for line in out.read_text().splitlines())  # whole records only
