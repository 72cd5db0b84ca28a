"""The lean runtime on real footage with tiny models: windows, records, robustness, flow reuse."""

from __future__ import annotations

import io
import shutil
import subprocess
import json

import cv2
import numpy as np
import pytest
import torch

from vpure.runtime.detect import DetectionConfig
from vpure.runtime.errors import InputError
from vpure.runtime.flow import DISFlow
from vpure.runtime.frame_caches import CachedFlow, CachedFrameLogits
from vpure.runtime.runner import Components, Runner, RunConfig, load_components
from vpure.runtime.shield import ShieldConfig
from vpure.runtime.stream import StreamConfig, Windows, Frame, window_count

TINY = RunConfig(models="tiny", flow="dis", window=8, stride=4)


@pytest.fixture(scope="module")
def tiny_components():
    return load_components(TINY)


def _run(source, cfg, comps):
    out = io.StringIO()
    summary = Runner(cfg, comps).run(source, out, progress=False)
    return summary, [json.loads(line) for line in out.getvalue().splitlines()]


class Constant(torch.nn.Module):
    """A frame classifier that always says class 0: alpha = 0, the clean route."""

    def forward(self, frames):
        b, _, t = frames.shape[:3]
        return torch.nn.functional.one_hot(torch.zeros(t, dtype=torch.long), 5).float().expand(b, t, 5).clone()


class Alternating(torch.nn.Module):
    """A frame classifier whose labels flip every frame: alpha = 1, the dense route. It labels
    by position in the call, not per frame, so runs using it keep labelling per window
    (``gate_ahead=False``)."""

    def forward(self, frames):
        b, _, t = frames.shape[:3]
        labels = torch.arange(t) % 2
        return torch.nn.functional.one_hot(labels, 5).float().expand(b, t, 5).clone()


@pytest.mark.parametrize("name, step", [("carphone.mp4", 1), ("vtest.avi", 8)])
def test_records_follow_the_windowing_arithmetic(name, step, data_dir, tiny_components):
    # gate_ahead off: labels taken while the decode queue happens to be empty would add
    # trailing frames to the count (test_frames_labelled_while_waiting_... covers them)
    cfg = TINY.replace(stream=StreamConfig(frame_step=step), gate_ahead=False)
    comps = Components(**{**tiny_components.__dict__, "frame_classifier": Constant()})  # routing is not the point
    summary, records = _run(data_dir / name, cfg, comps)
    kept = summary.stream["kept"]
    assert kept == -(-summary.stream["decoded"] // step)
    assert len(records) == summary.clips == window_count(kept, cfg.window, cfg.stride) > 0
    for i, r in enumerate(records):
        assert r["clip"] == i and r["frames"] == [i * cfg.stride, i * cfg.stride + cfg.window - 1]
        assert r["route"] in ("clean", "sparse", "dense") and 0.0 <= r["alpha"] <= 1.0
        assert r["ms"]["total"] > 0 and "detect" in r["ms"] and any(k.endswith("recognize") for k in r["ms"])
    times = [r["start_time_s"] for r in records]
    assert times == sorted(times) and times[0] == 0.0
    # each frame is classified once: a whole first window, then the stride's new frames
    assert summary.frame_labels["computed"] == cfg.window + cfg.stride * (summary.clips - 1)
    assert summary.stream["decode_errors"] == 0 and summary.stream["ended_by"] == "end of input"


def test_dense_route_reuses_flow_across_overlapping_windows(data_dir, tiny_components):
    comps = Components(**{**tiny_components.__dict__, "frame_classifier": Alternating()})
    cfg = TINY.replace(stream=StreamConfig(frame_step=6), gate_ahead=False)
    summary, records = _run(data_dir / "carphone.mp4", cfg, comps)
    assert summary.clips >= 3 and all(r["route"] == "dense" for r in records)
    assert all(len(r["votes"]) == 7 and "videopure.unet" in r["ms"] for r in records)
    # windows of 8 every 4 frames: after the first, half of each window's 7 pairs are reused
    assert summary.flow_pairs["reused"] == 3 * (summary.clips - 1)
    assert summary.flow_pairs["computed"] == 7 + 4 * (summary.clips - 1)


def test_cached_flow_equals_recomputation(data_dir):
    from vpure.runtime.video import read_frames

    arr = read_frames(data_dir / "vtest.avi", 20, 64)
    base = DISFlow("medium")
    cached = CachedFlow(base)
    win = Windows(8, 3, 64)
    n = 0
    for i, rgb in enumerate(arr):
        w = win.push(Frame(i, i / 25, rgb))
        if w is None:
            continue
        ids, _, clip = w
        cached.set_window(ids)
        assert torch.equal(cached(clip), base(clip.clone()))
        n += 1
    assert n == window_count(20, 8, 3) and cached.reused > 0


@pytest.mark.parametrize("frames_per_call", [0, 3])
def test_cached_frame_logits_equal_recomputation(frames_per_call, data_dir, tiny_components):
    from vpure.runtime.detect import Detector
    from vpure.runtime.video import read_frames

    arr = read_frames(data_dir / "vtest.avi", 20, 64)
    base = tiny_components.frame_classifier
    cached = CachedFrameLogits(base)
    cfg = DetectionConfig(frames_per_call=frames_per_call)
    plain, reusing = Detector(base, cfg), Detector(cached, cfg)
    win = Windows(8, 3, 64)
    n = 0
    for i, rgb in enumerate(arr):
        w = win.push(Frame(i, i / 25, rgb))
        if w is None:
            continue
        ids, _, clip = w
        cached.set_window(ids)
        with torch.inference_mode():
            a, b = cached(clip), base(clip.clone())
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        cached.set_window(ids)  # the same window again, now through the Detector (chunked or not)
        assert torch.equal(reusing.frame_labels(clip), plain.frame_labels(clip.clone()))
        n += 1
    assert n == window_count(20, 8, 3)
    assert cached.computed == 8 + 3 * (n - 1) and cached.reused > cached.computed  # each frame once
    with torch.inference_mode():  # a batch of clips is not a window: computed plainly
        assert cached(torch.cat([clip, clip])).shape[:2] == (2, 8)


def test_truncated_video_keeps_what_decoded(tmp_path, data_dir, tiny_components):
    data = (data_dir / "carphone.mp4").read_bytes()
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(data[: len(data) // 2])
    # An MP4 whose index sits at the end cannot be opened once cut (refused, nothing to
    # lose); one indexed up front decodes up to the cut. Both are documented outcomes.
    try:
        summary, records = _run(cut, TINY, tiny_components)
    except InputError as e:
        assert "cannot open" in str(e)
    else:
        assert len(records) == summary.clips == window_count(summary.stream["kept"], 8, 4)
    avi = (data_dir / "vtest.avi").read_bytes()
    cut_avi = tmp_path / "cut.avi"
    cut_avi.write_bytes(avi[: len(avi) // 3])
    comps = Components(**{**tiny_components.__dict__, "frame_classifier": Constant()})
    summary, records = _run(cut_avi, TINY.replace(stream=StreamConfig(frame_step=4)), comps)
    assert 0 < summary.stream["decoded"] < 795 and len(records) == window_count(summary.stream["kept"], 8, 4) > 0


def test_random_bytes_are_refused_clearly(tmp_path, tiny_components):
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(np.random.default_rng(0).integers(0, 256, 50_000, dtype=np.uint8).tobytes())
    with pytest.raises(InputError, match="cannot open .*junk.mp4|no video stream"):
        _run(junk, TINY, tiny_components)
    with pytest.raises(InputError, match="neither a file"):
        _run(tmp_path / "missing.mp4", TINY, tiny_components)


def test_cli_exit_code_and_message_for_junk(tmp_path, capsys):
    from vpure.runtime.cli import main

    junk = tmp_path / "junk.avi"
    junk.write_bytes(b"\x00" * 1000)
    assert main(["run", str(junk), "--tiny"]) == 2
    assert "vpure run: error: cannot open" in capsys.readouterr().err


def test_frames_of_another_size_and_unreadable_images(tmp_path, data_dir, tiny_components):
    from vpure.runtime.video import read_frames

    arr = read_frames(data_dir / "vtest.avi", 12, 96)
    for i, rgb in enumerate(arr):
        img = cv2.resize(rgb, (120, 80)) if i == 5 else rgb
        cv2.imwrite(str(tmp_path / f"{i:04d}.png"), cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
    (tmp_path / "0006b.png").write_bytes(b"not a png")
    summary, records = _run(tmp_path, TINY, tiny_components)
    # one odd frame is two changes of size (to 120x80 and back), each logged once and counted
    assert summary.stream["size_changes"] == 2 and summary.stream["decode_errors"] == 1
    assert summary.stream["kept"] == 12 and len(records) == window_count(12, 8, 4)


def test_a_failing_engine_costs_one_clip_then_stops_after_too_many(data_dir, tiny_components):
    calls = {"n": 0}
    rec = tiny_components.recognizer

    def flaky(x):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("engine exploded")
        return rec(x)

    comps = Components(**{**tiny_components.__dict__, "recognizer": flaky})
    summary, records = _run(data_dir / "carphone.mp4", TINY, comps)
    assert summary.failed == 1 and "engine exploded" in records[1]["error"]
    assert summary.clips == len(records) - 1

    def broken(x):
        raise RuntimeError("engine gone")

    comps = Components(**{**tiny_components.__dict__, "recognizer": broken})
    summary, records = _run(data_dir / "carphone.mp4", TINY.replace(max_consecutive_failures=3), comps)
    assert summary.failed == 3 and len(records) == 3 and "3 consecutive clip failures" in summary.stopped


def test_ctrl_c_ends_cleanly_with_the_summary(data_dir, tiny_components):
    calls = {"n": 0}
    rec = tiny_components.recognizer

    def interrupted(x):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return rec(x)

    comps = Components(**{**tiny_components.__dict__, "recognizer": interrupted})
    summary, records = _run(data_dir / "carphone.mp4", TINY, comps)
    assert summary.interrupted and summary.clips == 2 and len(records) == 2
    assert "Ctrl-C" in summary.text()


def test_run_config_round_trips_through_toml(tmp_path):
    cfg = TINY.replace(shield=ShieldConfig(detection=DetectionConfig(gamma1=0.1, gamma2=0.2)))
    cfg.save(tmp_path / "run.toml")
    assert RunConfig.load(tmp_path / "run.toml") == cfg


def test_cli_run_writes_lines_and_summary(tmp_path, data_dir, capsys):
    from vpure.runtime.cli import main

    out = tmp_path / "records.jsonl"
    assert main(["run", str(data_dir / "carphone.mp4"), "--tiny", "--flow", "dis", "--window", "8", "--stride", "8",
                 "--out", str(out)]) == 0
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(lines) == window_count(120, 8, 8)
    summary = json.loads(capsys.readouterr().out)["summary"]
    assert summary["clips"] == len(lines) and summary["latency_ms"]["p50"] > 0


def test_an_input_shorter_than_a_window_says_so_and_writes_strict_json(tmp_path, data_dir, capsys, caplog):
    from vpure.runtime.cli import main
    from vpure.runtime.video import read_frames

    for i, rgb in enumerate(read_frames(data_dir / "carphone.mp4", 5, 64)):
        cv2.imwrite(str(tmp_path / f"{i:04d}.png"), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    out = tmp_path / "records.jsonl"
    assert main(["run", str(tmp_path), "--tiny", "--flow", "dis", "--window", "8", "--out", str(out)]) == 0
    assert out.read_text() == ""
    captured = capsys.readouterr()
    # Strict JSON (RFC 8259 has no NaN): an empty latency list is null, not NaN.
    line = json.loads(captured.out, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))
    assert line["summary"]["clips"] == 0 and line["summary"]["latency_ms"] == {"p50": None, "p90": None, "p99": None}
    assert "no clip ran" in captured.err
    assert "fewer than one window of 8" in caplog.text


def test_frames_labelled_while_waiting_are_reused_and_change_no_record(monkeypatch, data_dir, tiny_components):
    """On a live source the runner labels each frame for the gate as it arrives (the decode
    queue is empty); the records are those of labelling per window, and every kept frame
    goes through the frame classifier exactly once."""
    from vpure.runtime.stream import DecodeThread

    cfg = TINY.replace(stream=StreamConfig(frame_step=3))
    _, per_window = _run(data_dir / "carphone.mp4", cfg.replace(gate_ahead=False), tiny_components)
    monkeypatch.setattr(DecodeThread, "waiting", lambda self: True)  # every frame arrives to an idle runner
    summary, live = _run(data_dir / "carphone.mp4", cfg, tiny_components)

    def decisions(records):
        return [(r["frames"], r["route"], r["alpha"], r["exception_frames"], r["label"]) for r in records]

    assert len(live) == summary.clips >= 3 and decisions(live) == decisions(per_window)
    kept, t = summary.stream["kept"], cfg.window
    # each window's last frame is labelled by the window itself, every other one ahead
    assert summary.frame_labels == {"computed": kept, "reused": summary.clips * (t - 1), "ahead": kept - summary.clips}


def test_a_classifier_that_refuses_single_frames_falls_back_to_labelling_per_window(monkeypatch, caplog, data_dir,
                                                                                      tiny_components):
    from vpure.runtime.stream import DecodeThread

    class NoSingleFrames(Constant):  # an engine whose profile starts at 2 frames, say
        calls = 0

        def forward(self, frames):
            if frames.shape[2] == 1:
                NoSingleFrames.calls += 1
                raise RuntimeError("profile needs T >= 2")
            return super().forward(frames)

    comps = Components(**{**tiny_components.__dict__, "frame_classifier": NoSingleFrames()})
    monkeypatch.setattr(DecodeThread, "waiting", lambda self: True)
    with caplog.at_level("WARNING", logger="vpure"):
        summary, records = _run(data_dir / "carphone.mp4", TINY.replace(stream=StreamConfig(frame_step=3)), comps)
    assert summary.clips == len(records) >= 3 and summary.failed == 0 and all(r["route"] == "clean" for r in records)
    assert NoSingleFrames.calls == 1 and summary.frame_labels["ahead"] == 0  # tried once, then per window
    assert sum("labelling per window" in r.getMessage() for r in caplog.records) == 1


def test_prefilled_logits_equal_the_windows_own(data_dir, tiny_components):
    from vpure.runtime.detect import Detector
    from vpure.runtime.video import read_frames

    arr = read_frames(data_dir / "vtest.avi", 12, 64)
    base = tiny_components.frame_classifier
    cached = CachedFrameLogits(base, frames_per_call=2)
    detector = Detector(cached, DetectionConfig(frame_size=32))  # the prefill goes through the same resize
    win = Windows(8, 4, 64)
    for i, rgb in enumerate(arr):
        w = win.push(Frame(i, i / 25, rgb))
        if w is None:
            ids, frames = win.recent(1)
            assert ids == [i] and frames.shape == (1, 3, 1, 64, 64)
            with torch.inference_mode():
                assert cached.prefill(ids, detector.prepare(frames)) == 1
            continue
        ids, _, clip = w
        torch.testing.assert_close(win.recent(8)[1], clip, rtol=0, atol=0)
        cached.set_window(ids)
        with torch.inference_mode():
            torch.testing.assert_close(cached(detector.prepare(clip)), base(detector.prepare(clip.clone())),
                                       rtol=1e-5, atol=1e-5)
    assert cached.ahead == 12 - 2 and cached.computed == 12  # windows end at frames 7 and 11
    cached.reset()
    assert (cached.computed, cached.reused, cached.ahead) == (0, 0, 0)


def test_realtime_streams_hand_frames_over_at_their_presentation_times(monkeypatch, data_dir):
    """A file played as a live camera: the decode thread waits for each frame's time (a
    fake clock here, so the test takes no wall time)."""
    import threading

    from vpure.runtime import stream

    clock = {"t": 100.0}
    waits: list[float] = []

    class FakeStop(threading.Event):
        def wait(self, timeout=None):
            waits.append(timeout)
            clock["t"] += timeout
            return False

    monkeypatch.setattr(stream.time, "monotonic", lambda: clock["t"])
    d = stream.DecodeThread(data_dir / "carphone.mp4", StreamConfig(realtime=True, frame_step=10))
    d._stop = FakeStop()
    got = list(d)
    assert len(got) > 5
    times = [f.time_s for f in got]
    assert len(waits) == len(got) - 1  # the first frame is handed over at once
    np.testing.assert_allclose(np.cumsum(waits), np.array(times[1:]) - times[0], atol=1e-6)
    free = stream.DecodeThread(data_dir / "carphone.mp4", StreamConfig(frame_step=10))
    free._stop = FakeStop()
    waits.clear()
    assert [f.time_s for f in free] == times and waits == []


def test_clean_route_benchmark_checks_labels_and_writes_its_rows(tmp_path):
    from vpure.lab.bench_e2e import bench_clean_route

    from vpure.runtime.precision import native_bf16

    rows = bench_clean_route(iters=1, csv_path=tmp_path / "r.csv")
    # one run per recogniser precision: fp32 with the gate at fp32 (and bf16), then bf16 with a bf16 gate
    refs = ["recogniser alone (ref)"] + ["recogniser alone, bf16 (ref)"] * native_bf16()
    assert [r.case for r in rows if r.parity == "reference"] == refs
    assert len(rows) == 1 + 3 + (1 + 3 + 3) * native_bf16()
    assert all(r.parity in ("reference", "same label") for r in rows)
    assert all(r.p50_ms > 0 for r in rows)
    assert len((tmp_path / "r.csv").read_text().splitlines()) == 1 + len(rows)


def test_interleaved_benchmark_times_every_case_per_round_and_skips_wrong_ones(tmp_path):
    from vpure.lab import timing as benchmark

    calls: list[str] = []

    def case(name, value):
        def fn():
            calls.append(name)
            return torch.tensor([value])
        return fn

    def parity(out, ref):
        assert torch.equal(out, ref), "values differ"
        return "same"

    rows = benchmark.run("g", "c", benchmark.Case("ref", case("r", 1)),
                         [benchmark.Case("a", case("a", 1), parity), benchmark.Case("bad", case("b", 2), parity)],
                         csv_path=tmp_path / "r.csv", interleave=True, warmup=1, min_iters=3, min_time_s=0.0)
    assert [r.case for r in rows] == ["ref (ref)", "a", "bad"]
    assert rows[1].parity == "same" and rows[1].n == 3 and rows[2].parity.startswith("FAIL") and rows[2].n == 0
    # reference output, two parity checks, one warm-up each, then rounds of (ref, a)
    assert calls == ["r", "a", "b", "r", "a"] + ["r", "a"] * 3
    assert rows[2].parity == "FAIL: values differ"
    assert len((tmp_path / "r.csv").read_text().splitlines()) == 4


@pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")
def test_benchmark_rows_name_a_dirty_checkout(tmp_path):
    """A row measured on uncommitted code says so; result files alone do not count."""
    from vpure.lab.timing import git_commit

    def git(*args):
        subprocess.run(["git", "-c", "user.email=t@t", "-c", "user.name=t", *args], cwd=tmp_path, check=True,
                       capture_output=True)

    (tmp_path / "benchmarks" / "results").mkdir(parents=True)
    (tmp_path / "code.py").write_text("x = 1\n")
    (tmp_path / "benchmarks" / "results" / "results.csv").write_text("a\n")
    git("init", "-q")
    git("add", ".")
    git("commit", "-q", "-m", "c")
    clean = git_commit(tmp_path)
    assert clean != "unknown" and not clean.endswith("+dirty")
    (tmp_path / "benchmarks" / "results" / "results.csv").write_text("a\nb\n")
    assert git_commit(tmp_path / "benchmarks") == clean  # a results row appended: still clean
    (tmp_path / "code.py").write_text("x = 2\n")
    assert git_commit(tmp_path) == clean + "+dirty"


def test_deployment_scale_clean_route_benchmark_runs(tmp_path):
    from vpure.lab.bench_e2e import bench_clean_route_deploy

    from vpure.runtime.models.quantized import int8_ops_available

    rows = bench_clean_route_deploy(iters=1, frames=8, size=64, gate_size=32, csv_path=tmp_path / "r.csv",
                                    precisions=("fp32", "int8", "fp16"))  # fp16 is not a CPU precision: left out
    int8 = int8_ops_available()  # an int8 gate in front of the fp32 recogniser, where oneDNN has int8
    assert [r.parity for r in rows[1:]] == ["same label"] * (3 + 3 * int8)
    assert [r.case.endswith(", gate int8") for r in rows[1:]] == [False] * 3 + [True] * (3 * int8)


def test_emulated_bf16_is_skipped_by_the_benchmark_and_warned_by_the_torch_backend(monkeypatch, caplog):
    """On a CPU without native bf16, PyTorch emulates it (an order of magnitude slower than
    fp32): `vpure bench` leaves the case out saying why, and a bf16 torch component warns."""
    import logging

    from vpure.lab import bench_e2e as endtoend

    from vpure.runtime import presets, registry
    from vpure.runtime.backends import torch_backend
    from vpure.runtime.precision import Precision

    monkeypatch.setattr(endtoend, "native_bf16", lambda: False)
    monkeypatch.setattr(torch_backend, "native_bf16", lambda: False)
    m = presets.build("tiny")
    with caplog.at_level(logging.WARNING, logger="vpure"):
        cases = endtoend.cases_for("tiny", m, ["torch"], ["fp32", "bf16"], "cpu", None)
    assert [c[0] for c in cases] == ["torch fp32"]
    assert "torch bf16 skipped" in caplog.text and "no native bf16" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="vpure"):
        assert endtoend.clean_route_precisions(("fp32", "bf16")) == ("fp32",)
    assert "clean route in bf16 skipped" in caplog.text
    caplog.clear()
    spec = registry.get("frame_classifier")
    with caplog.at_level(logging.WARNING, logger="vpure"):
        torch_backend.TorchBackend(spec, spec.build(), Precision.BF16)
    assert "runs in bf16" in caplog.text
    monkeypatch.setattr(torch_backend, "native_bf16", lambda: True)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="vpure"):
        torch_backend.TorchBackend(spec, spec.build(), Precision.BF16)
    assert caplog.text == ""
