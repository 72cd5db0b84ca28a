"""Records are written whole or not at all; output failures end the run cleanly."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys

import pytest

from vpure.runtime.cli import main
from vpure.runtime.errors import ConfigError
from vpure.runtime.records import OutputError, RecordSink

RUN = ["--tiny", "--flow", "dis", "--window", "8", "--stride", "4"]


def _vpure(args, **kw):
    return subprocess.run([sys.executable, "-m", "vpure", "run", *args], capture_output=True, text=True,
                          timeout=300, **kw)


def _records(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_unwritable_outputs_are_refused_before_any_model_loads(tmp_path, monkeypatch, capsys, data_dir):
    import vpure.runtime.runner as runner

    monkeypatch.setattr(runner, "load_components", lambda cfg: pytest.fail("a model loaded"))
    (tmp_path / "a_file").write_text("x")
    for out, says in [(tmp_path, "is a folder"), (tmp_path / "a_file" / "r.jsonl", "which is a file, not a folder"),
                      ("/proc/vpure-records.jsonl", "cannot be written")]:
        assert main(["run", str(data_dir / "vtest.avi"), *RUN, "--out", str(out)]) == 2
        assert says in capsys.readouterr().err


def test_a_full_disk_ends_the_run_with_its_summary_and_exit_74(data_dir):
    out = _vpure([str(data_dir / "vtest.avi"), *RUN, "--out", "/dev/full"])
    assert out.returncode == 74, out.stderr
    assert "the disk is full" in out.stderr and "0 clips" in out.stderr and "Traceback" not in out.stderr


def test_the_file_size_limit_leaves_only_whole_records(tmp_path, data_dir):
    path = tmp_path / "r.jsonl"

    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (700, 700))

    out = _vpure([str(data_dir / "vtest.avi"), *RUN, "--out", str(path)], preexec_fn=limit)
    assert out.returncode == 74, out.stderr
    assert "file-size limit" in out.stderr and "Traceback" not in out.stderr
    text = path.read_text()
    assert text.endswith("\n") and len(text) <= 700
    records = _records(path)
    assert records and f"{len(records)} clips" in out.stderr  # every record counted was written whole


def test_a_closed_pipe_ends_quietly(data_dir):
    p = subprocess.Popen([sys.executable, "-m", "vpure", "run", str(data_dir / "vtest.avi"), *RUN],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first = p.stdout.readline()
    p.stdout.close()  # `| head -1`
    err = p.stderr.read()
    assert p.wait(timeout=300) == 141
    assert json.loads(first)["clip"] == 0
    assert "Traceback" not in err and "BrokenPipe" not in err, err


def test_appending_after_a_torn_line_starts_a_fresh_line_and_runs_are_told_apart(tmp_path, data_dir):
    path = tmp_path / "r.jsonl"
    path.write_text('{"clip": 0, "route": "cle')  # a run killed mid-write
    for _ in range(2):
        assert main(["run", str(data_dir / "carphone.mp4"), *RUN, "--frame-step", "4", "--out", str(path)]) == 0
    lines = path.read_text().splitlines()
    assert lines[0] == '{"clip": 0, "route": "cle'
    records = [json.loads(line) for line in lines[1:]]
    runs = [r["run"] for r in records]
    assert len(set(runs)) == 2 and runs == sorted(runs, key=runs.index)


def test_a_failed_write_cuts_its_own_partial_line(tmp_path, monkeypatch):
    path = tmp_path / "r.jsonl"
    sink = RecordSink.append_to(path)
    sink.write('{"a": 1}\n')
    real_write = os.write

    def half_then_full(fd, data):
        if fd != sink.fd:
            return real_write(fd, data)
        if len(data) > 4:
            return real_write(fd, data[:4])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "write", half_then_full)
    with pytest.raises(OutputError, match="the disk is full"):
        sink.write('{"b": 2}\n')
    monkeypatch.undo()
    sink.close()
    assert path.read_text() == '{"a": 1}\n'
    with pytest.raises(ConfigError, match="is a folder"):
        RecordSink.append_to(tmp_path)
